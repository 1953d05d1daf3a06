"""What the runs say to the user, through the standard :mod:`logging` module.

Every module logs to its own logger (``logging.getLogger(__name__)``, all below ``bvvit``).
:func:`configure_console`, called once by each command line, prints INFO lines to stdout
exactly as written (the progress of a run, its results) and warnings and errors to stderr,
one line each, without decoration. Ranks > 0 of a torchrun job print errors only: rank 0
speaks for the job. A program that uses bvvit as a library configures logging as it likes.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

LOGGER_NAME = "bvvit"


class _ConsoleHandler(logging.Handler):
    """Writes each record's message as one line to ``sys.stdout`` or ``sys.stderr``, looked
    up when writing (so a stream redirected later, e.g. by a test, is the one used)."""

    def __init__(self, stream_name: str, below_warning: bool):
        super().__init__()
        self.stream_name = stream_name
        self.setFormatter(logging.Formatter("%(message)s"))
        self.addFilter(lambda record: (record.levelno < logging.WARNING) == below_warning)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream_name)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own policy for a failing handler
            self.handleError(record)


def configure_console(rank: Optional[int] = None) -> None:
    """Send the ``bvvit`` loggers' messages to the console (see the module docstring).
    ``rank``: this process's torchrun rank (default: the ``RANK`` variable torchrun sets).
    Calling it again replaces the handlers it installed."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(_ConsoleHandler("stdout", below_warning=True))
    logger.addHandler(_ConsoleHandler("stderr", below_warning=False))
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)


__all__ = ["configure_console", "LOGGER_NAME"]
