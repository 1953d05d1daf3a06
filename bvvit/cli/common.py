"""What both command lines share: one-line errors, exit codes, small argparse helpers."""

from __future__ import annotations

import argparse
import errno
import logging
from typing import Callable, NoReturn, Optional, Sequence

from bvvit.console import configure_console
from bvvit.errors import BVViTError

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (and exit code 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def user_message(exc: BaseException) -> str:
    """The last meaningful line of an error (DataLoader workers wrap errors in tracebacks)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    for prefix in ("bvvit.errors.", ):
        if text.startswith(prefix):
            text = text.split(": ", 1)[-1]
    return text


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None,
            prog: str = "bvvit") -> int:
    """Run ``main`` with the console configured (:mod:`bvvit.console`); user errors become
    ``prog: error: ...`` on stderr and exit code 2."""
    configure_console()
    try:
        return main(argv)
    except BVViTError as exc:
        log.error(f"{prog}: error: {user_message(exc)}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        log.error(f"{prog}: interrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:
        # The file system refused a path the user gave (too long, unreadable, ...) somewhere
        # no stage turned it into its own message: still one line naming the path.
        if exc.errno not in USER_PATH_ERRNOS or exc.filename is None:
            raise
        log.error(f"{prog}: error: cannot use {exc.filename}: {exc.strerror}; check the path and "
                  "its permissions")
        return EXIT_USER_ERROR


# OSErrors that a path or file system the user chose causes, not a bug of ours.
USER_PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOENT,
                              errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EROFS, errno.ENOSPC,
                              errno.EDQUOT, errno.EIO, errno.ENXIO})


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value
