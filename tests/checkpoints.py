"""Tiny random Gemma 4 checkpoints built by transformers itself, the reference implementation."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 512
WINDOW = 8

_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2

_TEXT_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    sliding_window=WINDOW,
    layer_types=_LAYER_TYPES,
    hidden_size_per_layer_input=0,
    final_logit_softcapping=30.0,
    max_position_embeddings=4096,
)

# variant name -> Gemma4TextConfig overrides
TEXT_VARIANTS = {
    "dense": {},
    "ple_kv_shared": dict(
        num_key_value_heads=1,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=3,
        use_double_wide_mlp=True,
    ),
    "k_eq_v": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
    "moe_k_eq_v": dict(
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=24,
    ),
}


def text_config(variant: str):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**{**_TEXT_BASE, **TEXT_VARIANTS[variant]})


# Multimodal placeholder ids inside the tiny vocabulary (the real ones are 255999 and up).
MM_TOKENS = dict(
    boi_token_id=470,
    eoi_token_id=471,
    image_token_id=472,
    video_token_id=473,
    boa_token_id=474,
    eoa_token_index=475,
    audio_token_id=476,
)


def multimodal_config(bidirectional: bool = False):
    """E2B-like by default; `bidirectional`: 31B-like text, standardized and clipped vision."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4VisionConfig

    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        position_embedding_size=64,
        standardize=bidirectional,
        use_clipped_linears=bidirectional,
    )
    if bidirectional:
        text = text_config("k_eq_v")
        text.use_bidirectional_attention = "vision"
        return Gemma4Config(text_config=text, vision_config=vision, **MM_TOKENS)
    audio = Gemma4AudioConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        subsampling_conv_channels=[128, 16],
        output_proj_dims=48,
    )
    return Gemma4Config(
        text_config=text_config("ple_kv_shared"),
        vision_config=vision,
        audio_config=audio,
        **MM_TOKENS,
    )


@torch.no_grad()
def jitter(model: torch.nn.Module, seed: int) -> None:
    """Move every float parameter and layer scalar off its init (ones hide convention bugs)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        scale = 0.2 if name.endswith("norm.weight") or "scale" in name else 0.05
        param.add_(noise * scale)
    for name, buffer in model.named_buffers():
        if name.endswith("layer_scalar"):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
        elif name.endswith(("input_min", "output_min")) and "vision" in name:
            buffer.fill_(-1.0 - torch.rand((), generator=generator).item())
        elif name.endswith(("input_max", "output_max")) and "vision" in name:
            buffer.fill_(1.0 + torch.rand((), generator=generator).item())
        elif name.endswith("std_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
        elif name.endswith("std_scale"):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))


def to_hub_form(config: dict) -> dict:
    """Rewrite transformers' `per_layer_config` into the top-level keys Hub checkpoints use."""
    text = config.get("text_config", config)
    per_layer = text.pop("per_layer_config", None) or {}
    overrides = next(iter(per_layer.values()), {})
    text["global_head_dim"] = overrides.get("head_dim", text.get("head_dim"))
    if "num_key_value_heads" in overrides:
        text["num_global_key_value_heads"] = overrides["num_key_value_heads"]
    if "text_config" in config:
        config["vocab_size"] = text["vocab_size"]
    return config


def save_reference(model: torch.nn.Module, folder: Path, hub_form: bool = True) -> Path:
    model.save_pretrained(folder)
    if hub_form:
        file = folder / "config.json"
        file.write_text(json.dumps(to_hub_form(json.loads(file.read_text())), indent=2))
    return folder


def build_text(variant: str, folder: Path, seed: int = 0, hub_form: bool = True):
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(text_config(variant)).eval()
    jitter(model, seed)
    save_reference(model, folder, hub_form)
    return model


def build_multimodal(folder: Path, seed: int = 0, bidirectional: bool = False):
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(multimodal_config(bidirectional)).eval()
    jitter(model, seed)
    save_reference(model, folder)
    return model


