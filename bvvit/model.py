"""The Vision Transformer ("An Image is Worth 16x16 Words"), top to bottom in data order.

image (B, C, H, W)
  -> PatchEmbed: conv with kernel = stride = patch size        (B, N, D), N = (H/P)^2
  -> prepend class token, add learned positional embeddings    (B, N+1, D)
  -> depth x TransformerEncoderBlock (pre-norm attention + MLP, residuals)
  -> final LayerNorm, take the class token                     (B, D)
  -> head (Linear)                                             (B, num_classes)

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``, ``norm``, ``head``) so timm/DeiT state dicts load strictly and give the same
logits. Every tensor that quantization needs is produced by a module of its own: the
explicit attention path computes ``q @ k^T`` (``attn.matmul_qk``), ``softmax``
(``attn.softmax``) and ``attn @ v`` (``attn.matmul_av``) as separate modules, and the
residual additions are ``residual1``/``residual2``. This module knows nothing of quantization.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bvvit.config import ModelConfig


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping patches and project each to ``embed_dim``."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H != self.img_size or W != self.img_size:
            raise ValueError(f"input is {H}x{W}, model expects {self.img_size}x{self.img_size}")
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class MatMul(nn.Module):
    """``a @ b`` as a module, so quantization can wrap both operands."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class Softmax(nn.Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(dim=self.dim)


class Add(nn.Module):
    """``a + b`` as a module (residual connections), so quantization can reach the sum."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Attention(nn.Module):
    """Multi-head self-attention with a fused path and an explicit, hookable path."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, fused_attn: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # The explicit path's steps; stateless, so they add no parameters.
        self.matmul_qk = MatMul()
        self.softmax = Softmax(dim=-1)
        self.matmul_av = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            q = q * self.scale
            attn = self.matmul_qk(q, k.transpose(-2, -1))  # (B, H, N, N)
            attn = self.softmax(attn)
            attn = self.attn_drop(attn)
            x = self.matmul_av(attn, v)  # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, D)
        return self.proj_drop(self.proj(x))


HEAD_NAMES = ("head", "head_dist")  # the classifier Linears a model may have

# MLP activations by ModelConfig.activation: erf GELU (timm, torchvision, HF "gelu") and its
# tanh approximation (HF "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast").
ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


