"""Speculative decoding: a drafter proposes tokens, the target checks them all in one forward
pass, and the caches roll back past the first token it rejects.

Greedy decoding keeps the drafts the target's own argmax agrees with, then adds the target's
token: the output is the target's greedy output. Sampling uses the standard acceptance rule
(accept draft x with probability min(1, p(x) / q(x)), on rejection sample from the normalized
max(p - q, 0)), which leaves the output distributed as the target's own samples.
`DraftLength` picks how many tokens to draft from the measured acceptance rate and step times,
down to none, so a drafter the target keeps rejecting costs little; undrafted steps are queued
one ahead as plain decoding queues them. A seeded sampled run picks it from the acceptance
alone (a fixed cost per drafted token, no clock), so the same seed gives the same tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx

from .drafters import make_drafter
from .draws import SeededKey, logprob_filters
from .errors import DraftModelError
from .generation import PromptInputs, prefill_chunk, prefill_chunks
from .options import SamplingOptions
from .processing.processor import Media
from .prompt_cache import PromptCache

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class DraftStats:
    """Tokens drafted and tokens the target accepted, over one generation."""

    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class DraftLength:
    """How many tokens to draft next: the count that maximizes expected tokens per second.

    The acceptance rate is a decaying count of accepted and rejected drafts (one rejection at
    most per round); a round costs a plain step plus a measured cost per drafted token (one
    plain step, then a one-token round, measure both first). The length also stays under a
    ceiling that grows by two after a round whose drafts were all kept and shrinks by one
    after a rejection, so a drafter is trusted with long drafts only once it earns them.
    When drafting does not pay by `margin`, rounds go undrafted, and a one-token probe runs
    after a stretch long enough that a rejected probe costs at most `probe_budget` of it
    (doubling while probes fail).

    `timed=False` reads no clock: a step costs 1 and a drafted token `assumed_draft_cost`, so
    the lengths follow from the acceptance counts alone. Sampling draws one random number per
    drafted and checked token, so a length that followed the machine's timings would give a
    seeded run different tokens on every run.
    """

    # False: always draft `most` tokens (to study a drafter, or to test the rollback paths)
    adaptive = True
    decay = 0.8
    margin = 1.1  # drafting must promise this much more speed than not drafting
    probe_budget = 0.02
    longest_probe_wait = 256
    assumed_draft_cost = 0.25  # of a step, per drafted token, when not timed

    def __init__(self, most: int, timed: bool = True):
        self.most, self.timed = most, timed
        self.accepted, self.rejected = 1.0, 1.0  # a prior: a rate of one half
        # a round without drafts, and what each drafted token adds to a round
        self.step_seconds: float | None = None if timed else 1.0
        self.draft_seconds: float | None = None if timed else self.assumed_draft_cost
        self.backoff, self.since_probe = 1, 0
        self.ceiling = 1

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def expected_tokens(self, k: int) -> float:
        return sum(self.rate**i for i in range(k + 1))

    def speed(self, k: int) -> float:
        """Expected tokens per second of a round drafting `k`."""
        return self.expected_tokens(k) / (self.step_seconds + k * self.draft_seconds)

    def best(self) -> int:
        best = max(range(self.most + 1), key=self.speed)
        return best if self.speed(best) > self.margin * self.speed(0) else 0

    def probe_wait(self) -> int:
        """Undrafted rounds before the next probe."""
        cost = self.draft_seconds / self.step_seconds  # a rejected probe, in steps
        wait = max(4, math.ceil(cost / self.probe_budget)) * self.backoff
        return min(wait, self.longest_probe_wait)

    def next(self) -> int:
        if self.most == 0 or not self.adaptive:
            return self.most
        if self.step_seconds is None:
            return 0
        if self.draft_seconds is None:
            return 1
        k = min(self.best(), self.ceiling)
        if k:
            return k
        self.since_probe += 1
        if self.since_probe < self.probe_wait():
            return 0
        self.since_probe = 0
        return 1

    def update(self, k: int, accepted: int, seconds: float | None) -> None:
        """Record a round; `seconds` None for one that is no measure (the prompt's last)."""
        if self.timed and seconds is not None:
            self._time(k, seconds)
        if k == 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (accepted < k)
        self.backoff = 1 if accepted else min(2 * self.backoff, self.longest_probe_wait)
        if accepted == k:
            self.ceiling = min(self.ceiling + 2, self.most)
        else:
            self.ceiling = max(self.ceiling - 1, 1)

    def _time(self, k: int, seconds: float) -> None:
        if k == 0:
            self.step_seconds = _average(self.step_seconds, seconds)
        elif self.step_seconds is not None:
            per_draft = max(seconds - self.step_seconds, 0.0) / k
            self.draft_seconds = _average(self.draft_seconds, per_draft)


def _average(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new


class TokenChooser:
    """Turns target logits into tokens (greedy or sampled) and checks drafts against them.

    Logits processors see, for each position, the history up to and including its input. A
    seeded sampled chooser draws with its own random key, split as a global generator seeded
    alike splits: alone it gives what the global generator gives, and beside other rows in a
    batch it draws the same.
    """

    def __init__(
        self, sampling: SamplingOptions, processors: list[LogitsProcessor], prompt: list[int]
    ):
        self.greedy = sampling.temperature == 0
        self.temperature = sampling.temperature
        self.filters = logprob_filters(sampling)
        self.processors = processors
        self.history = mx.array(prompt)
        seeded = not self.greedy and sampling.seed is not None
        self.key = SeededKey(sampling.seed) if seeded else None

    def _draw_key(self) -> mx.array | None:
        """The key for the next draw (None: the global generator's)."""
        return None if self.key is None else self.key.next()

    def distribution(self, logits: mx.array) -> mx.array:
        """The probabilities sampling draws from: filters on log-probabilities, temperature."""
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for keep in self.filters:
            logprobs = keep(logprobs)
        return mx.softmax(logprobs * (1.0 / self.temperature), axis=-1)

    def sample_draft(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """A drafter's token from its logits [1, vocab], with the distribution it came from."""
        if self.greedy:
            return mx.argmax(logits, axis=-1), None
        probabilities = self.distribution(logits)
        return mx.random.categorical(mx.log(probabilities), key=self._draw_key()), probabilities

    def _processed(self, inputs: mx.array, i: int, logits: mx.array) -> mx.array:
        """Target logits [1, vocab] of position i, whose inputs end with `inputs[i]`."""
        if not self.processors:
            return logits
        history = mx.concatenate([self.history, inputs[: i + 1].astype(self.history.dtype)])
        for processor in self.processors:
            logits = processor(history, logits)
        return logits

    def next_token(self, newest: mx.array, logits: mx.array) -> mx.array:
        """The token [1] after `newest` [1] from its logits [1, vocab], left unevaluated (an
        undrafted round's, queued behind the previous one)."""
        logits = self._processed(newest, 0, logits)
        if self.processors:
            self.history = mx.concatenate([self.history, newest.astype(self.history.dtype)])
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        return mx.random.categorical(mx.log(self.distribution(logits)), key=self._draw_key())

    def verify(
        self,
        inputs: mx.array,
        logits: mx.array | Callable[[int], mx.array],
        drafts: list[mx.array],
        distributions: list[mx.array | None],
    ) -> tuple[int, int]:
        """(drafts accepted, the token after them) from the target's `logits` [k+1, vocab] at
        `inputs` [k+1] (the newest token, then the k drafts). `logits` may instead be a
        function of a position giving its logits [1, vocab]: it is called only for the
        positions the check reaches, up to the first rejected draft."""
        row = logits if callable(logits) else (lambda i: logits[i : i + 1])
        k = len(drafts)
        proposed = inputs[1:].tolist()
        if not self.greedy and k:
            draws = mx.random.uniform(shape=(k,), key=self._draw_key())
            draft = mx.concatenate(distributions, axis=0)
        for i in range(k + 1):
            scores = self._processed(inputs, i, row(i))
            if self.greedy:
                token = mx.argmax(scores, axis=-1).item()
                if i < k and proposed[i] == token:
                    continue
                break
            # [1, vocab], as `next_token` draws: a draw's result depends on its shape, and a
            # batch row's undrafted step comes here where its solo run calls `next_token`
            target = self.distribution(scores)
            if i == k:
                token = mx.random.categorical(mx.log(target), key=self._draw_key()).item()
                break
            x = proposed[i]
            if (draws[i] * draft[i, x] < target[0, x]).item():
                continue
            # rejected: resample where the target has more mass than the drafter
            residual = mx.maximum(target - draft[i : i + 1], 0.0)
            token = mx.random.categorical(mx.log(residual), key=self._draw_key()).item()
            break
        accepted = i
        kept = inputs[: accepted + 1].astype(self.history.dtype)
        if self.processors:
            self.history = mx.concatenate([self.history, kept])
        return accepted, token


def head_costs_per_row(model) -> bool:
    """Whether the output head costs in proportion to the rows it scores (quantized weights on
    the CPU, where `quantized_matmul` is compute-bound): then a check scores each position
    only once the drafts before it are kept. On a GPU scoring k+1 rows costs about one."""
    head = model["lm_head"] if "lm_head" in model else model.language_model.embed_tokens
    return mx.default_device() == mx.cpu and "scales" in head


def _head(model, states: mx.array, by_row: bool) -> mx.array | Callable[[int], mx.array]:
    """The logits of `states` [n, hidden]: all rows at once, or one row when asked."""
    if by_row:
        return lambda i: model.logits(states[i : i + 1])
    return model.logits(states)


def speculative_generate_step(
    model,
    draft_model,
    prompt: list[int],
    inputs: PromptInputs,
    prompt_cache: PromptCache,
    sampling: SamplingOptions,
    logits_processors: list[LogitsProcessor],
    prefill_step_size: int = 2048,
    num_draft_tokens: int = 4,
    stats: DraftStats | None = None,
    media: Media | None = None,
) -> Iterator[int]:
    """Token ids as `generate_step` yields them, drafting up to `num_draft_tokens` at a time;
    `stats` counts the drafts. A draft model that cannot serve raises here, before any step.
    `media`: the prompt's, which a plain draft model with the towers for them sees too.

    `prompt_cache.tokens` always lists what the caches hold when a token is yielded. A seeded
    sampled run gives the same tokens on every run (its draft lengths read no clock).
    """
    if num_draft_tokens < 0:
        raise DraftModelError(f"num_draft_tokens must be 0 or more, got {num_draft_tokens}")
    drafter = make_drafter(draft_model, model, prompt_cache, prefill_step_size, media)
    stats = stats if stats is not None else DraftStats()
    seeded = sampling.temperature > 0 and sampling.seed is not None
    return _rounds(
        model,
        drafter,
        prompt,
        inputs,
        prompt_cache,
        sampling,
        logits_processors,
        prefill_step_size,
        DraftLength(num_draft_tokens, timed=not seeded),
        stats,
    )


def _rounds(
    model,
    drafter,
    prompt: list[int],
    inputs: PromptInputs,
    prompt_cache: PromptCache,
    sampling: SamplingOptions,
    logits_processors: list[LogitsProcessor],
    prefill_step_size: int,
    length: DraftLength,
    stats: DraftStats,
) -> Iterator[int]:
    cache, todo = prompt_cache.cache, inputs.todo
    for start, end in prefill_chunks(len(todo), prefill_step_size, inputs.block_spans):
        prefill_chunk(model, prompt_cache, inputs, start, end)
        mx.clear_cache()
    drafter.begin(prompt)
    chooser = TokenChooser(sampling, logits_processors, prompt[:-1])
    by_row = head_costs_per_row(model)

    # the last prompt token starts undrafted rounds: `newest` is the next input, not yet
    # cached; `hidden` the target's last hidden state at the position before it
    newest, hidden, k = mx.array(todo[-1:]), None, 0
    while True:
        if k == 0:
            newest, hidden, k = yield from _undrafted(
                model, drafter, prompt_cache, chooser, length, newest
            )
        began = time.perf_counter()
        last_hidden = hidden if drafter.needs_hidden else None
        drafts, distributions = drafter.propose(newest, last_hidden, k, chooser.sample_draft)
        verified = mx.concatenate([newest, *drafts])
        hidden = model.language_model(model.text_ids(verified[None]), cache)
        logits = _head(model, hidden[0], by_row)
        accepted, token = chooser.verify(verified, logits, drafts, distributions)
        kept = verified[: accepted + 1].tolist()
        prompt_cache.tokens.extend(kept)
        prompt_cache.roll_back_to_tokens()  # the positions of rejected drafts
        drafter.commit(kept)
        stats.drafted += len(drafts)
        stats.accepted += accepted
        length.update(len(drafts), accepted, time.perf_counter() - began)
        yield from kept[1:]
        yield token
        newest, hidden = mx.array([token]), hidden[:, accepted : accepted + 1]
        k = length.next()


def _undrafted(
    model, drafter, prompt_cache: PromptCache, chooser: TokenChooser, length: DraftLength, newest
) -> Iterator[int]:
    """Rounds without drafts, each queued before the previous one's token is read (as plain
    decoding runs), until `length` asks for drafts; returns (the newest token, not yet cached,
    the hidden state before it, how many to draft after it). Starts with at least one round."""
    cache = prompt_cache.cache

    def step(ids: mx.array) -> tuple[mx.array, mx.array]:
        hidden = model.language_model(model.text_ids(ids[None]), cache)
        return hidden, chooser.next_token(ids, model.logits(hidden[0, -1:]))

    hidden, token = step(newest)
    prompt_cache.tokens.append(newest.item())
    mx.async_eval(token)
    last = None  # when the previous token came out: an undrafted round's time
    while True:
        k = length.next()  # for the round after `token`
        if k == 0:
            upcoming = step(token)
            mx.async_eval(upcoming[1])
        value = token.item()
        drafter.commit([prompt_cache.tokens[-1]])
        now = time.perf_counter()
        length.update(0, 0, None if last is None else now - last)
        last = now
        if k:
            yield value
            return token, hidden, k
        prompt_cache.tokens.append(value)  # queued above: the caches hold it
        yield value
        hidden, token = upcoming
