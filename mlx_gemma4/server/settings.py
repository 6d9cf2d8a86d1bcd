"""How the server runs, and the batch generator its engine drives."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..collectives import DEFAULT_TIMEOUT
from ..engine import BatchGenerator
from .messages import MIB, MediaPolicy


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs. `max_concurrency`: requests decoded at once (None: as many as the
    KV budget admits); `kv_budget_bytes`, `kv_bits`, `prefix_cache_bytes` and
    `prefill_step_size` go to the `BatchGenerator`; `default_max_tokens` is a request's limit
    when it gives none, `transcription_max_tokens` an audio chunk's."""

    model_name: str = "gemma4"
    api_key: str | None = None
    max_concurrency: int | None = None
    kv_budget_bytes: int | None = None
    kv_bits: int | None = None
    prefix_cache_bytes: int = 1024 * MIB
    prefill_step_size: int = 512
    default_max_tokens: int = 2048
    transcription_max_tokens: int = 448  # per 30 s chunk: fast speech, with room
    max_body_bytes: int = 64 * MIB
    media: MediaPolicy = field(default_factory=MediaPolicy)
    distributed_timeout: float | None = DEFAULT_TIMEOUT  # a split model: see collectives.Watchdog
    draft_tokens: int = 4  # with a drafter (`create_app`'s draft_model): most drafts a step


def engine_generator(
    model, processor, settings: ServerSettings, draft_model=None
) -> BatchGenerator:
    """The batch generator the engine drives, as `settings` ask; `draft_model` drafts."""
    return BatchGenerator(
        model,
        processor,
        prefill_step_size=settings.prefill_step_size,
        kv_bits=settings.kv_bits,
        prefix_cache_bytes=settings.prefix_cache_bytes,
        kv_budget_bytes=settings.kv_budget_bytes,
        draft_model=draft_model,
        num_draft_tokens=settings.draft_tokens,
    )
