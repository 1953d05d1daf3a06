"""What a run records is what it used, and a resume cannot silently change the run:
absolute data paths, --workers capped at the usable CPUs, settings that change the numbers
refused on resume (execution settings allowed), a finished run's vit_model.pth left alone,
an unwritable vit_model.pth one line with the checkpoints intact."""

import errno
import json
import os

import pytest
import torch

from bvvit.config import TrainConfig
from bvvit.data import resolve_data
from bvvit.errors import BVViTError, ConfigError
from bvvit.train import runner, settings
from bvvit.train.settings import canonical_data_path
from tests.helpers import TINY_MODEL_ARGS, assert_one_line_error, make_image_folder, run_cli
from tests.train.hooked_run import signal_after_steps


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


def _fit(folder, out, data_path=None, hooks=None, **overrides):
    source = resolve_data(str(data_path or folder))
    model_cfg = runner.model_config_for_data(source, 16, None, patch_size=4, embed_dim=16, depth=1,
                                             num_heads=2)
    cfg = TrainConfig(**{"data_path": str(data_path or folder), "output_dir": str(out), "epochs": 2,
                         "batch_size": 8, "progress": False, "seed": 2, **overrides})
    return runner.fit(model_cfg, cfg, source, hooks=hooks)


def _interrupted_run(folder, out, monkeypatch):
    """A run stopped by SIGINT in epoch 2 (a test hook), resumable with --resume auto."""
    with pytest.raises(runner.TrainingInterrupted):
        _fit(folder, out, hooks=runner.TrainHooks(after_step=signal_after_steps(4)))


def test_workers_are_capped_at_usable_cpus(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(settings.os, "sched_getaffinity", lambda pid: {0})
    _fit(folder, tmp_path / "out", workers=3, epochs=1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--workers" in line]
    assert warnings == ["warning: --workers 3 is more than the 1 CPUs this process may use; using 1"]
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())
    assert recorded["train"]["workers"] == 1


def test_data_path_is_stored_absolute(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(folder.parent)
    _fit(folder, tmp_path / "out", data_path=folder.name, epochs=1)
    expected = str(folder.resolve())
    model = torch.load(tmp_path / "out" / "vit_model.pth", weights_only=True)
    assert model["data"]["data_path"] == expected
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())
    assert recorded["train"]["data_path"] == expected
    assert canonical_data_path("Fashion-MNIST") == "fashion-mnist"
    assert canonical_data_path(None) == "fashion-mnist"


def test_resume_with_other_run_settings_is_refused(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupted_run(folder, out, monkeypatch)
    before = {name: (out / name).read_bytes() for name in ("config.json", "checkpoints/last.pth")}
    with pytest.raises(ConfigError) as caught:
        _fit(folder, out, resume="auto", lr=2e-3, batch_size=4, augment="flip")
    message = str(caught.value)
    assert "\n" not in message
    for change in ("--lr 0.001 -> 0.002", "--batch-size 8 -> 4", "--augment light -> flip"):
        assert change in message, message
    assert "--output-dir" in message
    assert before == {name: (out / name).read_bytes() for name in before}  # nothing written


def test_resume_may_change_how_the_run_executes(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupted_run(folder, out, monkeypatch)
    _fit(folder, out, resume="auto", workers=1, tensorboard=False, device="cpu")
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["train"]["workers"] == 1  # what the resumed part used


def test_resume_of_a_finished_run_leaves_the_model_file_alone(folder, tmp_path, capsys):
    out = tmp_path / "out"
    _fit(folder, out)
    names = ("vit_model.pth", "config.json", "metrics.csv", "training_curves.png")
    before = {name: (out / name).read_bytes() for name in names}
    capsys.readouterr()
    _fit(folder, out, resume="auto")
    assert f"model already in {out / 'vit_model.pth'}" in capsys.readouterr().out
    assert before == {name: (out / name).read_bytes() for name in names}


def test_unwritable_model_file_is_one_line_and_checkpoints_stay(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_replace = os.replace

    def immutable_model_file(src, dst):
        if os.fspath(dst).endswith("vit_model.pth"):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", immutable_model_file)
    with pytest.raises(BVViTError) as caught:
        _fit(folder, out)
    message = str(caught.value)
    assert "\n" not in message and "vit_model.pth" in message and "--resume auto" in message
    assert "Operation not permitted" in message
    assert torch.load(out / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 2
    assert not list(out.glob(".vit_model.pth.*"))  # no temporary file left behind
    monkeypatch.setattr(os, "replace", real_replace)
    _fit(folder, out, resume="auto")  # once writable, the finished run writes it
    assert torch.load(out / "vit_model.pth", weights_only=True)["metrics"]["epochs"] == 2


@pytest.mark.slow
def test_folder_in_place_of_the_model_file_is_one_line(folder, tmp_path):
    out = tmp_path / "out"
    (out / "vit_model.pth").mkdir(parents=True)
    (out / "vit_model.pth" / "keep").write_text("x")
    result = run_cli("run.py", "--data-path", str(folder), "--output-dir", str(out), "--epochs", "1",
                     "--batch-size", "8", *TINY_MODEL_ARGS, "--no-progress", "--resume", "auto")
    assert_one_line_error(result, "vit_model.pth", "--resume auto")
    assert torch.load(out / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 1
    assert (out / "vit_model.pth" / "keep").read_text() == "x"


def test_the_training_loop_calls_its_hooks_and_reads_no_environment(folder, tmp_path):
    """Faults are injected through TrainHooks (tests/train/hooked_run.py), never through
    environment variables read inside the loop."""
    import ast
    from pathlib import Path

    steps, epochs = [], []
    _fit(folder, tmp_path / "out", hooks=runner.TrainHooks(after_step=steps.append, after_epoch=epochs.append))
    assert steps == [1, 2, 3, 4, 5, 6] and epochs == [1, 2]  # 24 images, batch 8, 2 epochs
    for path in Path(runner.__file__).parent.glob("*.py"):
        names = {getattr(node, "attr", getattr(node, "id", None)) for node in ast.walk(ast.parse(path.read_text()))}
        assert not names & {"environ", "getenv"}, path