# Gemma 4's control tokens at their real ids; the rest is characters and byte fallback.
SPECIAL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
    470: "<|image>",
    471: "<image|>",
    472: "<|image|>",
    473: "<|video|>",
    474: "<|audio>",
    475: "<audio|>",
    476: "<|audio|>",
}
_BYTES_AT = 200  # <0x00> .. <0xFF> at ids 200 .. 455
_CHARACTERS = "\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:;'\"-()\n"


def tokenizer_vocab() -> dict[str, int]:
    vocab = {text: i for i, text in SPECIAL_TOKENS.items()}
    vocab.update({f"<0x{b:02X}>": _BYTES_AT + b for b in range(256)})
    free = (i for i in range(VOCAB) if i not in vocab.values())
    vocab.update({c: next(free) for c in _CHARACTERS})
    vocab.update({f"<unused{i}>": i for i in free})
    return vocab


def save_tokenizer(folder: Path, chat_template: str | None = None) -> None:
    """A Gemma-style tokenizer (SentencePiece pieces, byte fallback) over the tiny vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(tokenizer_vocab(), [], unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Replace(" ", "\u2581")
    core.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    core.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS.values()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.add_bos_token = True
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------- permissions


def as_unprivileged(command: list[str]) -> list[str]:
    """`command` run without the power to override file modes when the tests run as root (root
    reads and writes whatever the modes say), so that permission errors are real ones: the
    same user, minus the capabilities that bypass permission checks."""
    import os
    import shutil

    import pytest

    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv is missing: no way to drop privileges")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]


def make_hub_cache(home: Path, repo_id: str, source: Path) -> None:
    """Lay out `source` as huggingface_hub caches a downloaded snapshot."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


# Google's Gemma 4 chat template (interleaved-thinking revision), unchanged from the public copy in
# llama.cpp, models/templates/google-gemma-4-31B-it-interleaved.jinja: reference data for tests.
GEMMA4_TEMPLATE = (Path(__file__).parent / "data" / "gemma4-interleaved.jinja").read_text()


def chat_renderer(folder: Path):
    """`render(messages, template=GEMMA4_TEMPLATE, tools=None, thinking=False,
    generation_prompt=True)`: transformers' apply_chat_template with the tiny tokenizer."""
    from transformers import AutoTokenizer

    save_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def render(
        messages, template=GEMMA4_TEMPLATE, tools=None, thinking=False, generation_prompt=True
    ):
        return tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            enable_thinking=thinking,
        )

    return render


# ----------------------------------------------------------------------------- media inputs

PATCH_PIXELS = 3 * 16 * 16
MELS = 128


def patches(grids: list[tuple[int, int]], max_tokens: int, seed: int = 0):
    """Random pixels and (x, y) patch positions for images of `grids` (patch columns, rows),
    padded to `max_tokens * 9` patches with (-1, -1), as transformers' processor lays them out."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = max_tokens * 9
    pixels = rng.random((len(grids), n, PATCH_PIXELS), dtype=np.float32)
    positions = np.full((len(grids), n, 2), -1, dtype=np.int64)
    for i, (columns, rows) in enumerate(grids):
        grid = np.stack(np.meshgrid(np.arange(columns), np.arange(rows)), -1).reshape(-1, 2)
        positions[i, : len(grid)] = grid
        pixels[i, len(grid) :] = 0.0
    return pixels, positions


def clips(lengths: list[int], seed: int = 0):
    """Random log-mel features for clips of `lengths` frames, zero-padded to the longest, and
    the mask (True: real frame), as transformers' feature extractor lays them out."""
    import numpy as np

    rng = np.random.default_rng(seed)
    frames = max(lengths)
    features = rng.standard_normal((len(lengths), frames, MELS)).astype(np.float32)
    mask = np.arange(frames)[None, :] < np.array(lengths)[:, None]
    return features * mask[..., None], mask


# ----------------------------------------------------------------------------- bfloat16 fidelity

# What each comparison runs: the text model's logits, the vision tower's soft tokens, the audio
# tower's soft tokens (through its embedder), for the same inputs in both implementations.
PRECISION_PARTS = ("text", "vision", "audio")


