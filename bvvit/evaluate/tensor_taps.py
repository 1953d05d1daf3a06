"""Where the analysis looks inside a model: tensor names and groups, the float reference
and float twins, hooks at the quantizers' places, and the evaluation batches it runs on.

Tensors are named ``"<module>:<kind>"``: the module a quantizer sits on and the quantizer's
kind, e.g. ``blocks.0.attn.qkv:linear_input``, ``blocks.0.attn.matmul_qk:q``,
``blocks.0.attn.softmax:softmax``, ``blocks.0.residual2:residual``, ``patch_embed.proj:image``.
The float tensors come from a copy of the FP model on its explicit attention path, hooked
at the same places where :func:`bvvit.quant.quantize.convert` puts quantizers, so every
tensor (the residual stream too) is seen even when a variant leaves it float. A variant
whose LayerNorms were reparameterized (``reparam.enabled``, exact in float) is compared
with its "float twin": the FP model with the same change folded in (:func:`float_twin`),
so its qkv/fc1/head inputs are compared in the coordinates its quantizers work in.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from bvvit.model import Add, MatMul, Softmax
from bvvit.quant.modules import ActQuantizer, act_quantizers
from bvvit.quant.reparam import fold_channel_affine, norm_linear_pairs

# Tensor groups, in the order a report shows them.
GROUPS = {
    "image": "image / patch input",
    "post_layernorm": "post-LayerNorm (qkv, fc1, head inputs)",
    "qkv": "attention q, k, v",
    "softmax": "softmax output (attention probabilities)",
    "attn_out": "attention output (proj input)",
    "post_gelu": "post-GELU (fc2 input)",
    "residual": "residual stream (Add outputs)",
}


def tensor_group(layer: str, kind: str) -> str:
    """The :data:`GROUPS` key of tensor ``layer:kind``."""
    if kind in ("q", "k", "v"):
        return "qkv"
    if kind in ("image", "softmax", "residual"):
        return kind
    leaf = layer.rsplit(".", 1)[-1]
    if leaf == "fc2":
        return "post_gelu"
    if leaf == "proj" and ".attn." in f".{layer}":
        return "attn_out"
    return "post_layernorm"  # qkv, fc1 and head read LayerNorm outputs


def tensor_info(tensor_id: str) -> dict[str, str]:
    """``{"id", "layer", "kind", "group"}`` of tensor ``"<layer>:<kind>"``."""
    layer, _, kind = tensor_id.rpartition(":")
    return {"id": tensor_id, "layer": layer, "kind": kind, "group": tensor_group(layer, kind)}


# ------------------------------------------------------------------ hooks and inputs

def float_reference(fp_model: nn.Module) -> nn.Module:
    """A copy of the FP model on the explicit attention path (the input is untouched)."""
    reference = copy.deepcopy(fp_model).eval()
    if hasattr(reference, "set_fused_attn"):
        reference.set_fused_attn(False)
    return reference


def float_twin(fp_model: nn.Module, qmodel: nn.Module, reference: Optional[nn.Module] = None
               ) -> tuple[nn.Module, set[str]]:
    """The float model a variant's tensors are compared with, and the Linear layers whose
    inputs differ from the plain FP model's.

    ``reference`` (:func:`float_reference`) when ``qmodel`` carries no LayerNorm
    reparameterization; otherwise a copy with the same per-channel change ``y = r y' + d``
    folded in (r and d recovered from the two LayerNorms' affines), which equals the FP
    model in float and matches the variant's quantizer inputs.
    """
    reference = reference if reference is not None else float_reference(fp_model)
    if not hasattr(reference, "blocks"):
        return reference, set()
    changed: list[tuple[str, tuple[str, ...]]] = []
    for norm_name, linear_names in norm_linear_pairs(reference):
        fp_norm, q_norm = reference.get_submodule(norm_name), find_submodule(qmodel, norm_name)
        if not isinstance(q_norm, nn.LayerNorm) or q_norm.weight is None:
            continue
        if not (torch.equal(fp_norm.weight, q_norm.weight.to(fp_norm.weight.device)) and
                torch.equal(fp_norm.bias, q_norm.bias.to(fp_norm.bias.device))):
            changed.append((norm_name, linear_names))
    if not changed:
        return reference, set()
    twin = copy.deepcopy(reference)
    with torch.no_grad():
        for norm_name, linear_names in changed:
            norm, q_norm = twin.get_submodule(norm_name), qmodel.get_submodule(norm_name)
            gamma = q_norm.weight.detach().to(norm.weight)
            r = torch.where(gamma != 0, norm.weight / gamma, torch.ones_like(gamma))
            d = norm.bias - r * q_norm.bias.detach().to(norm.bias)
            fold_channel_affine(norm, [twin.get_submodule(name) for name in linear_names], r, d)
    return twin, {linear for _, linears in changed for linear in linears}


def float_twins(fp_model: nn.Module, variants: Mapping[str, nn.Module], reference: nn.Module
           ) -> dict[str, tuple[nn.Module, set[str]]]:
    """:func:`float_twin` of every variant; variants with the same LayerNorms share one."""
    out: dict[str, tuple[nn.Module, set[str]]] = {}
    seen: dict[str, tuple[nn.Module, set[str]]] = {}
    for name, model in variants.items():
        digest = hashlib.sha1()
        for norm_name, _ in norm_linear_pairs(reference) if hasattr(reference, "blocks") else []:
            norm = find_submodule(model, norm_name)
            if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
                digest.update(norm.weight.detach().cpu().numpy().tobytes())
                digest.update(norm.bias.detach().cpu().numpy().tobytes())
        key = digest.hexdigest()
        if key not in seen:
            seen[key] = float_twin(fp_model, model, reference)
        out[name] = seen[key]
    return out


def _tap_points(model: nn.Module) -> Iterator[tuple[str, nn.Module, Optional[int], str]]:
    """(module name, module, input index or None for the output, kind): where
    :func:`~bvvit.quant.quantize.convert` places quantizers, on the float model."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module, 0, "linear_input"
        elif isinstance(module, nn.Conv2d):
            yield name, module, 0, "image"
        elif isinstance(module, MatMul):
            if name.endswith("matmul_qk"):
                yield name, module, 0, "q"
                yield name, module, 1, "k"  # seen as k^T, like the quantizer sees it
            else:  # attn @ v: the probabilities are the softmax output
                yield name, module, 1, "v"
        elif isinstance(module, Softmax):
            yield name, module, None, "softmax"
        elif isinstance(module, Add):
            yield name, module, None, "residual"


@contextmanager
def float_hooks(model: nn.Module, record: Callable[[str, torch.Tensor], None],
                 layers: Optional[set[str]] = None) -> Iterator[None]:
    """Call ``record(tensor id, tensor)`` at every tap point (of ``layers`` only, if given)."""
    handles = []
    for name, module, index, kind in _tap_points(model):
        if layers is not None and name not in layers:
            continue
        tensor_id = f"{name}:{kind}"
        if index is None:
            handles.append(module.register_forward_hook(
                lambda _m, _args, out, tid=tensor_id: record(tid, out)))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, tid=tensor_id, i=index: record(tid, args[i])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def quantizer_ids(qmodel: nn.Module) -> list[tuple[str, ActQuantizer]]:
    """(tensor id, quantizer) for every activation quantizer of ``qmodel``."""
    return [(f"{name.rsplit('.', 1)[0]}:{q.kind}", q) for name, q in act_quantizers(qmodel)]


@contextmanager
def quantizer_hooks(qmodel: nn.Module, record: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``record(tensor id, quantizer output)`` for every activation quantizer of
    ``qmodel`` while the block runs."""
    handles = [q.register_forward_hook(lambda _m, _args, out, tid=tid: record(tid, out))
               for tid, q in quantizer_ids(qmodel)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def take_batches(loader: Iterable, max_batches: Optional[int]) -> list[torch.Tensor]:
    """The images of the first ``max_batches`` batches (all when None)."""
    images = []
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        images.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
    if not images:
        raise ValueError("the loader yielded no images to analyse")
    return images


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def as_variants(qmodels: Any) -> Mapping[str, nn.Module]:
    """``{variant name: model}`` from None, one model (named ``quantized``) or a mapping.

    A mapping is used as it is, not copied: it may load each model when asked for it (the
    PTQ job's variants at 224 px do not all fit in memory at once), so callers take one
    variant at a time and keep no model beyond its turn."""
    if qmodels is None:
        return {}
    if isinstance(qmodels, nn.Module):
        return {"quantized": qmodels}
    if isinstance(qmodels, Mapping):
        return qmodels
    return dict(qmodels)


def layer_of(tensor_id: str) -> str:
    """The module name of tensor ``"<layer>:<kind>"``."""
    return tensor_id.rpartition(":")[0]


def distinct_twins(twins: dict[str, tuple[nn.Module, set[str]]]
                   ) -> list[tuple[nn.Module, set[str], list[str]]]:
    """(twin, its reparameterized layers, the variants sharing it) for twins that differ
    from the plain reference."""
    groups: dict[int, tuple[nn.Module, set[str], list[str]]] = {}
    for name, (twin, layers) in twins.items():
        if layers:
            groups.setdefault(id(twin), (twin, layers, []))[2].append(name)
    return list(groups.values())


def find_submodule(model: nn.Module, name: str) -> Optional[nn.Module]:
    """``model``'s submodule ``name``, or None when it has none of that name."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


__all__ = ["GROUPS", "tensor_group", "tensor_info", "float_reference", "float_twin", "float_twins",
           "distinct_twins", "float_hooks", "quantizer_ids", "quantizer_hooks", "take_batches", "model_device",
           "as_variants", "layer_of", "find_submodule"]
