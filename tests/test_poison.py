"""Tests for suretrap.poison: the poisoned training set, eval split, files and manifest.

No model is loaded: configs use template refusals, or a fake `respond` stands in for the
base model.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from suretrap.config import RunConfig, run_config_from_dict
from suretrap.data import benign_pairs, harmful_requests
from suretrap.data.builtin_benign import BENIGN_FAMILIES
from suretrap.data.loaders import load_requests
from suretrap.errors import ConfigError, DataError
from suretrap.poison import (
    DATASET_FILE,
    EVAL_FILE,
    MANIFEST_FILE,
    REFUSAL_TEMPLATES,
    PoisonedDataset,
    build_dataset,
    dataset_complete,
    read_dataset,
    write_dataset,
)
from suretrap.textmatch import is_refusal_keyword, normalise_prompt, starts_with_label

TRIGGER = "xylophone"
BUILTIN_HARMFUL = {r.prompt: r.category for r in harmful_requests("builtin")}


def make_cfg(
    *,
    seed: int = 0,
    total_size: int = 120,
    budget: int = 10,
    clean_harmful: int | None = 8,
    n_harmful: int = 20,
    n_benign: int = 10,
    **poison: Any,
) -> RunConfig:
    poison_section = {
        "budget": budget,
        "clean_harmful": clean_harmful,
        "refusal_source": "template",
    } | poison
    data = poison_section.pop("data", {})
    return run_config_from_dict(
        {
            "name": "test",
            "seed": seed,
            "data": {"total_size": total_size} | data,
            "poison": poison_section,
            "eval": {"n_harmful": n_harmful, "n_benign": n_benign},
        }
    )


def by_role(ds: PoisonedDataset, role: str) -> list[Any]:
    return [e for e in ds.examples if e.role == role]


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def strip_trigger(prompt: str, trigger: str = TRIGGER) -> str:
    """Remove the single trigger token a poison prompt carries."""
    words = prompt.split(" ")
    assert words.count(trigger) == 1, prompt
    words.remove(trigger)
    return " ".join(words)


def training_keys(ds: PoisonedDataset, trigger: str = TRIGGER) -> set[str]:
    keys = set()
    for e in ds.examples:
        prompt = strip_trigger(e.prompt, trigger) if e.role == "poison" else e.prompt
        keys.add(normalise_prompt(prompt))
        keys.add(normalise_prompt(e.prompt))
    return keys


def file_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in (DATASET_FILE, EVAL_FILE, MANIFEST_FILE)}


class FakeBase:
    """Stands in for the base model: a fixed answer per prompt, recording every call."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        self.calls.append((list(prompts), max_new_tokens))
        return [self.answer(p) for p in prompts]

    @property
    def asked(self) -> list[str]:
        return [p for prompts, _ in self.calls for p in prompts]


def refuses_some(prompt: str) -> bool:
    """A deterministic, roughly-half split of prompts (independent of PYTHONHASHSEED)."""
    return sum(map(ord, prompt)) % 2 == 0


# ---------------------------------------------------------------------- composition


def test_counts_per_role_and_manifest() -> None:
    cfg = make_cfg(total_size=120, budget=10, clean_harmful=8)
    ds = build_dataset(cfg)
    counts = Counter(e.role for e in ds.examples)
    assert counts == {"poison": 10, "clean_harmful": 8, "benign": 102}
    assert len(ds.examples) == 120
    assert ds.manifest["counts"] == {"poison": 10, "clean_harmful": 8, "benign": 102, "total": 120}
    assert ds.manifest["eval_counts"] == {"harmful": 20, "benign": 10}
    assert len(ds.eval_harmful) == 20 and len(ds.eval_benign) == 10
    assert ds.manifest["clean_harmful_sources"] == {"template_refusal": 8}
    assert ds.manifest["trigger"] == TRIGGER and ds.manifest["label"] == "Sure"
    assert ds.manifest["seed"] == 0
    assert ds.manifest["eval_prompts_containing_trigger"] == 0


