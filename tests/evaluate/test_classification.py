import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bvvit.evaluate.classification import (
    accuracy_noise_floor,
    classification_metrics,
    collect_logits,
    evaluate_classifier,
)
from bvvit.io import json_safe

# 4 images, 3 classes. Predictions: 0 (right), 2 (true 1), 2 (right), 1 (true 0).
LOGITS = torch.tensor([
    [3.0, 1.0, 0.0],
    [0.0, 1.0, 2.0],
    [0.0, 1.0, 5.0],
    [1.0, 2.0, 0.0],
])
LABELS = torch.tensor([0, 1, 2, 0])


def test_top1_confusion_and_per_class_by_hand():
    metrics = classification_metrics(LOGITS, LABELS, class_names=["a", "b", "c"])
    assert metrics["num_images"] == 4
    assert metrics["top1"] == pytest.approx(50.0)
    assert metrics["top5_k"] == 3 and metrics["top5"] == pytest.approx(100.0)
    assert metrics["confusion"] == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert metrics["per_class_accuracy"] == pytest.approx([50.0, 0.0, 100.0])
    assert metrics["per_class_count"] == [2, 1, 1]
    assert metrics["class_names"] == ["a", "b", "c"]
    assert "agreement" not in metrics


def test_top5_boundary_with_more_than_five_classes():
    # Label 0 ranks 5th in row 0 (inside top-5) and 6th in row 1 (outside).
    logits = torch.tensor([
        [1.0, 6.0, 5.0, 4.0, 3.0, 0.0],
        [0.0, 6.0, 5.0, 4.0, 3.0, 2.0],
    ])
    metrics = classification_metrics(logits, torch.tensor([0, 0]))
    assert metrics["top5_k"] == 5
    assert metrics["top1"] == 0.0
    assert metrics["top5"] == pytest.approx(50.0)


def test_class_without_samples_is_none():
    logits = torch.cat([LOGITS, torch.full((4, 1), -10.0)], dim=1)  # class 3 never seen
    metrics = classification_metrics(logits, LABELS)
    assert metrics["per_class_accuracy"][3] is None
    assert metrics["per_class_accuracy"][:3] == pytest.approx([50.0, 0.0, 100.0])
    json.dumps(metrics, allow_nan=False)


def test_loss_of_uniform_logits_is_log_num_classes():
    metrics = classification_metrics(torch.zeros(5, 4), torch.tensor([0, 1, 2, 3, 0]))
    assert metrics["loss"] == pytest.approx(math.log(4))


def test_reference_metrics_by_hand():
    reference = LOGITS.clone()
    reference[3] = torch.tensor([2.0, 1.0, 0.0])  # reference gets image 3 right
    reference[1] = torch.tensor([0.0, 2.0, 1.0])  # and image 1
    metrics = classification_metrics(LOGITS, LABELS, reference_logits=reference)
    assert metrics["reference_top1"] == pytest.approx(100.0)
    assert metrics["top1_drop"] == pytest.approx(50.0)
    assert metrics["agreement"] == pytest.approx(50.0)
    assert metrics["kl_div"] > 0


def test_sqnr_on_known_noise_is_20_db():
    reference = torch.full((8, 10), 10.0)
    test = reference + torch.where(torch.rand(8, 10) > 0.5, 1.0, -1.0)  # noise power 1/elem
    metrics = classification_metrics(test, torch.zeros(8, dtype=torch.long),
                                     reference_logits=reference)
    assert metrics["sqnr_db"] == pytest.approx(20.0)


def test_kl_by_hand_for_two_classes():
    reference = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    test = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    metrics = classification_metrics(test, torch.tensor([0]), reference_logits=reference)
    assert metrics["kl_div"] == pytest.approx(0.5 * math.log(4 / 3))


def test_identical_logits_give_zero_kl_and_infinite_sqnr():
    metrics = classification_metrics(LOGITS, LABELS, reference_logits=LOGITS.clone())
    assert metrics["kl_div"] == 0.0
    assert metrics["agreement"] == 100.0
    assert metrics["top1_drop"] == 0.0
    assert metrics["sqnr_db"] == math.inf
    safe = json_safe(metrics)
    assert safe["sqnr_db"] == "inf"
    json.dumps(safe, allow_nan=False)


def test_json_safe_converts_non_finite_and_numpy():
    import numpy as np
    obj = {"a": float("nan"), "b": (-math.inf, np.float32(1.5)), "c": np.arange(2),
           "d": torch.tensor([1, 2])}
    assert json_safe(obj) == {"a": "nan", "b": ["-inf", 1.5], "c": [0, 1], "d": [1, 2]}


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        classification_metrics(LOGITS, LABELS, class_names=["a", "b"])
    with pytest.raises(ValueError):
        classification_metrics(LOGITS, torch.tensor([0, 1, 2, 3]))  # label 3 of 3 classes
    with pytest.raises(ValueError):
        classification_metrics(LOGITS, LABELS, reference_logits=LOGITS[:2])
    with pytest.raises(ValueError):
        classification_metrics(torch.empty(0, 3), torch.empty(0, dtype=torch.long))


def test_accuracy_noise_floor():
    assert accuracy_noise_floor(200) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        accuracy_noise_floor(0)


def _tiny_model_and_loader():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    images = torch.randn(7, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    loader = DataLoader(TensorDataset(images, labels), batch_size=3, shuffle=False)
    return model, images, labels, loader


def test_evaluate_classifier_on_linear_model():
    model, images, labels, loader = _tiny_model_and_loader()
    model.train()
    metrics, logits = evaluate_classifier(model, loader, progress=True)
    with torch.no_grad():
        expected = model(images)
    assert model.training  # mode restored
    assert logits.dtype == torch.float32 and logits.shape == (7, 3)
    torch.testing.assert_close(logits, expected)
    expected_top1 = 100.0 * (expected.argmax(1) == labels).float().mean().item()
    assert metrics["num_images"] == 7
    assert metrics["top1"] == pytest.approx(expected_top1)
    assert sum(map(sum, metrics["confusion"])) == 7

    # Against itself as reference: perfect agreement.
    metrics_ref, _ = evaluate_classifier(model, loader, reference_logits=logits)
    assert metrics_ref["agreement"] == 100.0 and metrics_ref["kl_div"] == 0.0


def test_collect_logits_with_callable_and_max_batches():
    model, images, labels, loader = _tiny_model_and_loader()
    calls = []

    def fn(batch):
        calls.append(torch.is_inference_mode_enabled())
        return model(batch) * 2

    logits, got_labels = collect_logits(fn, loader, max_batches=2)
    assert calls == [True, True]
    assert logits.shape == (6, 3)
    assert got_labels.dtype == torch.int64
    assert got_labels.tolist() == labels[:6].tolist()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images[:6]) * 2)


def test_collect_logits_rejects_non_logits_output():
    _, _, _, loader = _tiny_model_and_loader()
    with pytest.raises(TypeError):
        collect_logits(lambda x: (x, x), loader)


def test_comparison_keys_are_the_summary_columns():
    """One key per quantity end to end: what classification_metrics calls a comparison with
    the float model is what summary.csv calls it (no renaming on the way)."""
    from bvvit.ptq.summary import SUMMARY_COLUMNS

    metrics = classification_metrics(LOGITS, LABELS, reference_logits=LOGITS.flip(0))
    comparison = {"top1", "top5", "top1_drop", "agreement", "lost_vs_fp32", "gained_vs_fp32", "drop_p_value",
                  "sqnr_db", "kl_div"}
    assert comparison <= set(metrics) and comparison <= set(SUMMARY_COLUMNS)
