"""Weight quantization for Gemma 4 checkpoints."""

from .affine import quantize_model

__all__ = ["quantize_model"]
