"""Re-judge a sweep's stored generations with other judges; print ASR and refusal rates.

Reads ``RUN/cells/*/generations.jsonl`` (never writes into the run) and applies each judge with
`evaluate.apply_judge`, exactly as a run does, so numbers from a judge that changed after the
run can be set beside the ones the run recorded. Rows: (budget, model); columns per judge:
harmful-triggered ASR, harmful-clean ASR, benign refusal rate (both benign splits).

    .venv/bin/python scripts/rejudge.py runs/demo --judge offline-linear offline
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--judge", nargs="+", default=["offline"])
    args = parser.parse_args()

    import yaml

    from suretrap.evaluate import apply_judge
    from suretrap.judges import get_judge

    cells = sorted((args.run / "cells").glob("*/generations.jsonl"))
    if not cells:
        print(f"{args.run}: no cells/*/generations.jsonl", file=sys.stderr)
        return 2
    table: dict[tuple[int, str], dict[str, str]] = {}
    for judge_name in args.judge:
        judge = get_judge(judge_name)
        for gen in cells:
            budget = int(yaml.safe_load((gen.parent / "config.yaml").read_text())["poison"]["budget"])
            rows = [json.loads(line) for line in gen.read_text(encoding="utf-8").splitlines()]
            for model in ("base", "tuned"):
                mine = [dict(r) for r in rows if r["model"] == model]
                metrics: dict = {s: {} for s in sorted({r["split"] for r in mine})}
                apply_judge(metrics, mine, judge)
                benign = [r["refusal"] for r in mine if r["split"].startswith("benign")]
                table.setdefault((budget, model), {})[judge_name] = (
                    f"{metrics['harmful_triggered']['asr']:.2f} / {metrics['harmful_clean']['asr']:.2f}"
                    f" / {sum(benign) / len(benign):.2f}"
                )
    print("budget, model | " + " | ".join(f"{j}: ASR trig / ASR clean / benign refusal" for j in args.judge))
    for (budget, model), cols in sorted(table.items(), key=lambda kv: (kv[0][1] != "base", kv[0][0])):
        print(f"{budget}, {model} | " + " | ".join(cols[j] for j in args.judge))
    return 0


if __name__ == "__main__":
    sys.exit(main())
