"""The package's exception types: each carries one line that says what is wrong and what to do."""

from __future__ import annotations


class Gemma4Error(Exception):
    """Base class for every error this package raises on bad input."""


class ModelNotFoundError(Gemma4Error):
    """A model path or Hub repo id that cannot be resolved to files."""


class ConfigError(Gemma4Error):
    """A missing, unreadable or unsupported config.json."""


class WeightsError(Gemma4Error):
    """Missing, mis-shaped, truncated or unexpected tensors in a checkpoint."""


class QuantizationError(Gemma4Error):
    """A quantization scheme the package does not know or cannot apply."""
