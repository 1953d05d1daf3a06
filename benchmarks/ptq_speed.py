"""Real int8 speed: our static W8A8 in ONNX Runtime against what a user would pick instead.

    python benchmarks/ptq_speed.py [--model-path OUT/vit_model.pth] [--calib-size 1024]
        [--recipe vit] [--eval-subset N] [--batch-orders 10] [--runs 20] [--threads 2]
        [--batch 64] [--json PATH] [--skip-compile] [--skip GROUP,...]
    python benchmarks/ptq_speed.py --timm-model vit_small_patch16_224 --img-size 224 \
        --calib-size 8 --batch 8 --skip-compile      # speed only, at the scale users deploy

Without ``--model-path``: a random-weight ViT 6x192, patch 7, on 28x28 (or, with
``--timm-model``, timm's constructor of that name, random weights: timing does not depend on
the values) with random calibration images (accuracy columns are then n/a). Everything is measured in ONE
process, latency interleaved round-robin (bvvit.evaluate.latency), so machine noise hits
every variant alike: compare ratios within a run, not absolute times across runs.

Variants: PyTorch FP32 eager; ONNX Runtime FP32; OUR static W8A8 (our calibration, QDQ
export) with int8 attention (the simulated model's twin), float attention, and fused
attention (qkv + attention one QAttention node: the fastest); ORT ``quantize_static`` (QDQ,
per-channel; MinMax with uint8 and int8 activations, Percentile, Entropy);
ORT ``quantize_dynamic``; ``torch.ao.quantization.quantize_dynamic``; when openvino (and
nncf) import: OpenVINO running the FP32 file at its default precision (bf16 on CPUs with
AVX512-BF16/AMX) and at f32, our ``vit_w8a8.onnx`` as is, OUR W8A8 exported for it
(:mod:`bvvit.quant.export_openvino`, IR, attention float: compared with that simulated twin),
and NNCF ``nncf.quantize`` int8 (``ModelType.TRANSFORMER`` and the default); and, when torchao
imports and ``--skip-compile`` is not given, PT2E X86InductorQuantizer + torch.compile and
torchao int8 dynamic + torch.compile (each skipped with its reason if it fails).

Accuracy, with a model path: top-1 on the validation images at batch 64 (images in order),
and, for every model whose predictions depend on the batch (dynamic per-tensor activation
ranges: ORT and torch.ao ``quantize_dynamic``; also any variant whose logits for the first
64 images change by > 0.1% between batch 1 and batch 64), at batch 1 and at batch 64 over
``--batch-orders`` image orders (mean, min, max). Our static models are evaluated at batch 1
too. Each variant's predictions are compared with FP32's (images lost / gained) and ours with
the most accurate peer's (McNemar exact test, bvvit/evaluate/significance.py). The verdict
compares accuracies at each timed batch size: batch-1 accuracy at batch 1, the mean over
batch orders at batch 64.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import os

# Spinning worker threads (OpenMP's and ORT's) steal the cores from whichever runtime
# runs next in the interleaved rounds; every runtime waits passively instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bvvit.config import ModelConfig, Preprocessing  # noqa: E402
from bvvit.evaluate.classification import collect_logits  # noqa: E402
from bvvit.evaluate.significance import (accuracy_over_batch_orders, paired_comparison,  # noqa: E402
                                         predict_in_order)
from bvvit.evaluate.latency import measure_interleaved  # noqa: E402
from bvvit.io import atomic_write_json  # noqa: E402
from bvvit.model import VisionTransformer  # noqa: E402
from bvvit.quant.export import export_float_onnx, export_qdq_onnx  # noqa: E402
from bvvit.quant.quantize import quantize_model  # noqa: E402
from bvvit.quant.recipes import DEFAULT_RECIPE, make_quant_config  # noqa: E402
from bvvit.runtime.onnxruntime import (make_session, numpy_fn, optimized_op_report,  # noqa: E402
                                       session_fn)
from bvvit.system import system_info  # noqa: E402

import peers  # noqa: E402  (benchmarks/peers.py, beside this script)


SKIP_GROUPS = ("ort-static", "ort-dynamic", "torch-dynamic", "openvino", "nncf")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", help="vit_model.pth from run.py (default: random ViT 6x192)")
    p.add_argument("--data-path", help="data set (default: what the model was trained on)")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images (post_training's default)")
    p.add_argument("--eval-subset", type=int, default=None, help="evaluate on N validation images")
    p.add_argument("--runs", type=int, default=20, help="timed rounds per batch size (>= 10)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"our recipe (default {DEFAULT_RECIPE}: post_training's)")
    p.add_argument("--batch-orders", type=int, default=10,
                   help="image orders for the batch-64 accuracy of batch-dependent models")
    p.add_argument("--skip-compile", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--compile-budget-s", type=float, default=60.0,
                   help="start no further torch.compile peer after this many seconds of compiling")
    p.add_argument("--json", help="also write the table as JSON here")
    p.add_argument("--out-dir", help="keep the ONNX files here (default: a temp folder)")
    p.add_argument("--timing-only", action="store_true",
                   help="with --model-path: time on its images but skip the accuracy analysis")
    p.add_argument("--pause-ms", type=float, default=20.0,
                   help="untimed sleep before each timed call (lets the previous runtime's threads go idle)")
    p.add_argument("--batch", type=int, default=64, help="the large timed batch (batch 1 is always timed)")
    p.add_argument("--timm-model", help="time timm's model of this name (random weights, no accuracy), "
                                        "e.g. vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224, help="image size of --timm-model")
    p.add_argument("--skip", default="", help=f"comma-separated peer groups to leave out: {', '.join(SKIP_GROUPS)}")
    args = p.parse_args(argv)
    args.skip = {g for g in args.skip.split(",") if g}
    if args.skip - set(SKIP_GROUPS):
        p.error(f"--skip: unknown group(s) {sorted(args.skip - set(SKIP_GROUPS))}; choose from {SKIP_GROUPS}")
    if args.batch < 2:
        p.error(f"--batch must be >= 2, got {args.batch}")
    if args.batch_orders < 1:
        p.error(f"--batch-orders must be >= 1, got {args.batch_orders}")
    return args


# ------------------------------------------------------------------------ model and data

def random_setup(calib_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    config = ModelConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=192,
                         depth=6, num_heads=3)
    model = VisionTransformer(config).eval()
    images = torch.randn(calib_size, 1, 28, 28)
    calib = [(images[i:i + 64], torch.zeros(len(images[i:i + 64]), dtype=torch.long))
             for i in range(0, calib_size, 64)]
    return {"model": model, "pre": Preprocessing(), "class_names": [str(i) for i in range(10)],
            "calib": calib, "val": None, "desc": "random-weight ViT 6x192 patch 7, 28x28"}


def timm_setup(name: str, img_size: int, calib_size: int) -> dict[str, Any]:
    """timm's ``name`` (random weights) in our model; random calibration images (speed only)."""
    import timm
    from bvvit.model import load_pretrained
    torch.manual_seed(0)
    tm = timm.create_model(name, pretrained=False, img_size=img_size).eval()
    config = ModelConfig(img_size=img_size, patch_size=tm.patch_embed.patch_size[0], in_chans=3,
                         num_classes=tm.num_classes, embed_dim=tm.embed_dim, depth=len(tm.blocks),
                         num_heads=tm.blocks[0].attn.num_heads)
    model = VisionTransformer(config).eval()
    load_pretrained(model, tm.state_dict(), strict_head=True)
    images = torch.randn(calib_size, 3, img_size, img_size)
    calib = [(images[i:i + 8], torch.zeros(len(images[i:i + 8]), dtype=torch.long))
             for i in range(0, calib_size, 8)]
    pre = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), img_size=img_size, in_chans=3)
    return {"model": model, "pre": pre, "class_names": [str(i) for i in range(config.num_classes)],
            "calib": calib, "val": None,
            "desc": f"timm {name} shape ({config.depth}x{config.embed_dim}, {img_size} px, "
                    f"{config.num_patches + 1} tokens), random weights"}


