"""Tiny data sets written into tmp_path: IDX files and ImageNet-style folders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bvvit.data import fashion_mnist



def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write ``array`` (uint8) as an IDX file: magic 0x0000 08 ndim, big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data = header + array.tobytes()
    if compress:
        data = gzip.compress(data)
        path = path.with_name(path.name + ".gz")
    path.write_bytes(data)
    return path


def write_fmnist(folder: Path, compress: bool = True, n_train: int = 20,
                 n_test: int = 7) -> dict[str, np.ndarray]:
    """Four IDX files with images whose pixels encode the index (image i is filled with i)
    and labels i % 10; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        labels = np.arange(n, dtype=np.uint8) % 10
        images_stem, labels_stem = fashion_mnist.IDX_STEMS[split]
        write_idx(folder / images_stem, images, compress)
        write_idx(folder / labels_stem, labels, compress)
        arrays[split] = (np.array(images), labels)
    return arrays


@pytest.fixture
def tiny_fmnist(tmp_path: Path) -> Path:
    folder = tmp_path / "fmnist"
    write_fmnist(folder)
    return folder


@pytest.fixture
def no_fmnist_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every place resolve_data("fashion-mnist") searches at empty tmp folders."""
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "system" / "fashion-mnist")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 10),
                value: int = 128) -> Path:
    """A solid image (Pillow size is (width, height)); format from the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = (value, value // 2, 255 - value) if mode == "RGB" else value
    Image.new(mode, size, fill).save(path)
    return path


def make_folder(root: Path, classes: dict[str, list[tuple[str, str, tuple[int, int]]]],
                splits: tuple[str, ...] = ("train", "val")) -> Path:
    """root/<split>/<class>/<name> for each (name, mode, size) in classes[class]."""
    for split in splits:
        for class_name, images in classes.items():
            (root / split / class_name).mkdir(parents=True, exist_ok=True)
            for name, mode, size in images:
                write_image(root / split / class_name / name, mode, size)
    return root


MIXED_CLASSES = {
    "cat": [("a.png", "RGB", (12, 10)), ("b.jpg", "L", (9, 14))],
    "dog": [("c.jpeg", "RGB", (16, 16)), ("d.png", "L", (8, 8)), ("e.bmp", "RGB", (10, 20))],
    "emu": [("f.png", "RGB", (11, 13))],
}
GRAY_CLASSES = {
    "one": [("a.png", "L", (12, 10)), ("b.pgm", "L", (9, 14))],
    "two": [("c.png", "1", (16, 16)), ("d.tif", "I;16", (8, 8))],
}


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """RGB and grayscale PNG/JPEG/BMP images of mixed sizes in 3 classes."""
    return make_folder(tmp_path / "mixed", MIXED_CLASSES)


@pytest.fixture
def gray_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "gray", GRAY_CLASSES, splits=("train", "test"))


# helpers as fixtures, so test files need not import conftest
@pytest.fixture
def idx_writer():
    return write_idx


@pytest.fixture
def fmnist_writer():
    return write_fmnist


@pytest.fixture
def image_writer():
    return write_image


@pytest.fixture
def folder_maker():
    return make_folder