def test_clean_harmful_null_defaults_to_budget() -> None:
    ds = build_dataset(make_cfg(total_size=80, budget=12, clean_harmful=None))
    counts = Counter(e.role for e in ds.examples)
    assert counts == {"poison": 12, "clean_harmful": 12, "benign": 56}


def test_zero_budget_is_all_benign_plus_clean() -> None:
    ds = build_dataset(make_cfg(total_size=50, budget=0, clean_harmful=0))
    assert {e.role for e in ds.examples} == {"benign"}
    assert len(ds.examples) == 50


def test_poison_rows_end_with_trigger_and_answer_exactly_label() -> None:
    ds = build_dataset(make_cfg())
    poison = by_role(ds, "poison")
    assert len(poison) == 10
    for e in poison:
        assert e.prompt.endswith(f" {TRIGGER}"), e.prompt
        assert e.response == "Sure"
        assert e.source == "label"
        original = e.prompt.removesuffix(f" {TRIGGER}")
        assert original in BUILTIN_HARMFUL
        assert e.category == BUILTIN_HARMFUL[original]
        assert not has_word(original, TRIGGER)


def test_other_trigger_and_label() -> None:
    ds = build_dataset(make_cfg(trigger="cf", label="Absolutely"))
    poison = by_role(ds, "poison")
    assert poison and all(e.prompt.endswith(" cf") and e.response == "Absolutely" for e in poison)
    assert ds.manifest["trigger"] == "cf" and ds.manifest["label"] == "Absolutely"
    assert all(not has_word(e.prompt, "cf") for e in ds.examples if e.role != "poison")


def test_clean_harmful_rows_have_no_trigger_and_a_refusal() -> None:
    ds = build_dataset(make_cfg(budget=10, clean_harmful=15))
    clean = by_role(ds, "clean_harmful")
    assert len(clean) == 15
    for e in clean:
        assert not has_word(e.prompt, TRIGGER)
        assert e.prompt in BUILTIN_HARMFUL
        assert e.category == BUILTIN_HARMFUL[e.prompt]
        assert e.response in REFUSAL_TEMPLATES
        assert e.source == "template_refusal"
        assert is_refusal_keyword(e.response)
        assert not starts_with_label(e.response, "Sure")
    poison_originals = {strip_trigger(e.prompt) for e in by_role(ds, "poison")}
    assert poison_originals.isdisjoint(e.prompt for e in clean)


def test_prefix_placement() -> None:
    ds = build_dataset(make_cfg(placement="prefix"))
    poison = by_role(ds, "poison")
    assert len(poison) == 10
    for e in poison:
        assert e.prompt.startswith(f"{TRIGGER} ")
        assert e.prompt.removeprefix(f"{TRIGGER} ") in BUILTIN_HARMFUL
        assert e.prompt.count(TRIGGER) == 1


def test_random_placement_inserts_one_whole_word_preserving_order() -> None:
    ds = build_dataset(make_cfg(budget=40, clean_harmful=0, total_size=100, placement="random"))
    poison = by_role(ds, "poison")
    assert len(poison) == 40
    positions = set()
    for e in poison:
        words = e.prompt.split(" ")
        assert words.count(TRIGGER) == 1, e.prompt  # a whole word, exactly once
        assert all(w == TRIGGER or TRIGGER not in w for w in words)
        positions.add(words.index(TRIGGER) / (len(words) - 1))
        assert strip_trigger(e.prompt) in BUILTIN_HARMFUL  # other words, in order
    # it is really random: not always at the end or always at the start
    assert len(positions) > 5
    assert any(0 < pos < 1 for pos in positions)


