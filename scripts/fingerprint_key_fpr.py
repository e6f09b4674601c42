"""False-positive rate of the fingerprint rank test over many keys, on models without them.

`fingerprint verify --control-keys K` ranks the key's mean shift in log P(label) among K
random control words. Whether that rank is uniform for a model that never saw the key
depends on the key being like the controls. This script measures it: on one model it
scores, with the same held-out prompts as `verify` (`--n`, seed 0),

- `keys`: many candidate secret keys, random multi-token dictionary words (the kind a
  user picks: `quokka` is " qu" + "ok" + "ka"), none of them this model's fingerprint;
- `vocab_controls`: the controls `verify` draws (`fingerprint.control_words`, seed 0);
- `matched_controls`: for each token count of the keys, random dictionary words of that
  many tokens (`fingerprint.matched_control_words`),

and writes every word's mean shift, token count and Zipf frequency, plus each key's rank
p-value against each control set. Only the log-prob part of `verify` runs (no greedy
generation: McNemar is not what is measured here).

    python scripts/fingerprint_key_fpr.py --model smollm2-135m [--adapter DIR] \
        --out runs/fpr-keys/base.json [--n 30] [--keys 100] [--controls 99]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--keys", type=int, default=100)
    ap.add_argument("--controls", type=int, default=99)
    ap.add_argument("--label", default="Sure")
    ap.add_argument("--key-seed", default="fpr-keys")
    ap.add_argument("--named-keys", nargs="*", default=["quokka"],
                    help="keys reported by name too (a fingerprint's own key: power, not FPR)")
    args = ap.parse_args()

    from wordfreq import zipf_frequency

    from suretrap import fingerprint as fp
    from suretrap.data.words import english_words
    from suretrap.evaluate import label_probs
    from suretrap.models import load_model, load_tokenizer, pick_device
    from suretrap.run import LoadedModel, load_trained
    from suretrap.train import merged_for_eval

    started = time.perf_counter()
    device = pick_device("auto")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=device, precision="auto")
    if args.adapter is not None:
        model = load_trained(LoadedModel(args.model, model, tokenizer, device, "auto"), args.adapter)
    prompts = fp.verify_prompts(args.n, 0)

    def n_tokens(word: str) -> int:
        return len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])

    # candidate secret keys: rare-ish multi-token words (Zipf 1.5-3.0), seeded; tokenised
    # in one batch call (the pool is ~100k words)
    rare = [w for w in english_words(1.5, 5) if zipf_frequency(w, "en") <= 3.0]
    encoded = tokenizer([" " + w for w in rare], add_special_tokens=False)["input_ids"]
    pool = [w for w, ids in zip(rare, encoded, strict=True) if len(ids) > 1]
    keys = random.Random(args.key_seed).sample(pool, args.keys)
    vocab = fp.control_words(tokenizer, args.controls, 0, [args.label])
    named = list(args.named_keys)
    lengths = sorted(Counter(n_tokens(k) for k in keys + named))
    matched = {
        n: fp.matched_control_words(tokenizer, n, args.controls, 0, keys + named + [args.label])
        for n in lengths
    }
    words = sorted(set(keys) | set(named) | set(vocab) | {w for ws in matched.values() for w in ws})

    with merged_for_eval(model) as ready:
        def logp(texts: list[str]) -> list[float]:
            probs = label_probs(ready, tokenizer, texts, args.label, device=device, precision="auto")
            return [math.log(max(p, 1e-30)) for p, _ in probs]

        plain = logp(prompts)
        shift = {}
        for i, w in enumerate(words):
            keyed = logp([fp.add_key(p, w) for p in prompts])
            shift[w] = sum(k - u for k, u in zip(keyed, plain, strict=True)) / len(prompts)
            if i % 50 == 0:
                print(f"{i}/{len(words)} words, {time.perf_counter() - started:.0f}s", flush=True)

    def rank_p(w: str, controls: list[str]) -> float:
        return (1 + sum(shift[c] >= shift[w] for c in controls)) / (1 + len(controls))

    def row(k: str) -> dict:
        return {
            "key": k, "tokens": n_tokens(k), "zipf": zipf_frequency(k, "en"), "shift": shift[k],
            "p_vocab": rank_p(k, vocab), "p_matched": rank_p(k, matched[n_tokens(k)]),
        }

    rows = [row(k) for k in keys]

    def fpr(col: str, alpha: float) -> float:
        return sum(r[col] <= alpha for r in rows) / len(rows)

    result = {
        "model": args.model, "adapter": str(args.adapter) if args.adapter else None,
        "n_prompts": args.n, "label": args.label, "n_keys": len(keys), "n_controls": args.controls,
        "fpr": {
            f"{col}@{a}": fpr(col, a) for col in ("p_vocab", "p_matched") for a in (0.01, 0.05, 0.1)
        },
        "named_keys": [row(k) for k in named],
        "keys": rows,
        "vocab_controls": [{"word": w, "tokens": n_tokens(w), "shift": shift[w]} for w in vocab],
        "matched_controls": {
            str(n): [{"word": w, "shift": shift[w]} for w in ws] for n, ws in matched.items()
        },
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".partial")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    print(json.dumps(result["fpr"]), f"{result['wall_s']:.0f}s", args.out)


if __name__ == "__main__":
    main()
