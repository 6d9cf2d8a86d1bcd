"""Speculative decoding: greedy output identical to plain decoding and to transformers' assisted
generation, the rollback of every cache kind, the sampling rule, bad drafters."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest
from assistants import assistant, assisted_greedy  # noqa: F401  (assistant: a fixture)
from checkpoints import VOCAB
from conftest import id_prompts, media_messages, solo

from mlx_gemma4 import PromptCache, load, load_model, stream_generate
from mlx_gemma4.config import AssistantConfig
from mlx_gemma4.drafters import make_drafter
from mlx_gemma4.errors import DraftModelError
from mlx_gemma4.models.assistant import AssistantModel
from mlx_gemma4.options import SamplingOptions
from mlx_gemma4.quantize import quantize_model
from mlx_gemma4.speculative import DraftLength, TokenChooser, head_costs_per_row

TARGETS = ["ple_kv_shared", "k_eq_v", "moe_k_eq_v"]
PROMPT = 30  # past the sliding window (8): decoding runs on trimmed window caches
K = 3


@pytest.fixture
def every_round_drafts(monkeypatch):
    """Draft K tokens every round, however few the target accepts: the rollback paths run."""
    monkeypatch.setattr(DraftLength, "adaptive", False)


@pytest.fixture(scope="module")
def close_drafter(chat_checkpoint):
    """`close_drafter(variant)`: the target itself at 8 bits, a plain draft model the target
    agrees with often but not always."""
    built = {}

    def get(variant: str):
        if variant not in built:
            folder, _ = chat_checkpoint(variant)
            drafter = load_model(folder)
            quantize_model(drafter, bits=8, group_size=32)
            built[variant] = drafter
        return built[variant]

    return get


def speculative(model, processor, prompt, drafter, **kwargs):
    responses = list(
        stream_generate(model, processor, prompt, draft_model=drafter, num_draft_tokens=K, **kwargs)
    )
    return [r.token for r in responses], responses[-1]


@pytest.mark.usefixtures("every_round_drafts")
@pytest.mark.parametrize("target", TARGETS)
def test_greedy_output_is_the_targets(chat_checkpoint, assistant, close_drafter, target):  # noqa: F811
    folder, reference = chat_checkpoint(target)
    assistant_folder, reference_assistant = assistant(target, ordered=target == "ple_kv_shared")
    model, processor = load(folder)
    prompt = id_prompts([PROMPT], seed=1)[0]
    plain = solo(model, processor, prompt, max_tokens=20)
    assert len(plain) == 20

    tokens, last = speculative(
        model, processor, prompt, load_model(assistant_folder), max_tokens=20
    )
    assert tokens == plain
    assert last.drafted_tokens >= K * 4  # every round drafted (the random drafter is rarely right)

    tokens, last = speculative(model, processor, prompt, close_drafter(target), max_tokens=20)
    assert tokens == plain
    assert 0 < last.accepted_tokens < last.drafted_tokens  # some rounds rolled back, some not

    theirs = assisted_greedy(
        reference, reference_assistant, [prompt], K, 20, processor.stop_token_ids
    )
    assert theirs == plain


@pytest.mark.usefixtures("every_round_drafts")
def test_prompt_cache_reuse_across_turns(chat_checkpoint, close_drafter):
    folder, _ = chat_checkpoint("ple_kv_shared")
    model, processor = load(folder)
    drafter = close_drafter("ple_kv_shared")
    first = id_prompts([PROMPT], seed=2)[0]
    ours, plain = PromptCache(model), PromptCache(model)
    turn, _ = speculative(model, processor, first, drafter, max_tokens=12, prompt_cache=ours)
    assert turn == solo(model, processor, first, max_tokens=12, prompt_cache=plain)
    # the next turn repeats the first and its answer, minus the answer's last token, plus more
    second = first + turn[:-1] + id_prompts([6], seed=3)[0]
    tokens, last = speculative(model, processor, second, drafter, max_tokens=12, prompt_cache=ours)
    assert tokens == solo(model, processor, second, max_tokens=12, prompt_cache=plain)
    assert last.reused_tokens >= len(first) + len(turn) - 2
    assert ours.cache[0].offset == len(ours.tokens)


@pytest.mark.usefixtures("every_round_drafts")
def test_compacted_window_caches_roll_back(chat_checkpoint, close_drafter):
    """A long prompt in short chunks: the window caches have dropped old positions (their
    trim floor is live) before decoding starts."""
    folder, _ = chat_checkpoint("k_eq_v")
    model, processor = load(folder)
    prompt = id_prompts([340], seed=7)[0]
    settings = dict(max_tokens=16, prefill_step_size=64, prompt_cache=None)
    plain = solo(model, processor, prompt, **settings)
    cache = PromptCache(model)
    tokens, last = speculative(
        model, processor, prompt, close_drafter("k_eq_v"), **{**settings, "prompt_cache": cache}
    )
    assert tokens == plain
    assert last.accepted_tokens < last.drafted_tokens
    window = cache.cache[0]
    assert window.start > 0 and window.offset == len(cache.tokens)


@pytest.mark.usefixtures("every_round_drafts")
def test_quantized_kv_cache_rolls_back(chat_checkpoint, assistant, close_drafter):  # noqa: F811
    folder, _ = chat_checkpoint("k_eq_v")
    model, processor = load(folder)
    prompt = id_prompts([PROMPT], seed=4)[0]
    plain = solo(model, processor, prompt, max_tokens=16, kv_bits=4)
    for drafter in (load_model(assistant("k_eq_v", ordered=False)[0]), close_drafter("k_eq_v")):
        tokens, last = speculative(model, processor, prompt, drafter, max_tokens=16, kv_bits=4)
        assert tokens == plain
        assert last.drafted_tokens > last.accepted_tokens


@pytest.mark.usefixtures("every_round_drafts")
@pytest.mark.parametrize("modality", ["image", "audio"])
def test_media_prompts(chat_checkpoint, assistant, modality):  # noqa: F811
    folder, _ = chat_checkpoint("multimodal")
    model, processor = load(folder)
    drafter = load_model(assistant("ple_kv_shared", ordered=True)[0])  # same backbone width
    messages = media_messages(modality)
    plain = solo(model, processor, messages, max_tokens=10)
    tokens, last = speculative(model, processor, messages, drafter, max_tokens=10)
    assert tokens == plain and last.drafted_tokens > 0


def test_adaptive_length_stops_drafting_what_is_rejected(chat_checkpoint, assistant):  # noqa: F811
    folder, _ = chat_checkpoint("dense")
    model, processor = load(folder)
    drafter = load_model(assistant("dense", ordered=False)[0])
    prompt = id_prompts([12], seed=5)[0]
    tokens, last = speculative(model, processor, prompt, drafter, max_tokens=40)
    assert tokens == solo(model, processor, prompt, max_tokens=40)
    # a random drafter is nearly always wrong: after a round or two only the probes draft
    assert 0 < last.drafted_tokens <= 4 * K


def test_length_choice_follows_acceptance_and_cost():
    length = DraftLength(6)
    assert length.next() == 0  # a plain step first, then one draft: both costs measured
    length.update(0, 0, 1.0)
    assert length.next() == 1
    length.update(1, 1, 1.02)
    assert length.draft_seconds == pytest.approx(0.02)  # verifying costs about one step
    length.accepted, length.rejected = 8.0, 2.0
    assert length.best() == 6
    assert length.next() == 3  # the ceiling: 1, then 3 after the kept probe
    length.update(3, 3, 1.06)
    assert length.next() == 5
    length.update(5, 2, 1.1)
    assert length.next() == 4
    length.draft_seconds = 1.0  # every drafted token costs a step: drafting never pays
    assert length.best() == 0
    length.draft_seconds, length.accepted, length.rejected = 0.02, 0.0, 10.0
    assert length.best() == 0
    # undrafted rounds probe with one token, ever more rarely while probes fail; a probe
    # costing 2% of a step waits 4 rounds at first, one costing a whole step 50
    waits = []
    for _ in range(3):
        n = 0
        while length.next() == 0:
            n += 1
        waits.append(n)
        length.update(1, 0, 1.02)
    assert waits == [3, 7, 15]
    length.draft_seconds, length.backoff = 1.0, 1
    assert length.probe_wait() == 50


# --------------------------------------------------------------------------- sampling


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = counts.sum() * probabilities
    seen = expected > 0
    assert counts[~seen].sum() == 0, "a token of probability 0 came out"
    return float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())


# chi-square critical values at p = 0.001 by degrees of freedom
CRITICAL = {5: 20.52, 8: 26.12}


def test_acceptance_rule_keeps_the_target_distribution():
    """The first token out of a round, over many rounds, is distributed as the target's p,
    whatever the drafter's q; each later token likewise given those before it."""
    mx.random.seed(0)
    k, vocab, draws = 2, 6, 1500
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(vocab), size=k + 1).astype(np.float32)
    q = rng.dirichlet(np.ones(vocab), size=k).astype(np.float32)
    chooser = TokenChooser(SamplingOptions(temperature=1.0), [], [0])
    logits = mx.log(mx.array(p))
    distributions = [mx.array(q[i : i + 1]) for i in range(k)]
    counts = np.zeros(vocab, np.int64)
    second = np.zeros((vocab, vocab), np.int64)  # [first draft, next token] when it was kept
    for _ in range(draws):
        drafts = [mx.random.categorical(mx.log(d)) for d in distributions]
        inputs = mx.concatenate([mx.array([0]), *drafts])
        accepted, token = chooser.verify(inputs, logits, drafts, distributions)
        out = [*inputs[1 : accepted + 1].tolist(), token]
        counts[out[0]] += 1
        if len(out) > 1:
            second[out[0], out[1]] += 1
    assert chi_square(counts, p[0]) < CRITICAL[vocab - 1]
    assert chi_square(second.sum(axis=0), p[1]) < CRITICAL[vocab - 1]
    # the drafts' own distribution is far from it: a rule that kept every draft would fail
    assert chi_square((q[0] * draws).round(), p[0]) > 10 * CRITICAL[vocab - 1]


