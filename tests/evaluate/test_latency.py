import time

import numpy as np
import pytest
import torch

from bvvit.evaluate.latency import (
    LatencyResult,
    measure_interleaved,
    measure_latency,
    speedup_table,
)


def test_measure_latency_fields_and_counts():
    calls = []

    def fn(x):
        calls.append(torch.is_inference_mode_enabled())
        return x * 2

    result = measure_latency(fn, torch.ones(4, 3), warmup=3, runs=7, name="double",
                             kind="simulated")
    assert len(calls) == 10 and all(calls)
    assert (result.name, result.batch_size, result.runs, result.warmup, result.kind) == (
        "double", 4, 7, 3, "simulated")
    assert 0 < result.min_ms <= result.median_ms <= result.p90_ms
    assert result.min_ms <= result.mean_ms
    assert result.images_per_s == pytest.approx(4 / (result.median_ms / 1e3))
    assert result.threads == torch.get_num_threads()
    assert set(result.to_dict()) == {
        "name", "batch_size", "runs", "warmup", "median_ms", "p90_ms", "mean_ms", "min_ms",
        "images_per_s", "threads", "kind"}


def test_measure_latency_rejects_zero_runs():
    with pytest.raises(ValueError):
        measure_latency(lambda x: x, torch.ones(1), runs=0)


def test_interleaved_order_is_round_robin_with_rotation():
    log = []

    def recorder(name):
        return lambda x: log.append((name, x.shape[0]))

    fns = {"a": recorder("a"), "b": recorder("b"), "c": recorder("c")}
    inputs = {1: torch.zeros(1, 2), 4: torch.zeros(4, 2)}
    results = measure_interleaved(fns, inputs, warmup=1, runs=2, kinds={"b": "integer"})

    rounds = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]  # warmup, run, run
    expected = [(name, batch) for batch in (1, 4) for rnd in rounds for name in rnd]
    assert log == expected
    assert [(r.name, r.batch_size) for r in results] == [
        ("a", 1), ("b", 1), ("c", 1), ("a", 4), ("b", 4), ("c", 4)]
    assert all(r.runs == 2 and r.warmup == 1 for r in results)
    assert [r.kind for r in results[:3]] == ["float", "integer", "float"]
    assert all(r.median_ms <= r.p90_ms for r in results)


def test_interleaved_converts_inputs_once_outside_timing():
    conversions = []
    seen_types = []

    def to_numpy(x):
        conversions.append(x.shape[0])
        return x.numpy()

    fns = {"torch": lambda x: seen_types.append(type(x)),
           "ort": lambda x: seen_types.append(type(x))}
    measure_interleaved(fns, {2: torch.zeros(2, 3)}, warmup=1, runs=3,
                        to_input={"ort": to_numpy})
    assert conversions == [2]
    assert seen_types.count(np.ndarray) == 4 and seen_types.count(torch.Tensor) == 4


def test_interleaved_min_time_extends_runs():
    results = measure_interleaved({"sleep": lambda x: time.sleep(0.002)},
                                  {1: torch.zeros(1)}, warmup=0, runs=2, min_time_s=0.03)
    assert results[0].runs > 2


def test_interleaved_rejects_bad_arguments():
    with pytest.raises(ValueError):  # key says batch 8, tensor has 2 rows
        measure_interleaved({"f": lambda x: x}, {8: torch.zeros(2, 3)}, runs=1)
    with pytest.raises(ValueError):  # kinds names an unknown callable
        measure_interleaved({"f": lambda x: x}, {1: torch.zeros(1)}, kinds={"g": "float"})


def _result(name, batch, median_ms):
    return LatencyResult(name=name, batch_size=batch, runs=1, warmup=0, median_ms=median_ms,
                         p90_ms=median_ms, mean_ms=median_ms, min_ms=median_ms,
                         images_per_s=batch / median_ms * 1e3, threads=1, kind="float")


def test_speedup_table_ratios_per_batch_size():
    results = [_result("fp32", 1, 10.0), _result("int8", 1, 4.0),
               _result("fp32", 64, 100.0), _result("int8", 64, 200.0)]
    table = speedup_table(results, "fp32")
    assert [(row["name"], row["batch_size"], row["speedup"]) for row in table] == [
        ("fp32", 1, 1.0), ("int8", 1, 2.5), ("fp32", 64, 1.0), ("int8", 64, 0.5)]
    assert table[1]["baseline_median_ms"] == 10.0
    with pytest.raises(ValueError):
        speedup_table(results, "missing")


def test_interleaved_pause_is_untimed_and_precedes_every_call():
    calls: list[float] = []
    fn = lambda x: calls.append(time.perf_counter())  # noqa: E731
    started = time.perf_counter()
    results = measure_interleaved({"a": fn, "b": fn}, {1: torch.zeros(1, 2)}, warmup=0, runs=3, pause_s=0.01)
    assert len(calls) == 6 and time.perf_counter() - started >= 6 * 0.01
    assert all(r.median_ms < 5.0 for r in results)  # the sleep is not in the timed region
    assert all(later - earlier >= 0.009 for earlier, later in zip(calls, calls[1:]))
