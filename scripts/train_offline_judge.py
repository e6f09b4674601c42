"""Train the offline judge's logistic head and write src/suretrap/judges/offline_head.json.

Deterministic: fixed files, fixed grid, no sampling, one CPU thread. Steps:

1. embed every completion of the two XSTest human-labelled files with MiniLM (the judge's
   own `Embedder`, ``max_length`` tokens) and compute the hand features;
2. for every (lambda, hand_scale) in the grid, train on one file and test on the other, both
   ways (the cross-file protocol: the test file's model was never seen in training);
3. pick the setting with the best *worse* direction (ties: better mean, then the larger
   lambda -- the simpler model);
4. train the shipped head with that setting on both files together and write it with a
   ``training`` record (file hashes, grid, cross-file numbers, XSTest string-match numbers).

Usage (from the repository root)::

    .venv/bin/python scripts/train_offline_judge.py [--data ../shared/data] [--out PATH]
    .venv/bin/python scripts/train_offline_judge.py --check   # rebuild, compare, write nothing

Hyper-parameters are chosen with both files, so the cross-file numbers are not blind to the
choice of lambda and hand_scale (only to the weights); docs/judges.md says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from suretrap.data.loaders import load_labelled_completions  # noqa: E402
from suretrap.judges._eval import score_refusals  # noqa: E402
from suretrap.judges._offline import (  # noqa: E402
    HEAD_PATH,
    Embedder,
    hand_features,
    train_head,
)
from suretrap.judges._rules import xstest_strmatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FILES = ("xstest_completions_gpt4_labeled.csv", "xstest_completions_llama2new_labeled.csv")
MAX_LENGTH = 128
LAMBDAS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4)
HAND_SCALES = (1.0, 3.0, 10.0, 30.0)


def load(data: Path, embedder: Embedder) -> dict[str, dict]:
    sets = {}
    for name in FILES:
        path = data / name
        rows = load_labelled_completions(path)
        responses = [r.completion for r in rows]
        sets[name] = {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "emb": embedder.embed(responses, MAX_LENGTH),
            "hand": hand_features(responses),
            "y": np.array([r.is_refusal for r in rows], dtype=np.float64),
            "strmatch": [xstest_strmatch(r) for r in responses],
        }
        print(f"embedded {name}: {len(rows)} completions", file=sys.stderr)
    return sets


def cross_file(sets: dict[str, dict], lam: float, scale: float) -> dict[str, dict]:
    """Train on each file, score on the other; keyed by the *test* file."""
    out = {}
    for train_name, test_name in ((FILES[0], FILES[1]), (FILES[1], FILES[0])):
        tr, te = sets[train_name], sets[test_name]
        head = train_head(
            tr["emb"], tr["hand"], tr["y"], lam=lam, hand_scale=scale, max_length=MAX_LENGTH
        )
        pred = head.proba(te["emb"], te["hand"]) >= head.threshold
        out[test_name] = score_refusals(te["y"].astype(bool).tolist(), pred.tolist())
        out[test_name]["trained_on"] = train_name
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=HEAD_PATH)
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)  # deterministic and polite to other jobs on the machine

    sets = load(args.data, Embedder(batch_size=32))
    grid = []
    for lam in LAMBDAS:
        for scale in HAND_SCALES:
            result = cross_file(sets, lam, scale)
            accs = [result[name]["accuracy"] for name in FILES]
            grid.append(
                {
                    "lambda": lam,
                    "hand_scale": scale,
                    "accuracy": dict(zip(FILES, accs, strict=True)),
                }
            )
            print(
                f"lambda={lam:g} hand_scale={scale:g}: " + " ".join(f"{a:.4f}" for a in accs),
                file=sys.stderr,
            )
    best = max(
        grid, key=lambda g: (min(g["accuracy"].values()), sum(g["accuracy"].values()), g["lambda"])
    )
    lam, scale = best["lambda"], best["hand_scale"]
    chosen = cross_file(sets, lam, scale)
    baseline = {
        name: score_refusals(s["y"].astype(bool).tolist(), s["strmatch"])
        for name, s in sets.items()
    }
    training = {
        "files": [{"name": n, "sha256": sets[n]["sha256"], "n": len(sets[n]["y"])} for n in FILES],
        "protocol": "cross-file: train on one file, test on the other; shipped head: both files",
        "grid": grid,
        "chosen": {"lambda": lam, "hand_scale": scale},
        "cross_file": chosen,
        "xstest_strmatch": baseline,
    }
    emb = np.vstack([sets[n]["emb"] for n in FILES])
    hand = np.vstack([sets[n]["hand"] for n in FILES])
    y = np.concatenate([sets[n]["y"] for n in FILES])
    head = train_head(
        emb, hand, y, lam=lam, hand_scale=scale, max_length=MAX_LENGTH, training=training
    )
    text = json.dumps(head.to_dict(), indent=1) + "\n"

    for name in FILES:
        c, b = chosen[name], baseline[name]
        print(
            f"{name}: cross-file accuracy {c['accuracy']:.4f} (trained on {c['trained_on']}),"
            f" XSTest strmatch {b['accuracy']:.4f}"
        )
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print("identical to " + str(args.out) if same else f"DIFFERS from {args.out}")
        return 0 if same else 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} (lambda={lam:g}, hand_scale={scale:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