def model_setup(args: argparse.Namespace) -> dict[str, Any]:
    from bvvit.data import build_dataset, build_loader, build_transform, calibration_loader, resolve_data
    from bvvit.model_file import load_model_file
    loaded = load_model_file(args.model_path)
    source = resolve_data(args.data_path or loaded.data.get("data_path") or "fashion-mnist")
    pre = loaded.preprocessing
    val_set = build_dataset(source, "val", build_transform(pre, train=False), subset=args.eval_subset)
    calib, _ = calibration_loader(source, pre, args.calib_size, seed=0, batch_size=64)
    return {"model": loaded.model.eval(), "pre": pre, "class_names": loaded.class_names,
            "calib": calib, "val": build_loader(val_set, 64, shuffle=False),
            "desc": f"{args.model_path} (ViT {loaded.config.depth}x{loaded.config.embed_dim}, "
                    f"{len(val_set)} validation images)"}


# ------------------------------------------------------------------------ variants

FLOAT_BASELINES = ("PyTorch FP32 eager", "ORT FP32")


class Variant:
    """One competitor: a callable for timing and evaluation, its input kind and file size."""

    def __init__(self, name: str, fn: Callable[[Any], Any], numpy_input: bool,
                 size_bytes: Optional[int], note: str = "",
                 eval_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 batch_dependent: bool = False):
        self.name, self.fn, self.numpy_input = name, fn, numpy_input
        self.size_bytes, self.note = size_bytes, note
        self.eval_fn = eval_fn or fn
        self.batch_dependent = batch_dependent  # dynamic per-tensor activation ranges


