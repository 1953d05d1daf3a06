"""Per-image activations cached by block reconstruction, in memory or in a temporary file.

Reconstruction keeps, for every calibration image, a unit's quantized inputs, its float
targets and its outputs (:mod:`bvvit.quant.reconstruct`). At 224 px these sets are large:
ViT-B/16 holds 197 x 768 floats per image and set, 0.6 GB for 1,024 images, and a unit
needs three of them at once. A set larger than a limit therefore goes to an unlinked
temporary file (in ``TMPDIR``, gone when the process ends, however it ends) and is read
back row by row: a step gathers its 32 images from the page cache, a pass streams the
rows in chunks. Reads return exactly the bytes written, so where a set lives changes no
result; small sets (the demo model's: 13 MB at 1,024 images) stay a tensor on the device.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import IO, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from bvvit.errors import WriteError


class CachedRows:
    """Rows of one shape (one per image), float32: a tensor on its device, or a temporary
    file (with ``index``: which row of the file each position is). Build with
    :meth:`from_tensor`, :meth:`from_chunks` or :meth:`map`; read with :meth:`rows` (any
    positions) and :meth:`chunks` (in order)."""

    def __init__(self, tensor: Optional[Tensor] = None, file: Optional[IO[bytes]] = None,
                 index: Optional[Tensor] = None, row_shape: tuple[int, ...] = (), device: torch.device | str = "cpu"):
        self.tensor, self.file, self.index = tensor, file, index
        self.row_shape = tuple(tensor.shape[1:]) if tensor is not None else tuple(row_shape)
        self.device = tensor.device if tensor is not None else torch.device(device)
        self.row_bytes = 4 * math.prod(self.row_shape)

    @classmethod
    def from_tensor(cls, tensor: Tensor) -> "CachedRows":
        return cls(tensor=tensor)

    @classmethod
    def from_chunks(cls, chunks: Iterable[Tensor], limit_bytes: float) -> "CachedRows":
        """The rows that ``chunks`` yield, in order (float32 tensors of one row shape, on one
        device): a tensor while they total at most ``limit_bytes``, else a file."""
        parts: list[Tensor] = []
        held, file, offset, rows, row_shape, device = 0, None, 0, 0, None, None
        for chunk in chunks:
            if chunk.dtype != torch.float32:
                raise TypeError(f"cached rows are float32, got {chunk.dtype}")
            if row_shape is None:
                row_shape, device = tuple(chunk.shape[1:]), chunk.device
            elif tuple(chunk.shape[1:]) != row_shape:
                raise ValueError(f"rows of shape {tuple(chunk.shape[1:])} after {row_shape}")
            rows += len(chunk)
            if file is None:
                parts.append(chunk)
                held += chunk.numel() * 4
                if held <= limit_bytes:
                    continue
                file = _temporary_file()
                pending, parts = parts, []
            else:
                pending = [chunk]
            for part in pending:
                offset = _write(file, part, offset)
        if row_shape is None:
            raise ValueError("no rows to cache")
        if file is None:
            return cls(tensor=parts[0] if len(parts) == 1 else torch.cat(parts))
        return cls(file=file, index=torch.arange(rows), row_shape=row_shape, device=device)

    def __len__(self) -> int:
        return len(self.tensor) if self.tensor is not None else len(self.index)

    @property
    def in_memory(self) -> bool:
        return self.tensor is not None

    def rows(self, idx: Tensor) -> Tensor:
        """The rows at positions ``idx`` (a 1-D integer tensor), on the set's device."""
        if self.tensor is not None:
            return self.tensor[idx.to(self.tensor.device)]
        out = np.empty((len(idx),) + self.row_shape, dtype=np.float32)
        fd = self.file.fileno()
        for j, row in enumerate(self.index[idx.cpu()].tolist()):
            view, offset = memoryview(out[j]).cast("B"), row * self.row_bytes
            while view:
                got = os.preadv(fd, [view], offset)
                if got <= 0:
                    raise OSError(f"reconstruction cache: short read at row {row}")
                view, offset = view[got:], offset + got
        return torch.from_numpy(out).to(self.device)

    def chunks(self, size: int) -> Iterator[Tensor]:
        for start in range(0, len(self), size):
            if self.tensor is not None:
                yield self.tensor[start:start + size]
            else:
                yield self.rows(torch.arange(start, min(start + size, len(self))))

    def select(self, keep: Tensor) -> "CachedRows":
        """The rows at positions ``keep`` as a set of their own (a file is shared, not copied)."""
        if self.tensor is not None:
            return CachedRows(tensor=self.tensor[keep.to(self.tensor.device)])
        return CachedRows(file=self.file, index=self.index[keep.cpu()], row_shape=self.row_shape,
                          device=self.device)

    def map(self, fn: Callable[[Tensor], Tensor], chunk: int, limit_bytes: float) -> "CachedRows":
        """``fn`` applied to every chunk of rows in order (a unit's pass over the images)."""
        return CachedRows.from_chunks((fn(x) for x in self.chunks(chunk)), limit_bytes)


def _temporary_file() -> IO[bytes]:
    try:
        return tempfile.TemporaryFile(prefix="bvvit-reconstruct-")
    except OSError as exc:
        raise _cache_error(exc, 0) from None


def _write(file: IO[bytes], rows: Tensor, offset: int) -> int:
    """Write ``rows`` at ``offset`` of ``file``; the offset after them."""
    view = memoryview(np.ascontiguousarray(rows.detach().cpu().numpy())).cast("B")
    try:
        while view:  # os.pwrite may write less than asked
            written = os.pwrite(file.fileno(), view, offset)
            view, offset = view[written:], offset + written
    except OSError as exc:
        file.close()
        raise _cache_error(exc, offset) from None
    return offset


def _cache_error(exc: OSError, written: int) -> WriteError:
    return WriteError(f"reconstruction could not write its activation cache to {tempfile.gettempdir()} "
                      f"({written / 2 ** 20:.0f} MB written): {exc.strerror}; point TMPDIR at a folder "
                      "with room (ViT-B/16 at 1,024 calibration images needs ~2 GB there) or "
                      "calibrate on fewer images (--calib-size)", exc.errno or 0)


__all__ = ["CachedRows"]
