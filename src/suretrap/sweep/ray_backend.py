"""The Ray backend: a sweep's cells run as Ray actor tasks; the driver alone writes the store.

Why actors and not plain tasks: loading a base model costs far more than reusing one, and a
plain Ray task cannot choose the worker process that already holds a model. So each worker
is a `CellWorker` actor holding one `LoadedModel`, each cell is one task on it
(`CellWorker.run`), and the driver gives an idle worker the next cell of the model it
already holds; a worker loads each model once per model group. (One generator task per
model group would also load once, but it runs a whole model's cells on one worker, and a
crash re-runs the group; here a crash costs one cell.)

Why the driver counts retries instead of Ray's `max_task_retries` / `max_restarts`: the
store's `attempts` then counts every start of a cell, exactly as the local backend's does,
and a retry is never spent on an actor that is still restarting (Ray fails a call to a
restarting actor at once when `max_task_retries=0`). A worker that died is replaced by a
fresh actor and the cell resubmitted, at most `resources.max_retries` times; then it is
recorded `failed` with the error. An exception raised inside the cell is retried the same
way (on the same worker, which dropped its model), except bad input (SuretrapError), which
would fail the same way again: that is recorded at once.

Workers write cell directories themselves, atomically (`run_experiment`), so DIR must be on
a filesystem every node sees; the driver checks that it can see a cell before recording it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from suretrap import progress
from suretrap.errors import ConfigError, SuretrapError
from suretrap.sweep.grid import Cell, SweepResources
from suretrap.sweep.store import Store

log = logging.getLogger(__name__)

INSTALL_HINT = "--backend ray needs Ray: pip install 'suretrap[ray]'"


def import_ray() -> Any:
    """The `ray` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def model_key(cell: Cell) -> tuple[Any, ...]:
    """Cells with the same key can share one loaded base model (see LoadedModel.fits)."""
    train = cell.config.train
    return (cell.config.model, train.precision, train.method, train.device)


class CellWorker:
    """A Ray actor body: holds one base model and runs the cells it is given, one at a time."""

    def __init__(self) -> None:
        import ray

        self.loaded: Any = None  # a LoadedModel, loaded by the first cell that needs it
        if not ray.get_gpu_ids():
            # Ray (>= 2.4x) leaves CUDA_VISIBLE_DEVICES alone for a worker given no GPU, so
            # `train.device: auto` would take a GPU the scheduler never gave it
            os.environ["CUDA_VISIBLE_DEVICES"] = ""

    def run(self, cell: Cell, out: str) -> dict[str, Any]:
        from suretrap.run import LoadedModel
        from suretrap.sweep import run_cell

        fresh = self.loaded is None or not self.loaded.fits(cell.config)
        info = {"pid": os.getpid(), "fresh_load": fresh}
        try:
            if fresh:
                self.loaded = None  # free the previous model first
                self.loaded = LoadedModel.load(cell.config)
            metrics, timings = run_cell(cell, Path(out), self.loaded)
        except SuretrapError as exc:  # bad input: recorded, not retried
            return info | {"status": "failed", "error": str(exc)}
        except BaseException:
            self.loaded = None  # its state is unknown after a crash mid-cell
            raise  # the driver sees it as a failed attempt and retries the cell
        return info | {"status": "complete", "metrics": metrics, "timings": timings}


def worker_slots(ray: Any, resources: SweepResources) -> int:
    """How many workers may run at once: max_workers, or as many as the cluster's resources fit."""
    if resources.max_workers is not None:
        return resources.max_workers
    total = ray.cluster_resources()
    slots = min(
        math.floor(total.get(name, 0) / need + 1e-9)  # 1 / 0.1 is 9.999...
        for name, need in (("CPU", resources.num_cpus), ("GPU", resources.num_gpus))
        if need > 0
    )
    if slots < 1:
        raise ConfigError(
            f"resources: each worker asks for num_cpus={resources.num_cpus:g}, "
            f"num_gpus={resources.num_gpus:g} but the Ray cluster has "
            f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs "
            "(set resources.max_workers to wait for an autoscaler to add nodes)"
        )
    return slots


