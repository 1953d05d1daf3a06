"""Numbers that are not numbers, or out of range, are refused in one line before training;
a run that diverges stops in one line naming the epoch and step, its checkpoint untouched."""

import math

import pytest
import torch
from torch import nn

from bvvit.cli.common import run_cli as run_main
from bvvit.cli.train import main
from bvvit.config import ModelConfig, TrainConfig
from bvvit.data import resolve_data
from bvvit.errors import BVViTError, ConfigError
from bvvit.train import runner
from tests.helpers import TINY_MODEL_ARGS, assert_one_line_error, make_image_folder, run_cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


def _refused(capsys, folder, tmp_path, *flags):
    """Run run.py's main in this process; return its one error line."""
    argv = ["--data-path", str(folder), "--output-dir", str(tmp_path / "out"), "--epochs", "1",
            "--batch-size", "8", *TINY_MODEL_ARGS, "--no-progress", *flags]
    code = run_main(main, argv, prog="run.py")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before training
    return lines[0]


@pytest.mark.parametrize("flags, fragment", [
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr=-1e-3"], "--lr"),
    (["--min-lr", "nan"], "--min-lr"),
    (["--min-lr=-1"], "--min-lr"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--weight-decay=-0.1"], "--weight-decay"),
    (["--warmup-epochs", "nan"], "--warmup-epochs"),
    (["--warmup-epochs", "inf"], "--warmup-epochs"),
    (["--label-smoothing", "nan"], "--label-smoothing"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--clip-grad", "nan"], "--clip-grad"),
    (["--clip-grad", "inf"], "--clip-grad"),
    (["--seed=-1"], "--seed"),
    (["--seed", str(2 ** 70)], "--seed"),
    (["--mlp-ratio", "nan"], "--mlp-ratio"),
    (["--mlp-ratio", "inf"], "--mlp-ratio"),
    (["--mlp-ratio", "0.001"], "--mlp-ratio"),
    (["--drop-rate", "nan"], "--drop-rate"),
    (["--attn-drop-rate", "1"], "--attn-drop-rate"),
    (["--drop-path-rate", "inf"], "--drop-path-rate"),
    (["--img-size", "7000"], "--img-size"),
    (["--img-size", "512", "--patch-size", "4"], "tokens"),
    (["--embed-dim", "65536", "--num-heads", "2", "--mlp-ratio", "64"], "parameters"),
])
def test_bad_numbers_are_one_line_errors(capsys, folder, tmp_path, flags, fragment):
    assert fragment in _refused(capsys, folder, tmp_path, *flags)


def test_limits_are_explained():
    with pytest.raises(ConfigError, match=r"hidden width .* 0.*at least 1"):
        ModelConfig(embed_dim=16, num_heads=2, mlp_ratio=0.01)
    with pytest.raises(ConfigError, match=r"16384 tokens.*at most 4096"):
        ModelConfig(img_size=512, patch_size=4, embed_dim=16, num_heads=2)
    with pytest.raises(ConfigError, match="--img-size 8192"):
        ModelConfig(img_size=8192, patch_size=512, embed_dim=16, num_heads=2)
    ModelConfig(img_size=256, patch_size=4, embed_dim=16, num_heads=2)  # 4096 tokens: allowed
    assert TrainConfig(clip_grad=0).clip_grad is None and TrainConfig(clip_grad=-1).clip_grad is None


@pytest.mark.parametrize("config", [
    ModelConfig(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2),
    ModelConfig(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=24, depth=3, num_heads=3,
                mlp_ratio=2.5, qkv_bias=False),
])
def test_parameter_estimate_is_exact(config):
    from bvvit.model import VisionTransformer, count_parameters

    assert config.estimated_parameters() == count_parameters(VisionTransformer(config))


def test_divergence_names_epoch_and_step_and_keeps_the_checkpoint(folder, tmp_path, monkeypatch):
    """The loss turns NaN at the first step of epoch 2: one line, last.pth of epoch 1 intact."""
    real = runner.train_one_epoch
    calls, saved = [], {}
    out = tmp_path / "out"

    class NanLoss(nn.Module):
        def forward(self, logits, targets):
            return nn.functional.cross_entropy(logits, targets) * math.nan

    def diverge_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            saved["last"] = (out / "checkpoints" / "last.pth").read_bytes()
            args = list(args)
            args[4] = NanLoss()  # the criterion
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "train_one_epoch", diverge_in_epoch_2)
    source = resolve_data(str(folder))
    model_cfg = runner.model_config_for_data(source, 16, None, patch_size=4, embed_dim=16, depth=1,
                                             num_heads=2)
    cfg = TrainConfig(data_path=str(folder), output_dir=str(out), epochs=2, batch_size=8,
                      progress=False)
    with pytest.raises(BVViTError) as caught:
        runner.fit(model_cfg, cfg, source)
    message = str(caught.value)
    assert "\n" not in message and "diverged" in message
    assert "epoch 2" in message and "step 1" in message and "--lr" in message
    assert (out / "checkpoints" / "last.pth").read_bytes() == saved["last"]
    assert torch.load(out / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 1
    assert not (out / "vit_model.pth").exists()


@pytest.mark.slow
def test_diverging_run_is_one_line_exit_2(folder, tmp_path):
    result = run_cli("run.py", "--data-path", str(folder), "--output-dir", str(tmp_path / "o"),
                     "--epochs", "2", "--batch-size", "8", *TINY_MODEL_ARGS, "--no-progress",
                     "--lr", "1e6")
    assert_one_line_error(result, "diverged", "--lr")
