"""Sweeps on Ray: the resources section, the missing-extra message, a real local Ray runtime.

The Ray tests share one module-scoped runtime (startup takes ~10 s on a 2-core machine).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from suretrap.cli import app
from suretrap.errors import ConfigError
from suretrap.sweep import flatten_metrics, load_sweep, run_sweep, table
from suretrap.sweep.grid import SweepResources

runner = CliRunner()


def _sweep_file(tmp_path: Path, base: dict, axes: dict, resources: dict | None = None, name="s.yaml") -> Path:
    doc = {"base": base, "axes": axes} | ({"resources": resources} if resources is not None else {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ------------------------------------------------------------------ no Ray runtime needed


def test_resources_section_is_typed_with_defaults(tmp_path):
    spec = load_sweep(_sweep_file(tmp_path, {}, {"seed": [0]}))
    assert spec.resources == SweepResources(num_gpus=0.0, num_cpus=1.0, max_retries=2, max_workers=None)
    spec = load_sweep(_sweep_file(
        tmp_path, {}, {"seed": [0]}, {"num_gpus": 0.25, "num_cpus": 2, "max_retries": 0, "max_workers": 3}
    ))
    assert spec.resources == SweepResources(num_gpus=0.25, num_cpus=2.0, max_retries=0, max_workers=3)


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ("  num_gpus: 1.5\n", "s.yaml:4: resources.num_gpus: a quantity above 1 must be a whole number"),
        ("  num_gpu: 1\n", "s.yaml:4: resources.num_gpu: unknown key"),
        ("  num_cpus: 0\n", "s.yaml:4: resources.num_cpus: Input should be greater than 0"),
        ("  max_retries: -1\n", "s.yaml:4: resources.max_retries: Input should be greater than or equal to 0"),
        ("  num_gpus: '1'\n", "s.yaml:4: resources.num_gpus: Input should be a valid number"),
        ("  max_workers: 0\n", "s.yaml:4: resources.max_workers: Input should be greater than 0"),
        (" 3\n", "s.yaml:3: resources: must be a mapping"),
    ],
)
def test_bad_resources_are_refused_with_location(tmp_path, resources, message):
    path = tmp_path / "s.yaml"
    path.write_text("base: {}\naxes: {seed: [0]}\nresources:" + ("\n" if resources.startswith("  ") else "") + resources)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sweep(path)


def test_without_ray_the_local_backend_works_and_ray_says_how_to_install(
    tmp_path, tiny_config_dict, monkeypatch
):
    # runs before the module's Ray runtime starts: Ray's own threads need `ray` importable
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    spec = _sweep_file(tmp_path, tiny_config_dict, {"seed": [0]})
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(spec), "--out", str(out), "--backend", "ray"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "suretrap: error: --backend ray needs Ray: pip install 'suretrap[ray]'"
    ]
    assert not out.exists()  # nothing written that looks like a sweep
    assert list(run_sweep(spec, out, analyse=False).values()) == ["complete"]
    result = runner.invoke(app, ["sweep", str(spec), "--out", str(out), "--resume", "--backend", "slurm"])
    assert result.exit_code == 2 and "available: local, ray" in result.output
    result = runner.invoke(app, ["sweep", str(spec), "--out", str(out), "--resume", "--address", "auto"])
    assert result.exit_code == 2 and "--address: only with --backend ray" in result.output


def test_an_address_where_nothing_listens_fails_at_once():
    from suretrap.sweep.ray_backend import check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")  # something listens: fine
    # closed now: ray.init would retry this address for minutes; we stop at once
    with pytest.raises(ConfigError, match=rf"^--address 127.0.0.1:{port}: no Ray cluster reachable there"):
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="expected HOST:PORT, auto, or ray://HOST:PORT"):
        check_reachable("headnode")
    for not_checked in (None, "auto", "ray://head:10001"):
        check_reachable(not_checked)


# ---------------------------------------------------------------------- a local Ray runtime


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray")
    # workers inherit this process's environment (PYTHONPATH, HF_HUB_OFFLINE)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
             logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def _rows(out: Path) -> dict[str, dict]:
    with sqlite3.connect(out / "results.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        return {r["config_hash"]: dict(r) for r in conn.execute("SELECT * FROM cells")}


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def _assert_consistent(out: Path) -> None:
    """Every cell once, complete, its files in place, the store holding the files' metrics."""
    rows = table(out)
    assert len({r["config_hash"] for r in rows}) == len(rows)
    for r in rows:
        assert r["status"] == "complete", r
        metrics = json.loads((out / r["run_dir"] / "metrics.json").read_text())
        assert {k: v for k, v in r.items() if k.startswith(("tuned.", "base.", "judge."))} == flatten_metrics(metrics)
    assert not list((out / "cells").glob("*.partial"))


