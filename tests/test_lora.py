"""LoRA fine-tuning: training forward = inference forward, gradients, learning, frozen weights,
fusing, loss masks, resume."""

from __future__ import annotations

import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import WINDOW, add_tool_tokens
from conftest import random_image, reference_logits, relative_error, to_numpy, tones
from mlx.utils import tree_flatten, tree_map

from mlx_gemma4 import load, load_model
from mlx_gemma4.quantize import quantize_model
from mlx_gemma4.training import (
    LoRASettings,
    TrainingOptions,
    apply_lora,
    batch_loss,
    fuse,
    load_adapter,
    make_batch,
    train,
    training_logits,
)
from mlx_gemma4.training.data import TurnMarkers, encode_conversation
from mlx_gemma4.training.lora import LoRAExpertLinear, LoRAExperts, LoRALinear

# two short conversations the tiny model can learn by heart
MEMORIZE = [
    [
        {"role": "user", "content": "name a color"},
        {"role": "assistant", "content": "blue"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "and a fruit?"},
        {"role": "assistant", "content": "a pear"},
    ],
]


def examples(processor, conversations, budget: int = 280):
    markers = TurnMarkers.of(processor)
    return [
        encode_conversation(
            processor, {"messages": c}, markers, source=f"test:{i}", max_soft_tokens=budget
        )
        for i, c in enumerate(conversations)
    ]


def sharpen(model) -> None:
    """Scale the final norm: a tiny random model's normed hidden states against its small
    tied embeddings bound the logits to a few units (a loss floor near 2.6 over 512 tokens),
    which no adapter can lift; a memorization set needs room for confident logits."""
    model.language_model.norm.weight = model.language_model.norm.weight * 10


def frozen_state(model) -> dict[str, np.ndarray]:
    """Every parameter that is not a LoRA factor, as numpy (bit-exact copies), by its path in
    the model without LoRA layers."""
    wrappers = [
        path for path, m in model.named_modules() if isinstance(m, LoRALinear | LoRAExpertLinear)
    ]

    def unwrapped(key: str) -> str:
        for path in wrappers:
            if key.startswith(f"{path}.linear."):
                return f"{path}.{key[len(path) + 8 :]}"
        return key

    return {
        unwrapped(k): np.array(v)
        for k, v in tree_flatten(model.parameters())
        if not k.endswith(("lora_a", "lora_b"))
    }


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("variant", ["ple_kv_shared", "moe_k_eq_v"])
def test_training_forward_equals_inference_forward(tiny, token_ids, variant):
    """The training forward (no caches) gives the logits generation's forward gives, past the
    sliding window and through the KV-shared layers, and the reference's."""
    folder, reference = tiny(variant)
    model = load_model(folder, dtype="float32")
    assert variant != "ple_kv_shared" or model.config.text_config.num_kv_shared_layers > 0
    ids = token_ids(2, 3 * WINDOW + 1)
    trained = to_numpy(training_logits(model, mx.array(ids)))
    inference = to_numpy(model(mx.array(ids), cache=model.make_cache()))
    np.testing.assert_allclose(trained, inference, atol=1e-5)
    assert relative_error(trained, reference_logits(reference, ids)) < 1e-4


def test_training_forward_with_media_equals_inference(chat_checkpoint):
    """Image and audio soft tokens enter the training forward as they enter a prompt."""
    folder, _ = chat_checkpoint("multimodal")
    model, processor = load(folder, dtype="float32")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": random_image(96, 64, seed=1)},
                {"type": "audio", "audio": tones(1.0)},
                {"type": "text", "text": "what is this?"},
            ],
        },
        {"role": "assistant", "content": "a cat"},
    ]
    (example,) = examples(processor, [messages])
    inputs = processor(messages, add_generation_prompt=False)
    assert inputs["input_ids"][0].tolist() == example.ids
    trained = training_logits(model, mx.array([example.ids]), [example.media])
    np.testing.assert_allclose(to_numpy(trained), to_numpy(model(**inputs)), atol=1e-5)


# ----------------------------------------------------------------------------- gradients


