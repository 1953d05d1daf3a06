"""Per-layer sensitivity: quantize ONE layer at a time (its weights, or its activations),
everything else float, and measure how far the output moves from FP32.

How it stays fast (a 6-deep, 192-wide ViT: ~70 units x 2 bit depths on 1000 images in
about two minutes on one CPU core):

- Calibrate once per bit depth, for all layers together: the model is prepared with the
  full config (LayerNorm reparameterization and GPTQ codes included, as quantize_model
  does), its weights are set back to float and every quantizer observes the float
  model's own tensors. Each quantizer's range is therefore exactly what calibrating that
  layer alone (everything else float) would give.
- Then every quantizer is switched off and every weight is float (= the FP32 model on the
  explicit attention path), and one unit at a time is switched on: the layer's quantized
  weights, or its activation quantizers.
- The block inputs of the float model are cached, so a unit inside block i only runs
  blocks i.. and the head.
- Evaluation uses the first ``max_images`` (default 1000) evaluation images.

Block-wise reconstruction (``cfg.reconstruct.enabled``) is not applied here: it adapts a whole
block to its quantized neighbours, which a one-layer-at-a-time measurement has none of. The
ranking is that of the layers' quantization error before reconstruction.

Damage is the mean KL(FP32 || one-layer-quantized) of the output distributions (nats):
continuous, so it ranks layers even when the top-1 drop on a small subset is zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from bvvit.io import json_safe
from bvvit.metrics import agreement, kl_divergence, sqnr_db, top1_accuracy
from bvvit.quant.modules import OFF, QUANTIZE, ActQuantizer, QuantConv2d, QuantLinear
from bvvit.quant.quantize import calibrate, prepare

TARGETS = ("weights", "activations")


class _Unit:
    """One layer: its weight wrapper (quantized and float weights) and its quantizers."""

    def __init__(self, name: str, op: str):
        self.name, self.op = name, op
        self.module: Optional[nn.Module] = None
        self.quantized_weight: Optional[nn.Parameter] = None
        self.float_weight: Optional[nn.Parameter] = None
        self.quantizers: list[ActQuantizer] = []

    def set_weight(self, quantized: bool) -> None:
        self.module.weight = self.quantized_weight if quantized else self.float_weight

    def set_activations(self, quantized: bool) -> None:
        for quantizer in self.quantizers:
            quantizer.state = QUANTIZE if quantized else OFF


def _units(qmodel: nn.Module, fp_model: nn.Module) -> dict[str, _Unit]:
    units: dict[str, _Unit] = {}

    def unit(name: str) -> _Unit:
        if name not in units:
            op = type(qmodel.get_submodule(name)).__name__.replace("Quant", "")
            units[name] = _Unit(name, op)
        return units[name]

    for name, module in qmodel.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_qparams is not None:
            u = unit(name)
            u.module, u.quantized_weight = module, module.weight
            u.float_weight = nn.Parameter(fp_model.get_submodule(name).weight.detach().clone()
                                          .to(module.weight.device), requires_grad=False)
        elif isinstance(module, ActQuantizer):
            unit(name.rsplit(".", 1)[0]).quantizers.append(module)
    return units


def _block_index(layer: str, depth: int) -> Optional[int]:
    """Where the float prefix ends for ``layer``: block i, ``depth`` for the final norm and
    head, None (run everything) for the patch embedding or unknown layers."""
    if layer.startswith("blocks."):
        index = layer.split(".")[1]
        return int(index) if index.isdigit() else None
    if layer in ("head", "head_dist", "fc_norm") or layer.startswith("norm"):
        return depth
    return None


class _Runner:
    """Runs the model on the evaluation subset, from cached float block inputs when it can."""

    def __init__(self, images: list[torch.Tensor], cache_limit_bytes: int):
        self.images = images
        self.cache: Optional[list[list[torch.Tensor]]] = None  # [chunk][block index]
        self.cache_limit_bytes = cache_limit_bytes

    def fill_cache(self, model: nn.Module) -> torch.Tensor:
        """Float logits of the base model; records the inputs of every block and the norm."""
        blocks = getattr(model, "blocks", None)
        can_cache = blocks is not None and hasattr(model, "norm") and hasattr(model, "forward_head")
        cache, logits = [], []
        size = 0
        for images in self.images:
            inputs: list[torch.Tensor] = []
            handles = []
            if can_cache:
                for module in list(blocks) + [model.norm]:
                    handles.append(module.register_forward_pre_hook(
                        lambda _m, args: inputs.append(args[0].detach())))
            try:
                logits.append(model(images).float().cpu())
            finally:
                for handle in handles:
                    handle.remove()
            size += sum(t.numel() * t.element_size() for t in inputs)
            cache.append(inputs)
        self.cache = cache if can_cache and size <= self.cache_limit_bytes else None
        return torch.cat(logits)

    def logits(self, model: nn.Module, start: Optional[int]) -> torch.Tensor:
        if self.cache is None or start is None:
            return torch.cat([model(images).float().cpu() for images in self.images])
        out = []
        for chunk in self.cache:
            x = chunk[start]
            for block in list(model.blocks)[start:]:
                x = block(x)
            out.append(model.forward_head(model.norm(x)).float().cpu())
        return torch.cat(out)


def _take_images(loader: Iterable, max_images: int, device: torch.device
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    images, labels, seen = [], [], 0
    for batch in loader:
        x, y = batch[0], torch.as_tensor(batch[1]).reshape(-1)
        take = min(x.shape[0], max_images - seen)
        images.append(x[:take].to(device))
        labels.append(y[:take].long().cpu())
        seen += take
        if seen >= max_images:
            break
    if not images:
        raise ValueError("the evaluation loader yielded no images")
    return images, torch.cat(labels)


@torch.inference_mode()
def sensitivity(fp_model: nn.Module, make_config: Callable[[int, list], Any], calib_loader: Iterable,
                eval_loader: Iterable, bits: tuple[int, ...] = (4, 6),
                reference_logits: Optional[torch.Tensor] = None, *, max_images: int = 1000,
                targets: tuple[str, ...] = TARGETS, progress: bool = False,
                cache_limit_bytes: int = 2 << 30) -> list[dict[str, Any]]:
    """Rows ``{"layer", "op", "target" (weights|activations), "bits", "kl_div", "top1",
    "top1_drop", "agreement", "sqnr_db", "images"}``, most damaging first.

    ``make_config(bits, overrides)`` returns the QuantConfig at ``bits`` (the recipe and
    switches the run uses; it is called with ``overrides=[]``). ``reference_logits``: the
    FP32 logits on ``eval_loader`` in loader order (its first rows are used; computed when
    absent). Layers are module names, so they paste into ``--override``.
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"targets must be among {TARGETS}, got {unknown}")
    device = next(fp_model.parameters()).device
    images, labels = _take_images(eval_loader, max_images, device)
    n = int(labels.numel())
    runner = _Runner(images, cache_limit_bytes)
    reference: Optional[torch.Tensor] = None
    rows: list[dict[str, Any]] = []
    for b in bits:
        cfg = make_config(int(b), [])
        work, qmodel, _, _ = prepare(fp_model, cfg, calib_loader, device)
        qmodel.to(device).eval()
        units = _units(qmodel, work)
        for u in units.values():  # calibrate on the float model's own tensors
            if u.module is not None:
                u.set_weight(False)
        if any(u.quantizers for u in units.values()):
            calibrate(qmodel, calib_loader, device)
        for u in units.values():
            u.set_activations(False)
        if reference is None:  # first bit depth: the base model is the float model
            base = runner.fill_cache(qmodel)
            use_given = reference_logits is not None and len(reference_logits) >= n
            reference = torch.as_tensor(reference_logits)[:n].float().cpu() if use_given else base
        ref_top1 = top1_accuracy(reference, labels)
        depth = len(getattr(qmodel, "blocks", []))
        jobs = [(u, t) for u in units.values() for t in targets
                if (t == "weights" and u.module is not None) or (t == "activations" and u.quantizers)]
        for u, target in tqdm(jobs, desc=f"sensitivity {b}-bit", disable=not progress, leave=False):
            switch = u.set_weight if target == "weights" else u.set_activations
            switch(True)
            try:
                logits = runner.logits(qmodel, _block_index(u.name, depth))
            finally:
                switch(False)
            top1 = top1_accuracy(logits, labels)
            rows.append({"layer": u.name, "op": u.op, "target": target, "bits": int(b),
                         "kl_div": kl_divergence(reference, logits), "top1": top1,
                         "top1_drop": ref_top1 - top1, "agreement": agreement(reference, logits),
                         "sqnr_db": sqnr_db(reference, logits), "images": n})
    rows.sort(key=lambda r: (-r["kl_div"], -r["top1_drop"], r["layer"], r["target"], r["bits"]))
    return json_safe(rows)


def layer_damage(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The worst KL of each layer over targets and bit depths, most damaging first."""
    damage: dict[str, float] = {}
    for row in rows:
        kl = float(row["kl_div"])  # json_safe may have made it the string "inf"
        damage[row["layer"]] = max(damage.get(row["layer"], 0.0), kl)
    return dict(sorted(damage.items(), key=lambda kv: -kv[1]))


def suggest_overrides(rows: list[dict[str, Any]], budget: int = 2, bits: int = 8) -> list[str]:
    """The ``budget`` most damaging layers as ``PATTERN=BITS`` overrides (e.g.
    ``['blocks.5.mlp.fc2=8', 'head=8']``); layers that did no damage are never suggested."""
    ranked = [layer for layer, kl in layer_damage(rows).items() if kl > 0.0]
    return [f"{layer}={bits}" for layer in ranked[:budget]]


def overrides_cli(overrides: list[str]) -> str:
    """``--override A=8 --override B=8`` for post_training.py."""
    return " ".join(f"--override {item}" for item in overrides)


__all__ = ["sensitivity", "suggest_overrides", "overrides_cli", "layer_damage", "TARGETS"]
