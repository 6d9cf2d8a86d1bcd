"""An assistant drafter's checkpoint folder -> `AssistantModel` (transformers and Hub forms).

Its tensors are named as transformers names them (`model.layers.*`, `pre_projection`,
`post_projection`, `masked_embedding.*`), which is this package's module tree too; the LM head
is tied to the embeddings and not loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from .checkpoint import read_weights, weight_files
from .config import AssistantConfig
from .errors import ConfigError, QuantizationError
from .models.assistant import AssistantModel
from .weights import check_weights


def load_assistant(folder: Path, raw_config: dict[str, Any], dtype: mx.Dtype) -> AssistantModel:
    """Build the drafter `raw_config` describes and load its weights from `folder`."""
    from .loading import _cast_floats as cast_floats
    from .loading import quantize_like_checkpoint

    try:
        config = AssistantConfig.from_dict(raw_config)
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.json'}: {e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{folder / 'config.json'}: unusable value ({e})") from e
    weights, origin = read_weights(weight_files(folder))
    weights.pop("lm_head.weight", None)  # tied to model.embed_tokens
    weights = {k: v for k, v in weights.items() if "rotary_emb" not in k}
    if "masked_embedding.token_ordering" in weights:
        ordering = weights["masked_embedding.token_ordering"]
        weights["masked_embedding.token_ordering"] = ordering.astype(mx.int32)
    model = AssistantModel(config)
    if config.quantization is not None:
        quantize_like_checkpoint(model, weights, config.quantization)
    elif any(k.endswith(".scales") for k in weights):
        raise QuantizationError(
            f"{folder}: weights are quantized but config.json has no 'quantization' entry"
        )
    check_weights(model, weights, origin)
    model.load_weights(list(cast_floats(weights, dtype).items()))
    model.eval()
    mx.eval(model.parameters())
    model.path = folder
    return model
