"""Tiny checkpoints built by each library's own constructor (random weights, nothing is
downloaded), and the parity measure the format tests share."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

PARITY_ATOL = 1e-4  # max abs logit difference allowed against the source library's model
IMG, PATCH, DIM, DEPTH, HEADS, CLASSES = 32, 8, 32, 2, 2, 7
TIMM_ARGS = dict(img_size=IMG, patch_size=PATCH, num_classes=CLASSES, embed_dim=DIM, depth=DEPTH,
                 num_heads=HEADS)
HF_ARGS = dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
               intermediate_size=2 * DIM, image_size=IMG, patch_size=PATCH, num_labels=CLASSES)
_NORM_WEIGHTS = ("norm1.weight", "norm2.weight", "norm.weight", "fc_norm.weight", "ln_1.weight",
                 "ln_2.weight", "ln.weight", "layernorm_before.weight", "layernorm_after.weight",
                 "layernorm.weight")


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with every parameter random and non-trivial (libraries start
    heads, tokens and norm biases at zero, which would hide a wrong mapping)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2
                        + (1.0 if name.endswith(_NORM_WEIGHTS) else 0.0))
    return model.eval()


def images(batch: int = 3, channels: int = 3, size: int = IMG, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def max_logit_diff(ours: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    """Largest |our logit - the library's logit| on ``x``, over our fused AND explicit
    attention paths."""
    with torch.no_grad():
        expected = reference(x)
        expected = getattr(expected, "logits", expected)
        worst = (ours(x) - expected).abs().max().item()
        ours.set_fused_attn(False)
        worst = max(worst, (ours(x) - expected).abs().max().item())
        ours.set_fused_attn(True)
    return worst


def timm_vit(**overrides) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    return randomized(VisionTransformer(**{**TIMM_ARGS, **overrides}))


def timm_distilled(**overrides) -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled
    return randomized(VisionTransformerDistilled(**{**TIMM_ARGS, **overrides}))


def hf_folder(folder: Path, model_class: str = "ViTForImageClassification", processor: dict | None = None,
              safe: bool = True, **config) -> nn.Module:
    """A transformers image classifier saved with save_pretrained (+ its image processor)."""
    import transformers
    config_class = transformers.DeiTConfig if model_class.startswith("DeiT") else transformers.ViTConfig
    model = randomized(getattr(transformers, model_class)(config_class(**{**HF_ARGS, **config})))
    model.save_pretrained(folder)
    if not safe:  # transformers 5 writes only safetensors; older folders hold pytorch_model.bin
        from safetensors.torch import load_file
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    if processor is not None:
        processor_class = transformers.DeiTImageProcessor if model_class.startswith("DeiT") \
            else transformers.ViTImageProcessor
        processor_class(**processor).save_pretrained(folder)
    return model


def torchvision_vit(**overrides) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer
    args = dict(image_size=IMG, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS, hidden_dim=DIM,
                mlp_dim=2 * DIM, num_classes=CLASSES)
    return randomized(VisionTransformer(**{**args, **overrides}))
