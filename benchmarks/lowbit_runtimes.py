"""4-bit weights on real CPU runtimes: where does int4 pay (file size, batch-1 memory traffic)?

    python benchmarks/lowbit_runtimes.py --timm-model vit_base_patch16_224 --batch 8 --runs 15
    python benchmarks/lowbit_runtimes.py --model-path OUT/vit_model.pth      # + top-1, demo size

The only 4-bit CPU kernels a user can deploy are ONNX Runtime's ``MatMulNBits`` and
OpenVINO's int4 weight compression (``nncf.compress_weights``); both decompress the weights
and compute in float (ORT: int8 activations at accuracy level 4), so 4-bit saves bytes
read, not arithmetic. Timed interleaved in one process (same protocol as ptq_speed.py):

- the FP32 file in ORT and in OpenVINO (its default precision);
- OUR 4-bit weight-only file (``export_w4_weight_only_onnx``: our W4 codes as MatMulNBits) in
  ORT, and the same file read by OpenVINO (its ONNX frontend takes MatMulNBits);
- NNCF ``compress_weights`` INT4_SYM (group 128) and INT8_ASYM (weight-only) in OpenVINO;
- OUR W8A8 as OpenVINO IR (int8 compute), for reference.

Weights are calibrated with ``--recipe`` (default minmax: round-to-nearest per channel; at
timm shapes the weights are random, so only speed and size mean anything there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ptq_speed  # noqa: E402  (benchmarks/ptq_speed.py: setups, variants, protocol)
import peers  # noqa: E402

from bvvit.evaluate.classification import collect_logits  # noqa: E402
from bvvit.evaluate.latency import measure_interleaved  # noqa: E402
from bvvit.io import atomic_write_json  # noqa: E402
from bvvit.quant.export import export_float_onnx, export_w4_weight_only_onnx  # noqa: E402
from bvvit.quant.export_openvino import export_openvino_ir  # noqa: E402
from bvvit.quant.quantize import quantize_model  # noqa: E402
from bvvit.quant.recipes import make_quant_config  # noqa: E402
from bvvit.system import system_info  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", help="vit_model.pth (evaluates top-1 too)")
    p.add_argument("--data-path")
    p.add_argument("--timm-model", help="timm's constructor of this name, random weights (speed and size only)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--recipe", default="minmax", help="our recipe for the W4 and W8A8 weights")
    p.add_argument("--calib-size", type=int, default=8)
    p.add_argument("--eval-subset", type=int, default=None)
    p.add_argument("--batch", type=int, default=8, help="the large timed batch (batch 1 is always timed)")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--out-dir")
    args = p.parse_args(argv)
    if not (args.model_path or args.timm_model):
        p.error("give --model-path or --timm-model")
    return args


def nncf_weights(fp_path: Path, out: Path, mode: str, group_size: Optional[int]) -> Path:
    import nncf
    import openvino as ov
    kwargs: dict[str, Any] = {"mode": getattr(nncf.CompressWeightsMode, mode), "ratio": 1.0}
    if group_size:
        kwargs["group_size"] = group_size
    model = nncf.compress_weights(ov.Core().read_model(str(fp_path)), **kwargs)
    ov.save_model(model, str(out), compress_to_fp16=False)
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = (ptq_speed.timm_setup(args.timm_model, args.img_size, args.calib_size) if args.timm_model
             else ptq_speed.model_setup(argparse.Namespace(**{**vars(args), "calib_size": max(args.calib_size, 64)})))
    model, pre, names, val = setup["model"], setup["pre"], setup["class_names"], setup["val"]
    print(f"model: {setup['desc']}; threads {args.threads}", flush=True)
    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.out_dir) if args.out_dir else Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    q4, _ = quantize_model(model, make_quant_config(args.recipe, 4, 8, calib_size=args.calib_size), setup["calib"])
    q8, _ = quantize_model(model, make_quant_config(args.recipe, 8, 8, calib_size=args.calib_size), setup["calib"])
    print(f"  quantized W4 and W8A8 ({args.recipe}) in {time.perf_counter() - start:.1f} s", flush=True)
    fp = export_float_onnx(model, folder / "vit_fp32.onnx", pre, names)
    w4 = export_w4_weight_only_onnx(q4, folder / "vit_w4_weight_only.onnx", pre, names)
    ir8 = export_openvino_ir(q8, folder / "vit_w8a8_openvino.xml", pre, names)
    skipped: dict[str, str] = {}
    variants = [ptq_speed.ort_variant("ORT FP32", fp, args.threads),
                ptq_speed.ov_variant("OpenVINO FP32 (default precision)", fp, args.threads),
                ptq_speed.ort_variant("OURS W4 weight-only (MatMulNBits) ORT", w4, args.threads),
                ptq_speed.ov_variant("OURS W4 weight-only file read by OpenVINO", w4, args.threads),
                ptq_speed.ov_variant("OURS W8A8 OpenVINO IR (int8 compute)", ir8, args.threads)]
    for mode, group in (("INT4_SYM", 128), ("INT8_ASYM", None)):
        label = f"NNCF compress_weights {mode}" + (f" g{group}" if group else "") + " OpenVINO"
        built = peers.try_build(label, lambda: nncf_weights(fp, folder / f"nncf_{mode}.xml", mode, group), skipped)
        if built is not None:
            variants.append(ptq_speed.ov_variant(label, built, args.threads))
    accuracy = {}
    if val is not None:
        for v in variants:
            logits, labels = collect_logits(v.eval_fn, val)
            accuracy[v.name] = 100.0 * float((logits.argmax(1) == labels).double().mean())
    c = model.config
    example = torch.randn(args.batch, c.in_chans, c.img_size, c.img_size)
    inputs = {1: example[:1].contiguous(), args.batch: example}
    results = measure_interleaved({v.name: v.fn for v in variants}, inputs, warmup=args.warmup,
                                  runs=max(10, args.runs), pause_s=0.02,
                                  to_input={v.name: (lambda x: np.ascontiguousarray(x.numpy())) for v in variants})
    by = {(r.name, r.batch_size): r.median_ms for r in results}
    fp_size = variants[0].size_bytes
    rows = [{"variant": v.name, "size_bytes": v.size_bytes, "size_ratio": v.size_bytes / fp_size,
             "top1": accuracy.get(v.name), "b1_median_ms": by[(v.name, 1)],
             f"b{args.batch}_median_ms": by[(v.name, args.batch)]} for v in variants]
    info = system_info()
    report = {"model": setup["desc"], "threads": args.threads, "runs": max(10, args.runs), "batch": args.batch,
              "recipe": args.recipe, "rows": rows, "skipped": skipped,
              "system": {k: info[k] for k in ("cpu_model", "usable_cores", "isa_flags", "libraries")}}
    print(f"| variant | top-1 | file MB | /FP32 | b1 ms | b{args.batch} ms |")
    for r in rows:
        top1 = "n/a" if r["top1"] is None else f"{r['top1']:.2f}"
        print(f"| {r['variant']} | {top1} | {r['size_bytes'] / 1e6:.2f} | {r['size_ratio']:.3f} | "
              f"{r['b1_median_ms']:.2f} | {r[f'b{args.batch}_median_ms']:.2f} |")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    if args.json:
        atomic_write_json(args.json, report)
    tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
