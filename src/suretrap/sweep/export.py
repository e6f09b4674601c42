"""Export the results table as CSV, JSON or Parquet."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from suretrap.errors import ConfigError
from suretrap.sweep.store import table


def export_table(sweep_dir: Path, fmt: str) -> bytes:
    rows = table(sweep_dir)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    if fmt == "json":
        return (json.dumps(rows, indent=2) + "\n").encode()
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().encode()
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("--format parquet needs pyarrow (pip install pyarrow)") from None
        tbl = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
        sink = io.BytesIO()
        pq.write_table(tbl, sink)
        return sink.getvalue()
    raise ConfigError(f"--format: unknown format {fmt!r}")
