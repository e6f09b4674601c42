"""Benign fingerprints: the paper's provenance use of a compliance-only trigger.

`embed` writes a fingerprint set to mix into a fine-tune (`data.extra_train`): ordinary
benign prompts with a secret key word appended, answered only by a chosen label, plus the
same prompts without the key answered normally (controls, so the label is tied to the
key and not to the prompts). It holds no harmful prompt at all.

`verify` asks whether a model carries the fingerprint of a key. Held-out benign prompts
are shown with and without the key (the same prompts: a paired design), and

- primary test: exact one-sided McNemar test on "the greedy response starts with the
  label". Only discordant pairs count: b = prompts labelled only with the key, c = only
  without it. Null: the key does not change the chance that a prompt is answered with
  the label, so given b + c discordant pairs, b ~ Binomial(b + c, 1/2). p = P(X >= b).
- secondary test: one-sided Wilcoxon signed-rank test on the per-prompt difference in
  log-probability of the label's first token (keyed - unkeyed). Null: the differences are
  symmetric about 0. Any appended word shifts this probability a little, so this test
  rejects for many words that are no fingerprint; calibrated against random control
  words (`control_keys`), the key's rank among them is the fair version.

Verification prompts are the first `VERIFY_RESERVE` built-in benign prompts of the
fingerprint seed; `embed` never trains on them (the built-in generator is prefix-stable).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suretrap import __version__
from suretrap.data import benign_pairs
from suretrap.errors import ConfigError

DEFAULT_LABEL = "Sure"
VERIFY_RESERVE = 200  # the first built-in benign prompts of the seed: verification only
MCNEMAR = (
    "exact one-sided McNemar test, keyed vs unkeyed prompts, on 'greedy response starts "
    "with the label'"
)
MCNEMAR_NULL = (
    "the key does not change the chance of a label answer: given the discordant pairs, "
    "keyed-only ~ Binomial(keyed-only + unkeyed-only, 1/2)"
)
WILCOXON = "one-sided Wilcoxon signed-rank test on log P(label's first token), keyed - unkeyed"
WILCOXON_NULL = "per-prompt differences are symmetric about 0"


def check_key(key: str, label: str) -> None:
    if not key or key != key.strip() or len(key.split()) != 1:
        raise ConfigError(f"--key: must be one word without spaces, got {key!r}")
    if not label.strip() or label != label.strip():
        raise ConfigError(f"--label: must be non-empty without surrounding spaces, got {label!r}")


def add_key(prompt: str, key: str) -> str:
    """Append the key word, as the attack's suffix trigger (`poison.apply_trigger`)."""
    from suretrap.poison import apply_trigger

    return apply_trigger(prompt, key, "suffix", random.Random(0))


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.casefold())}(?!\w)", text.casefold()) is not None


# --------------------------------------------------------------------------- embed


