"""torchvision VisionTransformer state dicts load with torchvision's logits."""

import pytest
import torch

from bvvit.errors import CheckpointError
from bvvit.model_file import load_model_file
from tests.formats.sources import HEADS, PARITY_ATOL, images, max_logit_diff, torchvision_vit


def test_state_dict_gives_torchvisions_logits(tmp_path):
    reference = torchvision_vit()
    torch.save(reference.state_dict(), tmp_path / "vit.pth")
    loaded = load_model_file(tmp_path / "vit.pth", num_heads=HEADS)
    assert loaded.source_format == "torchvision"
    assert max_logit_diff(loaded.model, reference, images()) <= PARITY_ATOL


def test_files_from_before_torchvision_0_12_use_linear_1_and_linear_2(tmp_path):
    reference = torchvision_vit()
    old = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
           for k, v in reference.state_dict().items()}
    torch.save(old, tmp_path / "vit.pth")
    assert max_logit_diff(load_model_file(tmp_path / "vit.pth", num_heads=HEADS).model,
                          reference, images()) <= PARITY_ATOL


def test_vit_b_16_shape_gets_torchvisions_recipe_and_twelve_heads(tmp_path):
    """Built on the meta device: the real shapes at no cost; only the keys/shapes matter."""
    from torchvision.models import vit_b_16
    with torch.device("meta"):
        state = vit_b_16().state_dict()
    from bvvit.formats import torchvision as tv_format
    converted = tv_format.convert_state_dict(state, "vit_b_16.pth")
    pre = converted.preprocessing
    assert (converted.config.num_heads, converted.config.img_size) == (12, 224)
    assert (pre.interpolation, pre.crop_pct, pre.crop_mode) == ("bilinear", 224 / 256, "center")
    assert pre.mean == (0.485, 0.456, 0.406)


def test_pre_logits_layer_is_refused_in_one_line(tmp_path):
    torch.save(torchvision_vit(representation_size=16).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="pre-logits"):
        load_model_file(tmp_path / "vit.pth", num_heads=HEADS)
