"""A model's KV caches plus the tokens they hold: reused across calls, chat turns and processes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import PromptCacheError
from .files import atomic_file
from .kv_quant import KVQuantization


def _model_fingerprint(model) -> str:
    text = json.dumps(model.config.raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """Caches for every KV-owning layer and the token ids they have processed, in order.

    `kv_quantization` stores the full-attention layers' keys and values quantized.
    """

    def __init__(self, model, kv_quantization: KVQuantization | None = None):
        self.model = model
        self.kv_quantization = kv_quantization
        self.cache: list[Any] = model.make_cache(kv_quantization)
        self.tokens: list[int] = []

    def reset(self) -> None:
        self.cache = self.model.make_cache(self.kv_quantization)
        self.tokens = []

    def use_kv_quantization(self, kv_quantization: KVQuantization | None) -> None:
        """Hold keys and values as `kv_quantization` says; caches made otherwise are rebuilt
        (and their tokens processed again), never reused."""
        if kv_quantization != self.kv_quantization:
            self.kv_quantization = kv_quantization
            self.reset()

    def roll_back_to_tokens(self) -> None:
        """Cut every cache back to `tokens`, the positions known to be complete.

        Building a step's graph advances each layer's cache as it goes, before the step is
        evaluated and its tokens recorded; a step interrupted on the way (Ctrl-C during prefill
        or decode) leaves some layers ahead of `tokens`. Their extra positions are dropped so the
        next call reuses everything before the interrupted step; a cache that cannot be cut back
        is rebuilt (and its tokens processed again).
        """
        held = len(self.tokens)
        for layer in self.cache:
            extra = layer.offset - held
            if extra < 0 or (extra and not (layer.is_trimmable() and layer.trim(extra) == extra)):
                self.reset()
                return

    def _trim(self, n: int) -> bool:
        if not all(c.is_trimmable() for c in self.cache):
            return False
        return all(c.trim(n) == n for c in self.cache)

    def prepare(self, prompt: list[int], blocks: list[tuple[int, int]] = ()) -> list[int]:
        """Keep the longest cached prefix of `prompt`; return the tokens still to process.

        At least the last prompt token is always left to process: its logits start generation.
        The kept prefix never ends inside one of `blocks` ([start, end) spans of image tokens,
        which must be processed together).
        """
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1)
        keep = next((start for start, end in blocks if start < keep < end), keep)
        drop = len(self.tokens) - keep
        if drop and not self._trim(drop):
            self.reset()  # a cache that cannot be cut back that far is rebuilt
            keep = 0
        self.tokens = self.tokens[:keep]
        return prompt[keep:]

    def save(self, file: str | Path) -> None:
        """Write caches and tokens to one safetensors file (atomically)."""
        arrays = {
            f"{i}.{j}": array
            for i, layer in enumerate(self.cache)
            for j, array in enumerate(layer.state)
        }
        kv = self.kv_quantization
        metadata = {
            "model": _model_fingerprint(self.model),
            "types": json.dumps([type(c).__name__ for c in self.cache]),
            "kv_quantization": "null" if kv is None else kv.to_json(),
            "meta": json.dumps([list(c.meta_state) for c in self.cache]),
            "tokens": json.dumps(self.tokens),
        }
        with atomic_file(file) as temporary, temporary.open("wb") as handle:
            # a handle, not a name: mx.save_safetensors appends ".safetensors" to a name
            mx.save_safetensors(handle, arrays, metadata=metadata)

    @classmethod
    def load(cls, model, file: str | Path) -> PromptCache:
        """Read a file written by `save` for the same model."""
        try:
            arrays, metadata = mx.load(str(file), format="safetensors", return_metadata=True)
            types, meta = json.loads(metadata["types"]), json.loads(metadata["meta"])
            tokens = json.loads(metadata["tokens"])
            kv_quantization = KVQuantization.from_json(metadata.get("kv_quantization"))
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
            raise PromptCacheError(f"{file}: not a prompt-cache file ({e})") from e
        if metadata.get("model") != _model_fingerprint(model):
            raise PromptCacheError(f"{file}: this prompt cache was saved for another model")
        prompt_cache = cls(model, kv_quantization)
        for i, (name, meta_state) in enumerate(zip(types, meta, strict=True)):
            layer = prompt_cache.cache[i]
            if type(layer).__name__ != name:
                raise PromptCacheError(f"{file}: layer {i} holds a {name}, unlike this model")
            state = [arrays[f"{i}.{j}"] for j in range(len(arrays)) if f"{i}.{j}" in arrays]
            if state:
                layer.state = tuple(state)
            layer.meta_state = meta_state
        prompt_cache.tokens = tokens
        return prompt_cache
