"""Named crash points, so tests can kill a run or sweep at an exact phase.

Set ``SURETRAP_CRASH_AT=PHASE:N[,PHASE:N...]`` and the process kills itself with SIGKILL
(no cleanup, no ``finally``: what a power cut or the OOM killer does) the Nth time it
passes `crash_point(PHASE)`. Counting is per process. Unset, a crash point costs one
environment lookup. The crash-safety tests (tests/test_crash.py) use this to hit every
phase deterministically; no library offers such a fault-injection hook, hence these lines.

Phases (where they sit):
  dataset    between writing dataset.jsonl and the manifest that marks it complete
  train      after each optimiser step
  save       after the adapter is written, before it is moved into the run directory
  evaluate   after the tuned model's generations, before (1st) and between (2nd) the writes
  rename     before a finished run directory is renamed into place (and, with --force,
             between moving the old one aside and renaming the new one in)
  cell_done  after a sweep cell's directory is in place, before the store records it
  store      inside a results-store transaction, before COMMIT
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "SURETRAP_CRASH_AT"
PHASES = ("dataset", "train", "save", "evaluate", "rename", "cell_done", "store")

_passed: Counter[str] = Counter()


def crash_point(phase: str) -> None:
    """Kill this process here if SURETRAP_CRASH_AT asks for this pass of `phase`."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _passed[phase] += 1
    for item in spec.split(","):
        name, _, count = item.strip().partition(":")
        if name == phase and count.isdigit() and _passed[phase] == int(count):
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
