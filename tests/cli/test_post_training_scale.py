"""The PTQ job at 224-px scale: quantized models released after their evaluation and
reloaded from their files by the later stages, with the same results as when all are held,
and every stage's wall time in summary.json."""

import json

import pytest

from bvvit.ptq import variants as variants_module
from bvvit.ptq.job import PTQJob, run

pytestmark = pytest.mark.slow


def _job(model_path, data, out):
    return PTQJob(model_path=str(model_path), output_dir=str(out), data_path=str(data), bit_pairs=[(6, 6), (8, 8)],
                  calib_size=16, latency_runs=2, latency_batches=(1, 4), progress=False)


def _results(out):
    summary = json.loads((out / "summary.json").read_text())
    # an OpenVINO IR embeds its output path (the two runs write to different folders)
    path_dependent = {"size_bytes", "size_ratio"}
    rows = [{k: v for k, v in r.items() if not k.startswith("latency") and k != "calibration_time_s"
             and not (r["recipe"] == "openvino" and k in path_dependent)} for r in summary["rows"]]
    analysis = json.loads((out / "analysis.json").read_text())
    return summary, rows, analysis


def test_released_variants_give_the_same_results_and_every_stage_is_timed(trained, tmp_path, monkeypatch):
    data, trained_out = trained
    model_path = trained_out / "vit_model.pth"
    run(_job(model_path, data, tmp_path / "held"))
    held_summary, held_rows, held_analysis = _results(tmp_path / "held")

    loads = []
    original = variants_module.load_quantized_model
    monkeypatch.setattr(variants_module, "load_quantized_model",
                        lambda path: loads.append(path) or original(path))
    monkeypatch.setattr(variants_module, "HELD_MODELS_BYTES", 0)  # keep no quantized model in memory
    run(_job(model_path, data, tmp_path / "released"))
    summary, rows, analysis = _results(tmp_path / "released")

    assert loads, "no variant was reloaded from its file"
    assert rows == held_rows
    assert analysis["sqnr"] == held_analysis["sqnr"]
    assert analysis["weights"] == held_analysis["weights"]
    assert [t["quant"] for t in analysis["activations"]["tensors"]] == \
        [t["quant"] for t in held_analysis["activations"]["tensors"]]
    for timings in (summary["timings"], held_summary["timings"]):
        for stage in ("load_inputs_s", "fp32_evaluation_s", "calibration_set_s", "variants_s", "onnx_s",
                      "latency_s", "analysis_s", "report_s"):
            assert timings["stages"][stage] >= 0.0, stage
        assert set(timings["variants"]) == {"w6a6", "w6a6-minmax", "w8a8", "w8a8-minmax"}
        for step in ("float_model_s", "gptq_s", "calibrate_s", "save_s", "evaluate_s", "total_s"):
            assert timings["variants"]["w8a8"][step] >= 0.0, step
        assert timings["variants"]["w6a6"]["float_model_reused"] is False  # the first vit variant measures
        assert timings["variants"]["w8a8"]["float_model_reused"] is True  # the next reuses


def test_latency_batches_flag(monkeypatch, tmp_path):
    """A ViT-B/16 call at batch 64 takes ~15 s on 2 cores: the batch sizes are a flag."""
    from bvvit.cli import post_training as cli
    from bvvit.ptq import job as job_module

    jobs = []
    monkeypatch.setattr(job_module, "run", jobs.append)
    args = ["--model-path", str(tmp_path / "m.pth"), "--output-dir", str(tmp_path / "out")]
    assert cli.main(args + ["--latency-batches", "1", "8", "8"]) == 0
    assert cli.main(args) == 0
    assert [j.latency_batches for j in jobs] == [(1, 8), (1, 64)]
