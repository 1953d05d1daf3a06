"""The architecture variants imported checkpoints need, in our model: configurable LayerNorm
eps and activation, a distillation token and head, average pooling with fc_norm."""

import dataclasses

import pytest
import torch

from bvvit.config import ModelConfig
from bvvit.errors import ConfigError
from bvvit.model import VisionTransformer, count_parameters

BASE = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=1, num_heads=2)
VARIANTS = {
    "distilled": dict(dist_token=True, head_dist=True),
    "dist token, one head": dict(dist_token=True),
    "avg + fc_norm": dict(global_pool="avg", fc_norm=True),
    "avg, no class token": dict(global_pool="avg", class_token=False),
    "hf eps and tanh gelu": dict(norm_eps=1e-12, activation="gelu_tanh"),
}


@pytest.mark.parametrize("fields", VARIANTS.values(), ids=VARIANTS.keys())
def test_variant_builds_and_counts_its_parameters(fields):
    config = ModelConfig(**BASE, **fields)
    model = VisionTransformer(config).eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert count_parameters(model) == config.estimated_parameters()
    assert model.num_prefix_tokens == int(config.class_token) + int(config.dist_token)
    assert model.pos_embed.shape[1] == 16 + model.num_prefix_tokens


def test_old_model_configs_build_todays_model():
    """A model_config stored before these fields existed loads as the plain ViT."""
    stored = {k: v for k, v in dataclasses.asdict(ModelConfig(**BASE)).items()
              if k not in ("norm_eps", "activation", "class_token", "dist_token", "head_dist",
                           "global_pool", "fc_norm")}
    model = VisionTransformer(ModelConfig.from_dict(stored))
    assert set(model.state_dict()) == set(VisionTransformer(ModelConfig(**BASE)).state_dict())
    assert model.head_names == ("head",) and model.final_norm_name == "norm"


def test_eps_and_activation_reach_every_layer():
    model = VisionTransformer(ModelConfig(**BASE, norm_eps=1e-12, activation="gelu_tanh"))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-12 for m in norms)
    assert model.blocks[0].mlp.act.approximate == "tanh"


@pytest.mark.parametrize("fields, fragment", [
    (dict(global_pool="token", class_token=False), "needs the class token"),
    (dict(head_dist=True), "head_dist"),
    (dict(global_pool="max"), "global_pool 'max'"),
    (dict(activation="relu"), "activation 'relu'"),
    (dict(norm_eps=0.0), "norm-eps"),
])
def test_impossible_variants_are_one_line(fields, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig(**BASE, **fields)
