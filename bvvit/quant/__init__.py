"""Post-training quantization: primitives, observers, quantized modules, recipes,
calibration, ``quantize_model`` and packed storage.

    from bvvit.quant import make_quant_config, quantize_model
    qmodel, report = quantize_model(model, make_quant_config("mse", 8, 8), calibration_loader)
"""

from bvvit.quant.quantize import QuantReport, calibrate, convert, quantize_model
from bvvit.quant.recipes import DEFAULT_RECIPE, RECIPES, make_quant_config
from bvvit.quant.storage import load_quantized_model, save_quantized_model

__all__ = ["quantize_model", "convert", "calibrate", "QuantReport", "make_quant_config",
           "RECIPES", "DEFAULT_RECIPE", "save_quantized_model", "load_quantized_model"]
