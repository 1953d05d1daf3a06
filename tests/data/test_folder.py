from pathlib import Path

import pytest
import torch
from PIL import Image

from bvvit.config import Preprocessing
from bvvit.data import build_dataset, build_transform, resolve_data
from bvvit.errors import DataError


def error_for(path, *, expect_in_message=()) -> str:
    """resolve_data(path) must raise a one-line DataError naming ``path``."""
    with pytest.raises(DataError) as exc_info:
        resolve_data(str(path))
    message = str(exc_info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for text in expect_in_message:
        assert text in message, message
    return message


def test_mixed_folder_resolves_as_rgb(mixed_folder):
    source = resolve_data(str(mixed_folder))
    assert source.kind == "folder" and source.root == mixed_folder.resolve()
    assert source.class_names == ("cat", "dog", "emu") and source.num_classes == 3
    assert source.in_chans == 3 and source.native_size is None and source.val_split == "val"
    assert source.describe() == (f"folder ({mixed_folder.resolve()}, 3 classes, RGB, "
                                 "validation from val/)")


def test_mixed_folder_items_are_rgb_uint8_with_sorted_labels(mixed_folder):
    source = resolve_data(str(mixed_folder))
    dataset = build_dataset(source, "train")
    assert len(dataset) == 6 and dataset.class_names == ("cat", "dog", "emu")
    assert dataset.targets.tolist() == [0, 0, 1, 1, 1, 2]
    sizes = []
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert label == dataset.targets[index]
        sizes.append(tuple(image.shape[1:]))
    assert sizes == [(10, 12), (14, 9), (16, 16), (8, 8), (20, 10), (13, 11)]  # (H, W)
    gray_image, _ = dataset[1]  # an "L" image converted to RGB: equal channels
    assert torch.equal(gray_image[0], gray_image[1]) and torch.equal(gray_image[1], gray_image[2])
    assert build_dataset(source, "val").targets.tolist() == [0, 0, 1, 1, 1, 2]


def test_transforms_bring_mixed_sizes_to_one_shape(mixed_folder):
    source = resolve_data(str(mixed_folder))
    pre = source.default_preprocessing(img_size=16)
    assert pre.in_chans == 3 and pre.crop_pct == 1.0 and pre.interpolation == "bicubic"
    for train in (False, True):
        dataset = build_dataset(source, "train", transform=build_transform(pre, train=train))
        batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
        assert batch.shape == (6, 3, 16, 16) and batch.dtype == torch.float32


def test_grayscale_folder_has_one_channel_and_uses_test_split(gray_folder):
    source = resolve_data(str(gray_folder))
    assert source.in_chans == 1 and source.val_split == "test"
    assert source.default_preprocessing(96) == Preprocessing(
        mean=(0.5,), std=(0.5,), img_size=96, in_chans=1, interpolation="bilinear",
        crop_pct=0.875)
    dataset = build_dataset(source, "val")
    shapes = [tuple(dataset[i][0].shape) for i in range(len(dataset))]
    assert shapes == [(1, 10, 12), (1, 14, 9), (1, 16, 16), (1, 8, 8)]
    assert dataset[2][0].max() == 255  # mode "1" white -> 255
    assert build_dataset(source, "train", transform=build_transform(
        source.default_preprocessing(16), train=False))[0][0].shape == (1, 16, 16)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path, folder_maker):
    root = folder_maker(tmp_path / "r", {"a": [("x.png", "L", (4, 4))]})
    Image.new("I;16", (4, 4), 32896).save(root / "train" / "a" / "x.png")  # 128 * 257
    image, _ = build_dataset(resolve_data(str(root)), "train")[0]
    assert image.unique().tolist() == [128]


def test_rgb_folder_default_preprocessing_is_imagenet(mixed_folder):
    pre = resolve_data(str(mixed_folder)).default_preprocessing(224)
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    assert pre.crop_pct == 0.875 and pre.interpolation == "bicubic" and pre.in_chans == 3


def test_non_image_files_are_ignored_and_counted(mixed_folder):
    (mixed_folder / "train" / "cat" / "notes.txt").write_text("not an image")
    (mixed_folder / "train" / "dog" / ".DS_Store").write_bytes(b"\0")
    (mixed_folder / "train" / "dog" / "labels.csv").write_text("a,b")
    source = resolve_data(str(mixed_folder))
    train = build_dataset(source, "train")
    assert len(train) == 6 and train.ignored_files == 3
    assert build_dataset(source, "val").ignored_files == 0


