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


class PromptTooLongError(Gemma4Error):
    """The prompt plus the tokens to generate exceed the model's context."""


class PromptCacheError(Gemma4Error):
    """A prompt-cache file that is unreadable or was made for another model."""


class AudioError(Gemma4Error):
    """An audio input that is missing, undecodable, empty, silent or too short."""


class ImageError(Gemma4Error):
    """An image that is missing, unreadable, empty or of an unsupported kind."""


class VideoError(Gemma4Error):
    """A video that is missing, unreadable or empty, or PyAV not installed."""


class MoEKernelError(Gemma4Error):
    """The MoE kernel path asked for cannot run here."""


class KVQuantizationError(Gemma4Error):
    """An unsupported KV-cache quantization setting."""


class FileAccessError(Gemma4Error):
    """A path that cannot be read or written: missing, not a folder, or not permitted."""


class UnsupportedDtypeError(Gemma4Error, ValueError):
    """A compute dtype the package does not run in (float32, bfloat16 and float16 it does)."""


class ConversationError(Gemma4Error):
    """A saved-conversation file that is unreadable or not one."""


class ToolError(Gemma4Error):
    """A tool that cannot be declared to the model, or a tools file or module that cannot load."""


class ConstraintError(Gemma4Error):
    """A JSON schema or tool choice that constrained decoding cannot enforce, or no engine."""


class MemoryModelError(Gemma4Error):
    """A memory estimate asked for with an unusable context, batch or chunk size."""


class BatchRequestError(Gemma4Error):
    """A batched-generation request that cannot run: no prompts, an empty prompt, an option
    the engine does not take."""


class ServerRequestError(Gemma4Error):
    """A server request that cannot be served: a field of the wrong kind, media it may not
    read (a remote URL, a local path not allowed), a part too large."""


class TrainingDataError(Gemma4Error):
    """A fine-tuning data set that cannot be read: a missing train.jsonl, a malformed line, a
    conversation without a model turn, an example longer than allowed."""


class AdapterError(Gemma4Error):
    """A LoRA adapter that cannot be made or applied: unknown targets, an adapter folder that
    is missing or incomplete, or one made for another model."""


class DistributedError(Gemma4Error):
    """A model that cannot be split across this group (sizes that do not divide, weights
    that cannot be sharded), a group that cannot start, or a rank that was lost."""


class DraftModelError(Gemma4Error):
    """A draft model that cannot draft for this target (vocabulary or hidden size differ), or
    an option speculative decoding does not take."""