def test_lora_gradients_match_finite_differences(chat_checkpoint):
    folder, _ = chat_checkpoint("ple_kv_shared")
    model, processor = load(folder, dtype="float32")
    mx.random.seed(0)
    apply_lora(model, LoRASettings(rank=2, alpha=4.0, targets=("q", "v", "down")))
    # non-zero B factors, so that the A factors get a gradient too
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = 0.1 * mx.random.normal(module.lora_b.shape)
    batch = make_batch(examples(processor, MEMORIZE))
    loss, grads = nn.value_and_grad(model, lambda m, b: batch_loss(m, b))(model, batch)
    grads = dict(tree_flatten(grads))
    assert set(grads) == {k for k, _ in tree_flatten(model.trainable_parameters())}
    params = dict(tree_flatten(model.trainable_parameters()))
    rng = np.random.default_rng(0)
    checked = 0
    for key in ["language_model.layers.0.self_attn.q_proj.lora_a"] + [
        k for k in sorted(params) if k.endswith(("v_proj.lora_b", "down_proj.lora_a"))
    ][:3]:
        value = np.array(params[key])
        for _ in range(2):
            index = tuple(rng.integers(0, n) for n in value.shape)
            eps = 3e-3
            losses = []
            for sign in (1, -1):
                moved = value.copy()
                moved[index] += sign * eps
                model.update(_tree(key, mx.array(moved)))
                losses.append(batch_loss(model, batch).item())
            model.update(_tree(key, mx.array(value)))
            numeric = (losses[0] - losses[1]) / (2 * eps)
            analytic = np.array(grads[key])[index]
            assert abs(numeric - analytic) <= 2e-2 * max(abs(analytic), 1e-2), (key, index)
            checked += 1
    assert checked == 8 and np.isfinite(loss.item())


def _tree(key: str, value: mx.array) -> dict:
    from mlx.utils import tree_unflatten

    return tree_unflatten([(key, value)])


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def memorized(chat_checkpoint, tmp_path_factory):
    """A LoRA adapter trained to memorize MEMORIZE: (folder, adapter, result, before, after)."""
    folder, _ = chat_checkpoint("ple_kv_shared")
    model, processor = load(folder, dtype="float32")
    sharpen(model)
    before = frozen_state(model)
    mx.random.seed(0)
    out = tmp_path_factory.mktemp("memorized")
    result = train(
        model,
        examples(processor, MEMORIZE),
        examples(processor, MEMORIZE[:1]),
        out,
        LoRASettings(rank=8, alpha=16.0),
        TrainingOptions(iters=40, batch_size=2, learning_rate=1e-2, val_every=20, save_every=0),
        progress=False,
    )
    return folder, out, result, before, frozen_state(model), model


def test_memorization_loss_falls_by_90_percent(memorized):
    _, out, result, *_ = memorized
    assert result.losses[-1] <= 0.1 * result.losses[0], result.losses
    valid = [r.loss for r in result.reports if r.kind == "valid"]
    assert len(valid) == 2 and valid[-1] < valid[0]
    assert (out / "adapters.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_frozen_parameters_bit_identical_after_training(memorized):
    *_, before, after, model = memorized
    assert before.keys() == after.keys()
    for key in before:
        assert np.array_equal(before[key], after[key]), key
    assert any(isinstance(m, LoRALinear) for _, m in model.named_modules())


def test_fused_model_equals_model_plus_adapter(chat_checkpoint, tmp_path, token_ids):
    """Within 1e-5 of the logits' scale, or within twice float32's own floor where that is
    higher: a tiny random model amplifies rounding, and moving every weight by one part in
    10^7 (what rounding W + BA to float32 does) moves its logits by about 1e-5 already."""
    folder, _ = chat_checkpoint("ple_kv_shared")
    model, processor = load(folder, dtype="float32")
    mx.random.seed(0)
    adapter = tmp_path / "adapter"
    settings = LoRASettings(rank=8, alpha=16.0)
    options = TrainingOptions(iters=8, batch_size=2, learning_rate=2e-3, save_every=0)
    train(model, examples(processor, MEMORIZE), [], adapter, settings, options, progress=False)
    ids = mx.array(token_ids(1, 2 * WINDOW))
    adapted = to_numpy(load_model(folder, dtype="float32", adapter_path=adapter)(ids))
    base = load_model(folder, dtype="float32")
    assert relative_error(to_numpy(base(ids)), adapted) > 1e-2  # the adapter does something
    fuse(load_model(folder, dtype="float32"), adapter, tmp_path / "fused")
    fused = load_model(tmp_path / "fused", dtype="float32")
    assert not any(isinstance(m, LoRALinear) for _, m in fused.named_modules())
    # float32's own floor on this model: every weight moved by one part in 10^7
    nudged = load_model(folder, dtype="float32", adapter_path=adapter)
    nudged.update(tree_map(lambda v: v * (1 + 1e-7), nudged.parameters()))
    floor = relative_error(to_numpy(nudged(ids)), adapted)
    assert relative_error(to_numpy(fused(ids)), adapted) < max(1e-5, 2 * floor)

    # re-quantized to 8 bits: as far from the adapted model as 8 bits take the base from
    # itself, and nearer the adapted model than the base is
    fuse(load_model(folder, dtype="float32"), adapter, tmp_path / "fused-8", bits=8)
    quantized = load_model(tmp_path / "fused-8", dtype="float32")
    assert quantized.config.quantization["bits"] == 8
    assert "scales" in quantized.language_model.layers[0].self_attn.q_proj
    base_8 = load_model(folder, dtype="float32")
    quantize_model(base_8, bits=8)
    own_error = relative_error(to_numpy(base_8(ids)), to_numpy(base(ids)))
    error = relative_error(to_numpy(quantized(ids)), adapted)
    assert error < 2 * own_error
    assert error < relative_error(to_numpy(quantized(ids)), to_numpy(base(ids)))


def test_qlora_on_a_quantized_base_trains_and_fuses(chat_checkpoint, tmp_path, token_ids):
    """QLoRA: LoRA over packed linears; the packed weights stay untouched; fusing re-packs the
    merged modules in the base's scheme, off the adapted model by what 8 bits cost anyway."""
    from mlx_gemma4.saving import save_model

    folder, _ = chat_checkpoint("ple_kv_shared")
    model = load_model(folder, dtype="float32")
    save_model(model, tmp_path / "q8", quantization=quantize_model(model, bits=8, group_size=32))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path / "q8" / name)
    model, processor = load(tmp_path / "q8", dtype="float32")
    before = frozen_state(model)
    result = train(
        model,
        examples(processor, MEMORIZE),
        [],
        tmp_path / "adapter",
        LoRASettings(rank=4, alpha=8.0, targets=("q", "o", "down")),
        TrainingOptions(iters=12, batch_size=2, learning_rate=3e-3, save_every=0),
        progress=False,
    )
    assert np.mean(result.losses[-3:]) < 0.7 * result.losses[0], result.losses
    lora = model.language_model.layers[0].self_attn.q_proj
    assert isinstance(lora, LoRALinear) and "scales" in lora.linear
    assert all(np.array_equal(v, frozen_state(model)[k]) for k, v in before.items())
    ids = mx.array(token_ids(1, 2 * WINDOW))
    adapted = to_numpy(model(ids))
    fuse(load_model(tmp_path / "q8", dtype="float32"), tmp_path / "adapter", tmp_path / "fused")
    fused = load_model(tmp_path / "fused", dtype="float32")
    assert fused.config.quantization["bits"] == 8
    q_proj = fused.language_model.layers[0].self_attn.q_proj
    assert "scales" in q_proj and q_proj.bits == 8 and q_proj.group_size == 32
    own_error = relative_error(
        to_numpy(load_model(tmp_path / "q8", dtype="float32")(ids)),
        to_numpy(load_model(folder, dtype="float32")(ids)),
    )
    assert relative_error(to_numpy(fused(ids)), adapted) < 2 * own_error


