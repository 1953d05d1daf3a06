"""The post-training quantization job (``post_training.py``), split by concern:

==============  ===================================================================
module          what it owns
==============  ===================================================================
job.py          :class:`PTQJob` (every setting) and :func:`run`: the orchestration
inputs.py       the model file (BV-ViT or bare timm) and its data set, checked together
output_dir.py   claiming the output folder for one model, ``manifest.json``
variants.py     the ONE place a variant's QuantConfig is built; making a variant
cache.py        result records: file names, keys, reuse by a rerun
mixed.py        the mixed-precision stage (sensitivity -> per-layer widths -> variant)
onnx.py         the ONNX Runtime stage (export, evaluate and time the int8 files)
summary.py      summary rows (:data:`SUMMARY_COLUMNS`), summary.json/.csv, console table
==============  ===================================================================
"""

from bvvit.ptq.job import PTQJob, run

__all__ = ["PTQJob", "run"]