def relative_l2(ours, reference) -> float:
    """||ours - reference|| / ||reference|| over all elements, in float64."""
    import numpy as np

    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def precision_inputs(part: str, samples: int) -> list[tuple]:
    """`samples` different inputs for `part`, fixed seeds: single inputs are noisy."""
    import numpy as np

    if part == "text":
        rng = np.random.default_rng(100)
        return [(rng.integers(0, VOCAB, size=(1, 24)),) for _ in range(samples)]
    if part == "vision":
        return [patches([(6, 6), (3, 6)], max_tokens=5, seed=100 + i) for i in range(samples)]
    return [clips([61, 37], seed=100 + i) for i in range(samples)]


def _ours(part: str, model, inputs: tuple):
    import mlx.core as mx
    import numpy as np

    arrays = [mx.array(x) for x in inputs]
    if part == "text":
        out = model(*arrays)
    elif part == "vision":
        out = model.vision_tower(*arrays)
    else:
        out = model.audio_features(*arrays)
    return np.array(out.astype(mx.float32))


@torch.no_grad()
def _theirs(part: str, model, inputs: tuple):
    tensors = [torch.tensor(x) for x in inputs]
    if part == "text":
        out = model(tensors[0]).logits
    elif part == "vision":
        pixels, positions = tensors
        out = model.model.vision_tower(
            pixel_values=pixels, pixel_position_ids=positions
        ).last_hidden_state
    else:
        result = model.model.get_audio_features(*tensors, return_dict=True)
        out = result.pooler_output[result.attention_mask]
    return out.float().numpy()


def bfloat16_errors(part: str, folder: Path, reference, samples: int = 16) -> tuple[float, float]:
    """(ours, transformers'): relative error of each implementation's bfloat16 output against
    its own float32 output on the same checkpoint, averaged over `samples` inputs."""
    import copy

    import numpy as np

    from mlx_gemma4 import load_model

    ours = {dtype: load_model(folder, dtype=dtype) for dtype in ("float32", "bfloat16")}
    theirs = {"float32": reference, "bfloat16": copy.deepcopy(reference).to(torch.bfloat16)}
    errors: tuple[list[float], list[float]] = ([], [])
    for inputs in precision_inputs(part, samples):
        for run, models, out in ((_ours, ours, errors[0]), (_theirs, theirs, errors[1])):
            exact = run(part, models["float32"], inputs)
            out.append(relative_l2(run(part, models["bfloat16"], inputs), exact))
    return float(np.mean(errors[0])), float(np.mean(errors[1]))


# ----------------------------------------------------------------------------- tool tokens

# Gemma 4's function-calling control tokens, placed on unused ids of the tiny vocabulary.
TOOL_TOKENS = {
    107: "<|tool>",
    108: "<tool|>",
    109: "<|tool_call>",
    110: "<tool_call|>",
    111: "<|tool_response>",
    112: "<tool_response|>",
    113: '<|"|>',
}


