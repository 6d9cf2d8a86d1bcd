"""Media in a pipeline: the towers stay on rank 0, which encodes and sends the soft tokens.

The ranks after 0 hold no tower; each of them still takes every image, video frame and audio
clip of the prompt (they build the same token ids), and receives the soft tokens that fill its
placeholders. The count goes first, so every rank knows the shape before the data arrive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..collectives import Collectives
from ..errors import DistributedError


class AbsentTower(nn.Module):
    """Where a modality tower (or embedder) sits on the ranks after 0 in a pipeline: its
    weights stay on rank 0, which computes the soft tokens and sends them (`SoftTokensFromRank0`);
    the name stays, so every rank reads placeholders and takes media alike."""

    def __call__(self, *args, **kwargs):
        raise DistributedError("the modality towers run on rank 0 only in a pipeline")


class SoftTokensFromRank0:
    """A pipeline model's `vision_features` / `audio_features`: rank 0 runs the tower, then
    sends the soft tokens' count and the soft tokens themselves; the other ranks, which hold
    no tower, take both. Every rank calls it for the same media (the same prompt), so the two
    broadcasts pair up; a count of -1 says rank 0 refused the input, and every rank raises."""

    def __init__(self, encode: Callable[..., mx.array], comm: Collectives, hidden: int):
        self.encode, self.comm, self.hidden = encode, comm, hidden

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        features, failure = None, None
        if self.comm.rank == 0:
            try:
                features = self.encode(*args, **kwargs)
            except Exception as e:  # told to the other ranks first, then raised
                failure = e
        count = -1 if features is None else features.shape[0]
        count = int(self.comm.broadcast(mx.array(count, dtype=mx.int32), 0).item())
        if count < 0:
            if failure is not None:
                raise failure
            raise DistributedError("rank 0 could not encode the media input; see its error")
        # float32 on the wire: exact for bfloat16 and float16 soft tokens alike
        local = (
            features.astype(mx.float32)
            if features is not None
            else mx.zeros((count, self.hidden), dtype=mx.float32)
        )
        out = self.comm.broadcast(local, 0)
        mx.eval(out)
        return out if features is None else out.astype(features.dtype)


# the modules that turn media into soft tokens: the towers (or 12B's embedders) and projections
_MEDIA_MODULES = ("vision_tower", "vision_embedder", "embed_vision", "audio_tower", "embed_audio")


def towers_on_rank_0(model: nn.Module, comm: Collectives) -> None:
    """Keep the media modules on rank 0 only; every rank's media calls go through rank 0."""
    if comm.rank:
        for name in _MEDIA_MODULES:
            if name in model:
                model[name] = AbsentTower()
    hidden = model.language_model.config.hidden_size
    for method in ("vision_features", "audio_features"):
        # an instance attribute, as the pipeline's `make_cache`: the class's method stays
        # the encoder
        setattr(model, method, SoftTokensFromRank0(getattr(model, method), comm, hidden))