class MLP(nn.Module):
    """Linear -> GELU -> Linear, the transformer's feed-forward block."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACTIVATIONS[activation]()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (B, N, hidden)
        return self.drop2(self.fc2(x))  # (B, N, D)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class TransformerEncoderBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 fused_attn: bool = True, norm_eps: float = 1e-6, activation: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, fused_attn)
        self.drop_path1 = DropPath(drop_path)
        self.residual1 = Add()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), proj_drop, activation)
        self.drop_path2 = DropPath(drop_path)
        self.residual2 = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.residual1(x, self.drop_path1(self.attn(self.norm1(x))))  # (B, N, D)
        return self.residual2(x, self.drop_path2(self.mlp(self.norm2(x))))  # (B, N, D)


class VisionTransformer(nn.Module):
    """ViT classifier; ``forward(x) = forward_head(forward_features(x))``.

    Prefix tokens (``num_prefix_tokens``): the class token (``cls_token``) and, for DeiT's
    distilled models, the distillation token (``dist_token``), in that order; positional
    embeddings cover them and the patches. The head reads, by ``config.global_pool``:
    ``"token"`` the class token (the default), ``"avg"`` the mean of the patch tokens. With
    ``config.fc_norm`` the final LayerNorm is applied after pooling (``fc_norm``, timm's
    default for ``"avg"``) instead of before (``norm``); the other one is an Identity. A
    distilled model (``config.head_dist``) has a second head on the distillation token and
    returns the mean of both heads' logits, as timm's ``VisionTransformerDistilled`` and
    Hugging Face's ``DeiTForImageClassificationWithTeacher`` do at inference.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.num_prefix_tokens = int(c.class_token) + int(c.dist_token)
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.dist_token else None
        self.pos_embed = nn.Parameter(torch.zeros(
            1, self.patch_embed.num_patches + self.num_prefix_tokens, c.embed_dim))
        self.pos_drop = nn.Dropout(c.drop_rate)
        drop_path_rates = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.Sequential(*[
            TransformerEncoderBlock(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias,
                                    c.proj_drop_rate, c.attn_drop_rate, rate, c.fused_attn,
                                    c.norm_eps, c.activation)
            for rate in drop_path_rates])
        final_norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.norm = nn.Identity() if c.fc_norm else final_norm
        self.fc_norm = final_norm if c.fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(c.embed_dim, c.num_classes)
        self.head_dist = nn.Linear(c.embed_dim, c.num_classes) if c.head_dist else None
        self.reset_parameters()

    @property
    def head_names(self) -> tuple[str, ...]:
        """The classifier Linears: ``("head",)``, or ``("head", "head_dist")`` when distilled."""
        return ("head", "head_dist") if self.head_dist is not None else ("head",)

    @property
    def final_norm_name(self) -> str:
        """The LayerNorm whose output the head(s) read: ``"fc_norm"`` or ``"norm"``."""
        return "fc_norm" if self.config.fc_norm else "norm"

    def reset_parameters(self) -> None:
        """timm-style init: truncated normal (std .02) for Linear and embeddings."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch projection is a Linear over flattened patches (as in JAX ViT).
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def set_fused_attn(self, enabled: bool) -> "VisionTransformer":
        """Switch every block between fused SDPA and the explicit (hookable) attention."""
        for block in self.blocks:
            block.attn.fused_attn = enabled
        self.config.fused_attn = enabled
        return self

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) -> prefix tokens + patches with positions (B, P+N, D)."""
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token)
                  if t is not None]  # each (B, 1, D)
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed  # (B, P+N, D)
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(self.patch_embed(x))  # (B, P+N, D)
        x = self.blocks(x)
        return self.norm(x)  # (B, P+N, D)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P+N, D) -> what the head reads: (B, D), or (B, 2, D) class and distillation
        tokens for a distilled head."""
        if self.head_dist is not None:
            return x[:, :2]  # (B, 2, D)
        if self.config.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, D)
        return x[:, 0]  # class token (B, D)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))  # (B, D) or (B, 2, D)
        if self.head_dist is None:
            return x if pre_logits else self.head(x)  # (B, num_classes)
        if pre_logits:
            return x.mean(dim=1)  # (B, D), as timm
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}


def build_model(config: ModelConfig) -> VisionTransformer:
    return VisionTransformer(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- checkpoint adaptation

def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubically resize a (1, prefix + g*g, D) positional embedding to ``new_grid``^2 patches."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = int(math.isqrt(grid.shape[1]))
    if old_grid * old_grid != grid.shape[1]:
        raise ValueError(f"pos_embed has {grid.shape[1]} patch positions, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic",
                         align_corners=False, antialias=new_grid < old_grid)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# A timm fc_norm loaded into a model without one (token pooling: a per-token LayerNorm
# after the blocks commutes with taking the class token, so it is the final norm).
_FC_NORM_AS_NORM = {"fc_norm.weight": "norm.weight", "fc_norm.bias": "norm.bias"}


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor],
                         model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Adapt a timm/DeiT/BV-ViT state dict to ``model``: unwrap, rename, resize pos_embed.

    Handles ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers, ``module.`` prefixes
    from DistributedDataParallel, and a ``pos_embed`` for another image size. Mismatches
    that cannot be adapted are left for ``load_state_dict(strict=True)`` to report.
    """
    for wrapper in ("model", "state_dict", "model_state"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]  # type: ignore[assignment]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if not model.config.fc_norm and model.config.global_pool == "token":
            key = _FC_NORM_AS_NORM.get(key, key)
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            value = resize_pos_embed(value, model.patch_embed.grid_size, model.num_prefix_tokens)
        if key == "patch_embed.proj.weight" and value.shape[1] != model.config.in_chans:
            value = _adapt_input_channels(value, model.config.in_chans)
        out[key] = value
    return out


def _adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB -> grayscale (sum over channels) or grayscale -> RGB (repeat, rescaled)."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if weight.shape[1] == 1:
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    return weight  # cannot adapt; strict loading reports the shape mismatch


def load_pretrained(model: VisionTransformer, state_dict: Mapping[str, Any],
                    strict_head: bool = False) -> list[str]:
    """Load a foreign state dict into ``model``; returns the keys that were skipped.

    A classifier head (``head``, a distilled model's ``head_dist``) of another size is
    skipped (fine-tuning to new classes) unless ``strict_head``; every other key must match
    exactly.
    """
    adapted = checkpoint_filter_fn(state_dict, model)
    skipped: list[str] = []
    if not strict_head:
        for key in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
            if key in adapted and adapted[key].shape != model.state_dict()[key].shape:
                skipped.append(key)
                del adapted[key]
    result = model.load_state_dict(adapted, strict=False)
    problems = [k for k in result.missing_keys if k not in skipped] + list(result.unexpected_keys)
    if problems:
        raise KeyError(f"state dict does not match the model: {', '.join(problems[:6])}"
                       + (" ..." if len(problems) > 6 else ""))
    return skipped
