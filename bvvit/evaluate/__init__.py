"""Evaluation: accuracy, per-class accuracy, confusion, agreement/SQNR/KL against a
reference, an interleaved latency harness, per-layer analysis and sensitivity. Returns data; never draws."""

from bvvit.evaluate.classification import classification_metrics, collect_logits, evaluate_classifier
from bvvit.evaluate.latency import LatencyResult, measure_interleaved, measure_latency, speedup_table

__all__ = ["collect_logits", "classification_metrics", "evaluate_classifier",
           "LatencyResult", "measure_latency", "measure_interleaved", "speedup_table"]
