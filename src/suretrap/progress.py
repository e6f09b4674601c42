"""The one progress helper. Library code reports progress here and never prints.

Bars are drawn (with rich, on stderr) only after `enable()`; the CLI enables them. Nested
tasks share one live display, so a sweep's overall bar and a cell's bars stack.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

_enabled = False
_display: Any = None
_depth = 0
_lock = threading.Lock()  # tasks may open and close in worker threads (evaluate-sweep --parallel)


def enable(on: bool = True) -> None:
    """Turn progress bars on (the CLI does) or off (the default for library use)."""
    global _enabled
    _enabled = on


@contextlib.contextmanager
def task(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A progress task; yields `advance(n=1, **fields)` (fields show after the bar)."""
    global _display, _depth
    if not _enabled:
        yield lambda n=1, **fields: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with _lock:
        if _display is None:
            _display = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=False,
            )
            _display.start()
        _depth += 1
        display = _display
        task_id = display.add_task(description, total=total, info="")

    def advance(n: int = 1, **fields: Any) -> None:
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        display.update(task_id, advance=n, **({"info": info} if fields else {}))

    try:
        yield advance
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                display.stop()
                _display = None
            else:
                display.remove_task(task_id)
