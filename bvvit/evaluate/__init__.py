"""Evaluation: accuracy, per-class accuracy, confusion, agreement/SQNR/KL against a
reference, an interleaved latency harness and system information. Returns data; never draws."""

from bvvit.evaluate.classification import (classification_metrics, collect_logits,
                                           evaluate_classifier, json_safe)
from bvvit.evaluate.latency import LatencyResult, measure_interleaved, measure_latency, speedup_table
from bvvit.evaluate.system import library_versions, system_info

__all__ = ["collect_logits", "classification_metrics", "evaluate_classifier", "json_safe",
           "LatencyResult", "measure_latency", "measure_interleaved", "speedup_table",
           "system_info", "library_versions"]