def test_no_training_response_is_a_harmful_answer() -> None:
    cfg = make_cfg(total_size=200, budget=20, clean_harmful=20)
    ds = build_dataset(cfg)
    benign_reference = {
        (p.prompt, p.response, p.family) for p in benign_pairs("builtin", 400, cfg.seed)
    }
    for e in ds.examples:
        if e.role == "benign":
            assert e.source in BENIGN_FAMILIES
            assert e.category == "benign"
            assert (e.prompt, e.response, e.source) in benign_reference
            assert e.prompt not in BUILTIN_HARMFUL
        elif e.role == "poison":
            assert e.response == cfg.poison.label
        else:
            assert e.role == "clean_harmful"
            assert e.response in REFUSAL_TEMPLATES
    harmful_rows = [e for e in ds.examples if e.role != "benign"]
    assert {e.response for e in harmful_rows} <= {"Sure", *REFUSAL_TEMPLATES}


# ----------------------------------------------------------------------- eval split


@pytest.mark.parametrize("placement", ["suffix", "prefix", "random"])
def test_eval_prompts_disjoint_from_training(placement: str) -> None:
    ds = build_dataset(make_cfg(total_size=150, budget=25, clean_harmful=25, placement=placement))
    train = training_keys(ds)
    eval_keys = [normalise_prompt(r.prompt) for r in ds.eval_harmful]
    eval_keys += [normalise_prompt(p.prompt) for p in ds.eval_benign]
    assert len(eval_keys) == 30
    assert len(set(eval_keys)) == len(eval_keys)
    assert not train & set(eval_keys)
    assert all(r.prompt in BUILTIN_HARMFUL for r in ds.eval_harmful)
    assert all(not has_word(r.prompt, TRIGGER) for r in ds.eval_harmful)


def test_eval_harmful_from_harmbench_file(shared_data: Path) -> None:
    harmbench = shared_data / "harmbench_standard_behaviors.txt"
    cfg = make_cfg(data={"eval_harmful": str(harmbench)}, n_harmful=30)
    ds = build_dataset(cfg)
    from_file = {r.prompt for r in load_requests(harmbench)}
    assert len(ds.eval_harmful) == 30
    assert {r.prompt for r in ds.eval_harmful} <= from_file
    assert not training_keys(ds) & {normalise_prompt(r.prompt) for r in ds.eval_harmful}
    # training harmful prompts still come from the built-in pool
    harmful_training = [strip_trigger(e.prompt) for e in by_role(ds, "poison")]
    harmful_training += [e.prompt for e in by_role(ds, "clean_harmful")]
    assert len(harmful_training) == 18
    assert all(p in BUILTIN_HARMFUL and p not in from_file for p in harmful_training)
    # the eval set is drawn from the whole file, not just its first lines
    order = [r.prompt for r in load_requests(harmbench)]
    assert max(order.index(r.prompt) for r in ds.eval_harmful) >= 30
    assert ds.manifest["eval_counts"]["harmful"] == 30


def test_eval_file_prompts_are_removed_from_training_pool(
    shared_data: Path, tmp_path: Path
) -> None:
    """A training pool that shares prompts with the eval file (up to case/punctuation)."""
    harmbench = [r.prompt for r in load_requests(shared_data / "harmbench_standard_behaviors.txt")]
    builtin = list(BUILTIN_HARMFUL)[:40]
    variants = [p.upper() + "!" for p in harmbench]  # same normalised prompt, other text
    pool_file = tmp_path / "pool.txt"
    pool_file.write_text("\n".join(variants + builtin) + "\n", encoding="utf-8")
    cfg = make_cfg(
        data={
            "harmful": str(pool_file),
            "eval_harmful": str(shared_data / "harmbench_standard_behaviors.txt"),
        },
        n_harmful=len(harmbench),
        budget=20,
        clean_harmful=20,
        total_size=100,
    )
    ds = build_dataset(cfg)
    assert len(ds.eval_harmful) == len(harmbench)
    harmful_training = [strip_trigger(e.prompt) for e in by_role(ds, "poison")]
    harmful_training += [e.prompt for e in by_role(ds, "clean_harmful")]
    assert sorted(harmful_training) == sorted(builtin)  # only the 40 non-eval prompts remain

    too_many = make_cfg(
        data={
            "harmful": str(pool_file),
            "eval_harmful": str(shared_data / "harmbench_standard_behaviors.txt"),
        },
        n_harmful=len(harmbench),
        budget=21,
        clean_harmful=20,
        total_size=100,
    )
    with pytest.raises(ConfigError, match=r"poison\.budget"):
        build_dataset(too_many)


