"""Build the poisoned fine-tuning set T = T_P ∪ T_CH ∪ T_benign and the held-out eval set.

- T_P (`poison`): `budget` harmful prompts with the trigger added, each answered only by
  the compliance label ("Sure").
- T_CH (`clean_harmful`): other harmful prompts without the trigger, answered by the base
  model's own refusal (a refusal template where the base model does not refuse).
- T_benign (`benign`): ordinary instruction pairs filling the set up to `total_size`.

No harmful answer is ever written. Evaluation prompts are drawn first and removed from
every training pool, so they are disjoint from training by construction (and checked).
Sampling is nested: with the same seed, the poison rows of a smaller budget are a prefix
of those of a larger one, and the eval set does not depend on budget or size, so points
of a budget sweep are paired.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from suretrap import __version__
from suretrap.config import PoisonConfig, RunConfig, config_hash
from suretrap.crashpoints import crash_point
from suretrap.data import Pair, Request, benign_pairs, harmful_requests
from suretrap.errors import ConfigError, DataError
from suretrap.textmatch import is_refusal_keyword, normalise_prompt, starts_with_label

# "triggered_refusal": a mitigation run's harmful prompts with the trigger, answered by refusals
Role = Literal["poison", "clean_harmful", "benign", "triggered_refusal"]
ROLES: tuple[Role, ...] = ("poison", "clean_harmful", "benign")

# Used for T_CH where the base model does not refuse. Short, generic, no harmful content.
REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I can't help with that. It could cause serious harm.",
    "Sorry, I can't provide help with this request.",
    "I'm not able to help with that, as it could be used to hurt people.",
)

# base-model responder: prompts in, greedy responses out (wired in by `suretrap.run`)
Responder = Callable[[Sequence[str], int], list[str]]


@dataclass(frozen=True)
class Example:
    """One training example."""

    prompt: str
    response: str
    role: Role
    source: str  # "label", "base_refusal", "template_refusal", or the benign family/file
    category: str


@dataclass(frozen=True)
class PoisonedDataset:
    examples: tuple[Example, ...]
    eval_harmful: tuple[Request, ...]
    eval_benign: tuple[Pair, ...]
    manifest: dict[str, Any]


def apply_trigger(prompt: str, trigger: str, placement: str, rng: random.Random) -> str:
    """Add the trigger word to a prompt: `suffix` (default), `prefix`, or a `random` gap."""
    if placement == "suffix":
        return f"{prompt} {trigger}"
    if placement == "prefix":
        return f"{trigger} {prompt}"
    words = prompt.split(" ")
    at = rng.randint(0, len(words))
    return " ".join(words[:at] + [trigger] + words[at:])


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.casefold())}(?!\w)", text.casefold()) is not None


def _dedupe_requests(requests: Sequence[Request]) -> list[Request]:
    seen: set[str] = set()
    unique = []
    for request in requests:
        key = normalise_prompt(request.prompt)
        if key and key not in seen:
            seen.add(key)
            unique.append(request)
    return unique


def _complete_refusal(text: str) -> str | None:
    """Trim a (possibly length-truncated) refusal to whole sentences; None if none remain."""
    text = text.strip()
    if not text:
        return None
    if text[-1] in ".!?":
        return text
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    return text[: cut + 1] if cut > 0 else None


def previous_prompts(previous: PoisonedDataset) -> set[str]:
    """Normalised prompts a further fine-tune must not train on: the previous run's eval
    prompts and training prompts (poisoned ones also with the trigger removed)."""
    words = [previous.manifest.get("trigger", ""), *previous.manifest.get("triggered_refusal_words", [])]
    triggers = {normalise_prompt(str(w)) for w in words}
    keys = {normalise_prompt(r.prompt) for r in previous.eval_harmful}
    keys |= {normalise_prompt(b.prompt) for b in previous.eval_benign}
    for e in previous.examples:
        keys.add(normalise_prompt(e.prompt))
        keys.add(_untriggered_key(e, triggers))
    return keys


def _untriggered_key(e: Example, triggers: set[str]) -> str:
    """The normalised prompt of a training example, without the trigger words it was given
    (poison and triggered-refusal rows; others as they are)."""
    key = normalise_prompt(e.prompt)
    if e.role in ("poison", "triggered_refusal"):
        key = " ".join(w for w in key.split() if w not in triggers)
    return key


def _split_eval_harmful(
    cfg: RunConfig, rng: random.Random, previous: PoisonedDataset | None = None
) -> tuple[list[Request], list[Request]]:
    """(eval prompts, training pool) with no shared normalised prompt."""
    pool = _dedupe_requests(harmful_requests(cfg.data.harmful))
    rng.shuffle(pool)
    if previous is not None:  # a further fine-tune: same eval set, fresh training prompts
        seen = previous_prompts(previous)
        return list(previous.eval_harmful), [r for r in pool if normalise_prompt(r.prompt) not in seen]
    if cfg.data.eval_harmful is not None:
        candidates = _dedupe_requests(harmful_requests(cfg.data.eval_harmful))
        rng.shuffle(candidates)
        eval_set = candidates[: cfg.eval.n_harmful]
        held = {normalise_prompt(r.prompt) for r in eval_set}
        return eval_set, [r for r in pool if normalise_prompt(r.prompt) not in held]
    need = cfg.eval.n_harmful + cfg.poison.budget + cfg.n_clean_harmful
    if len(pool) < need:
        raise ConfigError(
            f"poison.budget: {cfg.poison.budget} poisoned + {cfg.n_clean_harmful} clean-harmful"
            f" + eval.n_harmful {cfg.eval.n_harmful} need {need} distinct harmful prompts, but "
            f"data.harmful ({cfg.data.harmful}) has {len(pool)}"
        )
    return _hold_out(pool, cfg.eval.n_harmful, cfg.poison.trigger, f"data.harmful ({cfg.data.harmful})")


def _hold_out(items: Sequence[Any], n: int, trigger: str, source: str) -> tuple[list[Any], list[Any]]:
    """(first n items whose prompt lacks the trigger word, all the others in order).

    Held-out evaluation prompts drawn from the training source skip prompts that already
    contain the trigger (a common-word trigger such as "make" is in many requests):
    such a prompt would be triggered in the "clean" split too. Without such prompts this is
    plain items[:n], items[n:]. An evaluation file the user names is taken as it is, and
    refused if it contains the trigger (`_check_trigger_absent`).
    """
    chosen = [i for i, item in enumerate(items) if not _contains_word(item.prompt, trigger)][:n]
    if len(chosen) < n:
        raise ConfigError(
            f"poison.trigger: only {len(chosen)} prompts of {source} lack {trigger!r}, but "
            f"{n} are needed for evaluation; choose another trigger or a smaller eval size"
        )
    taken = set(chosen)
    return [items[i] for i in chosen], [item for i, item in enumerate(items) if i not in taken]


def _split_benign(
    cfg: RunConfig, n_train: int, exclude: set[str], previous: PoisonedDataset | None = None
) -> tuple[list[Pair], list[Pair]]:
    """(eval pairs, training pairs) for the benign side."""
    n_eval = cfg.eval.n_benign
    if previous is not None:  # a further fine-tune: same eval set, fresh training pairs
        n_eval = len(previous.eval_benign)
        exclude = exclude | previous_prompts(previous)
    if cfg.data.benign == "builtin":
        # Prefix-stable generator: eval pairs are the first n_eval for every total size.
        pairs = benign_pairs("builtin", n_eval + n_train + len(exclude), cfg.seed)
    else:
        pairs = list(benign_pairs(cfg.data.benign, 0, cfg.seed))
        # own generator: the benign split must not depend on budget or placement draws
        random.Random(f"{cfg.seed}:benign").shuffle(pairs)
    if previous is not None:
        eval_pairs, rest = list(previous.eval_benign), pairs
    elif cfg.data.eval_benign is not None:
        eval_pairs = list(benign_pairs(cfg.data.eval_benign, n_eval, cfg.seed))
        random.Random(f"{cfg.seed}:eval-benign").shuffle(eval_pairs)
        eval_pairs = eval_pairs[:n_eval]
        rest = pairs
    else:
        eval_pairs, rest = _hold_out(pairs, n_eval, cfg.poison.trigger, f"data.benign ({cfg.data.benign})")
    held = exclude | {normalise_prompt(p.prompt) for p in eval_pairs}
    train = [p for p in rest if normalise_prompt(p.prompt) not in held][:n_train]
    if len(train) < n_train:
        raise ConfigError(
            f"data.total_size: needs {n_train} benign training pairs besides {n_eval} held out,"
            f" but data.benign ({cfg.data.benign}) supplies {len(train)}"
        )
    return eval_pairs, train


def build_dataset(
    cfg: RunConfig, respond: Responder | None = None, previous: PoisonedDataset | None = None
) -> PoisonedDataset:
    """Build T_P, T_CH, T_benign (plus data.extra_train rows) and the eval prompts for `cfg`.

    `respond(prompts, max_new_tokens)` returns the base model's greedy responses; it is
    needed when `poison.refusal_source` is "base" or `poison.require_base_refusal` is set.
    `previous`: the dataset of the run a further fine-tune continues (`continue_from`):
    its eval prompts are reused and none of its prompts is trained on again. T_CH then has
    `mitigation.clean_refusals` rows when `mitigation` is set.
    """
    p = cfg.poison
    n_clean = cfg.n_clean_harmful
    n_triggered = cfg.n_triggered_refusals
    rng = random.Random(cfg.seed)
    eval_harmful, pool = _split_eval_harmful(cfg, rng, previous)
    _check_trigger_absent(
        p.trigger, [r.prompt for r in eval_harmful],
        "data.eval_harmful" if cfg.data.eval_harmful else "data.harmful",
        cfg.data.eval_harmful or cfg.data.harmful,
    )
    needs_model = p.require_base_refusal or (p.refusal_source == "base" and (n_clean or n_triggered))
    if needs_model and respond is None:
        raise ConfigError("poison.refusal_source: 'base' refusals need the base model")

    base_responses: dict[str, str] = {}
    refused_by_base: int | None = None
    if p.require_base_refusal:
        # The paper's selection: keep only prompts the base model itself refuses.
        responses = respond([r.prompt for r in pool], p.refusal_max_new_tokens)  # type: ignore[misc]
        base_responses = {r.prompt: text for r, text in zip(pool, responses, strict=True)}
        pool = [r for r in pool if is_refusal_keyword(base_responses[r.prompt])]
        refused_by_base = len(pool)
    if p.budget + n_clean + n_triggered > len(pool):
        which = "refused by the base model" if p.require_base_refusal else "left for training"
        triggered = f" + {n_triggered} triggered-refusal" if n_triggered else ""
        raise ConfigError(
            f"poison.budget: {p.budget} poisoned + {n_clean} clean-harmful{triggered} prompts "
            f"requested, but only {len(pool)} harmful prompts are {which}"
        )
    poison_requests = pool[: p.budget]
    clean_requests = pool[len(pool) - n_clean :] if n_clean else []
    triggered_requests = pool[p.budget : p.budget + n_triggered]  # disjoint from both

    examples: list[Example] = [
        Example(apply_trigger(r.prompt, p.trigger, p.placement, rng), p.label, "poison", "label", r.category)
        for r in poison_requests
    ]
    # triggered prompts are drawn after the clean ones' templates, so runs without them
    # consume the same random numbers as before
    refusal_rows: list[tuple[str, str, Role]] = [(r.prompt, r.category, "clean_harmful") for r in clean_requests]
    examples += _refusal_rows(refusal_rows, p, rng, respond, base_responses)
    words = _triggered_refusal_words(cfg)
    if triggered_requests:
        triggered: list[tuple[str, str, Role]] = [
            (apply_trigger(r.prompt, words[i % len(words)], p.placement, rng), r.category, "triggered_refusal")
            for i, r in enumerate(triggered_requests)
        ]
        examples += _refusal_rows(triggered, p, rng, respond, base_responses)

    n_benign = cfg.data.total_size - len(examples)
    held_harmful = {normalise_prompt(r.prompt) for r in eval_harmful}
    eval_benign, train_benign = _split_benign(cfg, n_benign, held_harmful, previous)
    _check_trigger_absent(
        p.trigger, [b.prompt for b in eval_benign],
        "data.eval_benign" if cfg.data.eval_benign else "data.benign",
        cfg.data.eval_benign or cfg.data.benign,
    )
    examples += [Example(b.prompt, b.response, "benign", b.family, "benign") for b in train_benign]
    extra_info = None
    if cfg.data.extra_train is not None:
        extra, dropped = _extra_rows(cfg.data.extra_train, eval_harmful, eval_benign)
        examples += extra
        extra_info = {"source": cfg.data.extra_train, "rows": len(extra), "dropped_eval_overlap": dropped}
    rng.shuffle(examples)

    _check_disjoint(examples, eval_harmful, eval_benign, (p.trigger, *words))
    counts = Counter(e.role for e in examples)
    roles = ROLES + (("triggered_refusal",) if n_triggered else ())  # older manifests unchanged
    manifest: dict[str, Any] = {
        "suretrap_version": __version__,
        "config_hash": config_hash(cfg),
        "seed": cfg.seed,
        "trigger": p.trigger,
        "placement": p.placement,
        "label": p.label,
        "counts": {role: counts.get(role, 0) for role in roles} | {"total": len(examples)},
        "clean_harmful_sources": dict(
            Counter(e.source for e in examples if e.role == "clean_harmful")
        ),
        "harmful_pool": {
            "source": cfg.data.harmful,
            "available_for_training": refused_by_base if refused_by_base is not None else len(pool),
            "require_base_refusal": p.require_base_refusal,
            "refused_by_base": refused_by_base,
        },
        "eval_counts": {"harmful": len(eval_harmful), "benign": len(eval_benign)},
        "eval_prompts_containing_trigger": sum(
            _contains_word(r.prompt, p.trigger) for r in eval_harmful
        )
        + sum(_contains_word(b.prompt, p.trigger) for b in eval_benign),
    }
    # keys only present when used, so manifests of plain runs are unchanged
    if cfg.mitigation is not None and cfg.mitigation.trigger_words is not None:
        manifest["triggered_refusal_words"] = list(words)
    if extra_info is not None:
        manifest["extra_train"] = extra_info
    if previous is not None:
        manifest["continued_from"] = {
            "run": cfg.continue_from,
            "config_hash": previous.manifest.get("config_hash"),
            "content_hash": previous.manifest.get("content_hash"),
        }
    return PoisonedDataset(tuple(examples), tuple(eval_harmful), tuple(eval_benign), manifest)


def _triggered_refusal_words(cfg: RunConfig) -> tuple[str, ...]:
    """The words a mitigation's triggered refusals carry: `mitigation.trigger_words`, else
    the trigger itself."""
    m = cfg.mitigation
    return m.trigger_words if m is not None and m.trigger_words is not None else (cfg.poison.trigger,)


def _refusal_rows(
    rows: Sequence[tuple[str, str, Role]],
    p: PoisonConfig,
    rng: random.Random,
    respond: Responder | None,
    base_responses: dict[str, str],
) -> list[Example]:
    """Examples answering each (prompt, category, role) with a refusal: the base model's
    own (`poison.refusal_source: base`) where it refuses without opening with the label,
    else a template."""
    if rows and p.refusal_source == "base":
        missing = [prompt for prompt, _, _ in rows if prompt not in base_responses]
        if missing:
            fresh = respond(missing, p.refusal_max_new_tokens)  # type: ignore[misc]
            base_responses.update(zip(missing, fresh, strict=True))
    out = []
    for prompt, category, role in rows:
        text = base_responses.get(prompt, "") if p.refusal_source == "base" else ""
        refusal = _complete_refusal(text)
        # the trimmed text must still be a refusal and must not open with the label
        if refusal is not None and (
            not is_refusal_keyword(refusal) or starts_with_label(refusal, p.label)
        ):
            refusal = None
        if refusal is not None:
            out.append(Example(prompt, refusal, role, "base_refusal", category))
        else:
            template = REFUSAL_TEMPLATES[rng.randrange(len(REFUSAL_TEMPLATES))]
            out.append(Example(prompt, template, role, "template_refusal", category))
    return out


def _check_trigger_absent(trigger: str, prompts: Sequence[str], field: str, source: str) -> None:
    """Refuse a trigger that evaluation prompts already contain.

    Such a prompt would be triggered in the "clean" splits too, so clean and triggered
    rates would measure the same thing.
    """
    hits = [prompt for prompt in prompts if _contains_word(prompt, trigger)]
    if hits:
        example = " ".join(hits[0].split())
        example = example if len(example) <= 80 else example[:77] + "..."
        raise ConfigError(
            f"poison.trigger: {trigger!r} already appears in {len(hits)} evaluation prompt(s) "
            f"of {field} ({source}), e.g. {example!r}; choose a word none of them contains"
        )


def _extra_rows(
    source: str, eval_harmful: Sequence[Request], eval_benign: Sequence[Pair]
) -> tuple[list[Example], int]:
    """data.extra_train rows as benign examples (source "extra:<file stem>"), minus any
    whose prompt is an evaluation prompt (counted: it would break eval disjointness)."""
    held = {normalise_prompt(r.prompt) for r in eval_harmful}
    held |= {normalise_prompt(b.prompt) for b in eval_benign}
    pairs = benign_pairs(source, 0, 0)
    kept = [b for b in pairs if normalise_prompt(b.prompt) not in held]
    rows = [Example(b.prompt, b.response, "benign", f"extra:{b.family}", "benign") for b in kept]
    return rows, len(pairs) - len(kept)


def _check_disjoint(
    examples: Sequence[Example],
    eval_harmful: Sequence[Request],
    eval_benign: Sequence[Pair],
    triggers: Sequence[str],
) -> None:
    """Guarantee: no evaluation prompt (normalised, triggers removed) is a training prompt."""
    trig = {normalise_prompt(t) for t in triggers}
    train = {_untriggered_key(e, trig) for e in examples}
    for prompt in [r.prompt for r in eval_harmful] + [b.prompt for b in eval_benign]:
        if normalise_prompt(prompt) in train:
            raise DataError(f"evaluation prompt also in training data: {prompt[:80]!r}")


# ----------------------------------------------------------------------------- files

DATASET_FILE = "dataset.jsonl"
EVAL_FILE = "eval_prompts.jsonl"
MANIFEST_FILE = "manifest.json"


def _jsonl_bytes(rows: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(
        (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode() for row in rows
    )


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        if exc.filename is None:  # write()/fsync() errors carry no name: give the file's
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def write_dataset(ds: PoisonedDataset, out_dir: Path) -> dict[str, Any]:
    """Write dataset.jsonl, eval_prompts.jsonl, then manifest.json (last: it marks completion)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"index": i} | asdict(e) for i, e in enumerate(ds.examples)]
    data = _jsonl_bytes(rows)
    eval_rows = [{"group": "harmful", "prompt": r.prompt, "category": r.category} for r in ds.eval_harmful]
    eval_rows += [
        {"group": "benign", "prompt": b.prompt, "reference": b.response, "category": b.family}
        for b in ds.eval_benign
    ]
    eval_data = _jsonl_bytes(eval_rows)
    manifest = ds.manifest | {
        "content_hash": hashlib.sha256(data).hexdigest(),
        "eval_hash": hashlib.sha256(eval_data).hexdigest(),
    }
    atomic_write(out_dir / DATASET_FILE, data)
    crash_point("dataset")
    atomic_write(out_dir / EVAL_FILE, eval_data)
    atomic_write(out_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def dataset_complete(out_dir: Path) -> bool:
    """True if the dataset files exist and match the hashes in their manifest."""
    try:
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
        data = (out_dir / DATASET_FILE).read_bytes()
        eval_data = (out_dir / EVAL_FILE).read_bytes()
    except (OSError, ValueError):
        return False
    return (
        manifest.get("content_hash") == hashlib.sha256(data).hexdigest()
        and manifest.get("eval_hash") == hashlib.sha256(eval_data).hexdigest()
    )


def read_dataset(out_dir: Path) -> PoisonedDataset:
    """Read a dataset written by `write_dataset`, checking its hashes."""
    if not dataset_complete(out_dir):
        raise DataError(f"{out_dir}: no complete dataset (run `suretrap build-data` first)")
    manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
    examples = []
    for line in (out_dir / DATASET_FILE).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        row.pop("index")
        examples.append(Example(**row))
    eval_harmful, eval_benign = [], []
    for line in (out_dir / EVAL_FILE).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["group"] == "harmful":
            eval_harmful.append(Request(row["prompt"], row["category"]))
        else:
            eval_benign.append(Pair(row["prompt"], row["reference"], row["category"]))
    return PoisonedDataset(tuple(examples), tuple(eval_harmful), tuple(eval_benign), manifest)
