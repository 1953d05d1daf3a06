"""BV-ViT: train Vision Transformers and shrink them with post-training quantization."""

__version__ = "0.1.0"