DRAWS = 120  # whole generations: few, so only gross departures show (the rule test is finer)


@pytest.mark.usefixtures("every_round_drafts")
def test_sampled_tokens_follow_the_target(chat_checkpoint, close_drafter):
    """The first two tokens, sampled with drafting many times, against the target's exact
    joint distribution (top-3 sampling keeps it to 9 outcomes)."""
    folder, _ = chat_checkpoint("ple_kv_shared")
    model, processor = load(folder)
    prompt = id_prompts([10], seed=6)[0]
    top = 3
    first = model(mx.array([prompt]))[0, -1]
    first_ids = np.argsort(-np.array(first))[:top]
    joint = {}
    for a in first_ids:
        second = model(mx.array([[*prompt, int(a)]]))[0, -1]
        second_ids = np.argsort(-np.array(second))[:top]
        pa = np.exp(np.array(first)[first_ids]) / np.exp(np.array(first)[first_ids]).sum()
        pb = np.exp(np.array(second)[second_ids]) / np.exp(np.array(second)[second_ids]).sum()
        for b, prob in zip(second_ids, pb, strict=True):
            joint[(int(a), int(b))] = pa[list(first_ids).index(a)] * prob
    outcomes = list(joint)
    counts = np.zeros(len(outcomes), np.int64)
    cache = PromptCache(model)
    drafted = 0
    for seed in range(DRAWS):
        tokens, last = speculative(
            model,
            processor,
            prompt,
            close_drafter("ple_kv_shared"),
            max_tokens=2,
            temperature=1.0,
            top_k=top,
            seed=seed,
            prompt_cache=cache,
        )
        counts[outcomes.index(tuple(tokens))] += 1
        drafted += last.drafted_tokens
    assert drafted >= DRAWS * K
    assert chi_square(counts, np.array([joint[o] for o in outcomes])) < CRITICAL[8]


