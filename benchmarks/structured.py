"""Structured output: the grammar engines' token-mask time at Gemma 4's 262k vocabulary, and decode
speed with and without a JSON schema.

    python benchmarks/structured.py [--decode 48] [--layers 5] [--rounds 3] [--no-decode|--no-masks]

No Gemma tokenizer can be downloaded here, so the mask table uses a stand-in of the same size and
kind, built once: a SentencePiece-style BPE (`\u2581` for spaces, byte fallback) trained with the
`tokenizers` library on ~40 MB of Python's standard library and generated JSON to 262,144 pieces,
with Gemma's control tokens (the tool-call ones included) and the 256 byte pieces. Each engine
compiles one moderately complex JSON schema, then walks one valid document token by token: the
mask for each position is computed (timed), then the document's token is consumed. The same
document and tokens go through every engine. Engines that are not installed are skipped.

The MLX table times turning a packed bitmask (32 tokens per 32-bit word) into masked logits.

The decode table runs `stream_generate` on the E2B-shaped checkpoint (real layer shapes, few
layers, the stand-in tokenizer) greedily, with no constraint and with a JSON schema through
`stream_generate(..., json_schema=...)`, and reports decode tokens/s of each (median step
interval).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path

from common import CACHE, base_parser, e2b_shaped_checkpoint, parse, print_table

VOCAB = 262_144
# Gemma 4's control tokens at the ids the real vocabulary uses where known (tests/checkpoints.py);
# the tool-calling ones at free low ids.
CONTROL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
BYTES_AT = 200
WHITESPACE_PIECES = ["\u2581" * n for n in range(2, 32)] + ["\n" * n for n in range(1, 8)] + ["\t"]

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "name": {"type": "string", "minLength": 1, "maxLength": 60},
        "status": {"enum": ["draft", "active", "archived"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "owner": {
            "type": "object",
            "properties": {
                "email": {"type": "string", "format": "email"},
                "age": {"type": "integer", "minimum": 18, "maximum": 120},
                "verified": {"type": "boolean"},
            },
            "required": ["email", "verified"],
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number", "exclusiveMinimum": 0},
                    "note": {"type": ["string", "null"]},
                },
                "required": ["sku", "quantity", "price"],
            },
        },
    },
    "required": ["id", "name", "status", "items"],
}
DOCUMENT = {
    "id": "ABC-1234",
    "name": "Quarterly order for the north-east warehouse",
    "status": "active",
    "score": 87.5,
    "tags": ["priority", "bulk", "repeat customer"],
    "owner": {"email": "jane.doe@example.com", "age": 41, "verified": True},
    "items": [
        {"sku": "X-100", "quantity": 12, "price": 3.25, "note": None},
        {"sku": "Y-220", "quantity": 1, "price": 149.0, "note": "fragile, keep upright"},
        {"sku": "Z-7", "quantity": 250, "price": 0.04},
    ],
}


# --- the stand-in tokenizer -------------------------------------------------------------------


def training_text(limit: int = 40_000_000):
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for file in sorted(root.rglob("*.py")):
        text = file.read_text(errors="ignore")
        total += len(text)
        yield text
        if total > limit:
            break
    rng = random.Random(0)
    keys = "name id value items price tags user email city count enabled status score title".split()
    values = [lambda: rng.randint(-1000, 1000), rng.random, lambda: "text " * rng.randint(0, 3)]
    for _ in range(20_000):
        document = {rng.choice(keys): rng.choice(values)() for _ in range(rng.randint(1, 6))}
        yield json.dumps(document, indent=rng.choice([None, 2]))


def gemma_sized_tokenizer():
    """A 262,144-piece SentencePiece-style BPE with byte fallback (built once, then cached)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    folder = CACHE / "gemma-sized-tokenizer"
    if not (folder / "tokenizer.json").exists():
        print(f"training a {VOCAB}-piece tokenizer into {folder} (once) ...", file=sys.stderr)
        reserved = len(CONTROL_TOKENS) + 256 + len(WHITESPACE_PIECES)
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB - reserved, min_frequency=2, limit_alphabet=2000, show_progress=False
        )
        learner = Tokenizer(models.BPE(byte_fallback=True))
        learner.normalizer = normalizers.Replace(" ", "\u2581")
        learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        learner.train_from_iterator(training_text(), trainer)
        learned = json.loads(learner.to_str())["model"]
        pieces = sorted(learned["vocab"], key=learned["vocab"].get)

        vocab = {text: i for i, text in CONTROL_TOKENS.items()}
        vocab.update({f"<0x{b:02X}>": BYTES_AT + b for b in range(256)})
        taken = set(vocab.values())
        free = (i for i in range(VOCAB) if i not in taken)
        for piece in WHITESPACE_PIECES + pieces:
            if piece not in vocab:
                vocab[piece] = next(free)
        vocab.update({f"<unused{i}>": i for i in free})
        merges = [
            tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]
        ]
        core = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
        core.normalizer = normalizers.Replace(" ", "\u2581")
        core.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        core.add_special_tokens([AddedToken(t, special=True) for t in CONTROL_TOKENS.values()])
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=core,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
        )
        tokenizer.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


