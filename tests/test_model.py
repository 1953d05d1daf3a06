import pytest
import torch

from bvvit.config import ModelConfig
from bvvit.errors import ConfigError
from bvvit.model import (VisionTransformer, checkpoint_filter_fn, count_parameters,
                         load_pretrained, resize_pos_embed)

timm = pytest.importorskip("timm")


def test_shapes_and_split_forward(tiny_config):
    model = VisionTransformer(tiny_config).eval()
    x = torch.randn(3, 1, 28, 28)
    feats = model.forward_features(x)
    assert feats.shape == (3, 16 + 1, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (3, 32)
    assert model(x).shape == (3, 10)


def test_fused_and_explicit_attention_agree(tiny_config):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config).eval()
    x = torch.randn(4, 1, 28, 28)
    fused = model(x)
    model.set_fused_attn(False)
    explicit = model(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_explicit_attention_exposes_hookable_modules(tiny_config):
    model = VisionTransformer(tiny_config).eval().set_fused_attn(False)
    seen = []
    for name in ("matmul_qk", "softmax", "matmul_av"):
        getattr(model.blocks[0].attn, name).register_forward_hook(lambda m, i, o, n=name: seen.append(n))
    model(torch.randn(1, 1, 28, 28))
    assert seen == ["matmul_qk", "softmax", "matmul_av"]


def test_patch_must_divide_image():
    with pytest.raises(ConfigError, match="not divisible by --patch-size"):
        ModelConfig(img_size=28, patch_size=5)


def test_heads_must_divide_embed_dim():
    with pytest.raises(ConfigError, match="--num-heads"):
        ModelConfig(embed_dim=30, num_heads=4)


@pytest.mark.parametrize("img,patch,chans,dim,depth,heads,classes", [
    (28, 7, 1, 48, 2, 3, 10),
    (32, 8, 3, 64, 3, 4, 7),
])
def test_timm_state_dict_loads_strictly_and_gives_same_logits(img, patch, chans, dim, depth, heads, classes):
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=img, patch_size=patch, in_chans=chans, num_classes=classes, embed_dim=dim,
        depth=depth, num_heads=heads).eval()
    ours = VisionTransformer(ModelConfig(img_size=img, patch_size=patch, in_chans=chans,
                                         num_classes=classes, embed_dim=dim, depth=depth,
                                         num_heads=heads)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, chans, img, img)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-6, rtol=1e-5)
        ours.set_fused_attn(False)
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


def test_our_state_dict_loads_into_timm(tiny_config):
    ours = VisionTransformer(tiny_config)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert count_parameters(ours) == sum(p.numel() for p in reference.parameters())


def test_pos_embed_resized_for_other_image_size():
    torch.manual_seed(0)
    source = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=32, depth=1, num_heads=2)
    target = VisionTransformer(ModelConfig(img_size=48, patch_size=8, in_chans=3, num_classes=5,
                                           embed_dim=32, depth=1, num_heads=2))
    state = {"model": {"module." + k: v for k, v in source.state_dict().items()}}
    adapted = checkpoint_filter_fn(state, target)
    assert adapted["pos_embed"].shape == (1, 36 + 1, 32)
    torch.testing.assert_close(adapted["pos_embed"][:, :1], source.pos_embed[:, :1])
    target.load_state_dict(adapted, strict=True)


def test_resize_pos_embed_identity_and_smooth():
    grid = torch.arange(16.0).reshape(1, 16, 1).repeat(1, 1, 2)
    pos = torch.cat([torch.zeros(1, 1, 2), grid], dim=1)
    assert resize_pos_embed(pos, 4) is pos
    bigger = resize_pos_embed(pos, 8)
    assert bigger.shape == (1, 65, 2)
    assert bigger[0, 1:, 0].min() >= -1 and bigger[0, 1:, 0].max() <= 16


def test_load_pretrained_replaces_mismatched_head(tiny_config):
    source = VisionTransformer(tiny_config)
    other = ModelConfig(**{**tiny_config.to_dict(), "num_classes": 3})
    target = VisionTransformer(other)
    skipped = load_pretrained(target, source.state_dict())
    assert skipped == ["head.weight", "head.bias"]
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_load_pretrained_rejects_other_architecture(tiny_config):
    source = VisionTransformer(ModelConfig(**{**tiny_config.to_dict(), "depth": 3}))
    with pytest.raises(KeyError, match="blocks.2"):
        load_pretrained(VisionTransformer(tiny_config), source.state_dict())


def test_drop_path_only_in_training(tiny_config):
    cfg = ModelConfig(**{**tiny_config.to_dict(), "drop_path_rate": 0.5})
    model = VisionTransformer(cfg)
    x = torch.randn(8, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))