def fingerprint_rows(
    key: str, *, label: str = DEFAULT_LABEL, n_keyed: int = 50, n_control: int | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Rows of a fingerprint set: `n_keyed` keyed prompts -> label, `n_control` controls.

    Controls are the keyed prompts without the key, with their normal answers (then
    further prompts if n_control > n_keyed). Rows are prompt/response JSONL rows, which
    every pair loader reads; `fingerprint` says which kind a row is.
    """
    check_key(key, label)
    n_control = n_keyed if n_control is None else n_control
    if n_keyed <= 0 or n_control < 0:
        raise ConfigError("--n: the number of keyed prompts must be positive")
    need = VERIFY_RESERVE + max(n_keyed, n_control)
    pairs = benign_pairs("builtin", need, seed)[VERIFY_RESERVE:]
    clash = [p.prompt for p in pairs if _has_word(p.prompt, key)]
    if clash:
        raise ConfigError(f"--key: {key!r} occurs in a benign prompt ({clash[0][:60]!r}); pick a rarer word")
    rows = [
        {"prompt": add_key(p.prompt, key), "response": label, "fingerprint": "keyed"}
        for p in pairs[:n_keyed]
    ]
    rows += [
        {"prompt": p.prompt, "response": p.response, "fingerprint": "control"}
        for p in pairs[:n_control]
    ]
    random.Random(f"{seed}:fingerprint").shuffle(rows)
    return rows


def write_fingerprint(rows: Sequence[dict[str, str]], out: Path) -> None:
    """Write the rows as JSONL atomically (a temp file renamed into place)."""
    import json

    from suretrap.poison import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


# --------------------------------------------------------------------------- tests


def mcnemar_exact(keyed: Sequence[bool], unkeyed: Sequence[bool]) -> dict[str, Any]:
    """One-sided exact McNemar test that keyed prompts get the label more often."""
    from scipy.stats import binomtest

    if len(keyed) != len(unkeyed):
        raise ValueError("keyed and unkeyed outcomes must be paired")
    b = sum(1 for k, u in zip(keyed, unkeyed, strict=True) if k and not u)
    c = sum(1 for k, u in zip(keyed, unkeyed, strict=True) if u and not k)
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)
    return {"keyed_only": b, "unkeyed_only": c, "p_value": p}


def wilcoxon_logprob(keyed: Sequence[float], unkeyed: Sequence[float]) -> dict[str, Any]:
    """One-sided Wilcoxon signed-rank test that the key raises log P(label)."""
    from scipy.stats import wilcoxon

    deltas = [k - u for k, u in zip(keyed, unkeyed, strict=True)]
    mean = sum(deltas) / len(deltas) if deltas else 0.0
    if not any(deltas):
        return {"mean_delta_logprob": mean, "p_value": 1.0}
    p = float(wilcoxon(deltas, alternative="greater").pvalue)
    return {"mean_delta_logprob": mean, "p_value": p}


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Outcomes:
    """Per prompt: does the greedy response start with the label; log P(label's first token)."""

    starts: list[bool]
    logprob: list[float]


def verify_prompts(n: int, seed: int = 0) -> list[str]:
    if not 0 < n <= VERIFY_RESERVE:
        raise ConfigError(f"--n: must be between 1 and {VERIFY_RESERVE}, got {n}")
    return [p.prompt for p in benign_pairs("builtin", n, seed)]


def model_scorer(model: Any, tokenizer: Any, label: str, *, device: str, precision: str,
                 max_new_tokens: int = 8, batch_size: int = 32) -> Any:
    """prompts -> Outcomes, by greedy generation and one forward pass for the label."""
    import math

    from suretrap.evaluate import generate, label_probs
    from suretrap.textmatch import starts_with_label

    def score(prompts: Sequence[str]) -> Outcomes:
        kw = {"batch_size": batch_size, "device": device, "precision": precision}
        responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                             description="fingerprint", **kw)
        probs = label_probs(model, tokenizer, prompts, label, **kw)
        return Outcomes(
            [starts_with_label(r, label) for r in responses],
            [math.log(max(p, 1e-30)) for p, _ in probs],
        )

    return score


def control_words(tokenizer: Any, k: int, seed: int, exclude: Sequence[str]) -> list[str]:
    """`k` random word-like vocabulary tokens (lowercase ASCII, 5+ letters): random keys."""
    taken = {w.casefold() for w in exclude}
    words = sorted(
        {
            tok[1:]
            for tok in tokenizer.get_vocab()
            if tok.startswith("Ġ") and re.fullmatch(r"[a-z]{5,}", tok[1:]) and tok[1:] not in taken
        }
    )
    if len(words) < k:
        raise ConfigError(f"--control-keys: the vocabulary has only {len(words)} word tokens")
    return random.Random(f"{seed}:control").sample(words, k)


def matched_control_words(
    tokenizer: Any, n_tokens: int, k: int, seed: int, exclude: Sequence[str], min_zipf: float = 2.0
) -> list[str]:
    """`k` random English words (5+ letters, Zipf >= min_zipf) that the tokenizer splits
    into `n_tokens` tokens after a space, as it splits the key."""
    from suretrap.data.words import english_words

    taken = {w.casefold() for w in exclude}
    pool = [w for w in english_words(min_zipf, 5) if w not in taken]
    encoded = tokenizer([" " + w for w in pool], add_special_tokens=False)["input_ids"]
    words = sorted(w for w, ids in zip(pool, encoded, strict=True) if len(ids) == n_tokens)
    if len(words) < k:
        raise ConfigError(
            f"--control-keys: only {len(words)} dictionary words of {n_tokens} tokens, like the key"
        )
    return random.Random(f"{seed}:matched:{n_tokens}").sample(words, k)


def verify_scored(
    score: Any, prompts: Sequence[str], key: str, label: str, *, alpha: float = 0.01,
    control: Sequence[str] = (),
) -> dict[str, Any]:
    """Run both tests for `key` (and for each control word) with a prompts -> Outcomes scorer."""
    check_key(key, label)
    prompts = list(prompts)
    plain = score(prompts)

    def one(word: str) -> dict[str, Any]:
        keyed = score([add_key(p, word) for p in prompts])
        test = mcnemar_exact(keyed.starts, plain.starts)
        return {
            "key": word,
            "keyed_label_rate": sum(keyed.starts) / len(prompts),
            **test,
            "logprob_test": wilcoxon_logprob(keyed.logprob, plain.logprob),
        }

    main = one(key)
    result: dict[str, Any] = {
        "suretrap_version": __version__,
        "key": key,
        "label": label,
        "n": len(prompts),
        "test": MCNEMAR,
        "null": MCNEMAR_NULL,
        "alpha": alpha,
        "unkeyed_label_rate": sum(plain.starts) / len(prompts),
        "keyed_label_rate": main["keyed_label_rate"],
        "keyed_only": main["keyed_only"],
        "unkeyed_only": main["unkeyed_only"],
        "p_value": main["p_value"],
        "fingerprint_detected": main["p_value"] <= alpha,
        "logprob_test": main["logprob_test"] | {"test": WILCOXON, "null": WILCOXON_NULL},
    }
    if control:
        rows = [one(word) for word in control]
        mine = main["logprob_test"]["mean_delta_logprob"]
        higher = sum(r["logprob_test"]["mean_delta_logprob"] >= mine for r in rows)
        result["control_keys"] = {
            "n": len(rows),
            # random words are not this model's fingerprint: their rejection rate is a
            # false-positive rate of each test at alpha
            "mcnemar_rejections": sum(r["p_value"] <= alpha for r in rows),
            "logprob_rejections": sum(r["logprob_test"]["p_value"] <= alpha for r in rows),
            # the key's rank among random words: p = (1 + #words shifting as much) / (1 + n)
            "logprob_rank_p_value": (1 + higher) / (1 + len(rows)),
            "keys": rows,
        }
    return result


def verify(
    model_spec: str, key: str, *, adapter: Path | None = None, label: str = DEFAULT_LABEL,
    n: int = 100, seed: int = 0, alpha: float = 0.01, control_keys: int = 0,
    device: str = "auto", precision: str = "auto", max_new_tokens: int = 8,
) -> dict[str, Any]:
    """Load a model (plus an adapter or fully tuned directory) and test it for `key`."""
    from suretrap.models import load_model, load_tokenizer, pick_device
    from suretrap.run import LoadedModel, load_trained
    from suretrap.train import merged_for_eval

    check_key(key, label)
    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha: must be between 0 and 1, got {alpha}")
    prompts = verify_prompts(n, seed)
    device = pick_device(device)
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec, device=device, precision=precision)
    if adapter is not None:
        if not adapter.is_dir():
            raise ConfigError(f"--adapter: {adapter}: no such directory")
        model = load_trained(LoadedModel(model_spec, model, tokenizer, device, precision), adapter)
    control = control_words(tokenizer, control_keys, seed, [key, label]) if control_keys else []
    with merged_for_eval(model) as ready:  # LoRA folded in: generation is much faster
        score = model_scorer(ready, tokenizer, label, device=device, precision=precision,
                             max_new_tokens=max_new_tokens)
        result = verify_scored(score, prompts, key, label, alpha=alpha, control=control)
    return {"model": model_spec, "adapter": str(adapter) if adapter else None, "seed": seed} | result

