"""The ONNX stage of a PTQ job: the FP32 and W8A8 models (and W4 weight-only when ONNX
Runtime can run it) exported with our scales, evaluated and timed in ONNX Runtime's real
integer kernels beside PyTorch FP32.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from bvvit.distributed import DistInfo
from bvvit.errors import BVViTError, WriteError
from bvvit.evaluate.classification import collect_logits
from bvvit.io import WRITE_ERRNOS
from bvvit.model_file import LoadedModel
from bvvit.ptq.variants import Variant
from bvvit.quant.onnx_runtime import export_and_measure


def onnx_int8(variants: list[Variant], fp_logits: torch.Tensor, val_loader: Iterable, loaded: LoadedModel,
              out: Path, job: Any, info: DistInfo) -> Optional[dict[str, Any]]:
    """Real integer inference: ONNX FP32 and W8A8 (our scales as Q/DQ) in ONNX Runtime,
    evaluated and timed beside PyTorch FP32; 4-bit weight-only when ORT can run it.

    Returns the measurement (see ``export_and_measure``), None when there is nothing to
    export or the model cannot be exported (said in one line), or ``{"failed": True,
    "error", "detail"}`` when a file could not be written (a full disk: a failure of the run,
    reported at its end)."""
    by_name = {v.name: v for v in variants}
    w8a8 = by_name.get("w8a8")
    if w8a8 is None:
        print("ONNX int8: skipped (no w8a8 variant in this run; add 8 to --bits)")
        return None
    start = time.perf_counter()
    sim_logits = w8a8.logits if w8a8.logits is not None else collect_logits(w8a8.model, val_loader)[0]
    w4 = by_name.get("w4a4") or next((v for v in variants if v.config and v.config.w_bits == 4
                                      and v.config.recipe == job.recipe), None)
    try:
        result = export_and_measure(variants[0].model, w8a8.model, val_loader, out,
                                    loaded.preprocessing, loaded.class_names, fp_logits, sim_logits,
                                    latency_runs=job.latency_runs,
                                    batch_sizes=job.latency_batches,
                                    qmodel_w4=w4.model if w4 else None,
                                    measure_latency=info.is_main)
    except (BVViTError, OSError) as exc:
        failure = _write_failure(exc)
        if failure is None and not isinstance(exc, BVViTError):
            raise
        print(f"ONNX int8: skipped: {failure or exc}" + (f" ({exc})" if failure else ""))
        # a full disk is a failure of the run (reported at its end), not a limitation of the model
        return {"failed": True, "error": failure, "detail": str(exc)} if failure else None
    acc = result["accuracy"]
    print(f"ONNX Runtime: fp32 top-1 {acc['ort_fp32']['top1']:.2f}%, int8 W8A8 top-1 "
          f"{acc['ort_w8a8']['top1']:.2f}% (simulated {acc['pytorch_w8a8_sim']['top1']:.2f}%)"
          + (f", fused attention {acc['ort_w8a8_fused']['top1']:.2f}%" if "ort_w8a8_fused" in acc else "")
          + f", integer ops in the optimized graph: {result['checks'].get('w8a8_integer_ops')} "
          f"({time.perf_counter() - start:.1f}s)")
    if result["w8a8_fused"]["error"]:
        print(f"ONNX fused attention: not exported ({result['w8a8_fused']['error']})")
    return result


def _write_failure(exc: BaseException) -> Optional[str]:
    """"no space left on device" (or the like) when ``exc`` is a failed write, else None."""
    code = exc.errno if isinstance(exc, (WriteError, OSError)) else None
    if code not in WRITE_ERRNOS:
        return None
    return "no space left on device" if code in (errno.ENOSPC, errno.EDQUOT) else \
        f"cannot write ({os.strerror(code).lower()})"


__all__ = ["onnx_int8"]
