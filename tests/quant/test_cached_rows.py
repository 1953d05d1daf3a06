"""Reconstruction's cached activations (bvvit/quant/cached_rows.py): a set over its limit
lives in an unlinked temporary file and reads back bit for bit, by any positions, in
chunks and after a selection; a set under it stays the very tensor."""

import os

import pytest
import torch

from bvvit.quant.cached_rows import CachedRows


def _data(n=37, shape=(5, 3), seed=0):
    return torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed))


def _chunks(data, size):
    return (data[i:i + size] for i in range(0, len(data), size))


def test_a_set_over_the_limit_goes_to_a_file_and_reads_back_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    data = _data()
    rows = CachedRows.from_chunks(_chunks(data, 8), limit_bytes=data[:10].numel() * 4)
    assert not rows.in_memory and len(rows) == 37 and rows.row_shape == (5, 3)
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing left behind, however the process ends
    assert os.fstat(rows.file.fileno()).st_size == data.numel() * 4
    idx = torch.tensor([36, 0, 5, 5, 17])
    assert torch.equal(rows.rows(idx), data[idx])
    assert torch.equal(torch.cat(list(rows.chunks(6))), data)
    keep = torch.tensor([1, 4, 9, 30])
    picked = rows.select(keep)
    assert len(picked) == 4 and torch.equal(picked.rows(torch.tensor([3, 0])), data[keep][[3, 0]])
    assert torch.equal(torch.cat(list(picked.chunks(3))), data[keep])
    doubled = rows.map(lambda x: 2 * x, chunk=7, limit_bytes=0)
    assert not doubled.in_memory and torch.equal(doubled.rows(torch.arange(37)), 2 * data)


def test_a_set_under_the_limit_is_a_tensor_and_behaves_the_same():
    data = _data()
    rows = CachedRows.from_chunks(_chunks(data, 8), limit_bytes=data.numel() * 4)
    assert rows.in_memory and torch.equal(rows.tensor, data)
    idx = torch.tensor([3, 1, 3])
    assert torch.equal(rows.rows(idx), data[idx])
    assert torch.equal(rows.select(torch.tensor([2, 6])).tensor, data[[2, 6]])
    assert CachedRows.from_tensor(data).tensor is data


def test_bad_chunks_are_refused():
    with pytest.raises(ValueError, match="no rows"):
        CachedRows.from_chunks(iter([]), 0)
    with pytest.raises(ValueError, match="shape"):
        CachedRows.from_chunks(iter([torch.zeros(2, 3), torch.zeros(2, 4)]), 0)
    with pytest.raises(TypeError, match="float32"):
        CachedRows.from_chunks(iter([torch.zeros(2, 3, dtype=torch.float64)]), 0)


def test_a_full_disk_is_one_clear_error(monkeypatch):
    import errno

    from bvvit.errors import WriteError

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(WriteError, match="No space left on device; point TMPDIR at a folder with room"):
        CachedRows.from_chunks(iter([_data()]), limit_bytes=0)
