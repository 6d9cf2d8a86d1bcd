"""Typed option groups for generation: how tokens are sampled, and how media become tokens.

`stream_generate` takes them as `sampling=` and `media_options=`, or the same fields as
keyword arguments; the command line builds them from its flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from .processing.images import DEFAULT_BUDGET
from .processing.video import DEFAULT_VIDEO_BUDGET, MAX_FRAMES


@dataclass(frozen=True)
class SamplingOptions:
    """How each token is chosen, and when to stop. Greedy when `temperature` is 0."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.0  # nucleus mass; 0 keeps every token
    top_k: int = 0  # keep the k likeliest; 0 keeps every token
    min_p: float = 0.0  # drop tokens below min_p times the likeliest one's probability
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, cut from the answer


@dataclass(frozen=True)
class MediaOptions:
    """Soft tokens per image (70, 140, 280, 560 or 1120), per video frame, frames per video."""

    max_soft_tokens: int = DEFAULT_BUDGET
    video_soft_tokens: int = DEFAULT_VIDEO_BUDGET
    max_frames: int = MAX_FRAMES