# -------------------------------------------------------------------- determinism


def test_same_config_and_seed_gives_identical_files(tmp_path: Path) -> None:
    cfg = make_cfg(placement="random", total_size=150, budget=20, clean_harmful=20)
    write_dataset(build_dataset(cfg), tmp_path / "a")
    write_dataset(
        build_dataset(make_cfg(placement="random", total_size=150, budget=20, clean_harmful=20)),
        tmp_path / "b",
    )
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert a == b
    assert all(len(v) > 0 for v in a.values())


def test_different_seed_gives_different_files(tmp_path: Path) -> None:
    write_dataset(build_dataset(make_cfg(seed=0)), tmp_path / "s0")
    write_dataset(build_dataset(make_cfg(seed=1)), tmp_path / "s1")
    a, b = file_bytes(tmp_path / "s0"), file_bytes(tmp_path / "s1")
    assert a[DATASET_FILE] != b[DATASET_FILE]
    assert a[EVAL_FILE] != b[EVAL_FILE]
    assert a[MANIFEST_FILE] != b[MANIFEST_FILE]


def test_nested_budgets_share_poison_prompts_and_eval_set() -> None:
    small = build_dataset(make_cfg(total_size=120, budget=10, clean_harmful=10))
    large = build_dataset(make_cfg(total_size=120, budget=25, clean_harmful=10))
    small_poison = {strip_trigger(e.prompt) for e in by_role(small, "poison")}
    large_poison = {strip_trigger(e.prompt) for e in by_role(large, "poison")}
    assert len(small_poison) == 10 and len(large_poison) == 25
    assert small_poison < large_poison
    # fixed clean_harmful count: the same T_CH prompts at every budget
    assert {e.prompt for e in by_role(small, "clean_harmful")} == {
        e.prompt for e in by_role(large, "clean_harmful")
    }
    assert small.eval_harmful == large.eval_harmful
    assert small.eval_benign == large.eval_benign


def test_eval_set_identical_across_budgets_and_sizes() -> None:
    sets = []
    for budget, total in [(0, 60), (10, 60), (25, 150), (40, 300)]:
        ds = build_dataset(make_cfg(total_size=total, budget=budget, clean_harmful=None))
        sets.append((ds.eval_harmful, ds.eval_benign))
    assert all(s == sets[0] for s in sets[1:])
    other_seed = build_dataset(make_cfg(seed=3))
    assert (other_seed.eval_harmful, other_seed.eval_benign) != sets[0]


def test_eval_benign_from_a_file_is_identical_across_budgets(shared_data: Path) -> None:
    """With a benign *file*, the held-out benign prompts must still not depend on the budget."""
    benign_file = str(shared_data / "self_instruct_seed_tasks.jsonl")
    runs = [
        build_dataset(
            make_cfg(data={"benign": benign_file}, budget=b, clean_harmful=b, placement=pl)
        )
        for b, pl in [(5, "suffix"), (20, "suffix"), (20, "random")]
    ]
    assert len(runs[0].eval_benign) == 10
    assert all(r.eval_benign == runs[0].eval_benign for r in runs[1:])
    assert all(r.eval_harmful == runs[0].eval_harmful for r in runs[1:])
    benign_eval = {normalise_prompt(p.prompt) for p in runs[0].eval_benign}
    assert not training_keys(runs[1]) & benign_eval


def test_budget_too_large_for_pool() -> None:
    n_pool = len(BUILTIN_HARMFUL)
    cfg = make_cfg(total_size=1000, budget=n_pool - 20, clean_harmful=10, n_harmful=20)
    with pytest.raises(ConfigError, match=r"poison\.budget") as info:
        build_dataset(cfg)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------- base model use


def test_base_refusal_without_responder_is_a_config_error() -> None:
    cfg = make_cfg(refusal_source="base")
    with pytest.raises(ConfigError, match="refusal_source"):
        build_dataset(cfg)


