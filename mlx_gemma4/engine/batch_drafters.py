"""Drafters for the batch engine: every running row drafts in the same batched forwards.

`AssistantRows` runs Gemma 4's assistant over the target's batch caches (each row's own
positions picked by a mask). `ModelRows` runs a plain smaller Gemma 4 over batch caches of its
own, a row for each of the target's, kept a step behind the target as the solo `ModelDrafter`
keeps its caches.

Both propose `k` tokens per row after each row's newest token: `propose(tokens [rows], hidden
[rows, 1, H] or None, k, sample)` -> (drafts [rows, k], the distributions they were drawn from,
per row), where `sample(logits [rows, vocab])` -> (tokens [rows], per-row distributions).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from ..config import SLIDING
from ..drafters import shared_kv_layers
from ..memory import kv_cache_bytes
from ..models.assistant import AssistantModel
from ..prompt_cache import PromptCache
from .batch_cache import BatchKVCache
from .prefix_pool import PrefixCachePool

RowsSampler = Callable[[mx.array], tuple[mx.array, list[mx.array | None]]]


def _stack(columns: list[mx.array], distributions: list[list[mx.array | None]]):
    """Per-step draft tokens [rows] and per-step, per-row distributions -> ([rows, k], per row:
    its k distributions)."""
    per_row = [list(row) for row in zip(*distributions, strict=True)]
    return mx.stack(columns, axis=1), per_row


class AssistantRows:
    """Drafts every row with an `AssistantModel` reading the target's batch caches."""

    needs_hidden = True

    def __init__(self, assistant: AssistantModel, model, caches: list[BatchKVCache]):
        self.assistant, self.model, self.caches = assistant, model, caches
        self.layers = shared_kv_layers(model.config.text_config)
        # the reference's sliding mask lets a draft see the window and one more position
        self.sliding_keys = assistant.config.text_config.sliding_window + 1

    def join(self, prompt: list[int]) -> None:
        pass

    def row_kv_bytes(self, positions: int) -> int:
        return 0  # it reads the target's caches

    def keep_rows(self, rows: list[int]) -> None:
        pass

    def propose(self, tokens: mx.array, hidden: mx.array, k: int, sample: RowsSampler):
        shared, masks = {}, {}
        for kind, layer in self.layers.items():
            last = self.sliding_keys if kind == SLIDING else None
            shared[kind], masks[kind] = self.caches[layer].stored(last)
        position = self.caches[0].offset  # each row's newest token, not yet in the caches
        language = self.model.language_model
        columns, distributions = [], []
        for _ in range(k):
            embedding = language.embed(self.model.text_ids(tokens[:, None]))
            logits, hidden = self.assistant(embedding, hidden, position, shared, masks)
            tokens, chosen_from = sample(logits[:, -1, :])
            columns.append(tokens)
            distributions.append(chosen_from)
        return _stack(columns, distributions)

    def commit(self, kept: list[list[int]]) -> None:
        pass


