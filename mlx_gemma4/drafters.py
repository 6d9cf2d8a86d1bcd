"""Drafters for speculative decoding: Gemma 4's assistant (it reads the target's state), or a
plain smaller Gemma 4 with its own caches. Both propose `k` tokens after the newest one."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from .cache import FullAttentionCache, QuantizedFullAttentionCache, SlidingWindowCache
from .config import UNIFIED_ASSISTANT_MODEL_TYPE, TextConfig
from .errors import DraftModelError, Gemma4Error
from .generation import prefill_chunk, prefill_chunks, prompt_inputs
from .loading import load_model
from .models.assistant import AssistantModel, SharedKV
from .processing.processor import Media
from .prompt_cache import PromptCache
from .turn import refuse_media_without_tower

# (logits [1, vocab]) -> (token [1], its distribution [1, vocab] or None when greedy)
DraftSampler = Callable[[mx.array], tuple[mx.array, mx.array | None]]


def check_draft_model(model, draft_model) -> None:
    """One clear error when `draft_model` cannot draft for `model`."""
    target = model.config.text_config
    if isinstance(draft_model, AssistantModel):
        vocab, width = draft_model.vocab_size, draft_model.config.backbone_hidden_size
        drafts_for_12b = draft_model.config.model_type == UNIFIED_ASSISTANT_MODEL_TYPE
        if drafts_for_12b != target.unified:
            kind, made_for = draft_model.config.model_type, "Gemma 4 12B (gemma4_unified)"
            if not drafts_for_12b:
                made_for = "Gemma 4 E2B, E4B, 26B-A4B or 31B"
            raise DraftModelError(
                f"the draft model is a {kind} drafter, made for {made_for}, but the target is "
                f"{model.config.model_type}; use the assistant made for this target"
            )
        if vocab != target.vocab_size:
            raise DraftModelError(
                f"the draft model's vocabulary has {vocab} tokens but the target's has "
                f"{target.vocab_size}; use the assistant made for this target"
            )
        if width != target.hidden_size:
            raise DraftModelError(
                f"the assistant was trained on a backbone of hidden size {width} but the "
                f"target's is {target.hidden_size}; use the assistant made for this target"
            )
        return
    config = getattr(draft_model, "config", None)
    text = getattr(config, "text_config", None)
    if not isinstance(text, TextConfig):
        raise DraftModelError("the draft model is neither a Gemma 4 model nor an assistant")
    if text.vocab_size != target.vocab_size:
        raise DraftModelError(
            f"the draft model's vocabulary has {text.vocab_size} tokens but the target's has "
            f"{target.vocab_size}; a draft model must share the target's tokenizer"
        )


def shared_kv_layers(config: TextConfig) -> dict[str, int]:
    """Layer kind -> the target's last KV-owning layer of that kind (what an assistant reads)."""
    owners = config.layer_types[: config.first_kv_shared_layer]
    return {kind: len(owners) - 1 - owners[::-1].index(kind) for kind in set(owners)}


def cached_kv(cache: Any) -> tuple[mx.array, mx.array] | Any:
    """Every position a layer's cache holds, in order (float pairs, or a `QuantizedKV`)."""
    if isinstance(cache, QuantizedFullAttentionCache):
        return cache.fetch()
    if isinstance(cache, (SlidingWindowCache, FullAttentionCache)):
        return tuple(cache.state)
    raise DraftModelError(f"an assistant cannot read a {type(cache).__name__} cache")


def target_shared_kv(model, cache: list[Any]) -> SharedKV:
    """The keys and values an assistant attends over, read from the target's caches."""
    layers = shared_kv_layers(model.config.text_config)
    return {kind: cached_kv(cache[i]) for kind, i in layers.items()}


class AssistantDrafter:
    """Drafts with an `AssistantModel` from the target's caches and last hidden state."""

    needs_hidden = True

    def __init__(self, assistant: AssistantModel, model, prompt_cache: PromptCache):
        self.assistant, self.model, self.prompt_cache = assistant, model, prompt_cache

    def begin(self, prompt: list[int]) -> None:
        pass

    def propose(
        self, token: mx.array, hidden: mx.array, k: int, sample: DraftSampler
    ) -> tuple[list[mx.array], list[mx.array]]:
        """`k` tokens after `token` [1] (not yet in the target's cache); `hidden` [1, 1, H] is
        the target's final hidden state at the position before it."""
        language = self.model.language_model
        position = len(self.prompt_cache.tokens)
        shared = target_shared_kv(self.model, self.prompt_cache.cache)
        tokens, distributions = [], []
        for _ in range(k):
            embedding = language.embed(self.model.text_ids(token[None]))
            logits, hidden = self.assistant(embedding, hidden, position, shared)
            token, distribution = sample(logits[:, -1, :])
            tokens.append(token)
            distributions.append(distribution)
        return tokens, distributions

    def commit(self, accepted: list[int]) -> None:
        pass


