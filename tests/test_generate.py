"""Generation against transformers' `generate`, streaming text, sampling, thinking, stop strings."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import force_tokens, reference_greedy

from mlx_gemma4 import generate, load, stream_generate
from mlx_gemma4.generation import PromptTooLongError


@pytest.mark.parametrize("variant", ["ple_kv_shared", "moe_k_eq_v", "dense"])
def test_greedy_equals_transformers_from_ids(chat_checkpoint, variant):
    folder, reference = chat_checkpoint(variant)
    model, processor = load(folder)
    prompt = [2, *np.random.default_rng(5).integers(5, 90, 30).tolist()]  # longer than the window
    ours = [r.token for r in stream_generate(model, processor, prompt, max_tokens=24)]
    expected = reference_greedy(reference, prompt, 24, processor.stop_token_ids)
    assert ours == expected[: len(ours)]
    assert len(ours) == len(expected) or ours[-1] in processor.stop_token_ids


def test_greedy_equals_transformers_from_chat_messages(chat_checkpoint):
    folder, reference = chat_checkpoint()
    model, processor = load(folder)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]
    ids = processor.apply_chat_template(messages, tokenize=True)
    assert ids[:2] == [2, 105]  # <bos><|turn>
    ours = [r.token for r in stream_generate(model, processor, messages, max_tokens=16)]
    assert ours == reference_greedy(reference, ids, 16, processor.stop_token_ids)[: len(ours)]


def test_response_fields_and_finish_reasons(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    responses = list(stream_generate(model, processor, "hello", max_tokens=5))
    last = responses[-1]
    assert [r.generation_tokens for r in responses] == list(range(1, len(responses) + 1))
    assert last.finish_reason in ("stop", "length")
    assert all(r.finish_reason is None for r in responses[:-1])
    assert last.prompt_tokens == len(processor.encode("hello"))
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0

    forced = force_tokens(processor.encode("abc")[1:])
    responses = list(
        stream_generate(model, processor, "x", max_tokens=10, logits_processors=[forced])
    )
    assert "".join(r.text for r in responses) == "abc"
    assert responses[-1].finish_reason == "stop" and responses[-1].token == 106
    length_capped = stream_generate(
        model, processor, "x", max_tokens=2, logits_processors=[force_tokens([10, 11, 12])]
    )
    assert [r.finish_reason for r in length_capped] == [None, "length"]


def test_streamed_text_is_valid_utf8_at_every_step(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    text = "naïve café 🙂 über 日本"
    tokens = processor.encode(text)[1:]
    assert len(tokens) > len(text)  # multi-byte characters arrive as several byte tokens
    forced = force_tokens(tokens)
    segments = [
        r.text
        for r in stream_generate(
            model, processor, "x", max_tokens=len(tokens) + 1, logits_processors=[forced]
        )
    ]
    assert "".join(segments) == text
    assert all("\ufffd" not in s for s in segments)
    assert any(s == "" for s in segments)  # held back mid-character


def test_thinking_is_separated_from_the_answer(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    sequence = [100, *processor.encode("thought\nlet me see")[1:], 101, *processor.encode("42")[1:]]
    responses = list(
        stream_generate(
            model, processor, "q", max_tokens=40, logits_processors=[force_tokens(sequence)]
        )
    )
    assert "".join(r.thought for r in responses) == "let me see"
    assert "".join(r.text for r in responses) == "42"
    assert (
        generate(model, processor, "q", max_tokens=40, logits_processors=[force_tokens(sequence)])
        == "42"
    )


def test_stop_strings_cut_the_answer(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    forced = force_tokens(processor.encode("one. two. three")[1:])
    responses = list(
        stream_generate(
            model, processor, "x", max_tokens=30, stop=[". t"], logits_processors=[forced]
        )
    )
    assert "".join(r.text for r in responses) == "one"
    assert responses[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])

    def sample(seed):
        return [
            r.token
            for r in stream_generate(
                model, processor, "hi", max_tokens=12, temperature=1.5, seed=seed
            )
        ]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


@pytest.mark.parametrize(
    "options",
    [dict(top_k=3), dict(top_p=0.3), dict(min_p=0.2)],
    ids=["top_k", "top_p", "min_p"],
)
def test_sampling_masks_hold_at_every_step(chat_checkpoint, options):
    model, processor = load(chat_checkpoint()[0])
    seen = []

    def record(_history, logits):
        seen.append(np.array(mx.softmax(logits[0].astype(mx.float32))))
        return logits

    responses = list(
        stream_generate(
            model,
            processor,
            "hi",
            max_tokens=25,
            temperature=2.0,
            seed=0,
            logits_processors=[record],
            **options,
        )
    )
    for probs, response in zip(seen, responses, strict=False):
        order = np.argsort(-probs)
        if "top_k" in options:
            allowed = set(order[: options["top_k"]])
        elif "top_p" in options:
            cumulative = np.cumsum(probs[order])
            allowed = set(order[: np.searchsorted(cumulative, options["top_p"]) + 1])
        else:
            allowed = set(np.flatnonzero(probs >= options["min_p"] * probs.max()))
        assert response.token in allowed


def test_repetition_penalty_changes_greedy_output(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    plain = [r.token for r in stream_generate(model, processor, "hi", max_tokens=20)]
    penalized = [
        r.token
        for r in stream_generate(model, processor, "hi", max_tokens=20, repetition_penalty=5.0)
    ]
    assert len(set(penalized)) >= len(set(plain))
    assert plain != penalized


def test_prompt_longer_than_the_context_is_refused(chat_checkpoint):
    model, processor = load(chat_checkpoint()[0])
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 4096"):
        generate(model, processor, list(range(5, 90)) * 50, max_tokens=10)


def test_placeholders_typed_as_text_are_text_not_media(chat_checkpoint):
    from PIL import Image

    model, processor = load(chat_checkpoint("multimodal")[0])
    image_id = processor.token_id("<|image|>")
    typed = "what does <|image|> or <|audio|> mean?"
    ids, media = processor.prepare([{"role": "user", "content": typed}])
    assert media.images is None and image_id not in ids
    assert typed in processor.decode(ids)  # the characters reach the model as written

    picture = Image.new("RGB", (48, 48), "white")
    content = [{"type": "image", "image": picture}, {"type": "text", "text": typed}]
    history = [
        {"role": "user", "content": "say <|image|>"},
        {"role": "assistant", "content": "<|image|>"},  # an earlier answer with the characters
        {"role": "user", "content": content},
    ]
    ids, media = processor.prepare(history, max_soft_tokens=70)
    blocks = [i for i in range(1, len(ids)) if ids[i] == image_id and ids[i - 1] != image_id]
    assert len(blocks) == 1 and media.images is not None  # one image, one block of soft tokens
    replies = list(stream_generate(model, processor, history, max_tokens=2, max_soft_tokens=70))
    assert replies[-1].generation_tokens == 2


def test_sampling_options_stand_for_the_keyword_arguments(chat_checkpoint):
    from mlx_gemma4 import MediaOptions, SamplingOptions

    model, processor = load(chat_checkpoint()[0])
    prompt = [{"role": "user", "content": "tell me a story"}]
    keywords = dict(max_tokens=12, temperature=0.9, top_k=20, min_p=0.05, seed=3)
    by_keyword = [r.token for r in stream_generate(model, processor, prompt, **keywords)]
    sampling = SamplingOptions(**{**keywords, "temperature": 0.9})
    by_object = [
        r.token
        for r in stream_generate(
            model, processor, prompt, sampling=sampling, media_options=MediaOptions()
        )
    ]
    assert by_object == by_keyword and len(by_keyword) == 12
    other_seed = SamplingOptions(**{**keywords, "seed": 4})
    assert [r.token for r in stream_generate(model, processor, prompt, sampling=other_seed)] != (
        by_keyword
    )
