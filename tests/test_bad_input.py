"""The bad-input table (docs/BAD_INPUT.md): each row gets one line on stderr, exit code 2,
and nothing lost. Rows already covered elsewhere are named in the doc."""

import errno
import os
import random

import pytest
import torch

from bvvit.errors import BVViTError, CheckpointError
from bvvit.io import load_torch_file
from bvvit.train.checkpoint import find_resume_checkpoint, save_checkpoint
from tests.helpers import assert_one_line_error, TINY_MODEL_ARGS, make_image_folder, run_cli




def _train(data, out, *extra):
    return run_cli("run.py", "--data-path", str(data), "--output-dir", str(out), "--epochs", "1",
                   "--batch-size", "8", *TINY_MODEL_ARGS, "--no-progress", *extra)


@pytest.mark.slow
def test_class_folder_without_images(tmp_path):
    data = make_image_folder(tmp_path / "d")
    for image in (data / "train" / "bee").iterdir():
        image.unlink()
    assert_one_line_error(_train(data, tmp_path / "o"), "bee")


@pytest.mark.slow
def test_corrupt_image_names_the_file(tmp_path):
    data = make_image_folder(tmp_path / "d")
    (data / "train" / "ant" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    assert_one_line_error(_train(data, tmp_path / "o"), "0.png")


@pytest.mark.slow
def test_non_image_files_are_ignored_and_mixed_modes_work(tmp_path):
    data = make_image_folder(tmp_path / "d")
    (data / "train" / "ant" / "notes.txt").write_text("not an image")
    make_image_folder(tmp_path / "d", classes=("ant", "bee", "cat"), per_class=2, size=20, mode="RGB",
                      seed=3)  # adds RGB images of another size beside grayscale ones
    result = _train(data, tmp_path / "o")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flags,fragment", [
    (["--embed-dim", "30", "--num-heads", "4"], "--num-heads"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-3"], "--batch-size"),
])
def test_bad_model_and_batch_flags(tmp_path, flags, fragment):
    data = make_image_folder(tmp_path / "d")
    result = run_cli("run.py", "--data-path", str(data), "--output-dir", str(tmp_path / "o"),
                     "--img-size", "16", "--patch-size", "4", "--depth", "1", "--no-progress", *flags)
    assert_one_line_error(result, fragment)


@pytest.mark.slow
def test_output_dir_not_writable(tmp_path):
    data = make_image_folder(tmp_path / "d")
    assert_one_line_error(_train(data, "/proc/bvvit-out"), "/proc/bvvit-out")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"format_version": 1, "state_dict": {"w": torch.randn(100, 100)}}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointError, match="ckpt.pth"):
        load_torch_file(path)


def test_disk_full_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, {"format_version": 1, "epoch": 1, "optimizer": {}, "scheduler": {},
                             "model_config": {}, "state_dict": {}}, is_best=False)
    before = (folder / "last.pth").read_bytes()

    def full_disk(obj, target, *args, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(BVViTError, match="No space left"):
        save_checkpoint(folder, {"epoch": 2}, is_best=False)
    assert (folder / "last.pth").read_bytes() == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_fuzzed_checkpoints_fail_cleanly(tmp_path):
    """Mutated and truncated checkpoints either load or raise CheckpointError, nothing else."""
    folder = tmp_path / "run" / "checkpoints"
    payload = {"format_version": 1, "epoch": 1, "optimizer": {"state": {}}, "scheduler": {"x": 1},
               "model_config": {"embed_dim": 8}, "state_dict": {"w": torch.randn(16, 16)}}
    save_checkpoint(folder, payload, is_best=False)
    good = (folder / "last.pth").read_bytes()
    rng = random.Random(0)
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(40):
        data = bytearray(good)
        if trial % 3 == 0:
            data = data[: rng.randrange(1, len(data))]
        else:
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        (folder / "last.pth").write_bytes(bytes(data))
        if (folder / "last.prev.pth").exists():
            os.remove(folder / "last.prev.pth")
        try:
            find_resume_checkpoint("auto", tmp_path / "run")
            outcomes["loaded"] += 1
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


@pytest.mark.slow
def test_empty_data_path_is_refused_not_replaced_by_the_default(tmp_path):
    """`--data-path "$DATA"` with DATA unset must not silently train on Fashion-MNIST."""
    assert_one_line_error(_train("", tmp_path / "o"), "--data-path is empty")


@pytest.mark.slow
def test_path_name_too_long_is_one_line(tmp_path):
    """A 300-character folder name (a run named after its settings) is one line naming it."""
    data = make_image_folder(tmp_path / "d")
    long_name = tmp_path / ("lr0.001_bs128_" * 22)
    assert_one_line_error(_train(data, long_name), "File name too long", "lr0.001_bs128_")


def test_unhandled_oserror_on_a_user_path_is_one_line(capsys):
    """The CLI's last net: a file-system refusal of a user's path nobody turned into a message
    is still one line (other exceptions keep their tracebacks: they are our bugs)."""
    from bvvit.cli.common import run_cli as run_main

    def main(argv):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/model.pth")

    assert run_main(main, [], prog="x") == 2
    assert capsys.readouterr().err.strip() == ("x: error: cannot use /data/model.pth: Permission "
                                               "denied; check the path and its permissions")

    def buggy(argv):
        raise OSError("no errno: a bug of ours")

    with pytest.raises(OSError):
        run_main(buggy, [], prog="x")