class ModelRows:
    """Drafts every row with a smaller Gemma 4 over its own batch caches, one row per target
    row in the same order. A row's caches hold its committed tokens but `behind` (tokens the
    target took after the drafter's last round: none, one, or a whole undrafted step's).

    With `prefix_cache_bytes` the draft model keeps a prefix pool of its own, as large as the
    model's: a prompt that extends an earlier one (the next chat turn) is prefilled here only
    from where the pooled copy ends, as in the model's caches."""

    needs_hidden = False

    def __init__(self, draft_model, model, prefill_step: int, prefix_cache_bytes: int = 0):
        self.draft_model, self.model, self.prefill_step = draft_model, model, prefill_step
        self.caches = [BatchKVCache.like(c) for c in draft_model.make_cache()]
        self.pool = PrefixCachePool(draft_model, prefix_cache_bytes) if prefix_cache_bytes else None
        self.behind: list[list[int]] = []
        self._fed = 0  # positions of this round fed per row: the newest token, then drafts

    def _forward(self, ids: mx.array, caches: list) -> mx.array:
        return self.draft_model.language_model(self.model.text_ids(ids), caches)

    def join(self, prompt: list[int]) -> None:
        """Prefill the row's prompt (all but its newest token, which the first proposal feeds)
        alone, past what the pool holds of it, then add it as a row."""
        if self.pool is None:
            solo = PromptCache(self.draft_model)
        else:
            solo = self.pool.take(prompt, None)
        todo = solo.prepare(prompt)[:-1]
        for start in range(0, len(todo), self.prefill_step):
            chunk = todo[start : start + self.prefill_step]
            self._forward(mx.array(chunk)[None], solo.cache)
            mx.eval([c.state for c in solo.cache])
            solo.tokens.extend(chunk)
        if self.pool is not None:
            self.pool.put(solo)
        for one, batch in zip(solo.cache, self.caches, strict=True):
            batch.add_row(one)
        self.behind.append([])

    def row_kv_bytes(self, positions: int) -> int:
        """The KV one row of the draft model's own caches takes (the memory model's)."""
        return kv_cache_bytes(
            self.draft_model.config.text_config,
            positions,
            dtype=self.draft_model.language_model.norm.weight.dtype,
            prefill_step_size=self.prefill_step,
        )

    def keep_rows(self, rows: list[int]) -> None:
        self.behind = [self.behind[i] for i in rows]
        for cache in self.caches:
            cache.keep_rows(rows)

    def propose(self, tokens: mx.array, hidden: None, k: int, sample: RowsSampler):
        # rows are `behind` by different counts: feed every row as many positions as the
        # furthest behind, the shorter ones padded at the end, then drop the padding per row
        fed = [len(b) + 1 for b in self.behind]
        width = max(fed)
        ids = [
            b + [t] * (width - len(b)) for b, t in zip(self.behind, tokens.tolist(), strict=True)
        ]
        out = self._forward(mx.array(ids), self.caches)
        last = mx.array(fed)[:, None, None] - 1
        out = mx.take_along_axis(out, last, axis=1)[:, 0]
        for cache in self.caches:
            cache.roll_back([width - n for n in fed])
        self.behind = [[] for _ in self.behind]
        columns, distributions = [], []
        for i in range(k):
            tokens, chosen_from = sample(self.draft_model.logits(out))
            columns.append(tokens)
            distributions.append(chosen_from)
            if i < k - 1:
                out = self._forward(tokens[:, None], self.caches)[:, 0]
        self._fed = k
        return _stack(columns, distributions)

    def commit(self, kept: list[list[int]]) -> None:
        """`kept`: per row, the newest token and the drafts the target accepted. Drafts fed
        after a rejected one roll back; what the caches lack waits in `behind`."""
        if not self._fed:
            self.behind = [b + row for b, row in zip(self.behind, kept, strict=True)]
            return
        held = [min(len(row), self._fed) for row in kept]
        for cache in self.caches:
            cache.roll_back([self._fed - n for n in held])
        self.behind = [row[n:] for row, n in zip(kept, held, strict=True)]
        self._fed = 0


def make_rows_drafter(
    draft_model,
    model,
    caches: list[BatchKVCache],
    prefill_step: int,
    prefix_cache_bytes: int = 0,
):
    """The batch drafter for `draft_model` (checked against `model` by the caller); an object
    that drafts rows already (`join`, `keep_rows`, `propose`, `commit`, `row_kv_bytes` and
    `needs_hidden` as `ModelRows` has them) is used as it is. `prefix_cache_bytes`: the
    prefix pool of a draft model with caches of its own."""
    if hasattr(draft_model, "propose"):
        return draft_model
    if isinstance(draft_model, AssistantModel):
        return AssistantRows(draft_model, model, caches)
    return ModelRows(draft_model, model, prefill_step, prefix_cache_bytes)
