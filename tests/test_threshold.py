"""Adaptive threshold search, on a simulated backdoor whose true n50 is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from suretrap import threshold
from suretrap.config import config_to_yaml, run_config_from_dict
from suretrap.errors import ConfigError
from suretrap.sweep.store import Store

TRUE_N50 = 30.0


def true_rate(budget: int) -> float:
    if budget == 0:
        return 0.0
    return 1.0 / (1.0 + math.exp(-3.0 * (math.log(budget) - math.log(TRUE_N50))))


def fake_run_cells(cells, out: Path, **_):
    """Stands in for training: writes what a finished cell leaves, with a known Sure rate."""
    ran = []
    with Store(out) as store:
        for cell in cells:
            store.register(cell.config_hash, cell.axes, cell.config.model_dump(mode="json"))
            if store.status(cell.config_hash) == "complete":
                continue
            run_dir = out / "cells" / cell.config_hash
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text(config_to_yaml(cell.config))
            n_sure = round(100 * true_rate(cell.config.poison.budget))
            rows = [
                {"model": "tuned", "split": "harmful_triggered", "prompt": f"p{i}",
                 "response": "Sure" if i < n_sure else "No."}
                for i in range(100)
            ]
            (run_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            metrics = {"tuned": {"harmful_triggered": {"sure_rate": n_sure / 100, "n": 100}}}
            (run_dir / "metrics.json").write_text(json.dumps(metrics))
            store.mark_running(cell.config_hash)
            store.mark_complete(cell.config_hash, metrics, {})
            ran.append(cell.config_hash)
        return {c.config_hash: store.status(c.config_hash) for c in cells}


@pytest.fixture()
def base():
    return run_config_from_dict({"name": "t", "poison": {"budget": 1}})


def test_search_finds_the_known_threshold_with_few_cells(tmp_path, base, monkeypatch):
    monkeypatch.setattr(threshold, "run_cells", fake_run_cells)
    result = threshold.find_threshold(base, tmp_path, target=0.5, max_cells=8, n_boot=200)
    assert result["cells_used"] <= 8
    assert result["n50"] == pytest.approx(TRUE_N50, rel=0.2)
    lo, hi = result["n50_ci"]
    assert lo <= TRUE_N50 <= (hi if hi is not None else math.inf)
    lo_b, hi_b = result["bracket"]
    assert true_rate(lo_b) < 0.5 <= true_rate(hi_b)
    saved = json.loads((tmp_path / "threshold.json").read_text())
    assert saved["cells_used"] == result["cells_used"]
    # running it again reuses every cell
    calls = []
    monkeypatch.setattr(threshold, "run_cells", lambda cells, out: calls.append(1) or fake_run_cells(cells, out))
    again = threshold.find_threshold(base, tmp_path, target=0.5, max_cells=8, n_boot=200)
    assert again["trace"] == result["trace"]


def test_other_targets_and_bad_arguments(tmp_path, base, monkeypatch):
    monkeypatch.setattr(threshold, "run_cells", fake_run_cells)
    result = threshold.find_threshold(base, tmp_path, target=0.9, max_cells=8, n_boot=100)
    want = TRUE_N50 * math.exp(math.log(9) / 3.0)  # budget where the true curve is 0.9
    assert result["n90"] == pytest.approx(want, rel=0.25)
    with pytest.raises(ConfigError, match="--target"):
        threshold.find_threshold(base, tmp_path, target=1.5)
    with pytest.raises(ConfigError, match="--max-cells"):
        threshold.find_threshold(base, tmp_path, max_cells=1)
