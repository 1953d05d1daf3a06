import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from bvvit.config import Preprocessing
from bvvit.data import build_dataset, resolve_data
from bvvit.data import fashion_mnist
from bvvit.errors import DataError

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")


def assert_one_line_naming(exc_info, path) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_tiny_idx_files_parse(tmp_path, fmnist_writer, compress):
    arrays = fmnist_writer(tmp_path / "f", compress=compress, n_train=13, n_test=4)
    source = resolve_data(str(tmp_path / "f"))
    assert source.kind == "fashion-mnist" and source.root == (tmp_path / "f").resolve()
    for split, idx_split in (("train", "train"), ("val", "test")):
        dataset = build_dataset(source, split)
        images, labels = arrays[idx_split]
        assert dataset.images.shape == (len(images), 1, 28, 28)
        assert dataset.images.dtype == torch.uint8
        assert torch.equal(dataset.images[:, 0], torch.from_numpy(images))
        assert dataset.targets.tolist() == labels.tolist()
        image, label = dataset[3]
        assert image.shape == (1, 28, 28) and int(image[0, 5, 5]) == 3 and label == 3
        assert isinstance(label, int)


def test_read_idx_checks_magic_number(tmp_path, idx_writer):
    path = idx_writer(tmp_path / "labels", np.zeros(5, np.uint8), compress=False)
    with pytest.raises(DataError) as exc_info:
        fashion_mnist.read_idx(path, fashion_mnist.IMAGES_MAGIC)
    assert "magic" in assert_one_line_naming(exc_info, path)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_truncated_idx_file_is_a_data_error_naming_it(tmp_path, fmnist_writer, compress):
    folder = tmp_path / "f"
    fmnist_writer(folder, compress=compress)
    path = fashion_mnist.idx_file(folder, "train-images-idx3-ubyte")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    source = resolve_data(str(folder))
    with pytest.raises(DataError) as exc_info:
        build_dataset(source, "train")
    assert_one_line_naming(exc_info, path)
    build_dataset(source, "val")  # the other split is intact


def test_gzip_of_wrong_size_is_a_data_error(tmp_path, fmnist_writer):
    folder = tmp_path / "f"
    fmnist_writer(folder)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw + b"\x01\x02"))  # trailing bytes: header disagrees
    with pytest.raises(DataError) as exc_info:
        build_dataset(resolve_data(str(folder)), "val")
    assert "corrupt" in assert_one_line_naming(exc_info, path)


def test_image_and_label_counts_must_agree(tmp_path, fmnist_writer, idx_writer):
    folder = tmp_path / "f"
    fmnist_writer(folder, n_test=7)
    idx_writer(folder / "t10k-labels-idx1-ubyte", np.zeros(6, np.uint8), compress=True)
    with pytest.raises(DataError, match="7 images but .* 6 labels"):
        build_dataset(resolve_data(str(folder)), "val")


def test_rewritten_file_is_parsed_again(tmp_path, fmnist_writer):
    folder = tmp_path / "f"
    fmnist_writer(folder, n_test=7)
    source = resolve_data(str(folder))
    assert len(build_dataset(source, "val")) == 7
    fmnist_writer(folder, n_test=5)
    assert len(build_dataset(source, "val")) == 5


def test_keyword_finds_env_var_folder(tiny_fmnist, no_fmnist_anywhere, monkeypatch):
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tiny_fmnist))
    source = resolve_data("Fashion-MNIST")
    assert source.root == tiny_fmnist.resolve()
    assert resolve_data(None) == source


def test_keyword_finds_cwd_data_folder(no_fmnist_anywhere, fmnist_writer):
    fmnist_writer(Path("data") / "fashion-mnist", compress=False)
    assert resolve_data().root == (Path("data") / "fashion-mnist").resolve()


def test_torchvision_raw_layout_is_found(tmp_path, fmnist_writer):
    fmnist_writer(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert resolve_data(str(tmp_path / "tv")).root == tmp_path / "tv" / "FashionMNIST" / "raw"


def test_fashion_mnist_nowhere_says_where_it_looked_and_what_to_do(no_fmnist_anywhere):
    with pytest.raises(DataError) as exc_info:
        resolve_data("fashion-mnist")
    message = str(exc_info.value)
    assert "\n" not in message
    assert str(fashion_mnist.SYSTEM_DIR) in message
    assert str(Path.home() / ".cache" / "bvvit" / "fashion-mnist") in message
    assert "data/fashion-mnist" in message and "$BVVIT_FASHION_MNIST" in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "--data-path" in message


def test_partial_idx_folder_lists_missing_files(tmp_path, fmnist_writer):
    folder = tmp_path / "f"
    fmnist_writer(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as exc_info:
        resolve_data(str(folder))
    assert "t10k-labels-idx1-ubyte" in assert_one_line_naming(exc_info, folder.resolve())


def test_idx_file_given_as_path_points_at_its_folder(tiny_fmnist):
    path = tiny_fmnist / "train-images-idx3-ubyte.gz"
    with pytest.raises(DataError) as exc_info:
        resolve_data(str(path))
    message = assert_one_line_naming(exc_info, path)
    assert f"({tiny_fmnist.resolve()})" in message


def test_default_preprocessing_and_describe(tiny_fmnist):
    source = resolve_data(str(tiny_fmnist))
    assert source.num_classes == 10 and source.class_names == CLASS_NAMES
    assert source.in_chans == 1 and source.native_size == 28 and source.val_split == "test"
    assert source.default_preprocessing(28) == Preprocessing(
        mean=(0.2860,), std=(0.3530,), img_size=28, in_chans=1, crop_pct=1.0)
    assert source.default_preprocessing(56).img_size == 56
    assert source.describe() == f"fashion-mnist ({tiny_fmnist.resolve()}, 10 classes)"


def test_subset_is_deterministic_mixed_and_nested(tmp_path, fmnist_writer):
    fmnist_writer(tmp_path / "f", n_train=50)
    source = resolve_data(str(tmp_path / "f"))
    first = build_dataset(source, "train", subset=12)
    again = build_dataset(source, "train", subset=12)
    larger = build_dataset(source, "train", subset=20)
    assert len(first) == 12
    assert torch.equal(first.images, again.images) and torch.equal(first.targets, again.targets)
    assert torch.equal(larger.images[:12], first.images)
    order = first.images[:, 0, 0, 0].tolist()  # pixel value = original index
    assert order != sorted(order) and len(set(order)) == 12
    assert len(set(first.targets.tolist())) >= 5  # classes are mixed
    assert len(build_dataset(source, "train", subset=500)) == 50


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="Fashion-MNIST not installed at "
                    f"{REAL_FMNIST} (sudo apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    source = resolve_data(str(REAL_FMNIST))
    train, val = build_dataset(source, "train"), build_dataset(source, "val")
    assert train.images.shape == (60000, 1, 28, 28) and val.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    for dataset, per_class in ((train, 6000), (val, 1000)):
        assert torch.bincount(dataset.targets).tolist() == [per_class] * 10
    assert train.class_names == CLASS_NAMES
    assert 0.27 < train.images.float().div(255).mean().item() < 0.30  # FMNIST mean 0.286