def test_lora_on_moe_experts(chat_checkpoint, tmp_path, token_ids):
    """Expert stacks take one low-rank update per expert, trained through the routed gather
    and merged by fuse."""
    folder, _ = chat_checkpoint("moe_k_eq_v")
    model, processor = load(folder, dtype="float32")
    mx.random.seed(0)
    result = train(
        model,
        examples(processor, MEMORIZE),
        [],
        tmp_path / "adapter",
        LoRASettings(rank=2, alpha=4.0, targets=("q", "experts")),
        TrainingOptions(iters=4, batch_size=2, learning_rate=1e-3, save_every=0),
        progress=False,
    )
    assert all(np.isfinite(result.losses))
    experts = model.language_model.layers[0].experts
    assert isinstance(experts, LoRAExperts)
    assert np.abs(np.array(experts.down_proj.lora_b)).max() > 0  # trained
    ids = mx.array(token_ids(1, 2 * WINDOW))
    adapted = to_numpy(model(ids))
    fuse(load_model(folder, dtype="float32"), tmp_path / "adapter", tmp_path / "fused")
    fused = load_model(tmp_path / "fused", dtype="float32")
    assert relative_error(to_numpy(fused(ids)), adapted) < 1e-4


def test_frozen_towers_and_padded_images(chat_checkpoint, tmp_path):
    """Towers stay bit-identical unless --train-vision; with it, images of different sizes
    (padded patches) give finite gradients and the audio tower still does not move."""
    folder, _ = chat_checkpoint("multimodal")
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": random_image(96, 64, seed=1)},
                {"type": "image", "image": random_image(64, 96, seed=2)},
                {"type": "audio", "audio": tones(0.5)},
                {"type": "text", "text": "what is this?"},
            ],
        },
        {"role": "assistant", "content": "two cats"},
    ]
    for train_vision in (False, True):
        model, processor = load(folder, dtype="float32")
        data = examples(processor, [conversation, MEMORIZE[0]], budget=70)
        assert data[0].media.images.position_ids.min() == -1  # the smaller image is padded
        before = frozen_state(model)
        result = train(
            model,
            data,
            [],
            tmp_path / f"vision-{train_vision}",
            LoRASettings(rank=2, alpha=4.0, train_vision=train_vision),
            TrainingOptions(iters=2, batch_size=2, learning_rate=1e-2, save_every=0),
            progress=False,
        )
        assert all(np.isfinite(result.losses))
        after = frozen_state(model)
        assert all(np.array_equal(before[k], after[k]) for k in before)
        vision_factors = [
            v
            for k, v in tree_flatten(model.trainable_parameters())
            if k.startswith("vision_tower.")
        ]
        assert bool(vision_factors) == train_vision
        assert all(np.isfinite(np.array(v)).all() for v in vision_factors)
        if train_vision:  # the vision factors learned something
            assert any(np.abs(np.array(v)).max() > 0 for v in vision_factors[1::2])
        assert not any(
            k.startswith("audio_tower.") for k, _ in tree_flatten(model.trainable_parameters())
        )


