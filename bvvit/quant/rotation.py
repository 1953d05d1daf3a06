"""Orthogonal rotation of the residual stream, folded into the weights (the idea of QuaRot /
SpinQuant, kept exact with LayerNorm and no extra op in the model).

Activations of a ViT's residual stream have a few channels far wider than the rest; after
LayerNorm they are the inputs of qkv, fc1 and the head, quantized with one scale per tensor.
Rotating the stream by an orthogonal ``Q`` spreads every outlier over all channels, and the
model computes the same function when every weight is rotated to match (row convention: a
token ``x`` becomes ``Q x``):

1. each LayerNorm's affine is folded into the Linear it feeds (qkv, fc1, head):
   ``W <- W diag(gamma)``, ``b <- b + W beta``; the LayerNorm keeps ``gamma = 1, beta = 0``;
2. writers of the stream (patch embedding, class token, positional embedding, attn.proj,
   mlp.fc2): ``W <- Q W``, ``b <- Q b``;
3. readers after a LayerNorm (qkv, fc1, head): ``W <- W Q^T``.

``LayerNorm(Q x) = Q LayerNorm(x)`` holds exactly when ``Q 1 = 1``: the mean and the norm of
the centred token are then unchanged. ``Q`` is a randomized Hadamard matrix
``H diag(s) / sqrt(d)`` (random signs ``s``) followed by the Householder reflection that sends
``Q 1 / sqrt(d)`` back to ``1 / sqrt(d)``. ``H`` is a Sylvester (power of two) or Paley
(order ``q + 1``, ``q`` prime, ``q = 3 mod 4``) Hadamard matrix, or the Kronecker product of
the two: 96 = 12 x 8, 192 = 12 x 16, 384 = 12 x 32, 768 = 12 x 64. A width with no such
factorisation gets a seeded random orthogonal matrix (QR of a Gaussian) instead, with the
same reflection. Everything is computed in float64 and stored in the weights' dtype.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from bvvit.model import VisionTransformer


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def paley_hadamard(q: int) -> Tensor:
    """The +-1 Hadamard matrix of order ``q + 1`` (Paley construction I; ``q`` prime, ``q = 3 mod 4``)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]  # Legendre symbol of a mod q
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard_factor(d: int) -> Optional[int]:
    """The order ``m`` of the non-Sylvester factor of a Hadamard matrix of order ``d``
    (``d = m * 2^k``; 1: a pure power of two), or None when none is built here."""
    power = 1
    while d % (2 * power) == 0:
        power *= 2
    m = d // power
    while True:
        if m == 1 or (m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3):
            return m
        if d % (2 * m):
            return None
        m *= 2


def hadamard_matrix(d: int) -> Optional[Tensor]:
    """A +-1 Hadamard matrix of order ``d`` (float64, ``H H^T = d I``), or None."""
    m = hadamard_factor(d)
    if m is None:
        return None
    h = torch.ones(1, 1, dtype=torch.float64) if m == 1 else paley_hadamard(m - 1)
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(h, sylvester)
    return h


def ones_preserving_rotation(d: int, seed: int = 0) -> tuple[Tensor, str]:
    """(orthogonal ``Q`` (d, d) float64 with ``Q 1 = 1``, how it was built)."""
    generator = torch.Generator().manual_seed(seed)
    h = hadamard_matrix(d)
    if h is None:
        q0, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        q0 = q0 * torch.sign(torch.diagonal(r)).unsqueeze(0)
        kind = "random orthogonal"
    else:
        signs = torch.randint(0, 2, (d,), generator=generator).double() * 2 - 1
        q0 = h * signs.unsqueeze(0) / math.sqrt(d)
        m = hadamard_factor(d)
        kind = "hadamard" if m == 1 else f"hadamard (paley {m} x sylvester {d // m})"
    e = torch.full((d,), 1.0 / math.sqrt(d), dtype=torch.float64)
    w = q0 @ e - e
    if float(w.norm()) > 1e-12:
        q0 = q0 - 2.0 * torch.outer(w, w @ q0) / (w @ w)  # (I - 2 w w^T / w^T w) Q0
    return q0, kind


