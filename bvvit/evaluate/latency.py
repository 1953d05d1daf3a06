"""Latency harness: honest wall-clock timing of inference callables.

On a shared machine the noise drifts over seconds (other jobs start and stop), so
timing variant A for a minute and then variant B for a minute compares two different
machines. :func:`measure_interleaved` therefore runs the variants round-robin: each
round times one call of every variant, so a noisy stretch hits all of them alike, and
the round's starting variant rotates so no variant always follows the same neighbour.
Medians and 90th percentiles are reported, not means, since noise only adds time.

Every call is timed on its own with ``time.perf_counter_ns``; for CUDA inputs the
device is synchronised before and after the call so queued kernels are counted.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass
class LatencyResult:
    """Timing of one callable at one batch size. Times are per call (whole batch)."""

    name: str
    batch_size: int
    runs: int
    warmup: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    images_per_s: float  # batch_size / median
    threads: int  # torch.get_num_threads() while timing
    kind: str  # what was timed: "float", "simulated", "integer", ... (caller's label)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_latency(
    fn: Callable[[Any], Any],
    example_input: Any,
    warmup: int = 5,
    runs: int = 20,
    name: str = "",
    kind: str = "float",
) -> LatencyResult:
    """Time ``fn(example_input)``: ``warmup`` untimed calls, then ``runs`` timed ones.

    Batch size is ``example_input.shape[0]`` (1 for inputs without a shape).
    """
    _check_counts(warmup, runs)
    batch_size = _batch_size(example_input)
    sync = _synchronizer(example_input)
    with torch.inference_mode():
        for _ in range(warmup):
            fn(example_input)
        sync()
        times_ns = [_time_call(fn, example_input, sync) for _ in range(runs)]
    return _summarise(name, batch_size, times_ns, warmup, kind)


def measure_interleaved(
    fns: Mapping[str, Callable[[Any], Any]],
    inputs: Mapping[int, torch.Tensor],
    warmup: int = 5,
    runs: int = 20,
    kinds: Mapping[str, str] | None = None,
    min_time_s: float | None = None,
    to_input: Mapping[str, Callable[[torch.Tensor], Any]] | None = None,
    pause_s: float = 0.0,
) -> list[LatencyResult]:
    """Time several callables round-robin at each batch size.

    ``fns``: name -> callable taking one batch. ``inputs``: batch size -> torch tensor with
    that many rows (e.g. ``{1: x1, 64: x64}``). ``to_input``: name -> converter from the
    torch tensor to what that callable takes (e.g. ``lambda x: x.numpy()`` for an ONNX
    Runtime session); applied once per batch size, outside the timed region.
    ``kinds``: name -> label stored in each result (default ``"float"``).

    For each batch size: ``warmup`` untimed rounds, then timed rounds until at least
    ``runs`` rounds and, if given, ``min_time_s`` seconds have passed. A round calls every
    callable once; the starting callable rotates from round to round. ``pause_s``: an
    untimed sleep before each timed call, so the previous callable's worker threads (a
    runtime's pool that spins after its run, e.g. OpenVINO's) are idle when the next one
    starts: without it each callable is timed against its neighbour's spinning threads.

    Returns one result per (batch size, callable), batch sizes in ``inputs`` order, then
    callables in ``fns`` order.
    """
    _check_counts(warmup, runs)
    if not fns:
        raise ValueError("no callables to time")
    if not inputs:
        raise ValueError("no inputs to time on")
    kinds = dict(kinds or {})
    to_input = dict(to_input or {})
    unknown = (set(kinds) | set(to_input)) - set(fns)
    if unknown:
        raise ValueError(f"kinds/to_input name callables not in fns: {sorted(unknown)}")
    names = list(fns)

    results: list[LatencyResult] = []
    with torch.inference_mode():
        for batch_size, tensor in inputs.items():
            if _batch_size(tensor) != batch_size:
                raise ValueError(f"input for batch size {batch_size} has "
                                 f"{_batch_size(tensor)} rows")
            converted = {name: to_input[name](tensor) if name in to_input else tensor
                         for name in names}
            sync = _synchronizer(tensor)
            times_ns: dict[str, list[int]] = {name: [] for name in names}

            round_index = 0
            for _ in range(warmup):
                for name in _rotated(names, round_index):
                    fns[name](converted[name])
                round_index += 1
            sync()

            started = time.perf_counter()
            completed = 0
            while completed < runs or (
                min_time_s is not None and time.perf_counter() - started < min_time_s
            ):
                for name in _rotated(names, round_index):
                    if pause_s > 0:
                        time.sleep(pause_s)
                    times_ns[name].append(_time_call(fns[name], converted[name], sync))
                round_index += 1
                completed += 1

            results.extend(
                _summarise(name, batch_size, times_ns[name], warmup, kinds.get(name, "float"))
                for name in names
            )
    return results


def speedup_table(results: list[LatencyResult], baseline_name: str) -> list[dict[str, Any]]:
    """Speed of every result relative to ``baseline_name`` at the same batch size.

    One row per result, in input order: ``name``, ``kind``, ``batch_size``, ``median_ms``,
    ``baseline_median_ms`` and ``speedup`` = baseline median / median (> 1 is faster).
    """
    baseline_ms = {r.batch_size: r.median_ms for r in results if r.name == baseline_name}
    rows = []
    for result in results:
        if result.batch_size not in baseline_ms:
            raise ValueError(f"no {baseline_name!r} result at batch size {result.batch_size}")
        base = baseline_ms[result.batch_size]
        rows.append({
            "name": result.name,
            "kind": result.kind,
            "batch_size": result.batch_size,
            "median_ms": result.median_ms,
            "baseline_median_ms": base,
            "speedup": base / result.median_ms if result.median_ms > 0 else float("inf"),
        })
    return rows


def _time_call(fn: Callable[[Any], Any], example_input: Any, sync: Callable[[], None]) -> int:
    start = time.perf_counter_ns()
    fn(example_input)
    sync()
    return time.perf_counter_ns() - start


def _summarise(name: str, batch_size: int, times_ns: list[int], warmup: int,
               kind: str) -> LatencyResult:
    times_ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    median_ms = float(np.median(times_ms))
    return LatencyResult(
        name=name,
        batch_size=batch_size,
        runs=len(times_ns),
        warmup=warmup,
        median_ms=median_ms,
        p90_ms=float(np.percentile(times_ms, 90)),
        mean_ms=float(times_ms.mean()),
        min_ms=float(times_ms.min()),
        images_per_s=batch_size / (median_ms / 1e3) if median_ms > 0 else float("inf"),
        threads=torch.get_num_threads(),
        kind=kind,
    )


def _rotated(names: list[str], round_index: int) -> list[str]:
    start = round_index % len(names)
    return names[start:] + names[:start]


def _batch_size(example_input: Any) -> int:
    shape = getattr(example_input, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) > 0 else 1


def _synchronizer(example_input: Any) -> Callable[[], None]:
    """Wait for queued GPU work when the input lives on CUDA; a no-op otherwise."""
    if isinstance(example_input, torch.Tensor) and example_input.is_cuda:
        device = example_input.device
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _check_counts(warmup: int, runs: int) -> None:
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