def test_images_in_nested_folders_belong_to_the_class(mixed_folder, image_writer):
    image_writer(mixed_folder / "train" / "emu" / "more" / "g.PNG")
    dataset = build_dataset(resolve_data(str(mixed_folder)), "train")
    assert len(dataset) == 7 and dataset.targets.tolist()[-2:] == [2, 2]


def test_corrupt_image_is_a_data_error_naming_the_file(mixed_folder):
    bad = mixed_folder / "train" / "dog" / "zz_bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    dataset = build_dataset(resolve_data(str(mixed_folder)), "train")
    assert dataset.samples[5][0] == str(bad)
    dataset[4]  # the images before it are fine
    with pytest.raises(DataError) as exc_info:
        dataset[5]
    message = str(exc_info.value)
    assert message.startswith(f"cannot read image {bad}: ") and "\n" not in message
    assert message.endswith("; remove or replace the file")


def test_truncated_png_is_a_data_error(mixed_folder):
    path = mixed_folder / "val" / "cat" / "a.png"
    noise = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()
    Image.fromarray(noise).save(path)  # incompressible, so half the file lacks pixel data
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    dataset = build_dataset(resolve_data(str(mixed_folder)), "val")
    with pytest.raises(DataError, match="cannot read image .*a.png"):
        dataset[0]


def test_subset_is_deterministic_and_mixes_classes(tmp_path, folder_maker):
    classes = {name: [(f"{i}.png", "L", (4, 4)) for i in range(6)] for name in "abcd"}
    source = resolve_data(str(folder_maker(tmp_path / "r", classes)))
    first = build_dataset(source, "train", subset=8)
    assert first.samples == build_dataset(source, "train", subset=8).samples
    assert len(first) == 8 and len(set(first.targets.tolist())) >= 3
    assert build_dataset(source, "train", subset=12).samples[:8] == first.samples


# --- resolve_data errors: one line, naming the path ---------------------------------------

def test_missing_path(tmp_path):
    error_for(tmp_path / "nope", expect_in_message=("does not exist",))


def test_path_is_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    error_for(tmp_path / "file.txt", expect_in_message=("is a file",))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    error_for(tmp_path / "empty", expect_in_message=("empty",))


def test_no_train_folder(tmp_path, folder_maker):
    root = folder_maker(tmp_path / "r", {"a": [("x.png", "L", (4, 4))]}, splits=("val",))
    error_for(root, expect_in_message=("train/", "val"))


def test_train_folder_itself_hints_at_parent(mixed_folder):
    message = error_for(mixed_folder / "train")
    assert f"parent {mixed_folder}" in message


def test_no_val_or_test_folder(tmp_path, folder_maker):
    root = folder_maker(tmp_path / "r", {"a": [("x.png", "L", (4, 4))]}, splits=("train",))
    error_for(root, expect_in_message=("val/", "test/"))


def test_no_class_folders(tmp_path, image_writer):
    root = tmp_path / "r"
    image_writer(root / "train" / "loose.png")  # images directly in train/, no classes
    (root / "val").mkdir()
    error_for(root / "train", expect_in_message=())  # a folder without train/ inside
    message = error_for(root, expect_in_message=("no class folders",))
    assert str(root / "train") in message


def test_class_folder_without_images(mixed_folder):
    for path in (mixed_folder / "val" / "emu").iterdir():
        path.unlink()
    (mixed_folder / "val" / "emu" / "readme.txt").write_text("x")
    message = error_for(mixed_folder, expect_in_message=("has no images",))
    assert str(mixed_folder / "val" / "emu") in message


def test_train_and_val_classes_differ(mixed_folder, folder_maker):
    folder_maker(mixed_folder, {"fox": [("x.png", "RGB", (4, 4))]}, splits=("train",))
    folder_maker(mixed_folder, {"yak": [("x.png", "RGB", (4, 4))]}, splits=("val",))
    error_for(mixed_folder, expect_in_message=("only in train/: fox", "only in val/: yak"))


def test_unreadable_image_while_resolving_names_it(tmp_path, folder_maker):
    root = folder_maker(tmp_path / "r", {"a": [("x.png", "L", (4, 4))]})
    bad = root / "train" / "a" / "x.png"
    bad.write_bytes(b"garbage")
    message = error_for(root)
    assert str(bad) in message and "cannot read image" in message


def test_split_name_is_checked(mixed_folder):
    with pytest.raises(ValueError):
        build_dataset(resolve_data(str(mixed_folder)), "test")


def test_dataset_root_is_the_split_folder(mixed_folder):
    assert build_dataset(resolve_data(str(mixed_folder)), "val").root == \
        Path(mixed_folder / "val").resolve()
