"""Runtimes that execute exported models (deployment files), one module per runtime.

``quant`` builds the artifacts (packed ``.safetensors``, ONNX files); a runtime module runs
them and tells what ran. What :mod:`bvvit.runtime.onnxruntime` offers, and what a second
runtime (OpenVINO, TensorRT, ...) placed beside it offers under the same names:

- ``make_session(path, threads=None, ...)``: load an exported file, ready to run on the CPU;
  a missing or corrupt file is one :class:`bvvit.errors.CheckpointError` line;
- ``session_fn(session)``: a torch-in, torch-out callable for
  :func:`bvvit.evaluate.classification.collect_logits` (accuracy through our loaders);
- ``numpy_fn(session)``: the cheapest call for :func:`bvvit.evaluate.latency.measure_interleaved`;
- ``optimized_op_report(path)``: which kernels the runtime really runs (integer or float).

:mod:`bvvit.runtime.openvino` offers the same for OpenVINO (an optional package, imported
lazily; ``precision`` picks the float precision of the layers that are not quantized).
The PTQ job's deployment stage (:mod:`bvvit.ptq.onnx`) exports the files, then evaluates and
times them through these functions in every runtime of ``--runtime``. A runtime imports no stage but ``evaluate`` (and the leaf
helpers); tests/test_import_rules.py enforces it.
"""
