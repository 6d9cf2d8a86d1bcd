"""Speculative decoding in the batch engine: each step, every running row drafts up to `k`
tokens (the drafter runs all rows together), the target checks every row's newest token and
drafts in one forward over the batch caches, and each row keeps what it accepted.

Rows share the forward's width: a row allowed fewer drafts (near its `max_tokens`, an
assistant's row just joined, with no hidden state yet, or a row with a `json_schema`, a forced
`tool_choice` or the caller's `logits_processors`, which drafts none) checks only its own,
and its other positions are rolled back with its rejected drafts (`BatchKVCache.roll_back`,
per row).
Each row chooses and checks its tokens with its own `TokenChooser` (the solo rule: greedy
drafts kept while they equal the target's argmax; sampled ones by the standard acceptance
rule), so its output is what its solo run gives. How many tokens the batch drafts adapts as
one sequence's do (`DraftLength`, fed each step's time and its rows' mean accepted count), so
a drafter the model keeps rejecting stops costing the batch.

A seeded sampled row is reproducible whatever else is in the batch: it draws with its own key
and drafts as its solo run would, by a draft length of its own that reads no clock (its first
step undrafted, no cap at its `max_tokens`), so it gives its solo run's tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from ..drafters import check_draft_model
from ..errors import DraftModelError
from ..speculative import DraftLength, DraftStats, TokenChooser
from .batch_cache import BatchKVCache
from .batch_drafters import make_rows_drafter


@dataclass
class RowDrafting:
    """A row's part in speculative decoding."""

    chooser: TokenChooser
    stats: DraftStats
    hidden: mx.array | None = None  # [1, 1, H]: the target's state before the newest token
    own_length: DraftLength | None = None  # a seeded sampled row's (see the module's notes)
    stepped: bool = False  # it has taken part in a step


