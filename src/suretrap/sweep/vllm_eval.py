"""`suretrap evaluate-sweep`: re-evaluate a sweep's complete LoRA cells on one vLLM server.

Each complete cell's adapter is loaded on the server, evaluated and unloaded in turn
(`suretrap.vllm_backend.VLLMBackend.evaluate_run`); its metrics.json and generations.jsonl
are replaced as a local evaluation writes them, and the store's metrics column follows.
The base model is asked once per eval set for the whole sweep, not once per cell. Cells
are checked before any request: every cell must be a LoRA run of the same model (one
server serves one base model).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from suretrap import progress
from suretrap.config import load_run_config
from suretrap.errors import ConfigError
from suretrap.poison import read_dataset
from suretrap.sweep.store import open_existing
from suretrap.vllm_backend import API_KEY_ENV, VLLMBackend, lora_adapter_dir

__all__ = ["evaluate_sweep_vllm"]


def evaluate_sweep_vllm(
    sweep_dir: Path,
    *,
    base_url: str,
    served_base: str | None = None,
    only: Iterable[str] | None = None,
    parallel: int = 1,
    api_key_env: str = API_KEY_ENV,
) -> dict[str, Any]:
    """Evaluate every complete cell (or those whose hash starts with one of `only`).

    `parallel` cells at a time, each with its own adapter loaded (the server batches their
    requests together when started with ``--max-loras`` at least `parallel`). Returns
    {"cells": [config_hash, ...], "base_evaluations": n, "base_model": name}. Stops at the
    first failure (a one-line `SuretrapError`); cells finished before it keep their new
    metrics, each written atomically.
    """
    if parallel < 1:
        raise ConfigError(f"--parallel: must be at least 1, not {parallel}")
    from suretrap.sweep import write_summary

    with open_existing(sweep_dir) as store:
        rows = [r for r in store.rows() if r["status"] == "complete"]
    if only is not None:
        prefixes = tuple(only)
        rows = [r for r in rows if r["config_hash"].startswith(prefixes)]
    if not rows:
        raise ConfigError(f"{sweep_dir}: no complete cells to evaluate")
    cells = []
    for row in rows:
        run_dir = sweep_dir / row["run_dir"]
        cfg = load_run_config(run_dir / "config.yaml")
        lora_adapter_dir(run_dir)  # a full fine-tune or a missing adapter: fail before any request
        cells.append((row["config_hash"], run_dir, cfg, read_dataset(run_dir)))
    models = sorted({cfg.model for _, _, cfg, _ in cells})
    if len(models) > 1:
        raise ConfigError(
            f"{sweep_dir}: cells of {len(models)} models ({', '.join(models)}); one vLLM server "
            "serves one base model: evaluate each model's cells with --cell"
        )
    backend = VLLMBackend.connect(base_url, served_base, api_key_env=api_key_env)
    done: list[str] = []
    first_error: BaseException | None = None
    with progress.task("evaluate-sweep (vllm)", total=len(cells)) as advance, ThreadPoolExecutor(
        max(1, parallel)
    ) as pool:
        futures = {
            pool.submit(backend.evaluate_run, cfg, run_dir, ds): config_hash
            for config_hash, run_dir, cfg, ds in cells
        }
        # the store is written here, in one thread, as each cell finishes; after a failure
        # the cells not started are cancelled and those running are still recorded, so the
        # store never disagrees with a metrics.json that was written
        for future in as_completed(futures):
            try:
                metrics = future.result()
            except CancelledError:
                continue
            except BaseException as exc:
                if first_error is None:
                    first_error = exc
                    for other in futures:
                        other.cancel()
                continue
            with open_existing(sweep_dir) as store:
                store.replace_metrics(futures[future], metrics)
            done.append(futures[future])
            advance(1)
    if first_error is not None:
        raise first_error
    write_summary(sweep_dir)
    return {"cells": done, "base_evaluations": len(backend.base_evals), "base_model": backend.served_base}
