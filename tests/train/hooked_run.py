"""run.py with fault-injecting test hooks (tests only; the training loop reads no environment).

    python tests/train/hooked_run.py RUN.PY-FLAGS...

``BVVIT_SIGNAL_AFTER_STEPS=N``: the process sends itself SIGINT once N optimizer steps have
run (as a user's Ctrl-C would arrive). ``BVVIT_KILL_AFTER_EPOCH=N``: it is killed (SIGKILL,
a crash) right after epoch N is saved and logged.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bvvit.cli.common import run_cli  # noqa: E402
from bvvit.cli.train import main  # noqa: E402
from bvvit.train.runner import TrainHooks  # noqa: E402


def signal_after_steps(limit: int):
    """An ``after_step`` hook: SIGINT to this process, once, when ``limit`` steps have run."""
    sent = []

    def after_step(steps: int) -> None:
        if steps >= limit and not sent:
            sent.append(steps)
            os.kill(os.getpid(), signal.SIGINT)

    return after_step


def kill_after_epoch(last: int):
    """An ``after_epoch`` hook: SIGKILL to this process after epoch ``last``."""
    def after_epoch(epoch: int) -> None:
        if epoch == last:
            os.kill(os.getpid(), signal.SIGKILL)

    return after_epoch


def hooks_from_environment() -> TrainHooks:
    hooks = TrainHooks()
    if os.environ.get("BVVIT_SIGNAL_AFTER_STEPS"):
        hooks.after_step = signal_after_steps(int(os.environ["BVVIT_SIGNAL_AFTER_STEPS"]))
    if os.environ.get("BVVIT_KILL_AFTER_EPOCH"):
        hooks.after_epoch = kill_after_epoch(int(os.environ["BVVIT_KILL_AFTER_EPOCH"]))
    return hooks


if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: main(argv, hooks=hooks_from_environment()), prog="run.py"))