# A plain drafter's caches, kept with the target's prompt cache across calls (chat turns)
_DRAFT_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encodes(draft_model, media: Media | None) -> bool:
    """Whether `media` holds anything and `draft_model` has a tower for every kind in it."""
    if media is None or all(m is None for m in (media.images, media.video_frames, media.audio)):
        return False
    try:
        refuse_media_without_tower(draft_model, media)
    except Gemma4Error:
        return False
    return True


class ModelDrafter:
    """Drafts with a smaller Gemma 4 that keeps its own caches, a step behind the target's.

    It sees the prompt's `media` through its own towers when it has one for every kind there;
    otherwise it reads text only, and media placeholders reach it as the pad token.
    """

    needs_hidden = False

    def __init__(
        self,
        draft_model,
        model,
        prompt_cache: PromptCache,
        prefill_step: int = 2048,
        media: Media | None = None,
    ):
        self.draft_model, self.model, self.target_cache = draft_model, model, prompt_cache
        held = _DRAFT_CACHES.get(prompt_cache)
        if held is None or held.model is not draft_model:
            held = PromptCache(draft_model)
            _DRAFT_CACHES[prompt_cache] = held
        self.cache = held
        self.prefill_step = prefill_step
        self.media = media if encodes(draft_model, media) else None
        self._prompt: list[int] | None = None  # a prompt with media, fed with the first draft
        self._fed = 0  # tokens of this round in the drafter's caches: the newest, then drafts

    def begin(self, prompt: list[int]) -> None:
        """Keep the cached prefix of `prompt`; the rest is fed with the first proposal (its
        media's soft tokens too, from the drafter's towers: nothing runs if nothing is drafted)."""
        self.cache.roll_back_to_tokens()  # a turn interrupted mid-round
        self._prompt = None
        if self.media is None:
            self.cache.prepare(prompt)
        else:
            self._prompt = prompt

    def _feed_prompt(self, prompt: list[int]) -> None:
        """The prompt's positions not yet cached, with the soft tokens of its media."""
        try:
            inputs = prompt_inputs(self.draft_model, prompt, self.media, self.cache)
        except ValueError:  # its towers give another count of soft tokens: text only
            self.media = None
            self.cache.prepare(prompt)
            return
        todo = len(inputs.todo)
        for start, end in prefill_chunks(todo + 1, self.prefill_step, inputs.block_spans):
            prefill_chunk(self.draft_model, self.cache, inputs, start, end)

    def _feed(self, ids: list[int] | mx.array) -> mx.array:
        ids = mx.array(ids) if isinstance(ids, list) else ids
        ids = self.model.text_ids(ids[None])
        language = self.draft_model.language_model
        for start in range(0, ids.shape[1] - 1, self.prefill_step):
            end = min(start + self.prefill_step, ids.shape[1] - 1)
            language(ids[:, start:end], self.cache.cache)
            mx.eval([c.state for c in self.cache.cache])
        return self.draft_model.logits(language(ids[:, -1:], self.cache.cache)[:, -1, :])

    def propose(
        self, token: mx.array, hidden: mx.array | None, k: int, sample: DraftSampler
    ) -> tuple[list[mx.array], list[mx.array]]:
        if self._prompt is not None:
            self._feed_prompt(self._prompt)
            self._prompt = None
        committed = self.target_cache.tokens
        behind = committed[len(self.cache.tokens) :]
        logits = self._feed(mx.concatenate([mx.array(behind, dtype=token.dtype), token]))
        self.cache.tokens.extend(behind)
        self._fed = 1  # `token`, then every draft but the last
        tokens, distributions = [], []
        for i in range(k):
            token, distribution = sample(logits)
            tokens.append(token)
            distributions.append(distribution)
            if i < k - 1:
                logits = self._feed(token)
                self._fed += 1
        return tokens, distributions

    def commit(self, accepted: list[int]) -> None:
        """`accepted`: the newest token and the drafts the target kept; the drafts fed after a
        rejected one are rolled back."""
        self.cache.tokens.extend(accepted[: self._fed])
        self.cache.roll_back_to_tokens()
        self._fed = 0


def make_drafter(
    draft_model,
    model,
    prompt_cache: PromptCache,
    prefill_step: int = 2048,
    media: Media | None = None,
):
    """The drafter for `draft_model`; an object that drafts already (`begin`, `propose`,
    `commit` and `needs_hidden` as `AssistantDrafter` has them) is used as it is. `media`:
    the prompt's, for a draft model with towers of its own."""
    if hasattr(draft_model, "propose"):
        return draft_model
    check_draft_model(model, draft_model)
    if isinstance(draft_model, AssistantModel):
        return AssistantDrafter(draft_model, model, prompt_cache)
    return ModelDrafter(draft_model, model, prompt_cache, prefill_step, media)


def load_draft_model(path_or_repo, model, *, dtype=None):
    """Load a drafter (an assistant checkpoint or a smaller Gemma 4) and check that it can
    draft for `model`: one clear `DraftModelError` naming both sides when it cannot."""
    drafter = load_model(path_or_repo, dtype=dtype)
    check_draft_model(model, drafter)
    return drafter
