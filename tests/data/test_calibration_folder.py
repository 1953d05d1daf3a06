"""--calib-path: calibration images from any folder, in the model's channels and size."""

import pytest
import numpy as np
from PIL import Image

from bvvit.config import Preprocessing
from bvvit.data.calibration import folder_calibration_loader, folder_images
from bvvit.errors import DataError
from tests.helpers import make_image_folder


def _flat_folder(root, count=7, size=(40, 30), mode="RGB"):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_flat_rgb_folder_becomes_grayscale_model_inputs(tmp_path):
    folder = _flat_folder(tmp_path / "photos")
    pre = Preprocessing(mean=(0.5,), std=(0.5,), img_size=16, in_chans=1)
    loader, available = folder_calibration_loader(folder, pre, n=5, seed=0)
    images = [x for x, _ in loader]
    assert available == 7
    assert sum(len(x) for x in images) == 5
    assert images[0].shape[1:] == (1, 16, 16)


def test_image_folder_layout_counts_every_split_and_class(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=3)  # train/ and val/, 3 classes
    assert len(folder_images(root)) == 18
    pre = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), img_size=8, in_chans=3)
    loader, available = folder_calibration_loader(root, pre, n=100)
    assert available == 18 and sum(len(x) for x, _ in loader) == 18  # fewer than asked: all of them
    assert next(iter(loader))[0].shape[1:] == (3, 8, 8)


def test_the_seed_chooses_the_subset(tmp_path):
    folder = _flat_folder(tmp_path / "photos", count=12, mode="L")
    pre = Preprocessing(img_size=8)
    first = [x for x, _ in folder_calibration_loader(folder, pre, n=4, seed=0)[0]][0]
    again = [x for x, _ in folder_calibration_loader(folder, pre, n=4, seed=0)[0]][0]
    other = [x for x, _ in folder_calibration_loader(folder, pre, n=4, seed=1)[0]][0]
    assert (first == again).all() and not (first == other).all()


@pytest.mark.parametrize("case", ["missing", "file", "empty"])
def test_unusable_folders_are_one_line_errors(tmp_path, case):
    path = tmp_path / "calib"
    if case == "file":
        path.write_text("x")
    elif case == "empty":
        path.mkdir()
        (path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="--calib-path") as info:
        folder_images(path)
    assert "\n" not in str(info.value)
