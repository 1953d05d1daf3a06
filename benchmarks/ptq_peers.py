#!/usr/bin/env python3
"""Our PTQ against the peers' on ACCURACY, same model, same calibration images, same test set.

    python benchmarks/ptq_peers.py --model-path output/demo/vit_model.pth [--pairs 8/8,4/8]
        [--calib-size 1024] [--eval-subset N] [--json PATH] [--out-dir DIR]

Rows per W/A pair (only pairs with 8-bit activations have peers):
- OURS ``--recipe vit`` (simulated fake-quant, PyTorch), naive ``minmax`` beside it, and at
  W8A8 our exported int8 ONNX graph run in ONNX Runtime (real integer kernels);
- ORT ``quantize_static`` (QDQ, per-channel int8 weights at W8 / int4 at W4, uint8
  activations) with its MinMax, Percentile and Entropy calibration, run in ONNX Runtime;
- PT2E ``X86InductorQuantizer`` (W8A8 only: it has no 4-bit weights), reference
  quantized ops in eager mode;
- torchao ``Int8DynamicActivationInt8WeightConfig`` / ``Int8DynamicActivationInt4WeightConfig``
  (dynamic activations: a per-batch range, not static PTQ; shown for reference);
- when openvino / nncf import (W8A8): NNCF ``nncf.quantize`` (``ModelType.TRANSFORMER`` and the
  default) run in OpenVINO, OUR W8A8 exported for OpenVINO (IR, attention float) beside its
  simulated twin, and the FP32 file in OpenVINO at its default precision and at f32 (W32A32).
A peer that cannot run here is listed with its reason. Top-1 differences of one image are
100 / N points (printed as the noise floor); each row gives the images it loses and gains
against FP32, and ours is compared with the best peer image by image (McNemar exact test).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bvvit.data import build_dataset, build_loader, build_transform, calibration_loader, resolve_data  # noqa: E402
from bvvit.evaluate.classification import (accuracy_noise_floor, classification_metrics,  # noqa: E402
                                           collect_logits, evaluate_classifier)
from bvvit.evaluate.significance import paired_comparison  # noqa: E402
from bvvit.io import atomic_write_json  # noqa: E402
from bvvit.model_file import load_model_file  # noqa: E402
from bvvit.quant import make_quant_config, quantize_model  # noqa: E402
from bvvit.quant.export import export_float_onnx, export_qdq_onnx  # noqa: E402
from bvvit.quant.export_openvino import export_openvino_ir, float_attention_model  # noqa: E402
from bvvit.runtime import openvino as ovrt  # noqa: E402  (imports openvino only when used)
from bvvit.runtime.onnxruntime import make_session, session_fn  # noqa: E402

import peers  # noqa: E402  (benchmarks/peers.py, beside this script)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="vit_model.pth from run.py")
    p.add_argument("--data-path", default=None, help="data set (default: what the model was trained on)")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images (all methods)")
    p.add_argument("--eval-subset", type=int, default=None, help="evaluate on N validation images")
    p.add_argument("--pairs", default="8/8,4/8", help="W/A pairs, e.g. 8/8,4/8,4/4")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--skip", default="", help="comma-separated peers to skip: ort, pt2e, torchao, openvino, nncf")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--out-dir", default=None, help="keep the ONNX files here (default: a temp folder)")
    return p.parse_args(argv)


def parse_pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        w, _, a = item.strip().partition("/")
        if not (w.isdigit() and a.isdigit()):
            raise SystemExit(f"error: --pairs item {item!r} is not W/A such as 8/8")
        pairs.append((int(w), int(a)))
    return pairs


def torchao_dynamic(model: torch.nn.Module, w_bits: int) -> torch.nn.Module:
    """torchao's int8 dynamic-activation recipes: int8 weights, or int4 weights per channel."""
    from torchao.quantization import quantize_
    qmodel = copy.deepcopy(model).eval()
    if w_bits == 8:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        config = Int8DynamicActivationInt8WeightConfig()
    else:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig
        from torchao.quantization.granularity import PerAxis
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerAxis(0))
    quantize_(qmodel, config)
    return qmodel


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    pairs = parse_pairs(args.pairs)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    loaded = load_model_file(args.model_path)
    model = loaded.model.eval()
    source = resolve_data(args.data_path or loaded.data.get("data_path") or "fashion-mnist")
    pre = loaded.preprocessing
    val = build_loader(build_dataset(source, "val", build_transform(pre, train=False),
                                     subset=args.eval_subset), args.batch_size, shuffle=False)
    calib, _ = calibration_loader(source, pre, args.calib_size, seed=0, batch_size=64)
    fp_logits, labels = collect_logits(model, val)
    fp = classification_metrics(fp_logits, labels)
    correct: dict[tuple[int, int, str], torch.Tensor] = {}  # per-image right/wrong, for the paired test
    n = fp["num_images"]
    c = model.config
    desc = f"ViT {c.depth}x{c.embed_dim} patch {c.patch_size}"
    print(f"{args.model_path} ({desc}): FP32 top-1 {fp['top1']:.2f}% on {n} images "
          f"(one image = {accuracy_noise_floor(n):.2f} points); calibration {args.calib_size} "
          f"training images; threads {torch.get_num_threads()}", flush=True)
    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.out_dir) if args.out_dir else Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    rows: list[dict[str, Any]] = []

    def record(w: int, a: int, method: str, kind: str, fn: Callable[[torch.Tensor], torch.Tensor] | torch.nn.Module,
               seconds: float) -> None:
        metrics, logits = evaluate_classifier(fn, val, reference_logits=fp_logits)
        correct[(w, a, method)] = logits.argmax(1) == labels
        row = {"w_bits": w, "a_bits": a, "method": method, "kind": kind, "top1": metrics["top1"],
               "drop": metrics["top1_drop"], "agreement": metrics["agreement"],
               "lost_vs_fp32": metrics["lost_vs_fp32"], "gained_vs_fp32": metrics["gained_vs_fp32"],
               "drop_p_value": metrics["drop_p_value"], "quantize_s": seconds}
        rows.append(row)
        flips = f"{row['lost_vs_fp32']}/{row['gained_vs_fp32']}"
        print(f"W{w}A{a:<4}{method:<44}{kind:<22}{row['top1']:>7.2f}{row['drop']:>+7.2f}"
              f"{row['agreement']:>8.2f}{flips:>10}{seconds:>9.1f}", flush=True)

    has_ov = importlib.util.find_spec("openvino") is not None
    for name in ("openvino", "nncf"):
        if name not in skip and importlib.util.find_spec(name) is None:
            skipped[name] = f"the {name} package is not installed"
            skip.add(name)
    fp_path = None
    if not {"ort", "openvino", "nncf"} <= skip:  # every ONNX-reading peer starts from it
        fp_path = export_float_onnx(model, folder / "vit_fp32.onnx", pre, loaded.class_names)
    print(f"{'W/A':<6}{'method':<44}{'kind':<22}{'top-1':>7}{'drop':>7}{'agree':>8}{'lost/gain':>10}"
          f"{'quant s':>9}")
    for w, a in pairs:
        for recipe in ("vit", "minmax"):
            start = time.perf_counter()
            qmodel, _ = quantize_model(model, make_quant_config(recipe, w, a, calib_size=args.calib_size), calib)
            seconds = time.perf_counter() - start
            record(w, a, f"OURS --recipe {recipe}", "simulated", qmodel, seconds)
            if recipe == "vit" and (w, a) == (8, 8) and "ort" not in skip:
                path = export_qdq_onnx(qmodel, folder / "vit_w8a8.onnx", pre, loaded.class_names)
                record(w, a, "OURS --recipe vit, exported", "ORT int8 kernels",
                       session_fn(make_session(path)), seconds)
            if recipe == "vit" and (w, a) == (8, 8) and "openvino" not in skip:
                record(w, a, "OURS --recipe vit, attention float", "simulated (the IR's twin)",
                       float_attention_model(qmodel), seconds)
                path = peers.try_build("our W8A8 for OpenVINO", lambda: export_openvino_ir(
                    qmodel, folder / "vit_w8a8_openvino.xml", pre, loaded.class_names), skipped)
                if path is not None:
                    record(w, a, "OURS --recipe vit, OpenVINO IR", "OpenVINO int8 kernels",
                           ovrt.session_fn(ovrt.make_session(path)), seconds)
        if a != 8:
            continue  # the peers' static paths quantize activations to 8 bits only
        if "ort" not in skip and w in (4, 8):
            prepped = peers.try_build("ORT pre-processing", lambda: peers.ort_prepare(fp_path, folder), skipped)
            for method in peers.ORT_STATIC_METHODS if prepped else ():
                label = f"ORT quantize_static {method} W{w}A8"
                start = time.perf_counter()
                path = peers.try_build(label, lambda: peers.ort_quantize_static(
                    prepped, folder / f"ort_w{w}a8_{method}.onnx", calib, method, weight_bits=w), skipped)
                if path is not None:
                    record(w, a, f"ORT quantize_static {method}", "ORT QDQ",
                           session_fn(make_session(path)), time.perf_counter() - start)
        if "nncf" not in skip and w == 8:
            for model_type, label in (("transformer", "ModelType.TRANSFORMER"), (None, "default")):
                start = time.perf_counter()
                method = f"NNCF int8 ({label})"
                path = peers.try_build(method, lambda: peers.nncf_quantize(
                    fp_path, folder / f"nncf_{model_type or 'default'}.xml", calib, model_type), skipped)
                if path is not None:
                    record(w, a, method, "OpenVINO int8 kernels", ovrt.session_fn(ovrt.make_session(path)),
                           time.perf_counter() - start)
        if "pt2e" not in skip and w == 8:
            start = time.perf_counter()
            converted = peers.try_build("PT2E X86InductorQuantizer", lambda: peers.pt2e_convert(model, calib, 64),
                                        skipped)
            if converted is not None:
                record(w, a, "PT2E X86InductorQuantizer", "reference int8 ops",
                       peers.padded(converted, 64), time.perf_counter() - start)
        if "torchao" not in skip and w in (4, 8):
            start = time.perf_counter()
            label = f"torchao int8 dynamic act, int{w} weight"
            qmodel = peers.try_build(label, lambda: torchao_dynamic(model, w), skipped)
            if qmodel is not None:
                try:
                    with peers.quiet():
                        record(w, a, label, "dynamic activations", qmodel, time.perf_counter() - start)
                except Exception as exc:  # noqa: BLE001 - built but cannot run on this CPU
                    skipped[label] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
                    print(f"  skipped {label}: {skipped[label]}", flush=True)
    if has_ov and "openvino" not in skip:  # the float file in OpenVINO: what its precision costs
        default = ovrt.inference_precision(ovrt.make_session(fp_path))
        for precision in dict.fromkeys((None, "f32")):
            name = precision or default
            if precision == "f32" and default == "f32":
                continue
            record(32, 32, f"OpenVINO FP32 file ({name}{', its default' if precision is None else ''})",
                   f"OpenVINO {name}", ovrt.session_fn(ovrt.make_session(fp_path, precision=precision)), 0.0)
    report = {"model": f"{args.model_path} ({desc})", "fp32_top1": fp["top1"], "num_images": n,
              "calib_size": args.calib_size, "threads": torch.get_num_threads(), "rows": rows,
              "skipped": skipped, "comparisons": []}
    for w, a in pairs:
        ours = next((r for r in rows if (r["w_bits"], r["a_bits"]) == (w, a)
                     and r["method"] == "OURS --recipe vit"), None)
        others = [r for r in rows if (r["w_bits"], r["a_bits"]) == (w, a) and not r["method"].startswith("OURS")]
        if ours and others:
            best = max(others, key=lambda r: r["top1"])
            test = paired_comparison(correct[(w, a, ours["method"])], correct[(w, a, best["method"])])
            report["comparisons"].append({"w_bits": w, "a_bits": a, "best_peer": best["method"],
                                          "diff_points": test.diff_points, "only_ours": test.only_a,
                                          "only_peer": test.only_b, "mcnemar_p": test.p_value})
            print(f"W{w}A{a}: ours {ours['top1']:.2f} vs best peer {best['top1']:.2f} ({best['method']}): "
                  f"{ours['top1'] - best['top1']:+.2f} points; {test.only_a} images only ours gets right, "
                  f"{test.only_b} only it (McNemar exact p = {test.p_value:.2g})", flush=True)
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
