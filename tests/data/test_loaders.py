import pytest
import torch
from torch.utils.data import TensorDataset

from bvvit.data import (build_dataset, build_loader, build_transform, calibration_indices,
                        calibration_loader, resolve_data, set_epoch)
from bvvit.data.loaders import _worker_error_one_line
from bvvit.errors import ConfigError, DataError


def index_dataset(n=40):
    return TensorDataset(torch.arange(n))


def epoch_order(loader, epoch=None):
    if epoch is not None:
        set_epoch(loader, epoch)
    return torch.cat([batch[0] for batch in loader]).tolist()


def test_batches_cover_the_dataset():
    loader = build_loader(index_dataset(10), batch_size=4, shuffle=True)
    assert sorted(epoch_order(loader, 0)) == list(range(10)) and len(loader) == 3
    assert len(build_loader(index_dataset(10), 4, shuffle=True, drop_last=True)) == 2
    assert epoch_order(build_loader(index_dataset(10), 4, shuffle=False)) == list(range(10))


def test_set_epoch_order_depends_only_on_seed_and_epoch():
    loader = build_loader(index_dataset(), batch_size=8, shuffle=True, seed=3)
    epoch0, epoch1 = epoch_order(loader, 0), epoch_order(loader, 1)
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    # a fresh loader resumed at epoch 1 sees the same order, whatever ran before
    resumed = build_loader(index_dataset(), batch_size=8, shuffle=True, seed=3)
    assert epoch_order(resumed, 1) == epoch1
    epoch_order(resumed)  # an extra pass without set_epoch
    assert epoch_order(resumed, 0) == epoch0
    assert epoch_order(resumed, 1) == epoch1
    other_seed = build_loader(index_dataset(), batch_size=8, shuffle=True, seed=4)
    assert epoch_order(other_seed, 0) != epoch0
    assert epoch_order(build_loader(index_dataset(), 8, shuffle=True, seed=3)) == epoch0


def test_loaders_leave_the_global_rng_alone():
    loader = build_loader(index_dataset(), batch_size=8, shuffle=True)
    torch.manual_seed(0)
    epoch_order(loader, 0)
    after_loader = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after_loader)


def test_seeded_training_pass_is_reproducible(tiny_fmnist):
    source = resolve_data(str(tiny_fmnist))
    transform = build_transform(source.default_preprocessing(28), train=True)
    loader = build_loader(build_dataset(source, "train", transform), batch_size=8,
                          shuffle=True, seed=0)

    def one_epoch(epoch):
        torch.manual_seed(epoch)
        set_epoch(loader, epoch)
        return [(images.clone(), labels.clone()) for images, labels in loader]

    first = one_epoch(2)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, one_epoch(2)):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    assert first[0][0].shape == (8, 1, 28, 28) and first[0][0].dtype == torch.float32
    assert first[0][1].dtype == torch.int64


def test_worker_settings():
    loader = build_loader(index_dataset(), batch_size=8, shuffle=False, workers=2)
    assert loader.num_workers == 2 and loader.persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()
    assert not build_loader(index_dataset(), 8, shuffle=False).persistent_workers


def test_worker_error_message_is_recovered_as_one_line():
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File \"x.py\", line 1, in f\n"
                        "bvvit.errors.DataError: cannot read image /d/a.png: bad; remove or "
                        "replace the file\n")
    recovered = _worker_error_one_line(wrapped)
    assert type(recovered) is DataError
    assert str(recovered) == "cannot read image /d/a.png: bad; remove or replace the file"
    assert _worker_error_one_line(DataError("already one line")) is None


def test_corrupt_image_in_a_worker_is_a_one_line_data_error(mixed_folder):
    source = resolve_data(str(mixed_folder))
    bad = mixed_folder / "val" / "cat" / "a.png"
    bad.write_bytes(b"not a png")  # after resolve_data, which would have caught it
    dataset = build_dataset(source, "val")
    loader = build_loader(dataset, batch_size=2, shuffle=False, workers=1)
    with pytest.raises(DataError) as exc_info:
        list(loader)
    message = str(exc_info.value)
    assert message.startswith(f"cannot read image {bad}: ") and "\n" not in message


def test_calibration_indices_are_seeded_sorted_and_nested():
    first = calibration_indices(1000, 64, seed=7)
    assert first == calibration_indices(1000, 64, seed=7)
    assert first == sorted(set(first)) and len(first) == 64
    assert all(0 <= i < 1000 for i in first)
    assert first != calibration_indices(1000, 64, seed=8)
    assert set(first) <= set(calibration_indices(1000, 128, seed=7))
    assert calibration_indices(5, 5, seed=0) == [0, 1, 2, 3, 4]


def test_calibration_size_larger_than_training_split():
    with pytest.raises(DataError) as exc_info:
        calibration_indices(100, 256, seed=0)
    assert str(exc_info.value).startswith(
        "--calib-size 256 is larger than the training split (100 images)")
    with pytest.raises(ConfigError):
        calibration_indices(100, 0, seed=0)


def test_calibration_loader_yields_eval_transformed_training_images(tiny_fmnist):
    source = resolve_data(str(tiny_fmnist))
    pre = source.default_preprocessing(28)
    loader, indices = calibration_loader(source, pre, n=6, seed=1, batch_size=4)
    assert indices == calibration_indices(20, 6, seed=1)
    images = torch.cat([batch[0] for batch in loader])
    labels = torch.cat([batch[1] for batch in loader])
    assert images.shape == (6, 1, 28, 28)
    train = build_dataset(source, "train", build_transform(pre, train=False))
    expected = torch.stack([train[i][0] for i in indices])
    assert torch.equal(images, expected)  # eval transform, no augmentation, index order
    assert labels.tolist() == [i % 10 for i in indices]
    with pytest.raises(DataError, match="--calib-size 21"):
        calibration_loader(source, pre, n=21)
