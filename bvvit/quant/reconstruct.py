"""Block-wise reconstruction of a calibrated quantized ViT (BRECQ / QDrop with AdaRound).

Rounding every weight to its nearest grid point (or GPTQ's choice) and fixing every
activation step size from calibration statistics minimises each tensor's own error, not
the error of what the network computes. Reconstruction optimises both, one *unit* at a
time, against the float model:

* units, in data order: the patch embedding (with class token and positional embedding),
  every transformer block, and the head (final LayerNorm + classifier). BRECQ (Li et al.,
  ICLR 2021) showed that the block is the right granularity: large enough to capture the
  interactions between its layers, small enough not to over-fit a few hundred images;
* target: the float unit's output on the float model's input to that unit, cached once
  for the calibration images; loss: MSE relative to the target's mean square. The input
  of the quantized unit is the quantized model's (earlier units already reconstructed,
  so a unit learns to absorb the error it is handed). With ``drop_prob > 0`` (QDrop, Wei
  et al., ICLR 2022) that input is mixed element-wise with the float input and every
  activation quantizer inside the unit is bypassed element-wise, both with probability
  ``drop_prob``. The default 0 is BRECQ: on the demo model with a few hundred steps per
  unit, QDrop's 0.5 cost 0.3-0.5 top-1 points at W4A4 and W3A3;
* weights (AdaRound, Nagel et al., ICML 2020): the code of each weight is
  ``floor(v) + h(V)``, ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` with
  ``zeta = 1.1``, ``gamma = -0.1``, ``V`` initialised so that ``h(V) = v - floor(v)``. ``v`` is
  ``w / scale`` shifted by the integer correction the starting codes (GPTQ's, or
  round-to-nearest) made, so the hard-rounded start reproduces those codes. A regulariser
  ``sum(1 - |2h - 1|^beta)`` pushes every ``h`` to 0 or 1, switched on after a warm-up and
  with ``beta`` annealed from 20 to 2; at the end ``h`` is hard-rounded. Zero points stay
  fixed; so do the weight scales unless ``learn_weight_scale``: then each one is multiplied
  by a learned factor (Adam on its log, rate ``weight_scale_lr``) and stored rounded to
  bfloat16 (what files hold);
* activations (LSQ, Esser et al., ICLR 2020): the step size of every uniform activation
  quantizer in the unit (linear inputs, q, k, v, softmax output, ...) is learned through a
  straight-through round, starting from the calibrated value; zero points stay fixed.
  Learning ``log(scale)`` makes Adam's steps relative, so one rate suits every tensor.

The result is an ordinary quantized model: ``weight_codes`` and activation qparams are
replaced in place (weight scales are kept), so packing, export and evaluation are
unchanged. A unit whose error on the calibration data came out higher than it went in is
restored. Cost: ``units x iters`` forward+backward passes of one unit on ``batch_size``
images (demo model, 8 units x 300 steps: about 1.5 minutes on one CPU thread), plus three
passes of each unit over all calibration images (float targets, error before, error after =
the next unit's input), which dominate at 224 px. ``time_budget`` plans both
(:func:`plan_unit`): ViT-S/16, 256 images, 300 s budget: 276 s. Memory: the cached sets
(inputs, targets, outputs) go to a temporary file beyond ``cache_mb``
(:class:`~bvvit.quant.cached_rows.CachedRows`), and a step larger than
:data:`STEP_ELEMENTS` input values runs in micro-batches (:func:`_step_gradients`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from bvvit.quant.cached_rows import CachedRows
from bvvit.quant.config import ReconstructOptions
from bvvit.quant.modules import QUANTIZE, ActQuantizer, QuantConv2d, QuantLinear
from bvvit.quant.primitives import PerGroup, QParams, from_groups, to_groups
from bvvit.system import release_freed_memory

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1


# ------------------------------------------------------------------ units of the model


class _Embed(nn.Module):
    """Patch embedding + prefix tokens + positional embedding: images -> block 0 input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.patch_embed = model.patch_embed
        self.embed_tokens = model.embed_tokens  # a bound method: registers no module

    def forward(self, x: Tensor) -> Tensor:
        return self.embed_tokens(self.patch_embed(x))