def torch_size(module: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def ort_variant(name: str, path: Path, threads: int, note: str = "",
                batch_dependent: bool = False) -> Variant:
    session = make_session(path, threads=threads, allow_spinning=False)
    return Variant(name, numpy_fn(session), True, path.stat().st_size, note, session_fn(session),
                   batch_dependent)


def ort_static_peers(fp_path: Path, folder: Path, calib: Any, threads: int) -> list[Variant]:
    prepped = peers.ort_prepare(fp_path, folder)
    out = []
    for unsigned, label, method in ((True, "U8S8", "MinMax"), (False, "S8S8", "MinMax"),
                                    (True, "U8S8", "Percentile"), (True, "U8S8", "Entropy")):
        path = peers.ort_quantize_static(prepped, folder / f"ort_static_{label}_{method}.onnx", calib,
                                         method, unsigned_activations=unsigned)
        out.append(ort_variant(f"ORT quantize_static QDQ {label} {method}", path, threads,
                               f"per-channel, {method}, ORT's calibration"))
    return out


def ort_dynamic_peer(fp_path: Path, folder: Path, threads: int) -> Variant:
    path = peers.ort_quantize_dynamic(fp_path, folder / "ort_dynamic.onnx")
    return ort_variant("ORT quantize_dynamic", path, threads,
                       "int8 weights, dynamic per-tensor activations (range of each batch)", True)


def torch_dynamic_peer(model: nn.Module) -> Variant:
    qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    return Variant("torch.ao quantize_dynamic", qmodel, False, torch_size(qmodel),
                   "x86/fbgemm, dynamic per-tensor activations", batch_dependent=True)


def pt2e_peer(model: nn.Module, calib: Any, example: torch.Tensor) -> Variant:
    """PT2E static int8 (X86InductorQuantizer) compiled with Inductor freezing, the
    recipe of the PyTorch tutorial. One static-shape export per timed batch size:
    with a dynamic batch Inductor's quantized conv lowering fails a stride check here."""
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True  # folds weight quantization into oneDNN int8 kernels
    compiled: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
    converted = None
    for batch in (1, example.shape[0]):
        converted = peers.pt2e_convert(model, calib, batch)
        compiled[batch] = torch.compile(converted)
        with torch.no_grad():
            compiled[batch](example[:batch])  # compile now: failures and time show here

    def run(x: torch.Tensor) -> torch.Tensor:
        return compiled[x.shape[0]](x)
    return Variant("PT2E X86Inductor + compile", run, False, torch_size(converted),
                   "static int8, Inductor freezing", peers.padded(run, example.shape[0]))


def _compile_now(compiled: Callable[[torch.Tensor], Any], example: torch.Tensor) -> None:
    """Compile for both timed batch sizes now, so failures and compile time show here."""
    with torch.no_grad():
        compiled(example[:1])
        compiled(example)


def torchao_dynamic_peer(model: nn.Module, example: torch.Tensor) -> Variant:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    qmodel = copy.deepcopy(model)
    quantize_(qmodel, Int8DynamicActivationInt8WeightConfig())
    compiled = torch.compile(qmodel)
    _compile_now(compiled, example)
    return Variant("torchao int8 dynamic + compile", compiled, False, torch_size(qmodel),
                   "int8 dynamic activations", peers.padded(compiled, 64))


def ov_variant(name: str, path: Path, threads: int, precision: Optional[str] = None, note: str = "",
               graphs: Optional[dict[str, Any]] = None) -> Variant:
    """An OpenVINO-compiled file (ONNX or IR); its exec-graph summary goes into ``graphs``."""
    from bvvit.runtime import openvino as ovrt
    session = ovrt.make_session(path, threads=threads, precision=precision)
    if graphs is not None:
        report = ovrt.exec_graph_report(session)
        graphs[name] = {"precision": ovrt.inference_precision(session), **{
            k: report[k] for k in ("matmul_layers", "integer_matmuls", "num_layers", "layer_counts")}}
    return Variant(name, ovrt.numpy_fn(session), True, peers.openvino_file_bytes(path),
                   note, ovrt.session_fn(session))


def openvino_peers(fp_path: Path, ours_path: Path, threads: int, graphs: dict[str, Any]) -> list[Variant]:
    """OpenVINO running the FP32 file (default precision, f32) and our vit_w8a8.onnx as is."""
    from bvvit.runtime import openvino as ovrt
    default = ovrt.inference_precision(ovrt.make_session(fp_path, threads=threads))
    out = [ov_variant(f"OpenVINO FP32 ({default}, its default)", fp_path, threads, None,
                      "the FP32 ONNX as is; non-quantized layers at OpenVINO's default precision", graphs)]
    if default != "f32":
        out.append(ov_variant("OpenVINO FP32 (f32)", fp_path, threads, "f32",
                              "INFERENCE_PRECISION_HINT=f32", graphs))
    out.append(ov_variant("OpenVINO running our vit_w8a8.onnx", ours_path, threads, None,
                          "our every-tensor-int8 QDQ file, unchanged", graphs))
    return out


def nncf_peers(fp_path: Path, folder: Path, calib: Any, threads: int, graphs: dict[str, Any]) -> list[Variant]:
    out = []
    for model_type, label in (("transformer", "ModelType.TRANSFORMER"), (None, "default")):
        path = peers.nncf_quantize(fp_path, folder / f"nncf_{model_type or 'default'}.xml", calib, model_type)
        out.append(ov_variant(f"NNCF int8 ({label}) OpenVINO", path, threads, None,
                              "nncf.quantize on the same calibration images", graphs))
    return out


def try_peer(label: str, build: Callable[[], Any], skipped: dict[str, str]) -> list[Variant]:
    result = peers.try_build(label, build, skipped)
    return [] if result is None else result if isinstance(result, list) else [result]


# ------------------------------------------------------------------------ main

def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.timm_model:
        setup = timm_setup(args.timm_model, args.img_size, args.calib_size)
    else:
        setup = model_setup(args) if args.model_path else random_setup(args.calib_size)
    model, calib, val = setup["model"], setup["calib"], setup["val"]
    c = model.config
    big = args.batch
    example = torch.randn(big, c.in_chans, c.img_size, c.img_size)
    print(f"model: {setup['desc']}; threads {args.threads}", flush=True)
    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.out_dir) if args.out_dir else Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}

    start = time.perf_counter()
    qmodel, _ = quantize_model(model, make_quant_config(args.recipe, 8, 8,
                                                        calib_size=args.calib_size), calib)
    print(f"  our {args.recipe} W8A8 calibration: {time.perf_counter() - start:.1f} s", flush=True)
    fp_path = export_float_onnx(model, folder / "vit_fp32.onnx", setup["pre"], setup["class_names"])
    ours_path = export_qdq_onnx(qmodel, folder / "vit_w8a8.onnx", setup["pre"], setup["class_names"])
    ours_fattn = export_qdq_onnx(qmodel, folder / "vit_w8a8_float_attention.onnx", setup["pre"],
                                 setup["class_names"], attention="float")
    ours_fused = export_qdq_onnx(qmodel, folder / "vit_w8a8_fused_attention.onnx", setup["pre"],
                                 setup["class_names"], attention="fused")
    ops = optimized_op_report(ours_path, threads=args.threads)
    print(f"  our W8A8 graph after ORT optimization: integer ops {ops['integer_ops']}, "
          f"float matmuls {len(ops['float_matmuls'])}, unfused QDQ {len(ops['unfused_qdq_matmuls'])}")

    variants = [Variant(FLOAT_BASELINES[0], model, False, torch_size(model)),
                ort_variant(FLOAT_BASELINES[1], fp_path, args.threads),
                ort_variant(f"OURS static W8A8 ({args.recipe}) ORT", ours_path, args.threads,
                            "our calibration; every Linear one MatMulIntegerToFloat, q/k/v/softmax int8"),
                ort_variant(f"OURS static W8A8 ({args.recipe}) ORT, float attention", ours_fattn,
                            args.threads, "as above, q@k and attn@v in float (as ORT dynamic does)"),
                ort_variant(f"OURS static W8A8 ({args.recipe}) ORT, fused attention", ours_fused,
                            args.threads, "as float attention; qkv + attention one QAttention node")]
    ov_graphs: dict[str, Any] = {}
    if "openvino" not in args.skip:
        def ours_openvino() -> Variant:
            from bvvit.quant.export_openvino import export_openvino_ir
            ir = export_openvino_ir(qmodel, folder / "vit_w8a8_openvino.xml", setup["pre"], setup["class_names"])
            return ov_variant(f"OURS static W8A8 ({args.recipe}) OpenVINO IR", ir, args.threads, None,
                              "our scales; attention float (fused by OpenVINO); compared with that simulated twin",
                              ov_graphs)
        variants += try_peer("our W8A8 for OpenVINO", ours_openvino, skipped)
        variants += try_peer("OpenVINO", lambda: openvino_peers(fp_path, ours_path, args.threads, ov_graphs),
                             skipped)
    if "nncf" not in args.skip:
        variants += try_peer("NNCF", lambda: nncf_peers(fp_path, folder, calib, args.threads, ov_graphs), skipped)
    if "ort-static" not in args.skip:
        variants += try_peer("ORT quantize_static", lambda: ort_static_peers(fp_path, folder, calib,
                                                                              args.threads), skipped)
    if "ort-dynamic" not in args.skip:
        variants += try_peer("ORT quantize_dynamic", lambda: ort_dynamic_peer(fp_path, folder, args.threads),
                             skipped)
    if "torch-dynamic" not in args.skip:
        variants += try_peer("torch.ao quantize_dynamic", lambda: torch_dynamic_peer(model), skipped)
    compile_peers = {"PT2E X86InductorQuantizer": lambda: pt2e_peer(model, calib, example),
                     "torchao int8 dynamic": lambda: torchao_dynamic_peer(model, example)}
    start = time.perf_counter()
    for label, build in compile_peers.items():
        spent = time.perf_counter() - start
        if args.skip_compile:
            skipped[label] = "--skip-compile"
        elif spent > args.compile_budget_s:
            skipped[label] = (f"compile budget spent ({spent:.0f} s of --compile-budget-s "
                              f"{args.compile_budget_s:.0f})")
        else:
            variants += try_peer(label, build, skipped)

    accuracy: dict[str, dict[str, Any]] = {}
    sim_top1 = sim_float_attention_top1 = None  # our simulated (fake-quant) models, for reference
    if val is not None and not args.timing_only:
        start = time.perf_counter()
        accuracy = accuracy_analysis(variants, val, args.batch_orders, skipped)
        logits, labels = collect_logits(qmodel, val)
        sim_top1 = 100.0 * int((logits.argmax(1) == labels).sum()) / labels.numel()
        if any("OpenVINO IR" in v.name for v in variants):  # the simulated model our IR computes
            from bvvit.quant.export_openvino import float_attention_model
            logits, _ = collect_logits(float_attention_model(qmodel), val)
            sim_float_attention_top1 = 100.0 * int((logits.argmax(1) == labels).sum()) / labels.numel()
        print(f"  evaluated on {len(labels)} images in {time.perf_counter() - start:.1f} s", flush=True)

    inputs = {1: example[:1].contiguous(), big: example}
    if val is not None:  # real images for timing
        real = torch.cat([b[0] for _, b in zip(range(-(-big // 64)), val)])[:big]
        if len(real) == big:
            inputs = {1: real[:1].contiguous(), big: real.contiguous()}
    fns = {v.name: v.fn for v in variants}
    to_input = {v.name: (lambda x: np.ascontiguousarray(x.numpy())) for v in variants if v.numpy_input}
    start = time.perf_counter()
    results = measure_interleaved(fns, inputs, warmup=args.warmup, runs=max(10, args.runs),
                                  to_input=to_input, pause_s=args.pause_ms / 1000)
    print(f"  timed in {time.perf_counter() - start:.1f} s", flush=True)
    table = build_table(variants, results, accuracy, big)
    info = system_info()
    report = {"model": setup["desc"], "threads": args.threads, "runs": max(10, args.runs),
              "pause_ms": args.pause_ms,
              "warmup": args.warmup, "recipe": args.recipe, "sim_w8a8_top1": sim_top1,
              "sim_w8a8_float_attention_top1": sim_float_attention_top1, "batch": big,
              "openvino_exec_graphs": ov_graphs,
              "batch_orders": args.batch_orders,
              "rows": table, "skipped": skipped, "our_graph_ops": ops,
              "verdict": verdict(table, big),
              "best_of_ours": best_of_ours(table, big),
              "system": {k: info[k] for k in ("cpu_model", "usable_cores", "isa_flags",
                                              "cpu_capability", "libraries")}}
    for row in table:
        row.pop("correct", None)  # per-image vectors: used by the verdict, too long for the JSON
    print_table(report)
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    tmp.cleanup()
    return report


BATCH_EFFECT_TOL = 1e-3  # relative logit change b1 vs b64 above which a model counts as batch-dependent


def batch_effect(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    """max |logits at batch 64 - logits one image at a time| / max |logits|, first 64 images:
    float reassociation (~1e-6) for a static model, quantization noise for a dynamic one."""
    with torch.no_grad():
        together = torch.as_tensor(fn(images)).double()
        alone = torch.cat([torch.as_tensor(fn(images[i:i + 1].contiguous())) for i in range(len(images))]).double()
    return float((together - alone).abs().max() / together.abs().max().clamp_min(1e-12))


def accuracy_analysis(variants: list[Variant], val: Any, orders: int,
                      skipped: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per variant: top-1 at batch 64 in image order (``top1``), at batch 1 (``top1_b1``)
    and at batch 64 over ``orders`` image orders (``top1_b64_mean/min/max``; measured only
    where predictions depend on the batch, else equal to ``top1``), the batch effect, images
    lost and gained against FP32, and the per-image correctness (``correct``, dropped from
    the JSON)."""
    images = torch.cat([b[0] for b in val])
    labels = torch.cat([b[1] for b in val])
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        try:
            correct = predict_in_order(v.eval_fn, images, 64) == labels
            top1 = 100.0 * float(correct.double().mean())
            effect = batch_effect(v.eval_fn, images[:64])
            dependent = v.batch_dependent or effect > BATCH_EFFECT_TOL
            per_order = (accuracy_over_batch_orders(v.eval_fn, images, labels, 64, orders)
                         if dependent else [top1])
            measure_b1 = dependent or v.name.startswith("OURS")  # ours: show it, not assume it
            top1_b1 = (100.0 * float((predict_in_order(v.eval_fn, images, 1) == labels).double().mean())
                       if measure_b1 else top1)
            out[v.name] = {"top1": top1, "top1_b1": top1_b1, "top1_b1_measured": measure_b1,
                           "top1_b64_mean": float(np.mean(per_order)), "top1_b64_min": min(per_order),
                           "top1_b64_max": max(per_order), "batch_orders": len(per_order),
                           "batch_effect": effect, "batch_dependent": dependent, "correct": correct}
        except Exception as exc:  # noqa: BLE001 - report and keep timing the others
            skipped[f"{v.name} accuracy"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    reference = out.get(FLOAT_BASELINES[0])
    for entry in out.values() if reference is not None else ():
        vs = paired_comparison(entry["correct"], reference["correct"])
        entry["vs_fp32_gained"], entry["vs_fp32_lost"] = vs.only_a, vs.only_b
    return out


def build_table(variants: list[Variant], results: list[Any],
                accuracy: dict[str, dict[str, Any]], big: int = 64) -> list[dict[str, Any]]:
    by = {(r.name, r.batch_size): r for r in results}
    fp_size = variants[0].size_bytes
    rows = []
    for v in variants:
        acc = accuracy.get(v.name, {})
        row: dict[str, Any] = {"variant": v.name, "top1": acc.get("top1"), "size_bytes": v.size_bytes,
                               "size_ratio": v.size_bytes / fp_size if v.size_bytes else None,
                               "note": v.note, **{k: val for k, val in acc.items() if k != "top1"}}
        for b in (1, big):
            r = by[(v.name, b)]
            row[f"b{b}_median_ms"], row[f"b{b}_p90_ms"] = r.median_ms, r.p90_ms
            row[f"b{b}_speedup_vs_pytorch_fp32"] = by[("PyTorch FP32 eager", b)].median_ms / r.median_ms
            row[f"b{b}_speedup_vs_ort_fp32"] = by[("ORT FP32", b)].median_ms / r.median_ms
        rows.append(row)
    return rows


ACCURACY_AT = {1: "top1_b1", 64: "top1_b64_mean"}  # the accuracy a user gets at each batch size


def _peer_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The quantized peers' rows (neither ours nor a float baseline)."""
    return [r for r in rows if not r["variant"].startswith("OURS") and r["variant"] not in FLOAT_BASELINES]


def _against_fastest_peer(ours: dict[str, Any], peers: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """One of our rows against the fastest peer at ``batch``: times, ratio, met."""
    key = f"b{batch}_median_ms"
    fastest = min(peers, key=lambda r: r[key])
    return {"ours_ms": ours[key], "fastest_peer": fastest["variant"], "fastest_peer_ms": fastest[key],
            "ours_speedup_vs_fastest_peer": fastest[key] / ours[key], "met": ours[key] <= fastest[key]}


def verdict(rows: list[dict[str, Any]], big: int = 64) -> dict[str, Any]:
    """For each of our rows and each timed batch size: at least as fast as the fastest
    quantized peer, and as accurate as the most accurate one at that batch size? Also, at
    batch 64 in image order, the paired test against that peer (McNemar exact p)."""
    peers = _peer_rows(rows)
    scored = [r for r in peers if r.get("top1") is not None]
    out: dict[str, Any] = {}
    for ours in (r for r in rows if r["variant"].startswith("OURS")):
        entry: dict[str, Any] = {}
        for b in (1, big):
            entry[f"b{b}"] = _against_fastest_peer(ours, peers, b)
            if ours.get("top1") is None:
                continue
            acc = ACCURACY_AT[1 if b == 1 else 64]
            best = max(scored, key=lambda r: r[acc], default=None)
            entry[f"b{b}"]["accuracy"] = {
                "ours_top1": ours[acc], "best_peer": best and best["variant"],
                "best_peer_top1": best and best[acc],
                "met": best is None or ours[acc] >= best[acc] - 1e-9}
        if ours.get("top1") is not None and scored:
            best = max(scored, key=lambda r: r["top1"])
            test = paired_comparison(ours["correct"], best["correct"])
            entry["image_order_b64"] = {"ours_top1": ours["top1"], "best_peer": best["variant"],
                                        "best_peer_top1": best["top1"], "only_ours": test.only_a,
                                        "only_peer": test.only_b, "mcnemar_p": test.p_value}
        out[ours["variant"]] = entry
    return out


def best_of_ours(rows: list[dict[str, Any]], big: int = 64) -> dict[str, Any]:
    """Our W8A8 on the best runtime for each batch size: our fastest row (any runtime) against
    the fastest peer at that batch size. The files are the same calibration, so a user picks
    the runtime per deployment; which one wins can differ between batch 1 and ``big``."""
    peers = _peer_rows(rows)
    ours = [r for r in rows if r["variant"].startswith("OURS")]
    out: dict[str, Any] = {}
    if not ours or not peers:
        return out
    for b in (1, big):
        best = min(ours, key=lambda r: r[f"b{b}_median_ms"])
        out[f"b{b}"] = {"ours": best["variant"], **_against_fastest_peer(best, peers, b)}
    return out


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    info = report["system"]
    isa = ", ".join(k for k, v in info["isa_flags"].items() if v) or "unknown"
    print(f"\nCPU: {info['cpu_model']} ({info['usable_cores']} usable cores; ISA: {isa}; torch "
          f"dispatch {info['cpu_capability']}); threads {report['threads']}; "
          f"{report['runs']} interleaved rounds after {report['warmup']} warm-up")
    libs = info["libraries"]
    print(f"torch {libs.get('torch')}, onnxruntime {libs.get('onnxruntime')}, onnx {libs.get('onnx')}, "
          f"openvino {libs.get('openvino')}, nncf {libs.get('nncf')}")
    big = report.get("batch", 64)
    bb = f"b{big}"
    header = (f"| {'variant':48s} | {'top-1':>6s} | {'size bytes':>10s} | {'/FP32':>5s} | "
              f"{'b1 med':>7s} | {'b1 p90':>7s} | {bb + ' med':>7s} | {bb + ' p90':>7s} | "
              f"{'x PT b1':>7s} | {'x ORT b1':>8s} | {'x PT ' + bb:>8s} | {'x ORT ' + bb:>9s} |")
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for r in report["rows"]:
        print(f"| {r['variant']:48s} | {_fmt(r['top1'], '6.2f')} | {r['size_bytes'] or 0:10d} | "
              f"{_fmt(r['size_ratio'], '5.3f')} | {r['b1_median_ms']:7.2f} | {r['b1_p90_ms']:7.2f} | "
              f"{r[bb + '_median_ms']:7.2f} | {r[bb + '_p90_ms']:7.2f} | "
              f"{r['b1_speedup_vs_pytorch_fp32']:6.2f}x | {r['b1_speedup_vs_ort_fp32']:7.2f}x | "
              f"{r[bb + '_speedup_vs_pytorch_fp32']:7.2f}x | {r[bb + '_speedup_vs_ort_fp32']:8.2f}x |")
    for name, graph in report.get("openvino_exec_graphs", {}).items():
        print(f"OpenVINO exec graph of {name}: {graph['num_layers']} layers, float precision "
              f"{graph['precision']}, matmul layers {graph['matmul_layers']}")
    if report["sim_w8a8_top1"] is not None:
        print(f"our simulated (fake-quant) W8A8 top-1: {report['sim_w8a8_top1']:.2f}"
              + (f"; with attention in float (the OpenVINO IR's twin): "
                 f"{report['sim_w8a8_float_attention_top1']:.2f}"
                 if report.get("sim_w8a8_float_attention_top1") is not None else ""))
        print_accuracy(report)
    for name, reason in report["skipped"].items():
        print(f"skipped {name}: {reason}")
    for name, entry in report["verdict"].items():
        print(f"{name}:")
        for b in ("b1", bb):
            v = entry[b]
            line = (f"  {b}: {v['ours_ms']:.2f} ms vs fastest peer ({v['fastest_peer']}) "
                    f"{v['fastest_peer_ms']:.2f} ms -> {'MET' if v['met'] else 'NOT met'} "
                    f"({v['ours_speedup_vs_fastest_peer']:.2f}x its speed)")
            if "accuracy" in v:
                a = v["accuracy"]
                line += (f"; top-1 {a['ours_top1']:.2f} vs best peer at {b} "
                         f"({a['best_peer']}) {_fmt(a['best_peer_top1'], '.2f')} -> "
                         f"{'MET' if a['met'] else 'NOT met'}")
            print(line)
        if "image_order_b64" in entry:
            t = entry["image_order_b64"]
            print(f"  b64, images in order: {t['ours_top1']:.2f} vs {t['best_peer']} {t['best_peer_top1']:.2f}: "
                  f"{t['only_ours']} images only ours gets right, {t['only_peer']} only it; "
                  f"McNemar exact p = {t['mcnemar_p']:.2f}")
    for b, v in report.get("best_of_ours", {}).items():
        print(f"best of ours at {b}: {v['ours']} {v['ours_ms']:.2f} ms vs fastest peer ({v['fastest_peer']}) "
              f"{v['fastest_peer_ms']:.2f} ms -> {'MET' if v['met'] else 'NOT met'} "
              f"({v['ours_speedup_vs_fastest_peer']:.2f}x its speed)")


def print_accuracy(report: dict[str, Any]) -> None:
    print(f"\naccuracy (top-1 %): b64 in image order; b1 (measured where marked *, else static = "
          f"b64); b64 mean [min-max] over {report['batch_orders']} image orders where the batch "
          f"changes predictions; batch effect = max relative logit change b1 vs b64")
    print(f"| {'variant':48s} | {'b64':>6s} | {'b1':>7s} | {'b64 over orders':>21s} | "
          f"{'batch effect':>12s} | {'vs FP32 lost/gained':>19s} |")
    for r in report["rows"]:
        if r.get("top1") is None:
            continue
        orders = (f"{r['top1_b64_mean']:6.2f} [{r['top1_b64_min']:.2f}-{r['top1_b64_max']:.2f}]"
                  if r["batch_dependent"] else "(batch-independent)")
        b1 = f"{r['top1_b1']:6.2f}{'*' if r['top1_b1_measured'] else ' '}"
        flips = f"{r.get('vs_fp32_lost', 0)} / {r.get('vs_fp32_gained', 0)}"
        print(f"| {r['variant']:48s} | {r['top1']:6.2f} | {b1:>7s} | {orders:>21s} | "
              f"{r['batch_effect']:12.1e} | {flips:>19s} |")


if __name__ == "__main__":
    main()