# --- the engines, each: (tokenizer info, compile, mask-and-consume walk) ------------------------


def token_bytes(tokenizer) -> list[bytes]:
    """What each id writes: `\u2581` is a space, `<0xNN>` one byte; control tokens nothing."""
    out = [b""] * VOCAB
    special = set(tokenizer.all_special_ids) | set(CONTROL_TOKENS)
    for piece, i in tokenizer.get_vocab().items():
        if i in special or piece.startswith("<unused"):
            continue
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = bytes([int(piece[3:5], 16)])
        else:
            out[i] = piece.replace("\u2581", " ").encode()
    return out


def walk(mask, consume, tokens: list[int]) -> list[float]:
    """Seconds per mask along `tokens` (each token consumed after its mask)."""
    seconds = []
    for token in tokens:
        start = time.perf_counter()
        allowed = mask()
        seconds.append(time.perf_counter() - start)
        if not allowed(token):
            raise RuntimeError(f"the engine refused token {token} of the valid document")
        consume(token)
    return seconds


def run_llguidance(tokenizer, schema: str, tokens: list[int]):
    import llguidance
    import llguidance.hf
    import llguidance.numpy
    import numpy as np

    start = time.perf_counter()
    info = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB, eos_token=1)
    info_time = time.perf_counter() - start
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False}
    )
    matcher = llguidance.LLMatcher(info, grammar)
    compile_time = time.perf_counter() - start
    assert not matcher.is_error(), matcher.get_error()
    words = np.zeros((VOCAB + 31) // 32, dtype=np.int32)

    def mask():
        llguidance.numpy.fill_next_token_bitmask(matcher, words[None])
        return lambda t: (words[t // 32] >> (t % 32)) & 1

    return info_time, compile_time, walk(mask, matcher.consume_token, tokens)


def run_xgrammar(tokenizer, schema: str, tokens: list[int]):
    import xgrammar

    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[1])
    info_time = time.perf_counter() - start
    start = time.perf_counter()
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(
        schema, any_whitespace=False, separators=(",", ":")
    )
    matcher = xgrammar.GrammarMatcher(compiled)
    compile_time = time.perf_counter() - start
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB)

    def mask():
        matcher.fill_next_token_bitmask(bitmask)
        words = bitmask[0].numpy()
        return lambda t: (words[t // 32] >> (t % 32)) & 1

    return info_time, compile_time, walk(mask, matcher.accept_token, tokens)


def run_outlines_core(tokenizer, schema: str, tokens: list[int]):
    import numpy as np
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    pieces: dict[bytes, list[int]] = {}
    for i, piece in enumerate(token_bytes(tokenizer)):
        if piece:
            pieces.setdefault(piece, []).append(i)
    vocabulary = Vocabulary(1, pieces)
    info_time = time.perf_counter() - start
    start = time.perf_counter()
    index = Index(build_regex_from_schema(schema, whitespace_pattern=""), vocabulary)
    guide = Guide(index)
    compile_time = time.perf_counter() - start
    words = np.zeros((VOCAB + 31) // 32, dtype=np.int32)

    def mask():
        guide.write_mask_into(words.ctypes.data, words.size, words.itemsize)
        return lambda t: (words[t // 32] >> (t % 32)) & 1

    return info_time, compile_time, walk(mask, guide.advance, tokens)


ENGINES = {
    "llguidance": run_llguidance,
    "xgrammar": run_xgrammar,
    "outlines-core": run_outlines_core,
}


def engine_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def mask_table(tokenizer) -> None:
    schema = json.dumps(SCHEMA)
    document = json.dumps(DOCUMENT, separators=(",", ":"))
    tokens = tokenizer.encode(document, add_special_tokens=False)
    print(f"document: {len(document)} characters, {len(tokens)} tokens; vocabulary {VOCAB}")
    rows = []
    for name, run in ENGINES.items():
        version = engine_version(name)
        if version is None:
            rows.append([name, "not installed", "", "", "", "", ""])
            continue
        info_time, compile_time, seconds = run(tokenizer, schema, tokens)
        ms = sorted(s * 1e3 for s in seconds)
        rows.append(
            [
                f"{name} {version}",
                f"{info_time:.2f} s",
                f"{compile_time * 1e3:.0f} ms",
                f"{statistics.median(ms):.3f}",
                f"{statistics.mean(ms):.3f}",
                f"{ms[int(0.9 * len(ms))]:.3f}",
                f"{ms[-1]:.3f}",
            ]
        )
    print_table(
        "Token mask per position (ms), one JSON schema, 262k vocabulary",
        ["engine", "tokenizer info", "compile", "median", "mean", "p90", "max"],
        rows,
    )


def apply_table(repeats: int = 50) -> None:
    """Seconds to turn a packed bitmask into masked 262k logits, two ways."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    words = rng.integers(-(2**31), 2**31, size=VOCAB // 32, dtype=np.int64).astype(np.int32)
    logits = mx.random.normal((1, VOCAB))
    shifts = mx.arange(32, dtype=mx.uint32)

    def numpy_unpack():
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
        return mx.where(mx.array(bits).astype(mx.bool_), logits, -mx.inf)

    def mlx_shifts():
        packed = mx.array(words.view(np.uint32))
        bits = ((packed[:, None] >> shifts) & 1).reshape(-1)
        return mx.where(bits.astype(mx.bool_), logits, -mx.inf)

    rows = []
    for name, fn in [
        ("numpy unpackbits -> mx.where", numpy_unpack),
        ("MLX shifts -> mx.where", mlx_shifts),
    ]:
        mx.eval(fn())
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(fn())
            seconds.append(time.perf_counter() - start)
        rows.append([name, f"{statistics.median(seconds) * 1e3:.3f}"])
    print_table("Applying a bitmask to 262k logits in MLX (median ms)", ["method", "ms"], rows)


# --- decode speed through stream_generate's logits_processors hook ----------------------------


def checkpoint_with_tokenizer(layers: int) -> Path:
    """The E2B-shaped checkpoint's files beside the stand-in tokenizer's, linked into one folder."""
    weights = e2b_shaped_checkpoint(layers)
    tokenizer = CACHE / "gemma-sized-tokenizer"
    folder = CACHE / f"e2b-shaped-{layers}l-with-tokenizer"
    folder.mkdir(exist_ok=True)
    for source in [*weights.iterdir(), *tokenizer.iterdir()]:
        link = folder / source.name
        if not link.exists():
            link.symlink_to(source)
    return folder


def decode_table(layers: int, decode: int, rounds: int) -> None:
    """Greedy decode tokens/s without and with `json_schema=` (median step interval, best round).

    The schema asks for at least 50 of the mask table's objects, so the random model's answer
    cannot close before `decode` tokens and every step is masked."""
    import mlx.core as mx

    from mlx_gemma4 import load, stream_generate

    model, processor = load(checkpoint_with_tokenizer(layers), dtype=mx.float32)
    schema = {"type": "array", "items": SCHEMA, "minItems": 50}
    prompt = [{"role": "user", "content": "List the orders as JSON."}]
    best: dict[str, float] = {}
    processor_ms: list[float] = []
    for _ in range(rounds):
        for name in ["no schema", "JSON schema"]:
            constrained = {"json_schema": schema} if name == "JSON schema" else {}
            stamps = []
            with timed_constraints(processor_ms):
                for _response in stream_generate(
                    model, processor, prompt, max_tokens=decode, **constrained
                ):
                    stamps.append(time.perf_counter())
            intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            tps = 1 / statistics.median(intervals)
            best[name] = max(best.get(name, 0.0), tps)
    base = best["no schema"]
    cpu = f"{statistics.median(processor_ms):.2f} (mean {statistics.mean(processor_ms):.2f})"
    rows = [
        ["no schema", f"{base:.2f}", "1.00x", ""],
        ["JSON schema", f"{best['JSON schema']:.2f}", f"{best['JSON schema'] / base:.2f}x", cpu],
    ]
    print_table(
        f"Greedy decode on the E2B-shaped checkpoint ({layers} layers), {decode} tokens",
        ["run", "tok/s", "vs no schema", "processor ms per token"],
        rows,
    )


@contextmanager
def timed_constraints(milliseconds: list[float]):
    """Time each constrained processor's own work per call while inside: advancing the matcher,
    the mask, and queueing the masking (the wait for the previous token is not counted)."""
    import mlx.core as mx

    from mlx_gemma4.constrain import ConstrainedLogits

    call = ConstrainedLogits.__call__

    def timed(self, tokens, logits):
        mx.eval(tokens)
        start = time.perf_counter()
        out = call(self, tokens, logits)
        milliseconds.append((time.perf_counter() - start) * 1e3)
        return out

    ConstrainedLogits.__call__ = timed
    try:
        yield
    finally:
        ConstrainedLogits.__call__ = call


def main() -> None:
    parser = base_parser()
    parser.add_argument("--decode", type=int, default=48, help="generated tokens per decode run")
    parser.add_argument("--no-decode", action="store_true", help="only the mask tables")
    parser.add_argument("--no-masks", action="store_true", help="only the decode table")
    args, blas = parse(parser)
    tokenizer = gemma_sized_tokenizer()
    if not args.no_masks:
        mask_table(tokenizer)
        apply_table()
    if not args.no_decode:
        print(f"\nBLAS: {blas}")
        decode_table(args.layers, args.decode, args.rounds)


if __name__ == "__main__":
    main()
