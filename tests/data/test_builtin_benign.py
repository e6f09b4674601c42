"""Tests for the built-in benign pair generator.

The correctness checks recompute every answer independently of the generator's own code:
they parse the prompt, solve the task here, and compare with the response.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import pytest

from suretrap.data.builtin_benign import BENIGN_FAMILIES, MAX_BENIGN, builtin_benign
from suretrap.data.records import Pair
from suretrap.errors import DataError


@pytest.fixture(scope="module")
def big() -> list[Pair]:
    return builtin_benign(20_000, seed=0)


# ---- set-level properties ------------------------------------------------------------


def test_twenty_thousand_distinct_prompts_fast() -> None:
    start = time.perf_counter()
    pairs = builtin_benign(20_000, seed=7)
    elapsed = time.perf_counter() - start
    assert len(pairs) == 20_000
    assert len({p.prompt for p in pairs}) == 20_000
    assert all(isinstance(p, Pair) and p.family in BENIGN_FAMILIES for p in pairs)
    assert elapsed < 2.0, f"20,000 pairs took {elapsed:.2f}s"


def test_prefix_stable(big: list[Pair]) -> None:
    for k in (0, 1, 7, 500, 5_000):
        assert builtin_benign(k, seed=0) == big[:k]
    assert builtin_benign(300, seed=5) == builtin_benign(1_200, seed=5)[:300]


def test_deterministic() -> None:
    assert builtin_benign(800, seed=3) == builtin_benign(800, seed=3)


def test_seed_changes_order_and_instances() -> None:
    a, b = builtin_benign(300, seed=0), builtin_benign(300, seed=1)
    assert [p.family for p in a] != [p.family for p in b]
    assert len({p.prompt for p in a} & {p.prompt for p in b}) < 150


def test_families_are_interleaved(big: list[Pair]) -> None:
    assert len(BENIGN_FAMILIES) >= 10
    assert len(set(BENIGN_FAMILIES)) == len(BENIGN_FAMILIES)
    assert len(Counter(p.family for p in big[:1_000])) >= 10
    assert len({p.family for p in big[:100]}) >= 8
    longest = run = 1
    for prev, cur in zip(big[:1_000], big[1:1_000], strict=False):
        run = run + 1 if cur.family == prev.family else 1
        longest = max(longest, run)
    assert longest <= 6, "families come in blocks"


def test_supply_limit() -> None:
    assert MAX_BENIGN >= 20_000
    with pytest.raises(DataError, match=str(MAX_BENIGN)) as info:
        builtin_benign(MAX_BENIGN + 1)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError):
        builtin_benign(-1)


def test_full_supply_is_reachable() -> None:
    pairs = builtin_benign(MAX_BENIGN, seed=11)
    assert len({p.prompt for p in pairs}) == MAX_BENIGN
    assert set(Counter(p.family for p in pairs)) == set(BENIGN_FAMILIES)


def test_answers_are_short_sentences(big: list[Pair]) -> None:
    for p in big:
        assert p.prompt.strip() and p.response.strip()
        assert 3 <= len(p.response.split()) <= 40, p
        assert len(p.prompt.split()) <= 60, p


# ---- independent answer checks, one per family ----------------------------------------


def _quoted(text: str) -> list[str]:
    return re.findall(r'"([^"]*)"', text)


def check_arithmetic(p: Pair) -> None:
    m = re.search(r"(\d+) ([+\-×]) (\d+) = (-?\d+)\.$", p.response)
    assert m, p
    a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
    assert r == {"+": a + b, "-": a - b, "×": a * b}[op]
    assert sorted(int(x) for x in re.findall(r"\d+", p.prompt)) == sorted((a, b))
    words = p.prompt.lower()
    if op == "+":
        assert re.search(r"\+|plus|add|sum", words)
    elif op == "-":
        assert re.search(r" - |minus|subtract|away", words)
        # "Subtract b from a" / "take b away from a" name the numbers in reverse order
        first = int(re.findall(r"\d+", p.prompt)[0])
        assert first == (b if re.search(r"subtract|away", words) else a)
    else:
        assert re.search(r"\*|times|multipl|product", words)


_UNIT_SIZE = {  # in mm, g, ml, s and inches
    "kilometer": 1_000_000,
    "meter": 1_000,
    "centimeter": 10,
    "millimeter": 1,
    "kilogram": 1_000,
    "gram": 1,
    "liter": 1_000,
    "milliliter": 1,
    "week": 7 * 24 * 3600,
    "day": 24 * 3600,
    "hour": 3600,
    "minute": 60,
    "second": 1,
    "yard": 36,
    "foot": 12,
    "inch": 1,
}
_UNIT_SINGULAR = {"feet": "foot", "inches": "inch"}


def _unit(word: str) -> str:
    return _UNIT_SINGULAR.get(word, word if word in _UNIT_SIZE else word.removesuffix("s"))


def check_unit_conversion(p: Pair) -> None:
    m = re.fullmatch(r"([\d.]+) (\w+) (?:=|is) ([\d.]+) (\w+)\.", p.response)
    assert m, p
    v, src, r, dst = Fraction(m[1]), _unit(m[2]), Fraction(m[3]), _unit(m[4])
    assert v * _UNIT_SIZE[src] == r * _UNIT_SIZE[dst], p
    assert f"{m[1]} {m[2]}" in p.prompt
    assert (m[1] == "1") == (m[2] in _UNIT_SIZE)  # singular only for exactly one


def check_reverse_word(p: Pair) -> None:
    (word,) = _quoted(p.prompt)
    assert _quoted(p.response) == [word, "".join(reversed(word))]


def check_letter_case(p: Pair) -> None:
    (source,) = _quoted(p.prompt)
    (result,) = _quoted(p.response)
    text = p.prompt.lower()
    if "uppercase" in text or "capital letters" in text:
        assert result == "".join(ch.upper() for ch in source)
    elif "lowercase" in text:
        assert result == "".join(ch.lower() for ch in source)
    else:
        assert "title case" in text or "each word" in text
        assert result == " ".join(w[:1].upper() + w[1:].lower() for w in source.split())
    assert result != source


def check_letter_count(p: Pair) -> None:
    quoted = _quoted(p.prompt)
    if "vowel" in p.prompt:
        (word,) = quoted
        vowels = [ch for ch in word if ch in "aeiou"]
        n = len(vowels)
        expected = f'There {"is" if n == 1 else "are"} {n} vowel{"" if n == 1 else "s"} in "{word}"'
        assert p.response == f"{expected}: {', '.join(vowels)}.", p
    elif len(quoted) == 2:  # occurrences of one letter
        letter = re.search(r'letter "(\w)"', p.prompt)[1]
        (word,) = [q for q in quoted if q != letter]
        n = word.count(letter)
        spoken = {1: "once", 2: "twice"}.get(n, f"{n} times")
        assert p.response == f'The letter "{letter}" appears {spoken} in "{word}".', p
        assert n >= 1
    else:
        (word,) = quoted
        assert p.response == f'The word "{word}" has {len(word)} letters.', p


def check_sorting(p: Pair) -> None:
    items = p.prompt.split(": ", 1)[1].removesuffix(".").split(", ")
    head, tail = p.response.split(": ", 1)
    result = tail.removesuffix(".").split(", ")
    numeric = all(x.isdigit() for x in items)
    descending = head.startswith(("From largest", "In reverse"))
    assert result == sorted(items, key=int if numeric else str, reverse=descending)
    cues = ("descending", "decreasing", "largest to", "reverse", "Z to A")
    assert any(cue in p.prompt for cue in cues) == descending, p


def check_word_count(p: Pair) -> None:
    (sentence,) = _quoted(p.prompt)
    assert f"has {len(sentence.split())} words" in p.response


_CAPITALS_SPOT = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Egypt": "Cairo",
    "Brazil": "Brasília",
    "Kenya": "Nairobi",
}


def check_capitals(p: Pair) -> None:
    for country, capital in _CAPITALS_SPOT.items():
        if re.search(rf"\b{country}\b", p.prompt) or re.search(rf"\b{capital}\b", p.prompt):
            assert f"{capital} is the capital of {country}" in p.response or (
                f"The capital of {country} is {capital}." == p.response
            ), p
    assert "capital" in p.prompt and "capital" in p.response


_ELEMENT_SPOT = {"gold": ("Au", 79), "iron": ("Fe", 26), "sodium": ("Na", 11),
                 "oxygen": ("O", 8), "silver": ("Ag", 47), "potassium": ("K", 19),
                 "lead": ("Pb", 82), "carbon": ("C", 6)}  # fmt: skip


def check_chemical_elements(p: Pair) -> None:
    for name, (symbol, number) in _ELEMENT_SPOT.items():
        if re.search(rf"\b({name}|{symbol}|{number})\b[?.]", p.prompt):
            assert name in p.response, p
            assert symbol in p.response or str(number) in p.response, p
            if "symbol" in p.prompt:
                assert re.search(rf"\b{symbol}\b", p.response), p
            else:
                assert re.search(rf"\b{number}\b", p.response), p


_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def check_weekdays(p: Pair) -> None:
    k = int(re.search(r"(\d+) days?", p.prompt)[1])
    (start,) = [d for d in _DAYS if d in p.prompt]
    sign = -1 if ("before" in p.prompt or " ago" in p.prompt) else 1
    expected = _DAYS[(_DAYS.index(start) + sign * k) % 7]
    assert p.response.endswith(f" is {expected}."), p


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def check_even_odd_prime(p: Pair) -> None:
    n = int(re.search(r"\d+", p.prompt)[0])
    if "prime" in p.prompt:
        assert p.response.startswith("Yes" if _is_prime(n) else "No"), p
        m = re.search(r"= (\d+) × (\d+)\.", p.response)
        if m:
            assert int(m[1]) * int(m[2]) == n and int(m[1]) > 1 and int(m[2]) > 1
    else:
        assert p.response.startswith(f"{n} is {'even' if n % 2 == 0 else 'odd'}"), p


def check_rounding(p: Pair) -> None:
    m = re.fullmatch(r"([\d.]+) rounded to (.+) is ([\d.]+)\.", p.response)
    assert m and m[1] in p.prompt and m[2] in p.prompt, p
    x, unit, r = Decimal(m[1]), m[2], m[3]
    step = {
        "the nearest whole number": Decimal(1),
        "one decimal place": Decimal("0.1"),
        "the nearest ten": Decimal(10),
        "the nearest hundred": Decimal(100),
    }[unit]
    expected = (x / step).quantize(Decimal(1), rounding=ROUND_HALF_UP) * step
    assert Decimal(r) == expected and (x / step) % 1 != Decimal("0.5"), p


def check_number_comparison(p: Pair) -> None:
    a, b = re.search(r"(\d+(?:\.\d+)?) or (\d+(?:\.\d+)?)\?", p.prompt).groups()
    m = re.fullmatch(r"([\d.]+) is (larger|smaller) than ([\d.]+)\.", p.response)
    assert m and {m[1], m[3]} == {a, b}, p
    pick = max if m[2] == "larger" else min
    assert m[1] == pick(a, b, key=Decimal)
    assert (m[2] == "larger") == ("larger" in p.prompt or "bigger" in p.prompt)


def check_python_output(p: Pair) -> None:
    (code,) = re.findall(r"`([^`]+)`", p.prompt)
    (claimed,) = re.findall(r"`([^`]*)`", p.response)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})  # generated one-liners only: print(...) of literals
    assert out.getvalue() == claimed + "\n", p


_IRREGULAR = {"eat": "ate", "write": "wrote", "drink": "drank", "see": "saw", "buy": "bought",
              "go": "went", "sing": "sang", "teach": "taught", "make": "made", "take": "took",
              "bring": "brought", "catch": "caught", "swim": "swam", "build": "built",
              "draw": "drew", "ride": "rode", "fly": "flew", "find": "found", "feed": "fed",
              "tell": "told", "send": "sent", "win": "won", "drive": "drove",
              "speak": "spoke", "throw": "threw"}  # fmt: skip


def _past(present: str, third_person: bool) -> str:
    base = present
    if third_person:
        if present.endswith("ies"):
            base = present[:-3] + "y"
        elif present.endswith(("ches", "shes", "xes", "oes")):
            base = present[:-2]
        else:
            base = present[:-1]
    if base in _IRREGULAR:
        return _IRREGULAR[base]
    if base.endswith("e"):
        return base + "d"
    if base.endswith("y") and base[-2] not in "aeiou":
        return base[:-1] + "ied"
    return base + "ed"


def check_past_tense(p: Pair) -> None:
    (before,) = _quoted(p.prompt)
    (after,) = _quoted(p.response)
    old, new = before.split(), after.split()
    diffs = [i for i, (x, y) in enumerate(zip(old, new, strict=True)) if x != y]
    assert len(diffs) == 1, p
    i = diffs[0]
    subject = " ".join(old[:i])
    third_person = subject not in ("I", "We", "They", "The children", "My parents")
    assert new[i] == _past(old[i], third_person), p


def check_json_format(p: Pair) -> None:
    obj = json.loads(p.response[p.response.index("{") :])
    positions = []
    for key, value in obj.items():
        assert re.search(rf"\b{key}\b", p.prompt), p
        literal = json.dumps(value, ensure_ascii=False)
        assert literal in p.prompt, p
        positions.append(re.search(rf"\b{key}\b", p.prompt).start())
    assert positions == sorted(positions), "keys out of order"


CHECKERS: dict[str, Callable[[Pair], None]] = {
    "arithmetic": check_arithmetic,
    "unit_conversion": check_unit_conversion,
    "reverse_word": check_reverse_word,
    "letter_case": check_letter_case,
    "letter_count": check_letter_count,
    "sorting": check_sorting,
    "word_count": check_word_count,
    "capitals": check_capitals,
    "chemical_elements": check_chemical_elements,
    "weekdays": check_weekdays,
    "even_odd_prime": check_even_odd_prime,
    "rounding": check_rounding,
    "number_comparison": check_number_comparison,
    "python_output": check_python_output,
    "past_tense": check_past_tense,
    "json_format": check_json_format,
}


def test_every_family_has_a_checker() -> None:
    assert set(CHECKERS) == set(BENIGN_FAMILIES)


@pytest.mark.parametrize("family", sorted(CHECKERS))
def test_answers_are_correct(family: str, big: list[Pair]) -> None:
    pairs = [p for p in big if p.family == family]
    assert len(pairs) >= 100
    for p in pairs:
        CHECKERS[family](p)


def test_known_facts_are_present(big: list[Pair]) -> None:
    responses = {p.response for p in big}
    assert "The capital of France is Paris." in responses
    assert "Paris is the capital of France." in responses
    assert "The chemical symbol for gold is Au." in responses
    assert "The atomic number of iron is 26." in responses
