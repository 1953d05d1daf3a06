"""run.py end to end: outputs, exact resume, one-line errors for bad input."""

import csv
import json

import pytest
import torch

from tests.conftest import HAS_FMNIST
from tests.helpers import HOOKED_RUN, TINY_MODEL_ARGS, assert_one_line_error, make_image_folder, run_cli

pytestmark = pytest.mark.slow


def _train(data, out, *extra, env=None, script="run.py"):
    return run_cli(script, "--data-path", str(data), "--output-dir", str(out), "--epochs", "2",
                   "--batch-size", "8", *TINY_MODEL_ARGS, "--no-progress", "--seed", "3", *extra,
                   env=env)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = _train(folder, out)
    assert result.returncode == 0, result.stderr
    return out


def test_outputs_written(trained):
    for name in ("vit_model.pth", "config.json", "metrics.csv", "training_curves.png",
                 "checkpoints/last.pth", "checkpoints/last.prev.pth", "checkpoints/best.pth"):
        assert (trained / name).is_file(), name
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5",
                            "lr", "epoch_time_s", "train_images_per_s"}
    config = json.loads((trained / "config.json").read_text())
    assert config["model"]["num_classes"] == 3 and config["model"]["in_chans"] == 1
    assert config["versions"]["torch"]
    png = (trained / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_model_file_is_weights_only_and_complete(trained):
    payload = torch.load(trained / "vit_model.pth", weights_only=True)
    assert payload["format_version"] == 1
    assert payload["class_names"] == ["ant", "bee", "cat"]
    assert payload["preprocessing"]["img_size"] == 16
    assert payload["model_config"]["embed_dim"] == 16
    checkpoint = torch.load(trained / "checkpoints" / "last.pth", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert {"optimizer", "scheduler", "rng", "history", "best_val_acc"} <= set(checkpoint)


def test_resume_after_kill_is_exact(folder, trained, tmp_path):
    out = tmp_path / "killed"
    killed = _train(folder, out, env={"BVVIT_KILL_AFTER_EPOCH": "1"}, script=HOOKED_RUN)
    assert killed.returncode != 0  # SIGKILL after the first epoch's checkpoint
    assert torch.load(out / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 1
    assert not (out / "vit_model.pth").exists()
    resumed = _train(folder, out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    expected = torch.load(trained / "vit_model.pth", weights_only=True)["state_dict"]
    actual = torch.load(out / "vit_model.pth", weights_only=True)["state_dict"]
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_resume_falls_back_to_backup(folder, trained, tmp_path):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(trained, out)
    (out / "checkpoints" / "last.pth").write_bytes(b"garbage")
    result = _train(folder, out, "--resume", "auto", "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert "used the backup" in result.stdout




def test_error_missing_data_path(tmp_path):
    assert_one_line_error(_train(tmp_path / "nope", tmp_path / "o"), "nope")


def test_error_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(_train(tmp_path / "empty", tmp_path / "o"), "empty")


def test_error_patch_not_dividing(folder, tmp_path):
    result = run_cli("run.py", "--data-path", str(folder), "--output-dir", str(tmp_path),
                     "--img-size", "16", "--patch-size", "5", "--no-progress")
    assert_one_line_error(result, "--patch-size 5")


def test_error_num_classes_disagrees(folder, tmp_path):
    result = _train(folder, tmp_path / "o", "--num-classes", "10")
    assert_one_line_error(result, "--num-classes 10", "3 classes")


def test_error_random_bytes_checkpoint(folder, tmp_path):
    bad = tmp_path / "random.pth"
    bad.write_bytes(bytes(range(256)) * 10)
    assert_one_line_error(_train(folder, tmp_path / "o", "--resume", str(bad)), "random.pth")
    assert_one_line_error(_train(folder, tmp_path / "o", "--pretrained-path", str(bad)), "random.pth")


def test_error_checkpoint_of_other_architecture(folder, trained, tmp_path):
    result = run_cli("run.py", "--data-path", str(folder), "--output-dir", str(tmp_path),
                     "--epochs", "2", "--batch-size", "8", "--img-size", "16", "--patch-size", "4",
                     "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--no-progress",
                     "--resume", str(trained / "checkpoints" / "last.pth"))
    assert_one_line_error(result, "another architecture", "embed_dim")
    result = run_cli("run.py", "--data-path", str(folder), "--output-dir", str(tmp_path),
                     "--epochs", "1", "--batch-size", "8", "--img-size", "16", "--patch-size", "4",
                     "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--no-progress",
                     "--pretrained-path", str(trained / "vit_model.pth"))
    assert_one_line_error(result, "does not fit")


def test_error_pickle_that_runs_code_is_refused(folder, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"x": Evil()}))
    result = _train(folder, tmp_path / "o", "--pretrained-path", str(bad))
    assert_one_line_error(result, "evil.pth")
    assert not marker.exists()


def test_error_output_dir_is_a_file(folder, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_one_line_error(_train(folder, target), "not a folder")


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_smoke(tmp_path):
    result = run_cli("run.py", "--output-dir", str(tmp_path), "--epochs", "1", "--batch-size", "64",
                     "--train-subset", "512", "--val-subset", "256", "--embed-dim", "16",
                     "--depth", "1", "--num-heads", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "fashion-mnist" in result.stdout
    payload = torch.load(tmp_path / "vit_model.pth", weights_only=True)
    assert payload["class_names"][0] == "T-shirt/top" and payload["model_config"]["img_size"] == 28
