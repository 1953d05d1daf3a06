"""Model files whose config contradicts itself or its weights are refused on load, in one
line naming the file and the field: no silent pos_embed resizing, no crash later."""

import pytest
import torch

from bvvit.config import ModelConfig, Preprocessing
from bvvit.errors import CheckpointError
from bvvit.model import VisionTransformer
from bvvit.model_file import load_model_file, model_file_holds, model_payload, save_model_file

CONFIG = ModelConfig(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1,
                     num_heads=2)
PRE = Preprocessing(mean=(0.5,), std=(0.5,), img_size=16, in_chans=1)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "vit_model.pth"
    save_model_file(path, VisionTransformer(CONFIG), ["a", "b", "c"], PRE)
    return path


def _edited(path, edit):
    payload = torch.load(path, weights_only=True)
    edit(payload)
    target = path.with_name("edited.pth")
    torch.save(payload, target)
    return target


def _refused(path, *fragments):
    with pytest.raises(CheckpointError) as caught:
        load_model_file(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_unedited_file_loads(model_file):
    loaded = load_model_file(model_file)
    assert loaded.config == CONFIG and loaded.preprocessing == PRE


@pytest.mark.parametrize("edit, fragments", [
    # pos_embed no longer resized to an edited image size
    (lambda p: p["model_config"].update(img_size=32), ("pos_embed", "img_size 32")),
    (lambda p: p["model_config"].update(num_classes=4), ("head.weight", "num_classes 4")),
    (lambda p: p["model_config"].update(mlp_ratio=8.0), ("mlp.fc1", "mlp_ratio 8.0")),
    (lambda p: p["model_config"].update(depth=2), ("blocks.1", "depth 2")),
    (lambda p: p["model_config"].update(num_heads=3), ("--num-heads 3",)),
    (lambda p: p["model_config"].update(img_size=16.5), ("img-size",)),
    (lambda p: p["preprocessing"].update(img_size=0), ("preprocessing img_size",)),
    (lambda p: p["preprocessing"].update(img_size=20), ("preprocessing img_size 20", "model_config")),
    (lambda p: p["preprocessing"].update(in_chans=3), ("preprocessing", "in_chans")),
    (lambda p: p["preprocessing"].update(std=[0.0]), ("std",)),
    (lambda p: p["preprocessing"].update(mean=[float("nan")]), ("mean",)),
    (lambda p: p["preprocessing"].update(mean=0.5), ("mean",)),
    (lambda p: p["preprocessing"].update(interpolation="lanczos"), ("interpolation",)),
    (lambda p: p["preprocessing"].update(crop_pct=0), ("crop_pct",)),
    (lambda p: p.update(preprocessing="bilinear"), ("preprocessing",)),
    (lambda p: p["state_dict"].update(pos_embed=torch.zeros(1, 5, 16)), ("pos_embed",)),
    (lambda p: p["state_dict"].pop("norm.bias"), ("lacks norm.bias",)),
])
def test_contradictions_are_one_line_errors(model_file, edit, fragments):
    _refused(_edited(model_file, edit), *fragments)


def test_model_file_holds_compares_content_not_bytes(model_file):
    payload = torch.load(model_file, weights_only=True)
    assert model_file_holds(model_file, payload)
    payload["state_dict"]["head.bias"] = payload["state_dict"]["head.bias"] + 1
    assert not model_file_holds(model_file, payload)
    assert not model_file_holds(model_file.with_name("missing.pth"), payload)
    fresh = model_payload(VisionTransformer(CONFIG), ["a", "b", "c"], PRE)
    assert not model_file_holds(model_file, fresh)  # other random weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused(model_file, bad):
    """A diverged or corrupt model would give meaningless accuracy and calibration ranges
    (post_training used to print a top-1 and then crash in GPTQ's Cholesky)."""
    path = _edited(model_file, lambda p: p["state_dict"]["blocks.0.mlp.fc1.weight"].fill_(bad))
    _refused(path, "NaN or inf", "blocks.0.mlp.fc1.weight")
