"""Build the ``offline`` judge (LoRA-fine-tuned MiniLM) into suretrap's cache.

The weights are not tracked in git. `make setup` runs this once per machine (a no-op when
the cache already has them): `suretrap.judges._encoder.build_weights` trains on both XSTest
human-labelled completion files (seeds 0, 1, 2, the fixed settings in ``_encoder.SETTINGS``,
two torch threads: the build measured in docs/judges.md; about 5 minutes per seed on 2 idle
cores) and prints the in-sample accuracy next to the recorded one.

    .venv/bin/python scripts/train_offline_encoder.py [--data DIR] [--force]
    .venv/bin/python scripts/train_offline_encoder.py --record   # maintainers: rewrite offline_encoder.json

Bit for bit the weights depend on the CPU (floating-point order); `--record` stores the
measured build's hash, which another machine's build may not reproduce.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache has the weights")
    parser.add_argument("--record", action="store_true", help="rebuild and rewrite offline_encoder.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from suretrap.judges._encoder import weights_path

    if weights_path().is_file() and not (args.force or args.record):
        print(f"offline judge: {weights_path()} is built")
        return 0

    import json

    import peft
    import torch
    import transformers

    from suretrap.judges._encoder import ENCODER_META_PATH, EncoderJudge, build_weights, read_meta
    from suretrap.judges._eval import score_refusals

    out, texts, gold = build_weights(args.data)
    meta = read_meta()
    verdicts = [j.refusal for j in EncoderJudge(weights=str(out)).judge(texts, texts)]
    in_sample, start = {}, 0
    for f in meta["files"]:
        in_sample[f["name"]] = score_refusals(gold[start : start + f["n"]], verdicts[start : start + f["n"]])
        start += f["n"]
        print(f"{f['name']}: in-sample accuracy {in_sample[f['name']]['accuracy']:.4f}"
              f" (recorded {meta['in_sample'][f['name']]['accuracy']:.4f})")
    print(f"built {out}")
    if args.record:
        meta |= {
            "weights_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
            "in_sample": in_sample,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__},
        }
        ENCODER_META_PATH.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {ENCODER_META_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