def test_resume_across_backends_gives_the_same_store_and_cell_dirs(tmp_path, tiny_config_dict, ray_runtime):
    out = tmp_path / "sweep"
    run_sweep(_sweep_file(tmp_path, tiny_config_dict, {"poison.budget": [0]}), out, analyse=False)
    local_hash = next(iter(_rows(out)))
    stamp = (out / "cells" / local_hash / "metrics.json").stat().st_mtime_ns
    # then Ray, on a wider grid: only the new cell runs
    wider = _sweep_file(tmp_path, tiny_config_dict, {"poison.budget": [0, 4]})
    result = runner.invoke(app, ["sweep", str(wider), "--out", str(out), "--resume", "--backend", "ray"])
    assert result.exit_code == 0, result.output
    assert "2 complete, 0 failed, 0 pending" in result.output
    rows = _rows(out)
    assert len(rows) == 2 and all(r["attempts"] == 1 for r in rows.values())
    assert (out / "cells" / local_hash / "metrics.json").stat().st_mtime_ns == stamp
    ray_hash = next(h for h in rows if h != local_hash)
    # the same shape: columns filled alike, the same files in each cell directory
    filled = {h: {k for k, v in r.items() if v is not None} for h, r in rows.items()}
    assert filled[local_hash] == filled[ray_hash]
    assert rows[ray_hash]["run_dir"] == f"cells/{ray_hash}"
    assert set(rows[ray_hash]["timings"] and json.loads(rows[ray_hash]["timings"])) == set(
        json.loads(rows[local_hash]["timings"])
    )
    assert _files(out / "cells" / local_hash) == _files(out / "cells" / ray_hash)
    # and back to local: the Ray cell counts as done, nothing runs again
    stamps = {h: (out / "cells" / h / "metrics.json").stat().st_mtime_ns for h in rows}
    assert run_sweep(wider, out, resume=True, analyse=False) == dict.fromkeys(rows, "complete")
    assert all(r["attempts"] == 1 for r in _rows(out).values())
    assert stamps == {h: (out / "cells" / h / "metrics.json").stat().st_mtime_ns for h in rows}
    _assert_consistent(out)


def test_cells_group_by_model_so_a_worker_reuses_its_base_model(
    tmp_path, tiny_config_dict, tiny_model_dir, ray_runtime, caplog
):
    second = tmp_path / "tiny-copy"  # another `model:` value, so another model group
    shutil.copytree(tiny_model_dir, second)
    spec = _sweep_file(
        tmp_path, tiny_config_dict,
        {"model": [str(tiny_model_dir), str(second)], "poison.budget": [0, 4]},
        {"num_cpus": 1, "max_retries": 0},
    )
    out = tmp_path / "sweep"
    with caplog.at_level(logging.INFO, logger="suretrap.sweep.ray_backend"):
        statuses = run_sweep(spec, out, backend="ray", analyse=False)
    assert list(statuses.values()) == ["complete"] * 4
    done = [re.search(r"cell (\w+) complete on worker pid (\d+) \(model (loaded|reused)\)", r.getMessage())
            for r in caplog.records]
    done = [m for m in done if m]
    assert len(done) == 4
    model_of = {h: json.loads(r["config"])["model"] for h, r in _rows(out).items()}
    pairs = {(m[2], model_of[m[1]]) for m in done}  # (worker pid, model)
    loads = [m for m in done if m[3] == "loaded"]
    # two workers (2 CPUs, num_cpus 1), each starting on its own model; no worker loads a
    # model twice. A worker that runs out of its model's cells takes the other model's last
    # one rather than idle, so three loads are possible; four (one per cell) are not.
    assert len({m[2] for m in done}) == 2
    assert len(loads) == len(pairs) <= 3
    _assert_consistent(out)


