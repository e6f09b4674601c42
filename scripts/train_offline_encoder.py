"""Train the ``offline`` judge (LoRA-fine-tuned MiniLM) and write its shipped files.

Trains `suretrap.judges._encoder.finetune` on both XSTest human-labelled completion files
(seed 0, the fixed settings in ``_encoder.SETTINGS``, two torch threads: the run measured in
docs/judges.md), then writes ``src/suretrap/judges/offline_encoder.safetensors`` and
``offline_encoder.json`` (settings, the files' hashes, the weights' hash, the in-sample
accuracy of the saved judge, versions).

    .venv/bin/python scripts/train_offline_encoder.py           # about 10 CPU minutes
    .venv/bin/python scripts/train_offline_encoder.py --check   # retrain, compare, write nothing

Bit-for-bit the result depends on the thread count and the CPU (floating-point order);
``--check`` prints the largest weight difference and how many verdicts on the two files differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from suretrap.data.loaders import load_labelled_completions  # noqa: E402
from suretrap.judges._encoder import (  # noqa: E402
    ENCODER_META_PATH,
    ENCODER_WEIGHTS_PATH,
    META_FORMAT,
    SETTINGS,
    EncoderJudge,
    finetune,
)
from suretrap.judges._eval import score_refusals  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FILES = ("xstest_completions_gpt4_labeled.csv", "xstest_completions_llama2new_labeled.csv")
SEED, THREADS = 0, 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--check", action="store_true", help="retrain and compare with the shipped files")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    from safetensors.torch import save_file

    texts: list[str] = []
    gold: list[bool] = []
    files = []
    for name in FILES:
        path = args.data / name
        rows = load_labelled_completions(path)
        texts += [r.completion for r in rows]
        gold += [r.is_refusal for r in rows]
        files.append({"name": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "n": len(rows)})
    tensors = finetune(texts, gold, seed=SEED)

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / ENCODER_WEIGHTS_PATH.name
        save_file(tensors, str(weights))
        save_file(tensors, str(ROOT / "runs" / "offline_encoder.last.safetensors"))  # kept if judging fails
        judge = EncoderJudge(weights=str(weights))
        verdicts = [j.refusal for j in judge.judge(texts, texts)]
        in_sample = {}
        start = 0
        for f in files:
            n = f["n"]
            in_sample[f["name"]] = score_refusals(gold[start : start + n], verdicts[start : start + n])
            start += n
        if args.check:
            from safetensors.torch import load_file

            shipped = load_file(str(ENCODER_WEIGHTS_PATH))
            diff = max(float((shipped[k] - tensors[k]).abs().max()) for k in tensors)
            old = [j.refusal for j in EncoderJudge().judge(texts, texts)]
            changed = sum(a != b for a, b in zip(old, verdicts, strict=True))
            print(f"largest weight difference {diff:.3g}; verdicts that differ on the two files: {changed} of {len(texts)}")
            return 0 if changed == 0 else 1
        meta = {
            "format": META_FORMAT,
            "weights_file": ENCODER_WEIGHTS_PATH.name,
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "settings": SETTINGS,
            "seed": SEED,
            "torch_threads": THREADS,
            "inputs": "response only (no prompt), first max_length tokens; hand features beside the pooled vector",
            "files": files,
            "in_sample": in_sample,
            "versions": {"torch": torch.__version__, **_versions()},
        }
        ENCODER_WEIGHTS_PATH.write_bytes(weights.read_bytes())
    ENCODER_META_PATH.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    for name, s in in_sample.items():
        print(f"{name}: in-sample accuracy {s['accuracy']:.4f}")
    print(f"wrote {ENCODER_WEIGHTS_PATH} and {ENCODER_META_PATH}")
    return 0


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    sys.exit(main())
