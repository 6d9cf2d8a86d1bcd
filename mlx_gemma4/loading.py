"""Folder or Hub repo id -> model: config, weights mapped onto the module tree, the modules
a checkpoint stores packed made quantized, floats in the compute dtype."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import read_config, read_weights, resolve_model_path, weight_files
from .collectives import Group, broadcast_int
from .config import ASSISTANT_MODEL_TYPES, DTYPES, UNIFIED_MODEL_TYPE, ModelConfig
from .errors import (
    ConfigError,
    DistributedError,
    QuantizationError,
    UnsupportedDtypeError,
    WeightsError,
)
from .files import access_error
from .models.gemma4 import Model
from .models.layers import CodebookLinear, Rotation
from .models.unified import model_for
from .packing import AFFINE_BITS, FLOAT_MODES, MODES
from .processing import Processor
from .processing.unified import configure_processor
from .weights import canonical_weights, check_weights, without_absent_audio

# MLX's quantization modes; the float modes each allow one (bits, group size) pair.
_FLOAT_MODE_OF = {spec: mode for mode, spec in FLOAT_MODES.items()}  # (bits, group) -> mode
_METHODS = ("affine", "turboquant")


# ----------------------------------------------------------------------------- quantization


def _quantization_of(
    path: str, module: nn.Module, weights: dict[str, mx.array], default_mode: str
) -> dict[str, Any]:
    """The (bits, group size, mode) a stored module was packed with, read off its shapes."""
    in_dims = module.weight.shape[-1]
    packed, scales = weights[f"{path}.weight"], weights[f"{path}.scales"]
    group_size = in_dims // scales.shape[-1]
    bits = packed.shape[-1] * 32 // in_dims
    if scales.dtype == mx.uint8:
        mode = _FLOAT_MODE_OF.get((bits, group_size))
        if mode is None:
            raise QuantizationError(
                f"{path}: {bits}-bit float quantization with group size {group_size} is not a "
                "mode MLX knows (mxfp4, nvfp4, mxfp8)"
            )
    else:
        mode = "affine"
        if default_mode != "affine" or bits not in AFFINE_BITS:
            raise QuantizationError(
                f"{path}: cannot read {bits}-bit {default_mode} weights; supported are affine "
                "2-8 bits and mxfp4 / nvfp4 / mxfp8"
            )
    return {"group_size": group_size, "bits": bits, "mode": mode}


def quantize_like_checkpoint(
    model: Model, weights: dict[str, mx.array], quantization: dict
) -> None:
    """Turn exactly the modules the checkpoint stores packed into quantized modules."""
    method = quantization.get("method", "affine")
    if method not in _METHODS:
        raise QuantizationError(
            f"quantization method {method!r} in config.json is unknown; "
            f"supported: {', '.join(_METHODS)}"
        )
    if method == "turboquant":
        _install_rotations(model, weights)
    _install_codebooks(model, weights)
    default_mode = quantization.get("mode", "affine")
    if default_mode not in MODES:
        raise QuantizationError(
            f"quantization mode {default_mode!r} in config.json is unknown; "
            f"supported: {', '.join(sorted(MODES))}"
        )

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        return _quantization_of(path, module, weights, default_mode)

    nn.quantize(model, class_predicate=predicate)


def _install_rotations(model: Model, weights: dict[str, mx.array]) -> None:
    """A `Rotation` wherever the checkpoint stores one's signs (turboquant checkpoints)."""
    modules = dict(model.named_modules())
    for key in weights:
        if not key.endswith("_rotation.signs"):
            continue
        parent, _, name = key.removesuffix(".signs").rpartition(".")
        if parent not in modules:
            raise WeightsError(f"{key}: rotation of a module this model does not have")
        setattr(modules[parent], name, Rotation(weights[key].shape[-1]))


def _install_codebooks(model: Model, weights: dict[str, mx.array]) -> None:
    """A `CodebookLinear` wherever the checkpoint stores a codebook; sizes read off shapes."""
    modules = dict(model.named_modules())
    for key in weights:
        if not key.endswith(".codebook"):
            continue
        path = key.removesuffix(".codebook")
        module = modules.get(path)
        if not isinstance(module, nn.Linear) or f"{path}.scales" not in weights:
            raise WeightsError(f"{key}: a codebook for something that is not a linear layer")
        out_dims, in_dims = module.weight.shape
        bits = (weights[key].shape[-1] - 1).bit_length()
        group_size = in_dims // weights[f"{path}.scales"].shape[-1]
        parent, _, name = path.rpartition(".")
        setattr(
            modules[parent],
            name,
            CodebookLinear(in_dims, out_dims, bits, group_size, bias="bias" in module),
        )


# ----------------------------------------------------------------------------- dtype


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend (its bf16 matmuls are slow), bfloat16 on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def resolve_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    """The compute dtype for a name ("float32", "bfloat16", "float16"), a dtype, or None."""
    if dtype is None:
        return default_dtype()
    if dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise UnsupportedDtypeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }


# ----------------------------------------------------------------------------- entry points


def model_config(raw_config: dict[str, Any], folder: Path) -> ModelConfig:
    """`folder`'s config.json (read as `raw_config`), parsed; a bad one is one ConfigError
    line."""
    try:
        return ModelConfig.from_dict(raw_config)
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.json'}: {e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{folder / 'config.json'}: unusable value ({e})") from e


