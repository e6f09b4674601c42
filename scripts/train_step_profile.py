"""Where a training step's time goes, and what that bounds train_gflops to.

Runs the bench's training measurement (`bench.measure_ours`: the bench's model, data, LoRA
setting and batch size) once plainly, for the rate, then again under `torch.profiler`, and
splits the profiled steps' self CPU time into

* ``frozen_matmul``: matrix products whose every dimension is above 24 (the frozen weights'
  products, attention's score and value products, the LM head);
* ``small_matmul``: products with a dimension of 24 or less (the r = 16 LoRA products and
  the 24-token shared-prefix pass);
* ``other``: everything else (element-wise work, norms, softmax, casts, the optimiser).

From the same steps' FLOP count (the bench's accounting) it prints the fraction of the bf16
peak that train_gflops would reach if the step took only its matmul time, or only its
frozen matmul time, and what share of the rest may remain for half of the peak. The
profiler adds a cost to every operation, so these come from the profiled run alone (its
rate and its shares); the unprofiled rate is printed beside them.

    .venv/bin/python scripts/train_step_profile.py --out runs/train-step-profile.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from suretrap.bench import _template_refusals, bench_config, matmul_peak_gflops, measure_ours
from suretrap.models import load_model, load_tokenizer
from suretrap.poison import build_dataset
from suretrap.run import LoadedModel

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    cfg = bench_config()
    tokenizer = load_tokenizer(cfg.model)
    examples = list(build_dataset(cfg, _template_refusals).examples)

    def loaded() -> LoadedModel:
        return LoadedModel(cfg.model, load_model(cfg.model, device="cpu"), tokenizer, "cpu", cfg.train.precision)

    peak = matmul_peak_gflops("bf16")
    plain = measure_ours(loaded(), examples, cfg.train, cfg.seed, args.steps)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        profiled = measure_ours(loaded(), examples, cfg.train, cfg.seed, args.steps)
    # The profiled run includes a warm-up step that measure_ours does not time: scale the
    # profile's split to the measured (timed) seconds, by fractions.
    split = {"frozen_matmul": 0.0, "small_matmul": 0.0, "other": 0.0}
    calls = {"frozen_matmul": 0, "small_matmul": 0}
    for event in prof.key_averages(group_by_input_shape=True):
        us = event.self_cpu_time_total
        if event.key in MATMULS:
            dims = [d for shape in event.input_shapes[:2] for d in shape]
            kind = "small_matmul" if dims and min(dims) <= 24 else "frozen_matmul"
            split[kind] += us
            calls[kind] += event.count
        else:
            split["other"] += us
    total = sum(split.values())
    fractions = {k: v / total for k, v in split.items()}
    flop_rate_fraction = profiled["train_gflops"] / peak
    result = {
        "bf16_peak_gflops": peak,
        "batch_size": cfg.train.batch_size,
        "steps": args.steps,
        "unprofiled": plain | {"fraction_of_bf16_peak": plain["train_gflops"] / peak},
        "profiled": profiled | {"fraction_of_bf16_peak": flop_rate_fraction},
        "self_cpu_fraction": fractions,
        "matmul_calls_per_step": {k: v / (args.steps + 1) for k, v in calls.items()},
        # Ceilings, within the profiled run (the profiler's own per-operation cost is in
        # every share, so the profiled rate and shares are used together): the same FLOPs
        # in only the matmuls' share of the step, or only the frozen matmuls' share.
        "ceiling_if_only_matmuls": flop_rate_fraction / (fractions["frozen_matmul"] + fractions["small_matmul"]),
        "ceiling_if_only_frozen_matmuls": flop_rate_fraction / fractions["frozen_matmul"],
        # How much of the rest (small matmuls + other) may remain, relative to now, for the
        # step to reach half of the peak with the frozen matmuls as fast as they are now.
        "rest_allowed_for_half_peak": (flop_rate_fraction / 0.5 - fractions["frozen_matmul"])
        / (fractions["small_matmul"] + fractions["other"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