class BatchSpeculator:
    """Runs the speculative steps of a `BatchGenerator` whose rows are in `caches`."""

    def __init__(
        self,
        model,
        draft_model,
        num_draft_tokens: int,
        caches: list[BatchKVCache],
        prefill_step: int,
        prefix_cache_bytes: int = 0,
    ):
        if num_draft_tokens < 0:
            raise DraftModelError(f"num_draft_tokens must be 0 or more, got {num_draft_tokens}")
        if not hasattr(draft_model, "propose"):  # a row drafter of the caller's own
            check_draft_model(model, draft_model)
        self.model, self.caches, self.most = model, caches, num_draft_tokens
        self.drafter = make_rows_drafter(
            draft_model, model, caches, prefill_step, prefix_cache_bytes
        )
        self.length = DraftLength(num_draft_tokens)

    def join(self, request) -> RowDrafting:
        """A request whose prefilled row was just appended: its drafter row and chooser."""
        self.drafter.join(request.prompt_ids)
        chooser = TokenChooser(request.sampling, request.processors, request.prompt_ids[:-1])
        seeded = chooser.key is not None
        return RowDrafting(
            chooser,
            DraftStats(),
            own_length=DraftLength(self.most, timed=False) if seeded else None,
        )

    def keep_rows(self, rows: list[int]) -> None:
        self.drafter.keep_rows(rows)

    def _plan(self, running: list) -> list[int]:
        """How many tokens each running row drafts this step (called once a step)."""
        most = self.length.next()
        return [self._allowed(request, most) for request in running]

    def _allowed(self, request, most: int) -> int:
        """Drafts this row makes now, of the batch's `most`: none under a constraint or the
        caller's processors (as `stream_generate`: they follow one token at a time), none
        without a hidden state when the drafter needs one, none past its last token. A seeded
        row's own length decides for it, as in its solo run."""
        row = request.drafting
        if request.one_at_a_time:
            return 0
        if row.own_length is not None:  # as solo, its first step drafts nothing
            return row.own_length.next() if row.stepped else 0
        if self.drafter.needs_hidden and row.hidden is None:
            return 0
        left = request.output.max_tokens - request.output.generated
        return max(0, min(most, left - 1))

    def step(self, running: list) -> list[list[int]]:
        """One speculative step over the running requests; each one's new tokens (the drafts
        it accepted, then the target's next token)."""
        began = time.perf_counter()
        rows = [request.drafting for request in running]
        allowed = self._plan(running)
        k = max(allowed)
        newest = mx.array([request.next_token for request in running], dtype=mx.uint32)
        inputs, distributions = newest[:, None], [[] for _ in running]
        if k:
            hidden = None
            if self.drafter.needs_hidden:
                hidden = mx.concatenate([self._hidden_or_zeros(row) for row in rows])
            sample = self._sampler(rows, allowed)
            drafts, distributions = self.drafter.propose(newest, hidden, k, sample)
            inputs = mx.concatenate([inputs, drafts.astype(mx.uint32)], axis=1)
        hidden = self.model.language_model(self.model.text_ids(inputs), self.caches)
        logits = self.model.logits(hidden)
        mx.eval(logits, inputs)
        accepted, tokens = self._verify(rows, inputs, logits, allowed, distributions)
        width = inputs.shape[1]
        for cache in self.caches:
            cache.roll_back([width - 1 - a for a in accepted])
        ids = inputs.tolist()
        kept = [row_ids[: a + 1] for row_ids, a in zip(ids, accepted, strict=True)]
        self.drafter.commit(kept)
        for i, (row, a, n) in enumerate(zip(rows, accepted, allowed, strict=True)):
            row.stats.drafted += n
            row.stats.accepted += a
            row.stepped = True
            if row.own_length is not None:
                row.own_length.update(n, a, None)
            if self.drafter.needs_hidden:
                row.hidden = hidden[i : i + 1, a : a + 1]
        self._measure(k, allowed, accepted, time.perf_counter() - began)
        return [row_ids[1:] + [t] for row_ids, t in zip(kept, tokens, strict=True)]

    def _measure(self, k: int, allowed: list[int], accepted: list[int], seconds: float) -> None:
        """Tell the draft length what the step cost and how much of the rows' drafts stayed
        (rows that drafted fewer than `k` for their own reasons do not count)."""
        if not k:
            self.length.update(0, 0, seconds)
            return
        full = [a for a, n in zip(accepted, allowed, strict=True) if n == k]
        if full:
            self.length.update(k, sum(full) / len(full), seconds)

    def _hidden_or_zeros(self, row: RowDrafting) -> mx.array:
        if row.hidden is not None:
            return row.hidden
        width = self.model.config.text_config.hidden_size
        return mx.zeros((1, 1, width), self.model.language_model.norm.weight.dtype)

    @staticmethod
    def _sampler(rows: list[RowDrafting], allowed: list[int]):
        """Draft tokens for every row from the drafter's logits [rows, vocab] at each drafted
        position in turn, each by its own chooser (one argmax when every row is greedy). Past
        its `allowed` drafts, which the target will not check, a row takes the argmax: no
        random draw is spent on them."""
        position = 0

        def sample(logits: mx.array) -> tuple[mx.array, list[mx.array | None]]:
            nonlocal position
            drawing = {
                i for i, row in enumerate(rows) if position < allowed[i] and not row.chooser.greedy
            }
            position += 1
            if not drawing:
                return mx.argmax(logits, axis=-1), [None] * len(rows)
            picks = [
                row.chooser.sample_draft(logits[i : i + 1])
                if i in drawing
                else (mx.argmax(logits[i : i + 1], axis=-1), None)
                for i, row in enumerate(rows)
            ]
            tokens = mx.concatenate([token.astype(mx.uint32) for token, _ in picks])
            return tokens, [distribution for _, distribution in picks]

        return sample

    @staticmethod
    def _verify(rows, inputs, logits, allowed, distributions) -> tuple[list[int], list[int]]:
        """Per row: (drafts accepted, the target's token after them), checking only the
        row's own `allowed` drafts."""
        plain = [
            i for i, row in enumerate(rows) if row.chooser.greedy and not row.chooser.processors
        ]
        # greedy rows without logits processors: one argmax for all of them
        chosen = []
        if plain:
            some = logits if len(plain) == len(rows) else logits[mx.array(plain)]
            chosen = mx.argmax(some, axis=-1).tolist()
        by_row = dict(zip(plain, chosen, strict=True))
        accepted, tokens = [], []
        for i, (row, n) in enumerate(zip(rows, allowed, strict=True)):
            if i in by_row:
                proposed, best = inputs[i, 1 : n + 1].tolist(), by_row[i]
                a = next((j for j in range(n) if proposed[j] != best[j]), n)
                token = best[a]
            else:
                drafts = [inputs[i, j + 1 : j + 2] for j in range(n)]
                a, token = row.chooser.verify(
                    inputs[i, : n + 1], logits[i, : n + 1], drafts, distributions[i][:n]
                )
            accepted.append(a)
            tokens.append(token)
        return accepted, tokens
