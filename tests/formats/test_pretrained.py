"""run.py --pretrained-path FILE|FOLDER of any format: the training model takes the
checkpoint's architecture (tokens, pooling, norms, activation), its weights and, for
another library's checkpoint, its normalisation; a head for other classes is replaced."""

import pytest
import torch

from bvvit.config import ModelConfig
from bvvit.model import VisionTransformer, load_pretrained
from bvvit.model_file import read_pretrained
from tests.formats.sources import DEPTH, DIM, HEADS, IMG, PATCH, hf_folder, timm_distilled
from tests.helpers import make_image_folder, run_cli

FLAGS = dict(img_size=IMG, patch_size=PATCH, in_chans=3, num_classes=3, embed_dim=DIM, depth=DEPTH,
             num_heads=HEADS, mlp_ratio=2.0)


def test_hf_deit_folder_starts_a_distilled_model_with_a_new_head(tmp_path):
    reference = hf_folder(tmp_path / "deit", "DeiTForImageClassificationWithTeacher", layer_norm_eps=1e-12,
                          hidden_act="gelu_new")
    pretrained = read_pretrained(tmp_path / "deit")
    config = pretrained.architecture_for(ModelConfig(**FLAGS))
    assert (config.dist_token, config.head_dist, config.norm_eps, config.activation) == (True, True, 1e-12,
                                                                                         "gelu_tanh")
    model = VisionTransformer(config)
    skipped = load_pretrained(model, pretrained.state_dict)
    assert set(skipped) == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    theirs = reference.deit.embeddings.distillation_token
    torch.testing.assert_close(model.dist_token, theirs)
    assert pretrained.preprocessing.mean == (0.5, 0.5, 0.5)  # DeiTImageProcessor defaults


def test_timm_file_keeps_its_architecture(tmp_path):
    torch.save(timm_distilled(num_classes=3).state_dict(), tmp_path / "deit.pth")
    pretrained = read_pretrained(tmp_path / "deit.pth", num_heads=HEADS)
    model = VisionTransformer(pretrained.architecture_for(ModelConfig(**{**FLAGS, "mlp_ratio": 4.0})))
    assert load_pretrained(model, pretrained.state_dict) == []  # same classes: every tensor used


@pytest.mark.slow
def test_run_py_fine_tunes_from_an_hf_folder(tmp_path):
    hf_folder(tmp_path / "vit", image_size=16, patch_size=4, hidden_size=16, intermediate_size=64)
    data = make_image_folder(tmp_path / "data", size=16, mode="RGB")
    result = run_cli("run.py", "--data-path", str(data), "--output-dir", str(tmp_path / "out"),
                     "--epochs", "1", "--batch-size", "8", "--img-size", "16", "--patch-size", "4",
                     "--embed-dim", "16", "--depth", str(DEPTH), "--num-heads", str(HEADS), "--no-progress",
                     "--pretrained-path", str(tmp_path / "vit"), "--pretrained-format", "hf")
    assert result.returncode == 0, result.stderr
    assert "loaded pretrained weights" in result.stdout and "new head" in result.stdout
    assert "preprocessing of the hf checkpoint: mean [0.5, 0.5, 0.5]" in result.stdout
    stored = torch.load(tmp_path / "out" / "vit_model.pth", weights_only=True)
    assert stored["model_config"]["norm_eps"] == 1e-12