# --------------------------------------------------------------------------- bad drafters


def drafter_of(vocab: int, backbone: int) -> AssistantModel:
    text = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        hidden_size_per_layer_input=0,
    )
    return AssistantModel(
        AssistantConfig.from_dict({"text_config": text, "backbone_hidden_size": backbone})
    )


@pytest.mark.parametrize(
    ("vocab", "backbone", "message"),
    [
        (VOCAB // 2, 64, r"vocabulary has 256 tokens but the target's has 512"),
        (VOCAB, 32, r"hidden size 32 but the target's is 64"),
    ],
)
def test_mismatched_drafter_is_one_clear_error(chat_checkpoint, vocab, backbone, message):
    folder, _ = chat_checkpoint("dense")
    model, processor = load(folder)
    with pytest.raises(DraftModelError, match=message):
        next(stream_generate(model, processor, [2, 5, 6], draft_model=drafter_of(vocab, backbone)))


class SlowDrafter:
    """A drafter that takes `delay` seconds longer to propose: a timing the length must ignore."""

    def __init__(self, drafter, delay: float):
        self.drafter, self.delay = drafter, delay
        self.needs_hidden = drafter.needs_hidden

    def begin(self, prompt):
        self.drafter.begin(prompt)

    def propose(self, *args):
        time.sleep(self.delay)
        return self.drafter.propose(*args)

    def commit(self, kept):
        self.drafter.commit(kept)


def test_seeded_sampling_repeats_whatever_the_timings(chat_checkpoint, assistant):  # noqa: F811
    """The draft length adapts (acceptance and cost), yet the same seed gives the same tokens
    with a drafter that is fast in one run and slow in the other."""
    folder, _ = chat_checkpoint("ple_kv_shared")
    model, processor = load(folder)
    # a random assistant: with sampling some of its drafts are kept; cheap, so it drafts often
    other = load_model(assistant("ple_kv_shared", ordered=True)[0])
    prompt = id_prompts([10], seed=8)[0]
    runs = []
    for delay in (0.0, 0.05, 0.0):
        cache = PromptCache(model)
        drafter = SlowDrafter(make_drafter(other, model, cache), delay)
        runs.append(
            speculative(
                model,
                processor,
                prompt,
                drafter,
                max_tokens=24,
                temperature=1.0,
                seed=11,
                prompt_cache=cache,
            )
        )
    (tokens, last), *others = runs
    assert all(other == tokens for other, _ in others)
    assert 0 < last.accepted_tokens < last.drafted_tokens
    assert all(o.drafted_tokens == last.drafted_tokens for _, o in others)


@pytest.mark.usefixtures("every_round_drafts")
def test_a_draft_model_with_a_vision_tower_sees_the_image(chat_checkpoint):
    """A plain draft model with its own vision tower drafts from the image's soft tokens: the
    same model at 8 bits is then kept more often than its copy without the tower (which reads
    the image's placeholders as pad tokens), and the output stays the model's."""
    folder, _ = chat_checkpoint("multimodal")
    model, processor = load(folder)
    seeing, blind = load_model(folder), load_model(folder)
    del blind["vision_tower"]  # the same weights, no tower: text only
    for drafter in (seeing, blind):
        quantize_model(drafter, bits=8, group_size=32)
    messages = media_messages("image")
    plain = solo(model, processor, messages, max_tokens=16)
    accepted = {}
    for name, drafter in (("seeing", seeing), ("blind", blind)):
        tokens, last = speculative(model, processor, messages, drafter, max_tokens=16)
        assert tokens == plain
        accepted[name] = last.accepted_tokens / last.drafted_tokens
    assert accepted["seeing"] > accepted["blind"]
    assert accepted["seeing"] > 0.5


@pytest.mark.usefixtures("every_round_drafts")
def test_quantized_head_scores_only_the_positions_checked(chat_checkpoint, assistant):  # noqa: F811
    """With 4-bit weights on the CPU the output head costs per row, so a check scores a
    position only once every draft before it is kept; the output stays the model's."""
    folder, _ = chat_checkpoint("ple_kv_shared")
    model, processor = load(folder)
    quantize_model(model, bits=4, group_size=32)
    assert head_costs_per_row(model)
    prompt = id_prompts([PROMPT], seed=9)[0]
    plain = solo(model, processor, prompt, max_tokens=12)
    scored = []
    logits = model.logits
    model.logits = lambda hidden: scored.append(hidden.shape[0]) or logits(hidden)
    drafter = load_model(assistant("ple_kv_shared", ordered=True)[0])  # rarely right
    tokens, last = speculative(model, processor, prompt, drafter, max_tokens=12)
    assert tokens == plain
    rounds = last.drafted_tokens // K  # each drafted K; one undrafted round came first
    assert sum(scored) == 1 + rounds + last.accepted_tokens < 1 + rounds * (K + 1)
