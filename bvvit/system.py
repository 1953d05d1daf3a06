"""The machine a run executes on: which device to use (:func:`resolve_device`), and what
machine and software a measurement came from (:func:`system_info`, for reports next to
latencies and in every run's config); :func:`release_freed_memory` hands freed heap
memory back to the operating system after a large stage.

Integer kernels depend on ISA extensions (AVX-512 VNNI, AMX), so a speed-up figure means
little without them. Optional packages are looked up with importlib.metadata, never
imported, so asking is cheap and has no side effects.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

from bvvit.errors import ConfigError

CPUINFO_PATH = "/proc/cpuinfo"

# ISA extensions that decide which int8/bf16 kernels PyTorch and ONNX Runtime can use.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16")

# Distribution names tried, in order, for each package reported (first installed wins).
OPTIONAL_PACKAGES: dict[str, tuple[str, ...]] = {
    "timm": ("timm",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
    "onnxscript": ("onnxscript",),
    "safetensors": ("safetensors",),
    "matplotlib": ("matplotlib",),
    "openvino": ("openvino",),
    "nncf": ("nncf",),
}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; asking
    for CUDA on a machine without it is a one-line ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but no CUDA GPU is available; "
                          "use --device cpu (or auto)")
    return torch.device(name)


def system_info() -> dict[str, Any]:
    """A JSON-serialisable description of this machine and the libraries in use.

    Keys: ``cpu_model``, ``logical_cores``, ``usable_cores`` (this process's CPU
    affinity), ``torch_threads``, ``torch_interop_threads``, ``isa_flags`` (flag -> bool
    for :data:`ISA_FLAGS`; empty when /proc/cpuinfo is unreadable), ``cpu_capability``
    (what PyTorch dispatches to, e.g. ``"AVX512"``), ``quantized_engines``, ``python``,
    ``platform``, ``machine``, ``cuda_available``, ``cuda_device_name``, ``cuda_version``,
    ``libraries`` (:func:`library_versions`).
    """
    cpu_model, flags = _read_cpuinfo()
    cuda_available = torch.cuda.is_available()
    return {
        "cpu_model": cpu_model or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "isa_flags": {flag: flag in flags for flag in ISA_FLAGS} if flags else {},
        "cpu_capability": _cpu_capability(),
        "quantized_engines": [str(e) for e in torch.backends.quantized.supported_engines],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cuda_available": cuda_available,
        "cuda_device_name": torch.cuda.get_device_name(0) if cuda_available else None,
        "cuda_version": torch.version.cuda,
        "libraries": library_versions(),
    }


def library_versions() -> dict[str, str | None]:
    """Versions of torch, torchvision, numpy and the optional packages; None if absent."""
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,  # includes the build tag, e.g. "+cpu"
        "torchvision": distribution_version("torchvision"),
        "numpy": distribution_version("numpy"),
    }
    for package, distributions in OPTIONAL_PACKAGES.items():
        versions[package] = next(
            (v for v in map(distribution_version, distributions) if v is not None), None)
    return versions


def distribution_version(distribution: str) -> str | None:
    """Installed version of a distribution, without importing it; None if not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """``(model name, ISA flags)`` of the first processor in /proc/cpuinfo text."""
    model_name: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and model_name is None:
            model_name = value.strip() or None
        elif key in ("flags", "Features") and not flags:  # "Features" on ARM
            flags = set(value.split())
        if model_name is not None and flags:
            break
    return model_name, flags


def _read_cpuinfo() -> tuple[str | None, set[str]]:
    if not sys.platform.startswith("linux"):
        return None, set()
    try:
        with open(CPUINFO_PATH, encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return None, set()


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count()


def _cpu_capability() -> str | None:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return None


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Return the heap memory freed since the last call to the operating system.

    PyTorch's CPU tensors below glibc's mmap threshold live in malloc arenas; once a stage
    frees thousands of them (reconstruction's autograd buffers, a model released after its
    evaluation) the pages stay mapped and counted in RSS, so the next stage's peak stacks on
    top (ViT-B/16: 1.3 GB kept after reconstructing 3 blocks, 0.9 GB RSS after
    ``malloc_trim(0)`` against 2.5 before). Returns whether it could (glibc only)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


__all__ = ["release_freed_memory", "resolve_device", "system_info", "library_versions", "distribution_version", "parse_cpuinfo",
           "ISA_FLAGS", "OPTIONAL_PACKAGES", "CPUINFO_PATH"]