def load_model(
    path_or_repo: str | os.PathLike,
    *,
    dtype: str | mx.Dtype | None = None,
    revision: str | None = None,
    adapter_path: str | os.PathLike | None = None,
    group: Any = None,
    mode: str = "tensor",
) -> Model:
    """Load a Gemma 4 checkpoint (local folder or Hub repo id) as an MLX model; an assistant
    drafter's checkpoint (`gemma4_assistant`, `gemma4_unified_assistant`) gives an
    `AssistantModel`.

    `dtype` defaults to float32 on the CPU backend and bfloat16 on a GPU; quantized
    checkpoints stay quantized (their scales take `dtype`). `adapter_path`: a LoRA adapter
    folder (`gemma4 lora`) applied on top. With a distributed `group`
    (`mx.distributed.init()`), each rank reads only its share of the weights, split by `mode`:
    "tensor" (`Model.shard`) or "pipeline" (`Model.pipeline`).
    """
    if group is not None and adapter_path is not None:
        # the adapter's factors are whole matrices; a split base would need them split alike
        raise DistributedError(
            f"adapter {adapter_path}: adapters are not applied to a split model; merge it "
            "first (gemma4 fuse) and load the fused checkpoint"
        )
    compute_dtype = resolve_dtype(dtype)
    if group is not None:
        folder = resolve_once_per_host(path_or_repo, revision, group)
    else:
        folder = resolve_model_path(path_or_repo, revision)
    raw_config = read_config(folder)
    if raw_config.get("model_type") in ASSISTANT_MODEL_TYPES:
        if group is not None or adapter_path is not None:
            raise ConfigError(
                f"{folder}: an assistant drafter is loaded whole, without an adapter or a group"
            )
        from .assistant_checkpoint import load_assistant  # imports this module

        return load_assistant(folder, raw_config, compute_dtype)
    config = model_config(raw_config, folder)

    weights, origin = read_weights(weight_files(folder))
    config = without_absent_audio(config, weights)
    model = model_for(config)
    weights, where, towers = canonical_weights(weights, origin, model)
    if config.quantization is not None:
        quantize_like_checkpoint(model, weights, config.quantization)
    elif any(k.endswith(".scales") for k in weights):
        raise QuantizationError(
            f"{folder}: weights are quantized but config.json has no 'quantization' entry"
        )
    check_weights(model, weights, where)
    model.load_weights(list(_cast_floats(weights, compute_dtype).items()))
    model.eval()
    if group is not None:
        from .models.sharding import parallelize

        del weights  # the whole tensors are read only through this rank's slices
        parallelize(model, group, mode)
    mx.eval(model.parameters())
    built = {name for name in model.encoders if name in model}
    model.towers = frozenset(key.split(".")[0] for key in towers) | built
    model.path = folder
    if adapter_path is not None:
        from .training.adapters import load_adapter

        load_adapter(model, adapter_path)
    return model


def load(
    path_or_repo: str | os.PathLike,
    *,
    dtype: str | mx.Dtype | None = None,
    revision: str | None = None,
    adapter_path: str | os.PathLike | None = None,
    group: Any = None,
    mode: str = "tensor",
) -> tuple[Model, Processor]:
    """A model and its processor (tokenizer, chat template, stop tokens) from one checkpoint;
    `adapter_path`, `group` and `mode` as in `load_model`."""
    model = load_model(
        path_or_repo,
        dtype=dtype,
        revision=revision,
        adapter_path=adapter_path,
        group=group,
        mode=mode,
    )
    require_target_model(model)
    config = model.config
    try:
        processor = Processor.from_folder(model.path, config.eos_token_id, config.vision_config)
    except OSError as e:  # an unreadable tokenizer file; transformers lets it through
        if not isinstance(e, PermissionError) or e.filename is None:
            raise
        raise access_error(e.filename, "read", e) from e
    if config.model_type == UNIFIED_MODEL_TYPE:
        configure_processor(processor, config)
    return model, processor


def require_target_model(model):
    """`model`, unless it is an assistant drafter, which cannot generate on its own."""
    if model.config.model_type in ASSISTANT_MODEL_TYPES:
        raise ConfigError(
            f"{model.path}: an assistant drafter ({model.config.model_type}) does not generate "
            "on its own; pass it as --draft-model (draft_model=) beside the model it drafts for"
        )
    return model


def resolve_once_per_host(path_or_repo: Any, revision: str | None, group: Group) -> Any:
    """The checkpoint folder on every rank; a Hub download runs on rank 0 first, so ranks
    sharing its host (and cache) find the files there instead of fetching them again. When
    rank 0 fails, it raises its error and the others stop too."""
    folder, failure = None, None
    if group.rank() == 0:
        try:
            folder = resolve_model_path(path_or_repo, revision)
        except Exception as e:  # told to the other ranks first, then raised
            failure = e
    if broadcast_int(int(failure is not None), group):
        if failure is not None:
            raise failure
        raise DistributedError("rank 0 could not find the checkpoint")
    return folder if folder is not None else resolve_model_path(path_or_repo, revision)
