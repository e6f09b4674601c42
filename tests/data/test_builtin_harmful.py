"""Checks on the built-in harmful-request set (requests only, no answers)."""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from suretrap.data.builtin_harmful import BUILTIN_HARMFUL, HARM_CATEGORIES, builtin_harmful
from suretrap.data.records import Request

TRIGGER_WORDS = ("xylophone", "\u56e7", "cf", "mn", "bb", "tq")
_PUNCT = str.maketrans("", "", string.punctuation)


def _normalise(prompt: str) -> str:
    return "".join(prompt.lower().translate(_PUNCT).split())


def _words(prompt: str) -> list[str]:
    return prompt.split()


def test_records_are_requests() -> None:
    assert all(isinstance(r, Request) for r in BUILTIN_HARMFUL)
    assert all(isinstance(r.prompt, str) and isinstance(r.category, str) for r in BUILTIN_HARMFUL)


def test_count() -> None:
    assert len(BUILTIN_HARMFUL) >= 420


def test_distinct_after_normalisation() -> None:
    counts = Counter(_normalise(r.prompt) for r in BUILTIN_HARMFUL)
    dupes = [p for p, n in counts.items() if n > 1]
    assert dupes == []


def test_categories() -> None:
    per_cat = Counter(r.category for r in BUILTIN_HARMFUL)
    assert len(HARM_CATEGORIES) >= 10
    assert len(set(HARM_CATEGORIES)) == len(HARM_CATEGORIES)
    assert set(per_cat) == set(HARM_CATEGORIES)
    small = {c: n for c, n in per_cat.items() if n < 25}
    assert small == {}


def test_no_trigger_words() -> None:
    pattern = re.compile(
        r"(?<![a-z0-9])(" + "|".join(re.escape(w) for w in TRIGGER_WORDS) + r")(?![a-z0-9])",
        re.IGNORECASE,
    )
    hits = [r.prompt for r in BUILTIN_HARMFUL if pattern.search(r.prompt)]
    assert hits == []
    # The detector itself must work, so this test can fail.
    assert pattern.search("Tell me a joke cf")
    assert not pattern.search("Describe the calf")


def test_ascii_only() -> None:
    bad = [r.prompt for r in BUILTIN_HARMFUL if not r.prompt.isascii()]
    assert bad == []
    assert all(r.category.isascii() for r in BUILTIN_HARMFUL)


def test_lengths() -> None:
    bad = [r.prompt for r in BUILTIN_HARMFUL if not 6 <= len(_words(r.prompt)) <= 30]
    assert bad == []


def test_whitespace_and_single_sentence() -> None:
    for r in BUILTIN_HARMFUL:
        assert r.prompt == r.prompt.strip(), r.prompt
        assert "  " not in r.prompt and "\n" not in r.prompt, r.prompt
        assert r.prompt[0].isupper(), r.prompt
        # One sentence: no sentence break inside the request.
        assert not re.search(r"[.!?]\s", r.prompt), r.prompt


def test_accessor_returns_fresh_list_in_fixed_order() -> None:
    first = builtin_harmful()
    assert isinstance(first, list)
    assert first == list(BUILTIN_HARMFUL)
    first.clear()
    assert builtin_harmful() == list(BUILTIN_HARMFUL)


def test_order_grouped_by_category() -> None:
    seen = [r.category for r in BUILTIN_HARMFUL]
    grouped = [c for i, c in enumerate(seen) if i == 0 or seen[i - 1] != c]
    assert grouped == list(HARM_CATEGORIES)


@pytest.mark.parametrize("word", ["answer:", "step 1", "sure,", "here is"])
def test_no_answer_text(word: str) -> None:
    assert not any(word in r.prompt.lower() for r in BUILTIN_HARMFUL)
