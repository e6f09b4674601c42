"""Multi-scale sweeps: grid expansion, the results store, and the local backend.

`run_sweep` runs every cell not yet complete, in one process, loading each base model once
and reusing it across cells (a fresh adapter per cell; base-model metrics once per model
and eval set). Each cell is a normal run directory under `DIR/cells/<config_hash>/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from suretrap import progress
from suretrap.crashpoints import crash_point
from suretrap.errors import ConfigError, SuretrapError
from suretrap.poison import atomic_write
from suretrap.sweep.grid import Cell, SweepSpec, cell_for, expand, load_sweep
from suretrap.sweep.store import DB_FILE, STATUSES, Store, flatten_metrics, open_existing, table

if TYPE_CHECKING:
    from suretrap.run import LoadedModel

__all__ = [
    "Cell",
    "STATUSES",
    "SweepSpec",
    "cell_for",
    "expand",
    "flatten_metrics",
    "load_sweep",
    "open_existing",
    "run_cells",
    "run_sweep",
    "table",
]

log = logging.getLogger(__name__)

SPEC_FILE = "sweep.json"
BACKENDS = ("local", "ray")


def run_cell(cell: Cell, out: Path, loaded: LoadedModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one cell into `out/cells/<hash>`: the work every backend does per cell.

    Returns (metrics, timings); raises whatever the run raised. Touches no store: the
    driver records the outcome (on Ray, this runs on a worker).
    """
    import shutil

    from suretrap.run import complete_for, read_timings, run_experiment

    run_dir = out / "cells" / cell.config_hash
    if run_dir.exists() and not complete_for(run_dir, cell.config):
        shutil.rmtree(run_dir)  # ours, and not complete: never trust it
    # a complete run_dir (crash after its rename, before the store update) is reused, not recomputed
    metrics = run_experiment(cell.config, run_dir, loaded=loaded)
    return metrics, read_timings(run_dir)


def run_cells(
    cells: list[Cell], out: Path, *, on_done: Callable[[Cell, dict[str, Any]], None] | None = None
) -> dict[str, str]:
    """Run the cells not yet complete in `out`'s store (local backend). Returns status by hash."""
    from suretrap.run import LoadedModel

    out.mkdir(parents=True, exist_ok=True)
    with Store(out) as store:
        for cell in cells:
            store.register(cell.config_hash, cell.axes, cell.config.model_dump(mode="json"))
        todo = [c for c in cells if store.status(c.config_hash) != "complete"]
        # group by model so each base model is loaded once
        todo.sort(key=lambda c: (c.config.model, c.config.train.method))
        loaded: LoadedModel | None = None
        with progress.task("sweep", total=len(cells)) as advance:
            advance(len(cells) - len(todo))
            for cell in todo:
                if loaded is None or not loaded.fits(cell.config):
                    loaded = None  # free the previous model first
                    loaded = LoadedModel.load(cell.config)
                store.mark_running(cell.config_hash)
                try:
                    metrics, timings = run_cell(cell, out, loaded)
                except SuretrapError as exc:
                    store.mark_failed(cell.config_hash, str(exc))
                    advance(1)
                    continue
                except Exception as exc:  # one broken cell must not end an overnight sweep
                    log.error("cell %s failed:\n%s", cell.config_hash, traceback.format_exc())
                    store.mark_failed(cell.config_hash, f"{type(exc).__name__}: {exc}")
                    loaded = None  # its state is unknown after a crash mid-cell
                    advance(1)
                    continue
                crash_point("cell_done")
                store.mark_complete(cell.config_hash, metrics, timings)
                if on_done is not None:
                    on_done(cell, metrics)
                advance(1)
        return {c.config_hash: store.status(c.config_hash) or "pending" for c in cells}


def run_sweep(
    spec: SweepSpec | str | Path,
    out: Path | str,
    *,
    resume: bool = False,
    analyse: bool = True,
    backend: str = "local",
    address: str | None = None,
) -> dict[str, str]:
    """Expand the grid and run it into `out` (results.sqlite + cells/), then analyse.

    `backend` is "local" (this process) or "ray" (a Ray cluster at `address`, or a local
    Ray runtime; see suretrap.sweep.ray_backend). Both write the same store and cell
    directories, so a sweep started on one resumes on the other.
    """
    out = Path(out)
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: unknown backend {backend!r} (available: {', '.join(BACKENDS)})")
    if address is not None and backend != "ray":
        raise ConfigError("--address: only with --backend ray")
    if backend == "ray":
        from suretrap.sweep import ray_backend

        ray_backend.import_ray()  # first: without Ray, say how to install it
    if not isinstance(spec, SweepSpec):
        spec = load_sweep(spec)
    cells = expand(spec)
    if (out / DB_FILE).exists() and not resume:
        raise ConfigError(f"{out}: already holds a sweep; pass --resume to continue it")
    with contextlib.ExitStack() as stack:
        if backend == "ray":
            # join the cluster and check it can run a worker before anything is written
            stack.enter_context(ray_backend.cluster(address, spec.resources))
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(
            out / SPEC_FILE,
            (json.dumps({"base": spec.base, "axes": spec.axes}, indent=2, sort_keys=True) + "\n").encode(),
        )
        if backend == "ray":
            statuses = ray_backend.run_cells_ray(cells, out, spec.resources, address=address)
        else:
            statuses = run_cells(cells, out)
    if analyse:
        write_summary(out)
    return statuses


def write_summary(out: Path) -> dict[str, Any]:
    """Fit thresholds over the complete cells and write DIR/summary.json."""
    from suretrap.analysis import analyse, load_cells

    cells = load_cells(out)
    summary = analyse(cells)
    if cells and all("asr" in c.outcomes for c in cells):
        summary["asr"] = analyse(cells, metric="asr")  # judged harmful compliance
    atomic_write(out / "summary.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return summary
