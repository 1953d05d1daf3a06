"""The deployment stage at 224-px scale: sessions are timed in groups that fit a byte budget
(every ratio within one interleaved run), evaluated one at a time, in bounded chunks."""

import torch

from bvvit.ptq.onnx import _in_chunks, timing_groups

MB = 1 << 20


def test_a_small_model_is_one_interleaved_group():
    sizes = {"ort_fp32": 5 * MB, "ort_w8a8": 1 * MB, "ort_w8a8_fused": 1 * MB, "ov_fp32": 5 * MB,
             "ov_fp32_f32": 5 * MB, "ov_w8a8": 2 * MB}
    assert timing_groups(sizes) == [list(sizes)]


def test_vit_b_sized_files_are_split_with_the_reference_in_every_group():
    sizes = {"ort_fp32": 343 * MB, "ort_w8a8": 85 * MB, "ort_w8a8_fused": 85 * MB, "ort_w4": 50 * MB,
             "ov_fp32": 343 * MB, "ov_fp32_f32": 343 * MB, "ov_w8a8": 86 * MB}
    groups = timing_groups(sizes, budget=1 << 30)
    assert len(groups) == 2
    assert all(group[0] == "ort_fp32" for group in groups)
    assert sorted(n for g in groups for n in g[1:]) == sorted(n for n in sizes if n != "ort_fp32")
    for group in groups:
        assert sum(sizes[n] for n in group) <= 1 << 30
    # a session larger than the budget on its own still gets timed (alone with the reference)
    assert timing_groups({"ort_fp32": 10, "ov_fp32": 100, "ov_w8a8": 5}, budget=50) == \
        [["ort_fp32", "ov_fp32"], ["ort_fp32", "ov_w8a8"]]
    # no ONNX Runtime reference (--runtime openvino): plain packing
    assert timing_groups({"ov_fp32": 30, "ov_w8a8": 30}, budget=50) == [["ov_fp32"], ["ov_w8a8"]]


def test_chunked_evaluation_gives_the_same_logits():
    weight = torch.randn(10, 12)
    calls = []

    def model(x):
        calls.append(len(x))
        return x.flatten(1) @ weight.T

    images = torch.randn(150, 3, 2, 2)
    assert torch.equal(_in_chunks(model, 64)(images), images.flatten(1) @ weight.T)
    assert calls == [64, 64, 22]
