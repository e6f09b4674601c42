"""Adaptive search for the poison budget at which the Sure rate crosses a target.

A grid spends most cells far from the threshold. Here cells are chosen one at a time:
bracket the crossing by growing or shrinking the budget geometrically, then bisect on log
budget. The final estimate is not the last bisection point: a logistic curve is fitted by
maximum likelihood to every cell run so far (the rate vs budget is noisy and not always
monotone), with a bootstrap interval over prompts. Cells live in the same store as grid
sweeps, so a cell a grid already ran is reused, never run twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from suretrap.config import RunConfig
from suretrap.errors import ConfigError
from suretrap.poison import atomic_write
from suretrap.sweep import cell_for, run_cells

RESULT_FILE = "threshold.json"


def _rate(metrics: dict[str, Any]) -> float:
    return float(metrics["tuned"]["harmful_triggered"]["sure_rate"])


def find_threshold(
    base: RunConfig,
    out: Path,
    *,
    target: float = 0.5,
    max_cells: int = 8,
    start: int = 16,
    max_budget: int = 128,
    n_boot: int = 500,
) -> dict[str, Any]:
    """Run cells of `base` at chosen budgets until the crossing of `target` is bracketed
    to within one budget step or `max_cells` is spent; write and return threshold.json."""
    if not 0.0 < target < 1.0:
        raise ConfigError(f"--target: must be between 0 and 1, not {target}")
    if max_cells < 2:
        raise ConfigError("--max-cells: needs at least 2 cells to bracket a threshold")
    if not 1 <= start <= max_budget:
        raise ConfigError(f"--start: must be between 1 and --max-budget ({max_budget})")
    rates: dict[int, float] = {}
    trace: list[dict[str, Any]] = []

    def measure(budget: int) -> float:
        if budget not in rates:
            cell = cell_for(base, {"poison.budget": budget})
            statuses = run_cells([cell], out)
            if statuses[cell.config_hash] != "complete":
                raise ConfigError(f"{out}: cell at budget {budget} failed; see `suretrap results`")
            metrics = json.loads((out / "cells" / cell.config_hash / "metrics.json").read_text())
            rates[budget] = _rate(metrics)
            trace.append({"budget": budget, "rate": rates[budget], "config_hash": cell.config_hash})
        return rates[budget]

    lo, hi = 0, None  # rate(lo) < target <= rate(hi)
    budget = start
    # bracket: grow x4 below the target, shrink /4 above it
    while len(rates) < max_cells:
        if measure(budget) >= target:
            hi = budget
            if budget == 1 or lo >= budget // 4 and lo > 0:
                break
            nxt = max(1, budget // 4)
            if nxt in rates:
                break
            budget = nxt
        else:
            lo = budget
            if hi is not None or budget >= max_budget:
                break
            budget = min(max_budget, budget * 4)
    # bisect on log budget between the bracket ends
    while hi is not None and len(rates) < max_cells and hi - lo > max(1, 0.15 * lo):
        mid = max(lo + 1, min(hi - 1, round(math.sqrt(max(lo, 1) * hi))))
        if mid in rates:
            break
        if measure(mid) >= target:
            hi = mid
        else:
            lo = mid
    result = _estimate(out, base, trace, target, n_boot)
    result |= {
        "target": target,
        "cells_used": len(trace),
        "bracket": [lo, hi],
        "trace": trace,
    }
    atomic_write(out / RESULT_FILE, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    return result


def _estimate(
    out: Path, base: RunConfig, trace: list[dict[str, Any]], target: float, n_boot: int
) -> dict[str, Any]:
    """Logistic fit over the searched cells, with a bootstrap interval."""
    from suretrap.analysis import analyse, load_cells

    # one group: the searched cells differ only in budget, whatever axes a grid gave them
    cells = [
        dataclasses.replace(c, axes={"poison.budget": c.budget})
        for c in load_cells(out, only={t["config_hash"] for t in trace})
    ]
    summary = analyse(cells, n_boot=n_boot, levels=(target, 0.9))
    group = summary["groups"][0] if summary.get("groups") else {}
    key = f"n{round(target * 100)}"
    return {
        key: group.get(key),
        f"{key}_ci": group.get(f"{key}_ci"),
        "n50": group.get("n50"),
        "n50_ci": group.get("n50_ci"),
        "fit": group.get("fit"),
    }
