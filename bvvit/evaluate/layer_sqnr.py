"""Per-tensor SQNR of each quantized variant against the float model, at every quantizer's
output (so with the error accumulated upstream), plus the weight SQNR of every weight layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from bvvit.evaluate.activation_stats import weight_layer_names
from bvvit.evaluate.tensor_taps import (as_variants, find_submodule, float_hooks, float_reference, float_twins,
                                        layer_of, model_device, quantizer_hooks, take_batches, tensor_info)
from bvvit.io import json_safe
from bvvit.metrics import sqnr_db
from bvvit.quant.modules import QuantConv2d, QuantLinear


TAP_BUDGET_BYTES = 256 << 20  # float tensors held at once: one chunk of images, every tap


@torch.inference_mode()
def per_layer_sqnr(fp_model: nn.Module, qmodels: Mapping[str, nn.Module], loader: Iterable,
                   max_batches: Optional[int] = 4, tap_budget_bytes: int = TAP_BUDGET_BYTES,
                   progress: bool = False) -> dict[str, Any]:
    """SQNR (dB) of every quantized tensor against the float model's same tensor.

    For each variant, the tensor at each quantizer's OUTPUT (so it carries the error
    accumulated upstream, as the variant really runs) is compared with the float model's
    tensor at that place (its float twin's, :func:`~bvvit.evaluate.tensor_taps.float_twin`,
    for reparameterized variants), summed over the first ``max_batches`` batches:
    ``10 log10(sum ref^2 / sum (ref - q)^2)``. Weight SQNR of every weight layer is added.

    Memory: one variant is touched at a time (``qmodels`` may load its models lazily), and
    the float tensors of every tap are held for one chunk of images at a time, as many
    images as fit in ``tap_budget_bytes`` (a ViT-B/16 holds ~110 MB of them per image; the
    whole batch for small models).

    Returns ``{"images", "variants": [names], "tensors": [{"id", "layer", "kind", "group"}]
    (execution order), "sqnr_db": {variant: [dB or None (float there), ...]},
    "weights": {"layers": [...], "sqnr_db": {variant: [...]}}}``.
    """
    variants = as_variants(qmodels)
    reference = float_reference(fp_model)
    twins = float_twins(fp_model, variants, reference)
    device = model_device(reference)
    images = take_batches(loader, max_batches)
    order, chunk = _tap_order_and_chunk(reference, images[0][:1].to(device), tap_budget_bytes)
    sums: dict[str, dict[str, list[float]]] = {name: {} for name in variants}  # tid -> [signal, noise]
    weight_layers = weight_layer_names(fp_model)
    weight_table = {}
    for name in tqdm(list(variants), desc="per-layer SQNR", disable=not progress, leave=False):
        model = variants[name]
        twin, layers = twins[name]
        for batch in images:
            for start in range(0, batch.shape[0], chunk):
                _compare_chunk(reference, twin, layers, model, batch[start:start + chunk].to(device), sums[name])
        weight_table[name] = _weight_row(model, twin, weight_layers)
    table = {name: [_sqnr_from(sums[name].get(tid)) for tid in order] for name in variants}
    return json_safe({"images": sum(int(b.shape[0]) for b in images), "variants": list(variants),
                      "tensors": [tensor_info(tid) for tid in order], "sqnr_db": table,
                      "weights": {"layers": weight_layers, "sqnr_db": weight_table}})


def _tap_order_and_chunk(reference: nn.Module, image: torch.Tensor, budget: int) -> tuple[list[str], int]:
    """(tap ids in execution order, images per chunk so that every tap of a chunk fits
    ``budget`` bytes), from one image through the float reference."""
    sizes: dict[str, int] = {}

    def note(tid: str, x: torch.Tensor) -> None:
        sizes.setdefault(tid, x.numel() * x.element_size())

    with float_hooks(reference, note):
        reference(image)
    return list(sizes), max(1, budget // max(1, sum(sizes.values())))


def _compare_chunk(reference: nn.Module, twin: nn.Module, layers: set[str], model: nn.Module,
                   images: torch.Tensor, acc: dict[str, list[float]]) -> None:
    """Add one chunk's signal and noise power at every quantizer of ``model`` to ``acc``."""
    float_tensors: dict[str, torch.Tensor] = {}
    twin_tensors: dict[str, torch.Tensor] = {}

    def keeper(store: dict[str, torch.Tensor]) -> Callable[[str, torch.Tensor], None]:
        def keep(tid: str, x: torch.Tensor) -> None:  # returns None: a hook's value would replace the input
            store.setdefault(tid, x.detach())
        return keep

    with float_hooks(reference, keeper(float_tensors)):
        reference(images)
    if layers:
        with float_hooks(twin, keeper(twin_tensors), layers):
            twin(images)

    def compare(tid: str, out: torch.Tensor) -> None:
        ref = twin_tensors.get(tid) if layer_of(tid) in layers else float_tensors.get(tid)
        if ref is None or ref.shape != out.shape:
            return
        ref64 = ref.double()
        sums = acc.setdefault(tid, [0.0, 0.0])
        sums[0] += float((ref64 ** 2).sum())
        sums[1] += float(((ref64 - out.detach().to(ref.device).double()) ** 2).sum())

    with quantizer_hooks(model, compare):
        model(images.to(model_device(model)))


def _weight_row(model: nn.Module, twin: nn.Module, weight_layers: list[str]) -> list[Optional[float]]:
    """Weight SQNR of each layer of ``weight_layers`` in ``model`` (None where float)."""
    row: list[Optional[float]] = []
    for layer in weight_layers:
        module = find_submodule(model, layer)
        if isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_qparams is not None:
            row.append(sqnr_db(twin.get_submodule(layer).weight.detach().cpu(), module.weight.detach().cpu()))
        else:
            row.append(None)
    return row


def _sqnr_from(acc: Optional[list[float]]) -> Optional[float]:
    if acc is None:
        return None
    signal, noise = acc
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise, dtype=torch.float64)).item()
