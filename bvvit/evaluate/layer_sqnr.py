"""Per-tensor SQNR of each quantized variant against the float model, at every quantizer's
output (so with the error accumulated upstream), plus the weight SQNR of every weight layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from bvvit.evaluate.activation_stats import weight_layer_names
from bvvit.evaluate.tensor_taps import (as_variants, distinct_twins, find_submodule, float_hooks, float_reference,
                                        float_twins, layer_of, model_device, quantizer_hooks, take_batches,
                                        tensor_info)
from bvvit.io import json_safe
from bvvit.metrics import sqnr_db
from bvvit.quant.modules import QuantConv2d, QuantLinear


@torch.inference_mode()
def per_layer_sqnr(fp_model: nn.Module, qmodels: Mapping[str, nn.Module], loader: Iterable,
                   max_batches: Optional[int] = 4) -> dict[str, Any]:
    """SQNR (dB) of every quantized tensor against the float model's same tensor.

    For each variant, the tensor at each quantizer's OUTPUT (so it carries the error
    accumulated upstream, as the variant really runs) is compared with the float model's
    tensor at that place (its float twin's, :func:`~bvvit.evaluate.tensor_taps.float_twin`,
    for reparameterized variants), summed over the first ``max_batches`` batches:
    ``10 log10(sum ref^2 / sum (ref - q)^2)``. Weight SQNR of every weight layer is added.

    Returns ``{"images", "variants": [names], "tensors": [{"id", "layer", "kind", "group"}]
    (execution order), "sqnr_db": {variant: [dB or None (float there), ...]},
    "weights": {"layers": [...], "sqnr_db": {variant: [...]}}}``.
    """
    variants = as_variants(qmodels)
    reference = float_reference(fp_model)
    twins = float_twins(fp_model, variants, reference)
    device = model_device(reference)
    images = take_batches(loader, max_batches)
    order: list[str] = []
    sums = {name: {} for name in variants}  # variant -> tid -> [signal, noise]

    for batch in images:
        batch = batch.to(device)
        float_tensors: dict[str, torch.Tensor] = {}
        twin_tensors: dict[int, dict[str, torch.Tensor]] = {}

        def keep(tid: str, x: torch.Tensor, store: dict[str, torch.Tensor] = float_tensors) -> None:
            store.setdefault(tid, x.detach())

        with float_hooks(reference, keep):
            reference(batch)
        for twin, layers, _ in distinct_twins(twins):
            store = twin_tensors.setdefault(id(twin), {})
            with float_hooks(twin, lambda tid, x, store=store: keep(tid, x, store), layers):
                twin(batch)
        for tid in float_tensors:
            if tid not in order:
                order.append(tid)
        for name, model in variants.items():
            twin, layers = twins[name]

            def compare(tid: str, out: torch.Tensor, name: str = name, layers: set[str] = layers,
                        twin: nn.Module = twin) -> None:
                if layer_of(tid) in layers:
                    ref = twin_tensors[id(twin)].get(tid)
                else:
                    ref = float_tensors.get(tid)
                if ref is None or ref.shape != out.shape:
                    return
                ref64 = ref.double()
                acc = sums[name].setdefault(tid, [0.0, 0.0])
                acc[0] += float((ref64 ** 2).sum())
                acc[1] += float(((ref64 - out.detach().to(ref.device).double()) ** 2).sum())

            with quantizer_hooks(model, compare):
                model(batch.to(model_device(model)))

    table = {name: [_sqnr_from(sums[name].get(tid)) for tid in order] for name in variants}
    weight_layers = weight_layer_names(fp_model)
    weight_table = {}
    for name, model in variants.items():
        row = []
        for layer in weight_layers:
            module = find_submodule(model, layer)
            if isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_qparams is not None:
                row.append(sqnr_db(twins[name][0].get_submodule(layer).weight.detach().cpu(),
                                   module.weight.detach().cpu()))
            else:
                row.append(None)
        weight_table[name] = row
    return json_safe({"images": sum(int(b.shape[0]) for b in images), "variants": list(variants),
                      "tensors": [tensor_info(tid) for tid in order], "sqnr_db": table,
                      "weights": {"layers": weight_layers, "sqnr_db": weight_table}})


def _sqnr_from(acc: Optional[list[float]]) -> Optional[float]:
    if acc is None:
        return None
    signal, noise = acc
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise, dtype=torch.float64)).item()
