"""Run the `suretrap` CLI in fresh processes that can be SIGKILLed, without paying imports.

A cold `python -m suretrap.cli` spends 5-15 s importing torch/transformers/peft on this
machine, which would make twenty-odd kill-and-resume rounds take minutes. Instead a
multiprocessing *forkserver* imports them once; every round is a fresh process forked
from it (its own memory, files and SQLite connections, like a real second invocation)
that runs the CLI's entry point with the given arguments and environment.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

PRELOAD = ["torch", "transformers", "peft", "suretrap.cli", "suretrap.run", "suretrap.sweep"]


def _cli(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """Child body: output to a log file, environment applied, then the CLI as a user runs it."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)  # two busy cores: oversubscribed threads cost 5x here
    from suretrap.cli import app

    app(args=argv, prog_name="suretrap")


@dataclass
class Outcome:
    exitcode: int | None
    log: str

    @property
    def killed(self) -> bool:
        return self.exitcode == -9


class CliServer:
    """Starts CLI processes from a forkserver that has torch & co. already imported."""

    def __init__(self, log_dir: Path) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.log_dir = log_dir
        self.count = 0

    def run(
        self,
        argv: list[str],
        *,
        crash_at: str | None = None,
        kill_after: float | None = None,
        timeout: float = 120,
    ) -> Outcome:
        """Run `suretrap ARGV`; SIGKILL it at `crash_at` (SURETRAP_CRASH_AT) or after
        `kill_after` seconds. Returns its exit code (-9: killed) and its output."""
        self.count += 1
        log = self.log_dir / f"cli-{self.count:03d}.log"
        env = {"SURETRAP_CRASH_AT": crash_at} if crash_at else {}
        proc = self.ctx.Process(target=_cli, args=(argv, env, str(log)))
        proc.start()
        proc.join(kill_after if kill_after is not None else timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            if kill_after is None:
                raise TimeoutError(f"suretrap {' '.join(argv)} ran past {timeout}s")
        text = log.read_text(errors="replace") if log.exists() else ""
        return Outcome(proc.exitcode, text)
