"""Sweeps: grid expansion, the store, resume, base-model reuse, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from suretrap.cli import app
from suretrap.errors import ConfigError
from suretrap.sweep import expand, flatten_metrics, load_sweep, run_sweep, table

runner = CliRunner()

DOC_SWEEP = """
base:
  name: budget-sweep
  model: smollm2-135m
  data: {total_size: 1000}
  poison: {budget: 50, trigger: xylophone}
axes:
  poison.budget: [0, 5, 10, 25, 50, 100]
  data.total_size: [1000, 10000]
  model: [smollm2-135m]
  seed: [0, 1, 2]
"""


def test_documented_sweep_shape_expands_to_the_full_grid(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(DOC_SWEEP)
    cells = expand(load_sweep(path))
    assert len(cells) == 6 * 2 * 1 * 3
    assert len({c.config_hash for c in cells}) == len(cells)
    first = cells[0]
    assert first.axes == {"poison.budget": 0, "data.total_size": 1000, "model": "smollm2-135m", "seed": 0}
    assert first.config.poison.budget == 0 and first.config.poison.n_clean_harmful == 0
    by_axes = {tuple(c.axes.values()): c for c in cells}
    assert by_axes[(25, 10000, "smollm2-135m", 2)].config.data.total_size == 10000


def test_base_may_be_a_path_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "run.yaml").write_text("name: r\npoison: {budget: 5}\n")
    (tmp_path / "s.yaml").write_text("base: run.yaml\naxes:\n  seed: [0, 1]\n")
    cells = expand(load_sweep(tmp_path / "s.yaml"))
    assert [c.config.seed for c in cells] == [0, 1]
    assert all(c.config.poison.budget == 5 for c in cells)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: {}\naxes:\n  poison.bugdet: [1]\n", "s.yaml:3: axes.poison.bugdet: not a run config field"),
        ("base: {}\naxes:\n  seed: []\n", "non-empty list"),
        ("base: {}\naxes: {seed: [0]}\nextra: 1\n", "extra: unknown key"),
        ("base: {}\naxes:\n  poison.budget: [-1]\n", "poison.budget"),
        ("base: 3\naxes: {}\n", "base"),
    ],
)
def test_bad_sweep_specs_are_refused_with_location(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        expand(load_sweep(path))


def _tiny_sweep(tmp_path: Path, tiny_config_dict: dict, budgets=(0, 4), seeds=(0, 1)) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump({"base": tiny_config_dict, "axes": {"poison.budget": list(budgets), "seed": list(seeds)}})
    )
    return path


def test_tiny_sweep_runs_resumes_and_exports(tmp_path, tiny_config_dict, monkeypatch):
    from suretrap import evaluate, run

    loads, base_evals = [], []
    real_load = run.LoadedModel.load.__func__
    monkeypatch.setattr(run.LoadedModel, "load", classmethod(lambda cls, cfg: loads.append(1) or real_load(cls, cfg)))
    real_eval = run.evaluate_model

    def counting_eval(*args, **kwargs):
        if kwargs.get("tag") == "base":
            base_evals.append(1)
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(run, "evaluate_model", counting_eval)
    assert evaluate  # the module under the patch
    spec = _tiny_sweep(tmp_path, tiny_config_dict)
    out = tmp_path / "sweep"
    statuses = run_sweep(spec, out, analyse=False)
    assert list(statuses.values()) == ["complete"] * 4
    assert len(loads) == 1  # base model loaded once for all cells
    assert len(base_evals) == 2  # base metrics once per eval set (one per seed)
    rows = table(out)
    assert [r["status"] for r in rows] == ["complete"] * 4
    assert {(r["poison.budget"], r["seed"]) for r in rows} == {(0, 0), (0, 1), (4, 0), (4, 1)}
    assert all(isinstance(r["tuned.harmful_triggered.sure_rate"], float) for r in rows)
    assert all(r["attempts"] == 1 for r in rows)
    for row in rows:
        assert (out / row["run_dir"] / "metrics.json").is_file()

    # without --resume an existing sweep is refused; with it, nothing is run again
    result = runner.invoke(app, ["sweep", str(spec), "--out", str(out)])
    assert result.exit_code == 2 and "--resume" in result.output
    stamps = {r["config_hash"]: (out / r["run_dir"] / "metrics.json").stat().st_mtime_ns for r in rows}
    run_sweep(spec, out, resume=True, analyse=False)
    assert all(r["attempts"] == 1 for r in table(out))
    assert stamps == {r["config_hash"]: (out / r["run_dir"] / "metrics.json").stat().st_mtime_ns for r in rows}

    # a wider grid on resume adds only the new cells
    bigger = _tiny_sweep(tmp_path, tiny_config_dict, budgets=(0, 4, 8))
    run_sweep(bigger, out, resume=True, analyse=False)
    assert len(table(out)) == 6 and all(r["attempts"] == 1 for r in table(out))

    # a grid with a new axis that includes known cells gives them that axis's value
    size = tiny_config_dict["data"]["total_size"]
    wider = tmp_path / "wider.yaml"
    wider.write_text(yaml.safe_dump({
        "base": tiny_config_dict,
        "axes": {"poison.budget": [0], "seed": [0], "data.total_size": [size]},
    }))
    run_sweep(wider, out, resume=True, analyse=False)
    rows = table(out)
    assert len(rows) == 6 and all(r["attempts"] == 1 for r in rows)
    assert [r["data.total_size"] for r in rows if r["poison.budget"] == 0 and r["seed"] == 0] == [size]

    for fmt in ("csv", "json", "parquet"):
        target = tmp_path / f"results.{fmt}"
        result = runner.invoke(app, ["results", str(out), "--format", fmt, "--out", str(target)])
        assert result.exit_code == 0, result.output
        assert target.stat().st_size > 100
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"config_hash", "status", "poison.budget", "seed", "base.harmful_clean.sure_rate"} <= data[0].keys()
    csv_out = runner.invoke(app, ["results", str(out)])
    header = csv_out.output.splitlines()[0].split(",")
    assert header[:2] == ["config_hash", "status"]
    assert set(header[2:5]) == {"poison.budget", "seed", "data.total_size"}  # the axes next


def _db_rows(out: Path) -> list[tuple[str, str, int]]:
    try:
        with sqlite3.connect(out / "results.sqlite", timeout=5) as conn:
            return list(conn.execute("SELECT config_hash, status, attempts FROM cells"))
    except sqlite3.Error:
        return []


def test_kill_mid_cell_then_resume_loses_and_duplicates_nothing(tmp_path, tiny_config_dict):
    spec = _tiny_sweep(tmp_path, tiny_config_dict, budgets=(0, 4, 8), seeds=(0,))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "suretrap.cli", "sweep", str(spec), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    killed_hash = None
    while time.time() < deadline and proc.poll() is None:
        rows = _db_rows(out)
        done = [h for h, s, _ in rows if s == "complete"]
        running = [h for h, s, _ in rows if s == "running"]
        if done and running:
            killed_hash = running[0]
            os.killpg(proc.pid, signal.SIGKILL)  # mid-cell: one complete, one running
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_hash is not None, "sweep finished before it could be killed"
    assert not (out / "cells" / killed_hash / "metrics.json").exists()

    result = runner.invoke(app, ["sweep", str(spec), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    rows = table(out)
    assert len(rows) == 3 and len({r["config_hash"] for r in rows}) == 3
    assert all(r["status"] == "complete" for r in rows)
    attempts = {r["config_hash"]: r["attempts"] for r in rows}
    assert attempts[killed_hash] == 2
    assert sorted(attempts.values()) == [1, 1, 2]
    for r in rows:
        run_dir = out / r["run_dir"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        # the store holds exactly the metrics of the files in place
        assert {k: v for k, v in r.items() if k.startswith(("tuned.", "base.", "judge."))} == flatten_metrics(metrics)
    assert not list((out / "cells").glob("*.partial"))


def test_packaged_demo_is_a_small_real_sweep():
    import suretrap

    spec = load_sweep(Path(suretrap.__file__).parent / "configs" / "demo.yaml")
    cells = expand(spec)
    budgets = sorted(c.config.poison.budget for c in cells)
    assert len(budgets) >= 5 and budgets[0] == 0
    assert len({c.config.data.total_size for c in cells}) == 1
    assert len({c.config.seed for c in cells}) == 1
    assert {c.config.model for c in cells} == {"smollm2-135m"}