def add_tool_tokens(folder: Path) -> None:
    """Make the tokenizer saved in `folder` (by `save_tokenizer`) know the tool tokens as single
    special tokens, as Gemma 4's own tokenizer does."""
    import json

    file = folder / "tokenizer.json"
    data = json.loads(file.read_text())
    vocab = data["model"]["vocab"]
    for token_id, text in TOOL_TOKENS.items():
        del vocab[f"<unused{token_id}>"]
        vocab[text] = token_id
        data["added_tokens"].append(
            {
                "id": token_id,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    file.write_text(json.dumps(data))


def scripted_turns(turns: list[list[int]], end: int = 106):
    """A logits processor that makes the model emit `turns[i]` in the i-th generation it serves,
    then `end` (`<turn|>`); the model's forward pass still runs at every step. A generation
    starts where the history it is handed does not grow by one token, so one processor can
    serve the several generations of an agent loop."""
    import mlx.core as mx

    state = {"turn": -1, "length": -1, "position": 0}

    def processor(history, logits):
        length = history.shape[-1]
        if length != state["length"] + 1:
            state["turn"], state["position"] = state["turn"] + 1, 0
        state["length"] = length
        turn = turns[state["turn"]] if state["turn"] < len(turns) else []
        token = turn[state["position"]] if state["position"] < len(turn) else end
        state["position"] += 1
        return mx.where(mx.arange(logits.shape[-1]) == token, 0.0, -mx.inf)[None]

    return processor


# ----------------------------------------------------------------------------- outlier grid
# Tiny MLX text models with weights shaped like a trained LLM's in ways TurboQuant was not tuned
# on: the weight-quantization grid of tests/test_turboquant_grid.py and benchmarks/quantize.py.

# shape name -> (hidden, intermediate, heads, kv heads, head dim, full-attention head dim)
GRID_SHAPES = {
    "64x128": (64, 128, 4, 2, 16, 32),
    "96x352": (96, 352, 4, 2, 16, 32),  # 12-Hadamard rows; 352 = 320 + 32 block-diagonal
    "352x192": (352, 192, 2, 1, 32, 64),  # the residual stream itself is block-diagonal
}


def _clustered_channels(rng, shape):
    """Student-t (2.5 dof) entries; a contiguous run of input channels at the end 12x larger."""
    entries = rng.standard_t(2.5, size=shape)
    entries[..., -4:] *= 12.0
    return entries


def _scaled_rows_and_columns(rng, shape):
    """Gaussian entries times log-normal row and column scales, and one input channel 30x."""
    entries = rng.standard_normal(shape)
    entries *= rng.lognormal(0.0, 1.0, size=(*shape[:-1], 1))
    entries *= rng.lognormal(0.0, 0.75, size=shape[-1])
    entries[..., rng.integers(shape[-1])] *= 30.0
    return entries


def _sparse_spikes(rng, shape):
    """Laplace entries with one in 500 a spike 30x larger, anywhere in the matrix."""
    entries = rng.laplace(size=shape)
    entries[rng.random(shape) < 0.002] *= 30.0
    return entries


GRID_PATTERNS = {
    "clustered": _clustered_channels,
    "rows+cols": _scaled_rows_and_columns,
    "spikes": _sparse_spikes,
}


def outlier_text_model(shape: str, pattern: str, seed: int, layers: int = 3):
    """A float32 MLX text model of `GRID_SHAPES[shape]` whose projections follow `pattern`.

    Projections keep the initializer's RMS; q/k norm gains are 0.25 and post-norm gains 0.2, the
    scales of a trained model, so that quantization perturbs the output rather than scrambling it.
    The tied embeddings shrink with width as if it were 64 wide: at their initial scale a wide
    model's logits mostly repeat the input token, which no quantization error can move.
    """
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_gemma4.config import ModelConfig
    from mlx_gemma4.models.gemma4 import Model

    hidden, intermediate, heads, kv_heads, head_dim, full_head_dim = GRID_SHAPES[shape]
    config = ModelConfig.from_dict(
        dict(
            model_type="gemma4_text",
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            global_head_dim=full_head_dim,
            sliding_window=WINDOW,
            layer_types=(_LAYER_TYPES * layers)[: layers - 1] + ["full_attention"],
            hidden_size_per_layer_input=0,
            final_logit_softcapping=30.0,
            max_position_embeddings=4096,
        )
    )
    mx.random.seed(seed)
    model = Model(config)
    rng = np.random.default_rng(seed)
    changed = {}
    for key, value in tree_flatten(model.parameters()):
        array = np.array(value)
        if array.ndim == 2 and "proj" in key:
            entries = GRID_PATTERNS[pattern](rng, array.shape)
            rms = np.sqrt((array.astype(np.float64) ** 2).mean())
            changed[key] = mx.array((entries * rms / np.sqrt((entries**2).mean())).astype("f4"))
        elif key.endswith("embed_tokens.weight"):
            changed[key] = value * (64 / hidden) ** 0.5
        elif key.endswith(("q_norm.weight", "k_norm.weight")):
            changed[key] = value * 0.25
        elif ".post_" in key and key.endswith("norm.weight"):
            changed[key] = value * 0.2
    model.update(tree_unflatten(list(changed.items())))
    mx.eval(model.parameters())
    return model


# A tool and a schema small enough for a tiny model's constrained decoding (short strings).
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
}