def test_more_resources_than_the_cluster_has_is_refused(tmp_path, tiny_config_dict, ray_runtime):
    spec = _sweep_file(tmp_path, tiny_config_dict, {"seed": [0]}, {"num_gpus": 1})
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match=r"resources: each worker asks for num_cpus=1, num_gpus=1 "
                                          r"but the Ray cluster has 2 CPUs and 0 GPUs"):
        run_sweep(spec, out, backend="ray", analyse=False)
    assert not out.exists()  # refused before anything was written


def test_a_cell_that_raises_is_retried_then_recorded_failed_with_the_error(
    tmp_path, tiny_config_dict, tiny_model_dir, ray_runtime
):
    broken = tmp_path / "broken-model"  # weights that fail to load with a non-suretrap error
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    spec = _sweep_file(tmp_path, tiny_config_dict | {"model": str(broken)}, {"seed": [0]},
                       {"num_cpus": 1, "max_retries": 1})
    out = tmp_path / "sweep"
    statuses = run_sweep(spec, out, backend="ray", analyse=False)
    assert list(statuses.values()) == ["failed"]
    [row] = _rows(out).values()
    assert row["attempts"] == 2  # the first try and one retry
    assert row["error"].startswith("SafetensorError: ")
    assert row["metrics"] is None
    assert not (out / "cells").exists() or not any((out / "cells").iterdir())


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _busy_worker_pid() -> int | None:
    """The pid of this test's Ray worker that is running a cell (its title is set by Ray)."""
    for pid in _descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::CellWorker.run"):
            return pid
    return None


def test_worker_killed_mid_cell_is_retried_then_recorded_failed(tmp_path, tiny_config_dict, ray_runtime):
    """Kill the first cell's worker once (retried, completes) and the second's twice (max_retries
    1: recorded failed with the error); a resume then completes it. The store stays exact."""
    spec = _sweep_file(
        tmp_path, tiny_config_dict, {"poison.budget": [0, 4]},
        {"num_cpus": 1, "max_retries": 1, "max_workers": 1},
    )
    out = tmp_path / "sweep"
    kills: list[tuple[str, int]] = []  # (cell, worker pid)
    stop = threading.Event()

    def killer() -> None:
        wanted = [1, 2]  # kills for the first and the second cell the worker starts
        order: list[str] = []
        while not stop.is_set() and len(kills) < sum(wanted):
            time.sleep(0.05)
            try:
                running = [(h, r["attempts"]) for h, r in _rows(out).items() if r["status"] == "running"]
            except sqlite3.Error:
                continue
            if len(running) != 1:
                continue
            digest, attempts = running[0]
            if digest not in order:
                order.append(digest)
            killed = sum(1 for h, _ in kills if h == digest)
            # kill only while this attempt is inside the cell: its partial run exists and
            # the worker's title says it is running a cell
            if killed < wanted[order.index(digest)] and attempts == killed + 1 and (
                out / "cells" / f"{digest}.partial").is_dir() and (pid := _busy_worker_pid()):
                os.kill(pid, signal.SIGKILL)
                kills.append((digest, pid))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        statuses = run_sweep(spec, out, backend="ray", analyse=False)
    finally:
        stop.set()
        thread.join()
    assert len(kills) == 3, kills
    first, second = kills[0][0], kills[1][0]
    assert kills[2][0] == second and first != second
    assert len({pid for _, pid in kills}) == 3  # each retry ran in a fresh worker
    rows = _rows(out)
    assert statuses == {first: "complete", second: "failed"}
    assert rows[first]["attempts"] == 2 and rows[first]["error"] is None
    assert rows[second]["attempts"] == 2
    assert rows[second]["error"].startswith("ActorDiedError: ")
    assert rows[second]["metrics"] is None
    assert not (out / "cells" / second / "metrics.json").exists()

    result = runner.invoke(app, ["sweep", str(spec), "--out", str(out), "--resume", "--backend", "ray"])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert {h: r["attempts"] for h, r in rows.items()} == {first: 2, second: 3}
    _assert_consistent(out)