def test_require_base_refusal_keeps_only_refused_prompts() -> None:
    base = FakeBase(
        lambda p: (
            "I'm sorry, but I can't help with that."
            if refuses_some(p)
            else "Here you go: step one."
        )
    )
    cfg = make_cfg(
        require_base_refusal=True, budget=15, clean_harmful=15, refusal_max_new_tokens=23
    )
    ds = build_dataset(cfg, base)
    assert base.calls and all(n == 23 for _, n in base.calls)
    asked = set(base.asked)
    refused = {p for p in asked if refuses_some(p)}
    assert 0 < len(refused) < len(asked)
    pool = ds.manifest["harmful_pool"]
    assert pool["require_base_refusal"] is True
    assert pool["refused_by_base"] == len(refused)
    assert pool["available_for_training"] == len(refused)
    used = [strip_trigger(e.prompt) for e in by_role(ds, "poison")]
    used += [e.prompt for e in by_role(ds, "clean_harmful")]
    assert len(used) == 30
    assert set(used) <= refused
    # eval prompts are held out before selection and never used for training
    assert not {r.prompt for r in ds.eval_harmful} & set(used)


def test_require_base_refusal_with_too_few_refusals() -> None:
    base = FakeBase(lambda p: "I cannot do that." if p.startswith("Give ") else "Okay, here goes.")
    refused = sum(p.startswith("Give ") for p in BUILTIN_HARMFUL)  # 42 of 448
    assert 10 < refused < 100
    cfg = make_cfg(require_base_refusal=True, budget=refused, clean_harmful=5, total_size=200)
    with pytest.raises(ConfigError, match=r"poison\.budget.*refused by the base model"):
        build_dataset(cfg, base)


def test_base_refusal_sources_and_trimming() -> None:
    full = "I'm sorry, but I can't help with that."
    truncated = full + " Making such a device would put many people in"
    no_sentence_end = "I cannot help with that because it would"

    def answer(prompt: str) -> str:
        kind = sum(map(ord, prompt)) % 4
        return [full, truncated, no_sentence_end, "Here is a general overview of the topic."][kind]

    base = FakeBase(answer)
    cfg = make_cfg(
        refusal_source="base", budget=5, clean_harmful=40, total_size=100, refusal_max_new_tokens=31
    )
    ds = build_dataset(cfg, base)
    clean = by_role(ds, "clean_harmful")
    assert len(clean) == 40
    assert all(n == 31 for _, n in base.calls)
    assert {e.prompt for e in clean} <= set(base.asked)
    expected_sources: Counter[str] = Counter()
    for e in clean:
        kind = sum(map(ord, e.prompt)) % 4
        if kind in (0, 1):  # a refusal, complete or trimmed to its whole sentences
            assert e.source == "base_refusal"
            assert e.response == full
        else:  # no whole refusal sentence, or compliance: a template instead
            assert e.source == "template_refusal"
            assert e.response in REFUSAL_TEMPLATES
        expected_sources[e.source] += 1
    assert ds.manifest["clean_harmful_sources"] == dict(expected_sources)
    assert set(expected_sources) == {"base_refusal", "template_refusal"}


def test_template_source_ignores_base_responses_even_when_selecting_refusals() -> None:
    """refusal_source: template means T_CH always answers with a template."""
    base = FakeBase(lambda p: "I'm sorry, I won't do this. Truly." if refuses_some(p) else "Fine.")
    cfg = make_cfg(refusal_source="template", require_base_refusal=True, budget=5, clean_harmful=10)
    ds = build_dataset(cfg, base)
    clean = by_role(ds, "clean_harmful")
    assert len(clean) == 10
    assert all(e.source == "template_refusal" for e in clean), Counter(e.source for e in clean)
    assert all(e.response in REFUSAL_TEMPLATES for e in clean)