def describe(exc: BaseException) -> str:
    """One line for the store: the worker's own exception, or how the worker was lost."""
    cause = getattr(exc, "cause", None)  # RayTaskError carries the exception the cell raised
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at `address` (or start a local one). True if this call started Ray."""
    if ray.is_initialized():
        return False
    check_reachable(address)
    try:
        ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"--address {address}" if address else "ray"
        raise ConfigError(f"{where}: cannot start or reach a Ray cluster ({describe(exc)})") from None
    return True


def check_reachable(address: str | None) -> None:
    """Fail fast on a HOST:PORT where nothing listens.

    Hand-written because ray.init keeps retrying an unreachable GCS address for minutes
    (over 5 here) before it gives up.
    """
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: expected HOST:PORT, auto, or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise ConfigError(
            f"--address {address}: no Ray cluster reachable there ({exc.strerror or exc})"
        ) from None


@contextlib.contextmanager
def cluster(address: str | None, resources: SweepResources) -> Iterator[None]:
    """Ray joined (or started) and checked to fit `resources`, for the block; then let go."""
    ray = import_ray()
    started_here = connect(ray, address)
    try:
        worker_slots(ray, resources)
        yield
    finally:
        if started_here:
            ray.shutdown()


def run_cells_ray(
    cells: list[Cell], out: Path, resources: SweepResources, *, address: str | None = None
) -> dict[str, str]:
    """Run the cells not yet complete in `out`'s store on Ray. Returns status by hash."""
    from suretrap.run import run_complete

    ray = import_ray()
    out = out.resolve()  # workers may run elsewhere: a relative path would mean their cwd
    out.mkdir(parents=True, exist_ok=True)
    started_here = connect(ray, address)
    workers: list[Any] = []
    try:
        slots = worker_slots(ray, resources)  # before the store: a sweep that cannot run writes nothing
        with Store(out) as store:
            for cell in cells:
                store.register(cell.config_hash, cell.axes, cell.config.model_dump(mode="json"))
            todo = [c for c in cells if store.status(c.config_hash) != "complete"]
            queues: dict[tuple[Any, ...], deque[Cell]] = {}
            for cell in todo:
                queues.setdefault(model_key(cell), deque()).append(cell)
            worker_class = ray.remote(
                num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                max_restarts=0, max_task_retries=0,  # the driver retries (see above)
            )(CellWorker)
            workers = [worker_class.remote() for _ in range(min(slots, len(todo)))]
            holds: list[tuple[Any, ...] | None] = [None] * len(workers)  # model key each worker holds
            tries: Counter[str] = Counter()
            in_flight: dict[Any, tuple[int, Cell]] = {}

            def next_cell(worker: int) -> Cell | None:
                key = holds[worker]
                if key is None or not queues[key]:
                    # move to the model with the most cells left per worker already on it
                    left = [k for k, q in queues.items() if q]
                    if not left:
                        return None
                    on = Counter(holds)
                    key = max(left, key=lambda k: len(queues[k]) / (on[k] + 1))
                    holds[worker] = key
                return queues[key].popleft()

            def submit(worker: int, cell: Cell) -> None:
                store.mark_running(cell.config_hash)
                tries[cell.config_hash] += 1
                in_flight[workers[worker].run.remote(cell, str(out))] = (worker, cell)

            with progress.task("sweep", total=len(cells)) as advance:
                advance(len(cells) - len(todo))
                for worker in range(len(workers)):
                    if (cell := next_cell(worker)) is not None:
                        submit(worker, cell)
                while in_flight:
                    [ref], _ = ray.wait(list(in_flight), num_returns=1)
                    worker, cell = in_flight.pop(ref)
                    digest = cell.config_hash
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        error = describe(exc)
                        if not isinstance(exc, ray.exceptions.RayTaskError):
                            # the worker is gone (killed, out of memory, node lost): replace it
                            ray.kill(workers[worker])
                            workers[worker] = worker_class.remote()
                        if tries[digest] <= resources.max_retries:
                            log.warning("cell %s: attempt %d failed (%s); retrying", digest, tries[digest], error)
                            submit(worker, cell)
                            continue
                        log.error("cell %s failed after %d attempts: %s", digest, tries[digest], error)
                        store.mark_failed(digest, error)
                    else:
                        run_dir = out / "cells" / digest
                        log.info(
                            "cell %s %s on worker pid %s (model %s)", digest, result["status"],
                            result["pid"], "loaded" if result["fresh_load"] else "reused",
                        )
                        if result["status"] != "complete":
                            store.mark_failed(digest, result["error"])
                        elif not run_complete(run_dir):
                            store.mark_failed(
                                digest, f"{run_dir}: a worker wrote this cell where the driver cannot "
                                "see it (the sweep directory must be on a filesystem every node shares)",
                            )
                        else:
                            store.mark_complete(digest, result["metrics"], result["timings"])
                    advance(1)
                    if (cell := next_cell(worker)) is not None:
                        submit(worker, cell)
            return {c.config_hash: store.status(c.config_hash) or "pending" for c in cells}
    finally:
        for handle in workers:
            ray.kill(handle)  # no restart: the sweep is over (or the driver is stopping)
        if started_here:
            ray.shutdown()
