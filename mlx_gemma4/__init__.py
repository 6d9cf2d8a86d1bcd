"""Gemma 4 on Apple Silicon, MLX-native."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from .errors import Gemma4Error

if TYPE_CHECKING:
    from .agent import AgentResult, run_agent
    from .engine import BatchGenerator, BatchResult, batch_generate
    from .generation import GenerationResponse, generate, stream_generate
    from .kv_quant import KVQuantization
    from .loading import load, load_model
    from .options import MediaOptions, SamplingOptions
    from .prompt_cache import PromptCache
    from .tool_calls import ToolCall, parse_tool_calls

try:
    __version__ = version("mlx-gemma4")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = [
    "AgentResult",
    "BatchGenerator",
    "BatchResult",
    "Gemma4Error",
    "GenerationResponse",
    "KVQuantization",
    "MediaOptions",
    "PromptCache",
    "SamplingOptions",
    "ToolCall",
    "__version__",
    "batch_generate",
    "generate",
    "load",
    "load_model",
    "parse_tool_calls",
    "run_agent",
    "stream_generate",
]

_LAZY = {
    "load": "loading",
    "load_model": "loading",
    "generate": "generation",
    "stream_generate": "generation",
    "GenerationResponse": "generation",
    "PromptCache": "prompt_cache",
    "KVQuantization": "kv_quant",
    "SamplingOptions": "options",
    "MediaOptions": "options",
    "ToolCall": "tool_calls",
    "parse_tool_calls": "tool_calls",
    "run_agent": "agent",
    "AgentResult": "agent",
    "batch_generate": "engine",
    "BatchGenerator": "engine",
    "BatchResult": "engine",
}


def __getattr__(name: str):
    # mlx-lm imports transformers on first use; keep `import mlx_gemma4` (and the CLI) quick
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
