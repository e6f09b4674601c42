"""The sweep results store: one SQLite row per cell, written only by the driver.

A cell is recorded `complete` only after its run directory has been renamed into place
(`suretrap.run` writes `<dir>.partial` and renames it), and each status change is one
transaction, so a crash at any point leaves either the old or the new state. A row
found `running` when a driver starts is a crash leftover and is run again.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

from suretrap.crashpoints import crash_point
from suretrap.errors import ConfigError

DB_FILE = "results.sqlite"
STATUSES = ("complete", "running", "failed", "pending")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    config_hash TEXT PRIMARY KEY,
    status      TEXT NOT NULL CHECK (status IN ('complete', 'running', 'failed', 'pending')),
    axes        TEXT NOT NULL,          -- JSON: dotted axis name -> value
    config      TEXT NOT NULL,          -- JSON: the resolved run config
    run_dir     TEXT NOT NULL,          -- relative to the sweep directory
    metrics     TEXT,                   -- JSON: metrics.json of the run
    timings     TEXT,                   -- JSON: timings.json of the run
    started_at  REAL,
    finished_at REAL,
    duration_s  REAL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT
);
"""


class Store:
    """Thin wrapper over the SQLite file; every write is its own transaction."""

    def __init__(self, sweep_dir: Path) -> None:
        self.path = sweep_dir / DB_FILE
        sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:  # read-only, full, missing directory, locked
            raise ConfigError(f"{self.path}: cannot open the results database ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path}: not a suretrap results database ({exc})") from None
        self.conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, sql: str, params: Iterable[Any]) -> None:
        try:
            with closing(self.conn.cursor()) as cur:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    cur.execute(sql, tuple(params))
                    crash_point("store")
                    cur.execute("COMMIT")
                except BaseException:
                    if self.conn.in_transaction:
                        cur.execute("ROLLBACK")
                    raise
        except sqlite3.OperationalError as exc:  # disk full, read-only file, lock timeout
            raise ConfigError(f"{self.path}: cannot write the results database ({exc})") from None

    def register(self, config_hash: str, axes: dict[str, Any], config: dict[str, Any]) -> None:
        """Add a cell as pending unless it is already known.

        A known cell reached from another sweep file gains that file's axis names (same
        config, so the values agree): a demo cell reused by a wider grid is then grouped
        with its new neighbours by dataset size, model, and so on.
        """
        self._write(
            "INSERT OR IGNORE INTO cells (config_hash, status, axes, config, run_dir) "
            "VALUES (?, 'pending', ?, ?, ?)",
            (config_hash, json.dumps(axes, sort_keys=True), json.dumps(config, sort_keys=True),
             f"cells/{config_hash}"),
        )
        row = self.conn.execute(
            "SELECT axes FROM cells WHERE config_hash = ?", (config_hash,)
        ).fetchone()
        known = json.loads(row["axes"])
        merged = known | {k: v for k, v in axes.items() if k not in known}
        if merged != known:
            self._write(
                "UPDATE cells SET axes = ? WHERE config_hash = ?",
                (json.dumps(merged, sort_keys=True), config_hash),
            )

    def status(self, config_hash: str) -> str | None:
        row = self.conn.execute(
            "SELECT status FROM cells WHERE config_hash = ?", (config_hash,)
        ).fetchone()
        return row["status"] if row else None

    def mark_running(self, config_hash: str) -> None:
        self._write(
            "UPDATE cells SET status='running', started_at=?, attempts=attempts+1, error=NULL "
            "WHERE config_hash=?",
            (time.time(), config_hash),
        )

    def mark_complete(
        self, config_hash: str, metrics: dict[str, Any], timings: dict[str, Any] | None
    ) -> None:
        now = time.time()
        self._write(
            "UPDATE cells SET status='complete', metrics=?, timings=?, finished_at=?, "
            "duration_s=? - COALESCE(started_at, ?), error=NULL WHERE config_hash=?",
            (json.dumps(metrics, sort_keys=True), json.dumps(timings or {}, sort_keys=True),
             now, now, now, config_hash),
        )

    def replace_metrics(self, config_hash: str, metrics: dict[str, Any]) -> None:
        """New metrics for a complete cell re-evaluated in place (its timings stay)."""
        self._write(
            "UPDATE cells SET metrics=? WHERE config_hash=? AND status='complete'",
            (json.dumps(metrics, sort_keys=True), config_hash),
        )

    def mark_failed(self, config_hash: str, error: str) -> None:
        now = time.time()
        self._write(
            "UPDATE cells SET status='failed', error=?, finished_at=?, "
            "duration_s=? - COALESCE(started_at, ?) WHERE config_hash=?",
            (error, now, now, now, config_hash),
        )

    def rows(self) -> list[dict[str, Any]]:
        """Every cell as a dict with JSON columns decoded, in insertion order."""
        out = []
        for row in self.conn.execute("SELECT * FROM cells ORDER BY rowid"):
            item = dict(row)
            for key in ("axes", "config", "metrics", "timings"):
                item[key] = json.loads(item[key]) if item[key] else None
            out.append(item)
        return out


def open_existing(sweep_dir: Path) -> Store:
    if not (sweep_dir / DB_FILE).is_file():
        raise ConfigError(f"{sweep_dir}: no {DB_FILE} (not a sweep directory)")
    return Store(sweep_dir)


# metrics.json entries that describe the evaluation rather than hold metrics per split
# (endpoint and vLLM evaluations: `suretrap.run.evaluate_endpoint_run`, `suretrap.vllm_backend`)
RECORD_KEYS = ("unavailable", "endpoint", "backend")


def flatten_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """{"tuned": {split: {m: v}}} -> {"tuned.split.m": v}; {"judges": {m: name}} -> "judge.m"."""
    flat: dict[str, Any] = {}
    for model, splits in (metrics or {}).items():
        if model == "judges":
            flat |= {f"judge.{m}": name for m, name in splits.items()}
            continue
        if model in RECORD_KEYS or not isinstance(splits, dict):
            continue
        for split, values in splits.items():
            for name, value in values.items():
                flat[f"{model}.{split}.{name}"] = value
    return flat


def table(sweep_dir: Path) -> list[dict[str, Any]]:
    """Export rows: config_hash, status, axis values (dotted names), timings, metrics."""
    with open_existing(sweep_dir) as store:
        rows = store.rows()
    axis_names: list[str] = []
    for row in rows:
        for name in row["axes"]:
            if name not in axis_names:
                axis_names.append(name)
    out = []
    for row in rows:
        item: dict[str, Any] = {"config_hash": row["config_hash"], "status": row["status"]}
        item |= {name: row["axes"].get(name) for name in axis_names}
        item |= {
            "run_dir": row["run_dir"],
            "attempts": row["attempts"],
            "duration_s": row["duration_s"],
            "error": row["error"],
        }
        item |= flatten_metrics(row["metrics"])
        out.append(item)
    return out