# ----------------------------------------------------------------------------- loss mask


def test_loss_mask_covers_exactly_the_model_turns(chat_checkpoint, tmp_path):
    source, _ = chat_checkpoint("ple_kv_shared")
    folder = shutil.copytree(source, tmp_path / "tools")
    add_tool_tokens(folder)
    _, processor = load(folder)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {
            "role": "assistant",
            "tool_calls": [
                {"type": "function", "function": {"name": "get", "arguments": {"a": 1}}}
            ],
        },
        {"role": "tool", "name": "get", "content": '{"t": 3}'},
        {"role": "assistant", "content": "It is 3"},
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get",
                "description": "Weather.",
                "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
            },
        }
    ]
    record = {"messages": conversation, "tools": tools}
    example = encode_conversation(processor, record, TurnMarkers.of(processor))
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=False, tools=tools)
    assert "declaration:get" in rendered
    assert processor.decode(example.ids) == rendered
    runs, current = [], []
    for token, trained in zip(example.ids, example.trained, strict=True):
        if trained:
            current.append(token)
        elif current:
            runs.append(processor.decode(current))
            current = []
    assert runs == [
        "hello there<turn|>",
        "<|tool_call>call:get{a:1}<tool_call|><|tool_response>",
        "It is 3<turn|>",
    ]
    # every trained piece sits in a model turn of the rendered template, in order
    position = 0
    for run in runs:
        position = rendered.index(run, position)
        assert rendered.rfind("<|turn>", 0, position) == rendered.rfind(
            "<|turn>model\n", 0, position
        )


# ----------------------------------------------------------------------------- resume


def test_resume_continues_the_same_curve(chat_checkpoint, tmp_path):
    folder, _ = chat_checkpoint("ple_kv_shared")
    settings = LoRASettings(rank=4, alpha=8.0, dropout=0.1, targets=("q", "v", "gate"))

    def run(out, iters, resume=False):
        model, processor = load(folder, dtype="float32")
        mx.random.seed(0)
        options = TrainingOptions(
            iters=iters, batch_size=1, learning_rate=5e-3, save_every=3, seed=1
        )
        data = examples(processor, MEMORIZE)
        return train(model, data, [], out, settings, options, resume=resume, progress=False)

    whole = run(tmp_path / "whole", 6).losses
    first = run(tmp_path / "split", 3).losses
    resumed = run(tmp_path / "split", 6, resume=True)
    assert resumed.start_step == 3
    np.testing.assert_allclose(first + resumed.losses, whole, rtol=1e-5)
    assert whole[3:] != whole[:3]
    assert (tmp_path / "split" / "0000003_adapters.safetensors").is_file()
    assert (tmp_path / "split" / "0000006_adapters.safetensors").is_file()


def test_adapter_is_applied_by_load(memorized, token_ids):
    folder, adapter, *_ = memorized
    model, _ = load(folder, dtype="float32", adapter_path=adapter)
    again = load_model(folder, dtype="float32")
    load_adapter(again, adapter)
    ids = mx.array(token_ids(1, 5))
    np.testing.assert_array_equal(to_numpy(model(ids)), to_numpy(again(ids)))
    assert not tree_flatten(model.trainable_parameters())  # applied for inference: all frozen


def test_gradient_checkpointing_gives_the_same_steps(chat_checkpoint, tmp_path):
    folder, _ = chat_checkpoint("ple_kv_shared")
    runs = []
    for checkpointed in (False, True):
        model, processor = load(folder, dtype="float32")
        mx.random.seed(0)
        options = TrainingOptions(
            iters=3, batch_size=2, learning_rate=1e-2, save_every=0, grad_checkpoint=checkpointed
        )
        result = train(
            model,
            examples(processor, MEMORIZE),
            [],
            tmp_path / str(checkpointed),
            LoRASettings(rank=4, alpha=8.0),
            options,
            progress=False,
        )
        runs.append(result.losses)
        # the layers are plain decoder layers again afterwards
        assert type(model.language_model.layers[0]).__name__ == "DecoderLayer"
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)
