"""User-facing errors.

Anything a user can cause (a bad path, a corrupt file, flags that disagree) raises a
subclass of :class:`BVViTError`. The CLI catches them once, prints one line and exits
with code 2. Programming errors stay ordinary exceptions and keep their tracebacks.
"""


class BVViTError(Exception):
    """Base class for errors caused by user input; the message is shown as one line."""

    exit_code = 2


class ConfigError(BVViTError):
    """Flags or configuration values that are invalid or disagree with each other."""


class DataError(BVViTError):
    """A data set path, folder layout or image file that cannot be used."""


class CheckpointError(BVViTError):
    """A checkpoint or model file that is missing, corrupt or of the wrong kind."""


class WriteError(BVViTError):
    """An output that cannot be written (full disk, quota, read-only or unwritable folder)."""

    def __init__(self, message: str, errno: int = 0):
        super().__init__(message)
        self.errno = errno