class _Head(nn.Module):
    """Final LayerNorm, pooling and classifier(s): last block output -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.norm, self.fc_norm, self.head = model.norm, model.fc_norm, model.head
        self.head_dist = model.head_dist
        self.forward_head = model.forward_head  # a bound method using the modules above

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.norm(x))


def model_units(model: nn.Module, which: str = "all") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each reconstruction unit of a ViT, in data order."""
    blocks = [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    if which == "blocks":
        return blocks
    return [("embed", _Embed(model))] + blocks + [("head", _Head(model))]


# ------------------------------------------------------------------ learnable quantizers


def _bernoulli(x: Tensor, p: float, generator: Optional[torch.Generator]) -> Tensor:
    """Boolean mask of ``x``'s shape, True with probability ``p`` (drawn on the generator's
    device, so one CPU generator makes runs reproducible on any device)."""
    device = generator.device if generator is not None else x.device
    return (torch.rand(x.shape, generator=generator, device=device) < p).to(x.device)


class _AdaRoundWeight:
    """Soft-rounded codes of one quantized weight: ``clamp(floor(v) + h(V) + zp, qmin, qmax)``."""

    def __init__(self, module: nn.Module, float_weight: Tensor, init: str, learn_scale: bool = False):
        qp: QParams = module.weight_qparams
        self.module, self.qp = module, qp
        self.grouped = isinstance(qp.granularity, PerGroup)
        matrix = float_weight.detach().float().reshape(float_weight.shape[0], -1)
        codes = module.weight_codes.reshape(matrix.shape).to(torch.int32)
        if self.grouped:
            matrix, codes = to_groups(matrix, qp.granularity), to_groups(codes, qp.granularity)
        self.scale = qp.scale.float()
        self.zp = qp.zero_point.float()
        v = matrix * (1.0 / self.scale)  # as the primitives: multiply by the reciprocal
        if init == "codes":  # shift by the integer correction GPTQ (or clamping) applied
            v = v + (codes.float() - self.zp - torch.round(v))
        self.base = torch.floor(v)
        rest = (v - self.base).clamp(1e-4, 1 - 1e-4)  # h(V) = rest (sigmoid^-1 of a point inside)
        self.V = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).requires_grad_(True)
        self.shape = module.weight.shape
        self.log_scale = torch.zeros_like(self.scale).requires_grad_(learn_scale)  # learned factor

    def h(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def _weight(self, codes: Tensor) -> Tensor:
        w = (codes - self.zp) * (self.scale * torch.exp(self.log_scale))
        return (from_groups(w, self.qp.granularity) if self.grouped else w).reshape(self.shape)

    def soft_weight(self) -> Tensor:
        return self._weight(torch.clamp(self.base + self.zp + self.h(), self.qp.qmin, self.qp.qmax))

    def regulariser(self, beta: float) -> Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def final_qparams(self) -> QParams:
        """The qparams with the learned step sizes (rounded to bfloat16, as files store them)."""
        if not self.log_scale.requires_grad:
            return self.qp
        scale = (self.qp.scale * torch.exp(self.log_scale.detach())).to(torch.bfloat16).to(self.qp.scale.dtype)
        return dataclasses.replace(self.qp, scale=scale)

    def hard_codes(self) -> Tensor:
        """Integer codes (int32, the module's code shape): ``h >= 0.5`` rounds up."""
        with torch.no_grad():
            codes = torch.clamp(self.base + self.zp + (self.V >= 0).float(), self.qp.qmin, self.qp.qmax)
            if self.grouped:
                codes = from_groups(codes, self.qp.granularity)
            return codes.to(torch.int32).reshape(self.module.weight_codes.shape)


class _LearnedActQParams:
    """Stands in for an :class:`ActQuantizer`'s qparams while its unit is reconstructed:
    LSQ fake quantization with a learnable ``log(scale)`` and QDrop's random bypass."""

    def __init__(self, qp: Any, learn: bool):
        self.qp = qp
        self.uniform = isinstance(qp, QParams) and learn
        self.log_scale = torch.log(qp.scale.float()).clone().requires_grad_(self.uniform)
        self.drop_prob = 0.0
        self.generator: Optional[torch.Generator] = None

    def _quantize(self, x: Tensor) -> Tensor:
        if not self.uniform:  # log2 quantizers keep their qparams (straight-through)
            return self.qp.fake_quantize(x)
        qp = self.qp
        grouped = isinstance(qp.granularity, PerGroup)
        xg = to_groups(x, qp.granularity) if grouped else x
        scale = torch.exp(self.log_scale)
        zp = qp.zero_point.float()
        t = xg * (1.0 / scale)
        q = t + (torch.round(t) - t).detach()  # straight-through round
        out = (torch.clamp(q + zp, qp.qmin, qp.qmax) - zp) * scale
        return from_groups(out, qp.granularity) if grouped else out

    def fake_quantize(self, x: Tensor) -> Tensor:
        out = self._quantize(x)
        if self.drop_prob > 0:
            out = torch.where(_bernoulli(x, self.drop_prob, self.generator), x, out)
        return out

    def final(self) -> Any:
        if not self.uniform:
            return self.qp
        scale = torch.exp(self.log_scale.detach()).to(torch.float32)
        return QParams(scale, self.qp.zero_point, self.qp.bits, self.qp.symmetric, self.qp.granularity)


# ------------------------------------------------------------------ the algorithm


PASS_ELEMENTS = 2 ** 23  # a pass runs a unit on chunks of at most this many input values (ViT-B/16: 55 images)
STEP_ELEMENTS = 2 ** 21  # an Adam step's forward+backward, on micro-batches of at most this many
MAX_PASS_IMAGES = 256


def _chunk_rows(row_numel: int, elements: int, most: int) -> int:
    """Rows per chunk: as many as hold at most ``elements`` values, between 1 and ``most``."""
    return max(1, min(most, elements // max(1, row_numel)))


@torch.no_grad()
def _run(unit: nn.Module, inputs: Tensor, chunk: int = MAX_PASS_IMAGES) -> Tensor:
    return torch.cat([unit(inputs[i:i + chunk]) for i in range(0, len(inputs), chunk)])


@torch.no_grad()
def _pass(unit: nn.Module, inputs: CachedRows, cache_bytes: float) -> CachedRows:
    """``unit`` over every cached row (no gradients), its outputs cached in turn."""
    chunk = _chunk_rows(math.prod(inputs.row_shape), PASS_ELEMENTS, MAX_PASS_IMAGES)
    return inputs.map(unit, chunk, cache_bytes)


def _relative_mse(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12)


@torch.no_grad()
def _rows_relative_mse(out: CachedRows, target: CachedRows, unit: Optional[nn.Module] = None) -> float:
    """:func:`_relative_mse` of two cached sets, or of ``unit`` run on ``out`` against
    ``target``; summed chunk by chunk (in float64) when a set is on file."""
    if out.in_memory and target.in_memory:
        return float(_relative_mse(out.tensor if unit is None else _run(unit, out.tensor), target.tensor))
    chunk = _chunk_rows(math.prod(out.row_shape), PASS_ELEMENTS, MAX_PASS_IMAGES)
    error = energy = 0.0
    for o, t in zip(out.chunks(chunk), target.chunks(chunk)):
        o = o if unit is None else unit(o)
        error += float((o - t).double().pow(2).sum())
        energy += float(t.double().pow(2).sum())
    return error / max(energy, 1e-12 * t[0].numel() * len(target))


@torch.no_grad()
def unit_error(unit: nn.Module, inputs: Tensor, targets: Tensor) -> float:
    """Relative MSE ``|unit(x) - y|^2 / |y|^2`` of a (quantized) unit over cached data."""
    return float(_relative_mse(_run(unit, inputs), targets))


@torch.inference_mode(False)
@torch.enable_grad()  # callers may hold no_grad (evaluation code often does)
def reconstruct_unit(qunit: nn.Module, funit: nn.Module, q_inputs: Tensor, f_inputs: Tensor,
                     targets: Tensor, options: ReconstructOptions,
                     generator: torch.Generator, iters: Optional[int] = None) -> dict[str, Any]:
    """Optimise the rounding of every quantized weight of ``qunit`` and the step sizes of its
    activation quantizers so that ``qunit(x)`` matches ``targets``; update ``qunit`` in place.

    ``funit`` has the same structure with float weights (the AdaRound starting point);
    ``q_inputs`` / ``f_inputs`` are the quantized / float model's inputs to the unit;
    ``iters`` (default ``options.iters``) is the number of Adam steps.
    """
    rows = [CachedRows.from_tensor(t) for t in (q_inputs, f_inputs, targets)]
    return _reconstruct_unit(qunit, funit, *rows, options, generator, iters)[0]


@torch.inference_mode(False)
@torch.enable_grad()
def _reconstruct_unit(qunit: nn.Module, funit: nn.Module, q_inputs: CachedRows, f_inputs: Optional[CachedRows],
                      targets: CachedRows, options: ReconstructOptions, generator: torch.Generator,
                      iters: Optional[int] = None) -> tuple[dict[str, Any], CachedRows]:
    """:func:`reconstruct_unit` on cached rows, also returning the final unit's outputs on
    ``q_inputs`` (the next unit's quantized inputs: the pass that measures the error after
    gives them) and, in the statistics, the seconds of the Adam steps and of the passes over
    all images. ``f_inputs`` may be None when ``options.drop_prob`` is 0 (only QDrop reads
    them)."""
    iters = options.iters if iters is None else iters
    cache_bytes = options.cache_mb * 2 ** 20
    weights = {name: _AdaRoundWeight(m, funit.get_submodule(name).weight, options.init, options.learn_weight_scale)
               for name, m in qunit.named_modules()
               if isinstance(m, (QuantLinear, QuantConv2d)) and m.weight_qparams is not None}
    acts = {name: m for name, m in qunit.named_modules()
            if isinstance(m, ActQuantizer) and m.state == QUANTIZE}
    if not weights and not acts:
        return {"skipped": True, "images": len(q_inputs)}, _pass(qunit, q_inputs, cache_bytes)
    passes_start = time.perf_counter()
    before = _rows_relative_mse(q_inputs, targets, qunit)
    passes_s = time.perf_counter() - passes_start
    originals = {name: q.qparams for name, q in acts.items()}
    learned = {name: _LearnedActQParams(q.qparams, options.learn_act) for name, q in acts.items()}
    weight_leaves = [w.V for w in weights.values()]
    params = [{"params": list(weight_leaves), "lr": options.weight_lr}]
    if options.learn_weight_scale and weights:
        scales = [w.log_scale for w in weights.values()]
        weight_leaves += scales
        params.append({"params": scales, "lr": options.weight_scale_lr})
    act_params = [a.log_scale for a in learned.values() if a.uniform]
    if act_params:
        params.append({"params": act_params, "lr": options.act_lr})
    optimizer = torch.optim.Adam([g for g in params if g["params"]])
    n_weights = max(1, sum(w.V.numel() for w in weights.values()))
    warmup = int(options.warmup * iters)
    n = len(q_inputs)
    micro = _chunk_rows(math.prod(q_inputs.row_shape), STEP_ELEMENTS, options.batch_size)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    steps_start = time.perf_counter()
    try:
        for name, quantizer in acts.items():
            learned[name].drop_prob, learned[name].generator = options.drop_prob, generator
            quantizer.qparams = learned[name]  # duck-typed: ActQuantizer calls fake_quantize
        for it in range(iters):
            if cursor + options.batch_size > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            idx = order[cursor:cursor + options.batch_size]
            cursor += options.batch_size
            x = q_inputs.rows(idx)
            if options.drop_prob > 0:
                x = torch.where(_bernoulli(x, options.drop_prob, generator), f_inputs.rows(idx), x)
            beta = None
            if weights and it >= warmup:
                progress = (it - warmup) / max(1, iters - warmup)
                beta = options.beta[1] + (options.beta[0] - options.beta[1]) * (1.0 - progress)
            optimizer.zero_grad(set_to_none=True)
            grads = _step_gradients(qunit, weights, weight_leaves, act_params, x, targets.rows(idx), micro,
                                    beta, options.reg_weight, n_weights)
            for p, grad in zip(weight_leaves + act_params, grads):
                p.grad = grad
            optimizer.step()
    finally:
        for name, quantizer in acts.items():
            quantizer.qparams = originals[name]
    steps_s = time.perf_counter() - steps_start
    undecided = sum(int(((w.h() > 0.01) & (w.h() < 0.99)).sum()) for w in weights.values())
    start_codes = {name: w.module.weight_codes for name, w in weights.items()}
    changed = 0
    for w in weights.values():
        codes = w.hard_codes()
        changed += int((codes != w.module.weight_codes.to(torch.int32)).sum())
        _set_codes(w.module, codes, w.final_qparams())
    for name, quantizer in acts.items():
        quantizer.set_qparams(learned[name].final())
    passes_start = time.perf_counter()
    outputs = _pass(qunit, q_inputs, cache_bytes)
    after = _rows_relative_mse(outputs, targets)
    passes_s += time.perf_counter() - passes_start
    reverted = after > before  # never hand back a unit worse than it came on its own data
    if reverted:
        for name, w in weights.items():
            _set_codes(w.module, start_codes[name], w.qp)
        for name, quantizer in acts.items():
            quantizer.set_qparams(originals[name])
        changed, after, outputs = 0, before, _pass(qunit, q_inputs, cache_bytes)
    return ({"error_before": before, "error_after": after, "codes_changed": changed,
             "soft_at_end": undecided, "weights": n_weights, "reverted": reverted, "iters": iters,
             "images": n, "micro_batch": micro, "steps_s": steps_s, "passes_s": passes_s}, outputs)


def _step_gradients(qunit: nn.Module, weights: dict[str, _AdaRoundWeight], weight_leaves: list[Tensor],
                    act_params: list[Tensor], x: Tensor, target: Tensor, micro: int, beta: Optional[float],
                    reg_weight: float, n_weights: int) -> list[Tensor]:
    """Gradients, for ``weight_leaves`` (the AdaRound variables, then the weight scales' log
    factors when they are learned) then the activation log-scales, of one step's
    loss: the relative MSE of ``qunit`` on the batch ``x`` plus, when ``beta`` is given, the
    rounding regulariser (mean over the ``n_weights`` variables) times ``reg_weight``.

    A batch larger than ``micro`` images runs in micro-batches whose gradients add up (the
    loss is a sum over images: each part's squared error over the whole batch's target
    energy), so a step holds one micro-batch's activations for the backward (ViT-B/16,
    32 images of 197 tokens: ~2.3 GB at once). The soft weights are computed once, their
    gradient gathered over the micro-batches, then carried back to the AdaRound variables.
    """
    leaves = weight_leaves + act_params
    soft = {f"{name}.weight": w.soft_weight() for name, w in weights.items()}
    if len(x) <= micro:  # one batch, as BRECQ runs it
        loss = _relative_mse(functional_call(qunit, soft, (x,)), target)
        if beta is not None:
            loss = loss + reg_weight * (sum(w.regulariser(beta) for w in weights.values()) / n_weights)
        return list(torch.autograd.grad(loss, leaves))
    soft_leaves = {key: value.detach().requires_grad_(True) for key, value in soft.items()}
    inputs = list(soft_leaves.values()) + act_params
    sums = [torch.zeros_like(t) for t in inputs]
    scale = 1.0 / (target.numel() * target.pow(2).mean().clamp(min=1e-12))
    for part in torch.tensor_split(torch.arange(len(x)), -(-len(x) // micro)):
        error = (functional_call(qunit, soft_leaves, (x[part],)) - target[part]).pow(2).sum() * scale
        for total, grad in zip(sums, torch.autograd.grad(error, inputs, allow_unused=True)):
            if grad is not None:
                total += grad
    if not weights:
        return sums
    carried = sum((soft[key] * grad).sum() for key, grad in zip(soft, sums))
    if beta is not None:
        carried = carried + reg_weight * (sum(w.regulariser(beta) for w in weights.values()) / n_weights)
    return list(torch.autograd.grad(carried, weight_leaves)) + sums[len(soft):]


def _set_codes(module: nn.Module, codes: Tensor, qparams: QParams) -> None:
    module.weight_codes = codes.to(module.weight_codes.dtype)
    module.weight_qparams = qparams
    module.refresh_weight()


@torch.no_grad()
def _images(loader: Iterable, device: torch.device | str, cache_bytes: float) -> CachedRows:
    try:
        return CachedRows.from_chunks((images.to(device) for images, _ in loader), cache_bytes)
    except ValueError:
        raise ValueError("reconstruction needs calibration images; the loader yielded none") from None


@torch.inference_mode(False)
def reconstruct_model(float_model: nn.Module, qmodel: nn.Module, loader: Iterable,
                      options: ReconstructOptions = ReconstructOptions(enabled=True),
                      device: torch.device | str = "cpu", seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Reconstruct every unit of the calibrated ``qmodel`` in data order against
    ``float_model`` (the float network ``qmodel`` was converted from, e.g. after LayerNorm
    reparameterization) on the images of ``loader``, with the hyperparameters of ``options``
    (its ``enabled`` is the caller's business) and QDrop's random draws from ``seed``
    (a progress bar per unit when ``progress``). Modifies ``qmodel`` in place and returns
    per-unit statistics and the time taken.

    With ``options.time_budget`` the whole call, passes over the images included, is planned
    to end within the budget (:func:`plan_unit`); ``budget_note`` in the result says when
    even the fewest steps on the fewest images could not fit."""
    start = time.perf_counter()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    cache_bytes = options.cache_mb * 2 ** 20
    float_model.eval()
    qmodel.eval().to(device)
    f_units = dict(model_units(float_model, options.units))
    q_units = model_units(qmodel, options.units)
    f_in = q_in = _images(loader, device, cache_bytes)
    if options.units == "blocks":  # the first block's input: the embedding of either model
        f_in, q_in = _pass(_Embed(float_model), f_in, cache_bytes), _pass(_Embed(qmodel), q_in, cache_bytes)
    images_given = len(f_in)
    stats: dict[str, Any] = {}
    costs = _probe_costs(f_units, q_units, q_in, options) if options.time_budget is not None else None
    over_budget = False
    for index, (name, q_unit) in enumerate(tqdm(q_units, desc="reconstruct", disable=not progress, leave=False)):
        iters, images, fits = plan_unit(options, time.perf_counter() - start, len(q_units) - index,
                                        len(f_in), costs)
        over_budget |= not fits
        if images < len(f_in):  # the budget leaves no time for passes over every image
            keep = torch.randperm(len(f_in), generator=torch.Generator().manual_seed(seed + index))[:images]
            keep = keep.sort().values
            f_in, q_in = f_in.select(keep), q_in.select(keep)
        pass_start = time.perf_counter()
        f_out = _pass(f_units[name], f_in, cache_bytes)
        float_pass_s = time.perf_counter() - pass_start
        if options.drop_prob == 0:  # only QDrop reads the float inputs again: free them now
            f_in = None  # (ViT-B/16, 1,024 images: 0.6 GB)
        stats[name], q_in = _reconstruct_unit(q_unit, f_units[name], q_in, f_in, f_out, options, generator, iters)
        if costs is not None and not stats[name].get("skipped"):
            costs.update(stats[name], float_pass_s, len(f_out))
        f_in = f_out
        release_freed_memory()  # the unit's autograd buffers (else the RSS keeps them)
    result = {"units": stats, "time_s": time.perf_counter() - start, "images": images_given,
              "iters": options.iters, "drop_prob": options.drop_prob, "time_budget_s": options.time_budget,
              "iters_run": {name: unit.get("iters", 0) for name, unit in stats.items()},
              "images_run": {name: unit["images"] for name, unit in stats.items()}}
    if over_budget:
        result["budget_note"] = (
            f"--time-budget {options.time_budget:g} s is below what reconstruction needs at its floor "
            f"({MIN_BUDGET_ITERS} steps per unit on {MIN_BUDGET_IMAGES} images); it took "
            f"{result['time_s']:.0f} s. Raise the budget or use --no-reconstruct")
    return result


MIN_BUDGET_ITERS = 10  # a unit never gets fewer Adam steps, whatever the budget
MIN_BUDGET_IMAGES = 64  # nor fewer calibration images (all of them when there are fewer)


class UnitCosts:
    """Seconds per Adam step and per image of a unit's passes over the calibration images
    (float targets, quantized error before, error after = next unit's input): the slowest
    seen so far, first from a probe of the first transformer block."""

    def __init__(self, step_s: float, pass_s_per_image: float):
        self.step_s, self.pass_s_per_image = step_s, pass_s_per_image

    def update(self, unit_stats: dict[str, Any], float_pass_s: float, images: int) -> None:
        if unit_stats.get("iters"):
            self.step_s = max(self.step_s, unit_stats["steps_s"] / unit_stats["iters"])
        self.pass_s_per_image = max(self.pass_s_per_image,
                                    (unit_stats["passes_s"] + float_pass_s) / max(1, images))


def plan_unit(options: ReconstructOptions, spent_s: float, units_left: int, images: int,
              costs: Optional[UnitCosts]) -> tuple[int, int, bool]:
    """(Adam steps, calibration images, whether that fits) for the next unit.

    Without a budget: ``options.iters`` on every image. With one, the ``units_left`` units
    share what is left of it evenly; a unit costs its steps plus its passes over the images.
    The steps come first: a unit uses no more images than its steps draw (``steps x
    batch_size``; the rest would only add pass time), and as many steps as then fit, up to
    ``options.iters``. When not even :data:`MIN_BUDGET_ITERS` steps fit with that many images,
    it keeps that many steps on fewer images, down to :data:`MIN_BUDGET_IMAGES`; when that
    does not fit either, the result says so.
    """
    if options.time_budget is None or costs is None:
        return options.iters, images, True
    share = max(0.0, options.time_budget - spent_s) / max(1, units_left)

    def cost(steps: int, n: int) -> float:
        return steps * costs.step_s + n * costs.pass_s_per_image

    def used(steps: int) -> int:
        return min(images, max(MIN_BUDGET_IMAGES, steps * options.batch_size))

    if cost(MIN_BUDGET_ITERS, used(MIN_BUDGET_ITERS)) > share:
        fit = int((share - MIN_BUDGET_ITERS * costs.step_s) / max(costs.pass_s_per_image, 1e-12))
        floor = min(images, MIN_BUDGET_IMAGES)
        n = min(used(MIN_BUDGET_ITERS), max(floor, fit))
        return MIN_BUDGET_ITERS, n, cost(MIN_BUDGET_ITERS, n) <= share
    low, high = MIN_BUDGET_ITERS, max(MIN_BUDGET_ITERS, options.iters)
    while low < high:  # the most steps that fit (the cost grows with the steps)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid, used(mid)) <= share else (low, mid - 1)
    return low, used(low), True


@torch.inference_mode(False)
@torch.enable_grad()
def _probe_costs(f_units: dict[str, nn.Module], q_units: list[tuple[str, nn.Module]], inputs: CachedRows,
                 options: ReconstructOptions) -> UnitCosts:
    """First estimate of :class:`UnitCosts` from the first transformer block on one batch:
    a forward+backward (a step; the embedding unit is cheaper) and the forwards of its passes."""
    name, block = next(((n, u) for n, u in q_units if n.startswith("blocks.")), q_units[0])
    x = inputs.rows(torch.arange(min(options.batch_size, len(inputs))))
    if q_units[0][0] == "embed":
        with torch.no_grad():
            x = q_units[0][1](x)
    micro = _chunk_rows(math.prod(x.shape[1:]), STEP_ELEMENTS, options.batch_size)
    params = [p for p in block.parameters() if p.requires_grad]
    start = time.perf_counter()
    for part in torch.tensor_split(x, -(-len(x) // micro)):  # as a step: micro-batches
        part = part.detach().requires_grad_(True)
        torch.autograd.grad(block(part).pow(2).mean(), [part] + params)  # leaves no .grad behind
    step_s = time.perf_counter() - start
    start = time.perf_counter()
    _run(f_units[name], x.detach())
    _run(block, x.detach())
    _run(block, x.detach())
    return UnitCosts(step_s, (time.perf_counter() - start) / len(x))


__all__ = ["reconstruct_model", "reconstruct_unit", "model_units", "unit_error", "plan_unit", "UnitCosts",
           "MIN_BUDGET_ITERS", "MIN_BUDGET_IMAGES"]