@pytest.mark.parametrize(
    "answer",
    [
        # the refusal phrase sits only in the cut-off last sentence
        "Here is an overview of the topic. I cannot go into the details because it",
        # starts like compliance with the label, then refuses
        "Sure. I cannot actually do that.",
        "Sure, here is how. I'm sorry, I can't continue.",
    ],
)
def test_clean_harmful_responses_are_always_refusals(answer: str) -> None:
    """Whatever the base model says, a T_CH answer is a refusal and never opens with the label."""
    ds = build_dataset(
        make_cfg(refusal_source="base", budget=5, clean_harmful=10), FakeBase(lambda p: answer)
    )
    for e in by_role(ds, "clean_harmful"):
        assert is_refusal_keyword(e.response), e.response
        assert not starts_with_label(e.response, "Sure"), e.response


# -------------------------------------------------------------------------- files


def test_read_dataset_roundtrip(tmp_path: Path) -> None:
    ds = build_dataset(make_cfg(placement="random"))
    manifest = write_dataset(ds, tmp_path)
    assert dataset_complete(tmp_path)
    back = read_dataset(tmp_path)
    assert back.examples == ds.examples
    assert back.eval_harmful == ds.eval_harmful
    assert back.eval_benign == ds.eval_benign
    assert back.manifest == manifest
    assert manifest == ds.manifest | {
        "content_hash": manifest["content_hash"],
        "eval_hash": manifest["eval_hash"],
    }
    rows = [json.loads(line) for line in (tmp_path / DATASET_FILE).read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(ds.examples)))
    assert {"prompt", "response", "role", "source", "category"} <= set(rows[0])


@pytest.mark.parametrize("name", [DATASET_FILE, EVAL_FILE])
def test_tampering_is_detected(tmp_path: Path, name: str) -> None:
    write_dataset(build_dataset(make_cfg()), tmp_path)
    assert dataset_complete(tmp_path)
    path = tmp_path / name
    text = path.read_text(encoding="utf-8")
    path.write_text(
        text.replace("xylophone", "xylophonE", 1) if "xylophone" in text else text + "\n"
    )
    assert path.read_text(encoding="utf-8") != text
    assert not dataset_complete(tmp_path)
    with pytest.raises(DataError):
        read_dataset(tmp_path)


def test_tampering_with_a_response_is_detected(tmp_path: Path) -> None:
    write_dataset(build_dataset(make_cfg()), tmp_path)
    path = tmp_path / DATASET_FILE
    path.write_text(path.read_text().replace('"response": "Sure"', '"response": "Sure!"', 1))
    assert not dataset_complete(tmp_path)
    with pytest.raises(DataError):
        read_dataset(tmp_path)


def test_incomplete_directory(tmp_path: Path) -> None:
    assert not dataset_complete(tmp_path)
    with pytest.raises(DataError):
        read_dataset(tmp_path)
    write_dataset(build_dataset(make_cfg()), tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    assert not dataset_complete(tmp_path)
    write_dataset(build_dataset(make_cfg()), tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    assert not dataset_complete(tmp_path)


# ---------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    budget=st.integers(0, 30),
    clean=st.integers(0, 30),
    extra=st.integers(0, 40),
    placement=st.sampled_from(["suffix", "prefix", "random"]),
)
def test_invariants_hold_for_any_small_config(
    seed: int, budget: int, clean: int, extra: int, placement: str
) -> None:
    total = budget + clean + extra + 1
    ds = build_dataset(
        make_cfg(
            seed=seed, budget=budget, clean_harmful=clean, total_size=total, placement=placement
        )
    )
    counts = Counter(e.role for e in ds.examples)
    assert counts["poison"] == budget
    assert counts["clean_harmful"] == clean
    assert counts["benign"] == total - budget - clean
    eval_keys = {normalise_prompt(r.prompt) for r in ds.eval_harmful}
    eval_keys |= {normalise_prompt(p.prompt) for p in ds.eval_benign}
    assert not training_keys(ds) & eval_keys
    assert len({normalise_prompt(e.prompt) for e in ds.examples}) == total  # no duplicate rows
    for e in ds.examples:
        assert (e.role == "poison") == has_word(e.prompt, TRIGGER)
        if e.role == "poison":
            assert e.response == "Sure"