def norm_reader_pairs(model: VisionTransformer) -> list[tuple[str, str]]:
    """(LayerNorm, a Linear that reads its output) for every block and the head(s): the
    final norm (``norm``, or ``fc_norm`` after pooling) feeds ``head`` and a distilled
    model's ``head_dist``."""
    pairs = []
    for i in range(len(model.blocks)):
        pairs += [(f"blocks.{i}.norm1", f"blocks.{i}.attn.qkv"), (f"blocks.{i}.norm2", f"blocks.{i}.mlp.fc1")]
    return pairs + [(model.final_norm_name, head) for head in model.head_names]


@torch.no_grad()
def fold_layernorm_affine(norm: nn.LayerNorm, *linears: nn.Linear) -> None:
    """``linear(gamma * n + beta) = (W diag(gamma)) n + (b + W beta)`` for every Linear
    reading ``norm``; ``norm`` becomes (1, 0)."""
    for linear in linears:
        w = linear.weight.double()
        bias = torch.zeros(linear.out_features, dtype=torch.float64) if linear.bias is None else linear.bias.double()
        bias = bias + w @ norm.bias.double()
        linear.weight.copy_(w * norm.weight.double().unsqueeze(0))
        if linear.bias is None:
            linear.bias = nn.Parameter(bias.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
        else:
            linear.bias.copy_(bias)
    norm.weight.fill_(1.0)
    norm.bias.zero_()


@torch.no_grad()
def _write_rotated(weight: Tensor, bias: Optional[Tensor], q: Tensor) -> None:
    """A writer of the stream: ``W <- Q W`` (output channels first), ``b <- Q b``."""
    matrix = weight.double().reshape(weight.shape[0], -1)
    weight.copy_((q @ matrix).reshape(weight.shape))
    if bias is not None:
        bias.copy_(q @ bias.double())


@torch.no_grad()
def rotate_residual_stream(model: VisionTransformer, q: Tensor) -> None:
    """Rotate ``model``'s residual stream by ``q`` (orthogonal, ``q 1 = 1``) in place; the
    float model computes the same logits (up to float rounding)."""
    pairs = norm_reader_pairs(model)
    for norm_name in dict.fromkeys(norm for norm, _ in pairs):
        fold_layernorm_affine(model.get_submodule(norm_name),
                              *[model.get_submodule(linear) for norm, linear in pairs if norm == norm_name])
    _write_rotated(model.patch_embed.proj.weight, model.patch_embed.proj.bias, q)
    for token in (model.cls_token, model.dist_token, model.pos_embed):
        if token is not None:  # a model without a class token (average pooling)
            token.copy_(token.double() @ q.T)
    for block in model.blocks:
        _write_rotated(block.attn.proj.weight, block.attn.proj.bias, q)
        _write_rotated(block.mlp.fc2.weight, block.mlp.fc2.bias, q)
    for _, linear_name in norm_reader_pairs(model):
        linear = model.get_submodule(linear_name)
        linear.weight.copy_(linear.weight.double() @ q.T)


def rotate_model(model: VisionTransformer, seed: int = 0) -> dict[str, Any]:
    """Fold a seeded ones-preserving rotation into ``model`` in place; returns what was done
    (for the quantization report)."""
    q, kind = ones_preserving_rotation(model.config.embed_dim, seed)
    rotate_residual_stream(model, q.to(model.head.weight.device))
    return {"dim": model.config.embed_dim, "construction": kind, "seed": seed}


__all__ = ["hadamard_matrix", "ones_preserving_rotation", "fold_layernorm_affine",
           "rotate_residual_stream", "rotate_model", "norm_reader_pairs"]
