"""Weight quantization for Gemma 4 checkpoints: MLX affine groups and TurboQuant-style."""

from .affine import mixed_recipe, quantize_model
from .turboquant import lloyd_max_codebook, turboquant_model

__all__ = ["lloyd_max_codebook", "mixed_recipe", "quantize_model", "turboquant_model"]
