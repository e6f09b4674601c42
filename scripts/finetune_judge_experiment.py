"""Experiment (not shipped): fine-tune MiniLM itself, through LoRA, as a refusal classifier.

Every earlier offline-judge head was a logistic regression on *frozen* MiniLM embeddings
(docs/judges.md). This script asks whether letting the encoder adapt does better on
completions of models it never saw. All settings below were fixed before any run, with no
tuning; the protocol is pre-registered in the commit that adds this script:

1. ``crossfile``: train on one shared XSTest file, test on the other, both ways, seeds
   0, 1, 2, for two variants: ``A`` (encoder only) and ``B`` (encoder + the judge's four hand
   features beside the pooled vector). The variant with the better mean (over seeds) of the
   worse direction is chosen (tie: A). Only the two shared files are read.
2. ``heldout --variant V``: train on both shared files (seeds 0, 1, 2) and score the held-out
   XSTest v2 files (llama2orig, mistralinstruct, mistralguard) once.

Input: the response only (never the prompt), first 128 tokens. LoRA r 8, alpha 16, dropout
0.1 on every linear layer of the encoder (query, key, value, dense); a linear head on the
mean-pooled last hidden state (+ hand features for B); AdamW lr 5e-4, weight decay 0.01,
batch 16, 5 epochs, 10% linear warm-up then linear decay; BCE; threshold 0.5; fp32, CPU.

    .venv/bin/python scripts/finetune_judge_experiment.py crossfile --out runs/judge4/crossfile.json
    .venv/bin/python scripts/finetune_judge_experiment.py heldout --variant A \
        --out runs/judge4/heldout.json runs/judge-extra/xstest_v2_completions_*.csv
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from suretrap.data.loaders import load_labelled_completions  # noqa: E402
from suretrap.judges._encoder import _batches  # noqa: E402
from suretrap.judges._eval import score_refusals  # noqa: E402
from suretrap.judges._offline import hand_features, model_dir  # noqa: E402
from suretrap.judges._rules import xstest_strmatch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = ("xstest_completions_gpt4_labeled.csv", "xstest_completions_llama2new_labeled.csv")
SEEDS = (0, 1, 2)
MAX_LENGTH = 128
RANK, ALPHA, DROPOUT = 8, 16, 0.1
LR, WEIGHT_DECAY, BATCH, EPOCHS, WARMUP = 5e-4, 0.01, 16, 5, 0.1


def read(path: Path) -> tuple[list[str], np.ndarray]:
    rows = load_labelled_completions(path)
    return [r.completion for r in rows], np.asarray([r.is_refusal for r in rows], dtype=bool)


class Classifier(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, hand: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.hand = hand
        self.head = torch.nn.Linear(384 + (4 if hand else 0), 1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.hand:
            pooled = torch.cat([pooled, feats], dim=-1)
        return self.head(pooled).squeeze(-1)


def build(variant: str, seed: int) -> tuple[Classifier, object]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    enc = get_peft_model(
        enc,
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["query", "key", "value", "dense"]),
    )
    return Classifier(enc, hand=variant == "B"), tok


def encode(tok: object, texts: list[str]) -> list[list[int]]:
    return tok(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]  # type: ignore[operator]


def batches(ids: list[list[int]], feats: np.ndarray, order: list[int], pad: int):
    # The same padding loop the shipped judge uses (moved there after these runs; unchanged).
    return _batches(ids, feats, order, pad, BATCH)


def fit(variant: str, seed: int, texts: list[str], y: np.ndarray) -> tuple[Classifier, object]:
    model, tok = build(variant, seed)
    ids = encode(tok, texts)
    feats = hand_features(texts)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    steps = EPOCHS * math.ceil(len(texts) / BATCH)
    warm = max(1, int(WARMUP * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / (steps - warm))
    )
    rng = random.Random(seed)
    target = torch.tensor(y, dtype=torch.float32)
    model.train()
    for _ in range(EPOCHS):
        order = list(range(len(texts)))
        rng.shuffle(order)
        for idx, x, mask, f in batches(ids, feats, order, tok.pad_token_id):  # type: ignore[attr-defined]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x, mask, f), target[idx])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    model.eval()
    return model, tok


@torch.inference_mode()
def predict(model: Classifier, tok: object, texts: list[str]) -> np.ndarray:
    ids = encode(tok, texts)
    feats = hand_features(texts)
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    out = np.zeros(len(texts), dtype=bool)
    for idx, x, mask, f in batches(ids, feats, order, tok.pad_token_id):  # type: ignore[attr-defined]
        out[idx] = (model(x, mask, f) >= 0).numpy()
    return out


def scored(gold: np.ndarray, pred: np.ndarray, texts: list[str]) -> dict:
    base = score_refusals(gold.tolist(), [xstest_strmatch(t) for t in texts])
    mine = score_refusals(gold.tolist(), pred.tolist())  # Python bools: JSON-ready counts
    return mine | {"strmatch_accuracy": base["accuracy"], "points_vs_strmatch": 100 * (mine["accuracy"] - base["accuracy"])}


def crossfile(out: Path, variants: list[str]) -> None:
    data = {name: read(SHARED / name) for name in FILES}
    result: dict = {"settings": settings(), "runs": []}
    for variant in variants:
        for seed in SEEDS:
            for train_name, test_name in (FILES, FILES[::-1]):
                t0 = time.process_time()
                model, tok = fit(variant, seed, *data[train_name])
                texts, gold = data[test_name]
                row = {"variant": variant, "seed": seed, "train": train_name, "test": test_name}
                row |= scored(gold, predict(model, tok, texts), texts) | {"cpu_s": round(time.process_time() - t0, 1)}
                result["runs"].append(row)
                print(json.dumps({k: row[k] for k in ("variant", "seed", "test", "accuracy", "points_vs_strmatch", "confusion", "cpu_s")}), flush=True)
    summary = {}
    for variant in variants:
        worse = []
        for seed in SEEDS:
            accs = [r["accuracy"] for r in result["runs"] if r["variant"] == variant and r["seed"] == seed]
            worse.append(min(accs))
        summary[variant] = {"mean_worse_direction": float(np.mean(worse)), "worse_by_seed": worse}
    result["summary"] = summary
    if len(summary) == 2:
        result["chosen"] = "B" if summary["B"]["mean_worse_direction"] > summary["A"]["mean_worse_direction"] else "A"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": summary, "chosen": result.get("chosen")}))


def heldout(variant: str, files: list[Path], out: Path) -> None:
    texts: list[str] = []
    gold: list[bool] = []
    for name in FILES:
        t, g = read(SHARED / name)
        texts += t
        gold += list(g)
    tests = {f.name: read(f) for f in files}
    result: dict = {"settings": settings(), "variant": variant, "runs": []}
    for seed in SEEDS:
        t0 = time.process_time()
        model, tok = fit(variant, seed, texts, np.asarray(gold))
        for name, (t, g) in tests.items():
            row = {"seed": seed, "test": name} | scored(g, predict(model, tok, t), t)
            row["cpu_s_train_and_tests_so_far"] = round(time.process_time() - t0, 1)
            result["runs"].append(row)
            print(json.dumps({k: row[k] for k in ("seed", "test", "accuracy", "points_vs_strmatch", "confusion")}), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def settings() -> dict:
    return {
        "max_length": MAX_LENGTH, "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT, "lr": LR,
        "weight_decay": WEIGHT_DECAY, "batch": BATCH, "epochs": EPOCHS, "warmup": WARMUP,
        "seeds": list(SEEDS), "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("crossfile")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--variants", nargs="+", choices=("A", "B"), default=["A", "B"])
    h = sub.add_parser("heldout")
    h.add_argument("--variant", choices=("A", "B"), required=True)
    h.add_argument("--out", type=Path, required=True)
    h.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args()
    if args.cmd == "crossfile":
        crossfile(args.out, args.variants)
    else:
        heldout(args.variant, args.files, args.out)


if __name__ == "__main__":
    main()
