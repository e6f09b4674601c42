"""Training throughput of suretrap's trainer against batch size, in one process.

`suretrap bench` measures training at the demo's batch size (8). This script runs the
same measurement (`bench.measure_ours`, the bench's model, data and LoRA setting) at
other batch sizes, to show how far the small-batch regime, not the matmuls, keeps
train_gflops under the bf16 peak (docs/performance.md). The bf16 peak is measured in
the same process, before and after.

    .venv/bin/python scripts/train_batch_scaling.py --out runs/batch-scaling.json 8 16 32 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from suretrap.bench import _template_refusals, bench_config, matmul_peak_gflops, measure_ours
from suretrap.models import load_model, load_tokenizer
from suretrap.poison import build_dataset
from suretrap.run import LoadedModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch_sizes", type=int, nargs="+")
    parser.add_argument("--examples", type=int, default=96, help="examples measured per batch size (steps = this / batch size, at least 4)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    cfg = bench_config()
    tokenizer = load_tokenizer(cfg.model)
    examples = list(build_dataset(cfg, _template_refusals).examples)
    result: dict = {"torch_threads": torch.get_num_threads(), "peak_bf16_before": matmul_peak_gflops("bf16"), "runs": []}
    for bs in args.batch_sizes:
        train_cfg = cfg.train.model_copy(update={"batch_size": bs})
        loaded = LoadedModel(cfg.model, load_model(cfg.model, device="cpu"), tokenizer, "cpu", cfg.train.precision)
        row = {"batch_size": bs} | measure_ours(loaded, examples, train_cfg, cfg.seed, max(4, args.examples // bs))
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    result["peak_bf16_after"] = matmul_peak_gflops("bf16")
    peak = max(result["peak_bf16_before"], result["peak_bf16_after"])
    for row in result["runs"]:
        row["fraction_of_bf16_peak"] = row["train_gflops"] / peak
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
