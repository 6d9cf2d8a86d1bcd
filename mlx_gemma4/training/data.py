"""Fine-tuning data: JSONL chat conversations -> token ids, loss masks and media -> batches.

A data folder holds `train.jsonl` (and `valid.jsonl` for validation), one conversation a line:
`{"messages": [...], "tools": [...]}` in the package's message format (text, image, audio and
video parts; tool calls and tool responses). Relative media paths are read from the folder.

The conversation is rendered with the checkpoint's own chat template and encoded exactly as
`stream_generate` encodes a prompt. The loss covers the model's turns only, found by the
template's markers: from after `<|turn>` + the model's role line to the `<turn|>` that closes
the turn (included: the model learns to stop), less the tool responses inside the turn (their
opening `<|tool_response>` stays: it is the token a calling model stops on).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import Gemma4Error, TrainingDataError
from ..files import access_error
from ..processing.images import DEFAULT_BUDGET
from ..processing.processor import (
    AUDIO_TOKEN,
    IMAGE_TOKEN,
    TURN_END,
    VIDEO_TOKEN,
    Media,
    Processor,
)

TRAIN_FILE, VALID_FILE = "train.jsonl", "valid.jsonl"
TURN_OPEN = "<|turn>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
OVERFLOW = ("truncate", "refuse")
_MEDIA_KINDS = ("image", "video", "audio")
_ROLE_LINE_TOKENS = 16  # the role line after <|turn> is a few tokens long


@dataclass
class Example:
    """One encoded conversation: `ids`, `trained[i]` True where token i is the model's own,
    its media, and where it came from (`file:line`)."""

    ids: list[int]
    trained: list[bool]
    media: Media
    source: str

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Batch:
    """Right-padded inputs [B, T], the flat positions whose next token is trained, those
    tokens, and each row's media (padding is never attended to by real tokens: causal)."""

    inputs: mx.array
    positions: mx.array  # flat indices into [B * T]
    labels: mx.array
    media: list[Media]
    tokens: int  # trained tokens
    lengths: list[int]


# ----------------------------------------------------------------------------- reading


def read_jsonl(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; a malformed line is one clear error."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrainingDataError(f"{file}: not UTF-8 text ({e.reason})") from e
    except OSError as e:
        raise access_error(file, "read", e) from e
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingDataError(f"{file}:{number}: not valid JSON ({e.msg})") from e
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TrainingDataError(
                f'{file}:{number}: each line must be an object {{"messages": [...]}} with a list '
                "of message objects"
            )
        yield number, record


def _resolve_media(messages: list[dict], folder: Path) -> list[dict]:
    """Media paths relative to the data folder made absolute."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                value = part.get(kind) if kind in _MEDIA_KINDS else None
                if isinstance(value, str) and not Path(value).is_absolute():
                    part = {**part, kind: str(folder / value)}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


# ----------------------------------------------------------------------------- loss mask


@dataclass(frozen=True)
class TurnMarkers:
    """The chat template's markers, as token ids, and the model's role name."""

    turn_open: int
    turn_end: int
    model_role: str
    response_open: int | None
    response_close: int | None

    @classmethod
    def of(cls, processor: Processor) -> TurnMarkers:
        turn_open, turn_end = processor.token_id(TURN_OPEN), processor.token_id(TURN_END)
        if turn_open is None or turn_end is None:
            raise TrainingDataError(
                f"the tokenizer has no {TURN_OPEN} / {TURN_END} tokens; the loss mask needs "
                "Gemma 4's turn markers"
            )
        # the generation prompt is the opening of a model turn: its role line names the role
        user = [{"role": "user", "content": "x"}]
        plain = processor.apply_chat_template(user, add_generation_prompt=False)
        prompted = processor.apply_chat_template(user, add_generation_prompt=True)
        opening = prompted[len(plain) :]
        if not opening.startswith(TURN_OPEN) or "\n" not in opening:
            raise TrainingDataError(
                f"the chat template's generation prompt {opening!r} does not open a turn with "
                f"{TURN_OPEN}ROLE and a newline; cannot tell the model's turns apart"
            )
        role = opening[len(TURN_OPEN) :].split("\n", 1)[0].strip()
        return cls(
            turn_open,
            turn_end,
            role,
            processor.token_id(TOOL_RESPONSE_OPEN),
            processor.token_id(TOOL_RESPONSE_CLOSE),
        )


def model_token_mask(processor: Processor, markers: TurnMarkers, ids: list[int]) -> list[bool]:
    """True for each token the model itself writes in the conversation `ids`."""
    trained = [False] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i] != markers.turn_open:
            i += 1
            continue
        role, body = _role_line(processor, ids, i + 1)
        i = body
        if role != markers.model_role:
            continue
        in_response = False
        while i < len(ids):
            token = ids[i]
            if in_response:
                in_response = token != markers.response_close
            else:
                trained[i] = True
                in_response = token == markers.response_open
            i += 1
            if token == markers.turn_end:
                break
    return trained


def _role_line(processor: Processor, ids: list[int], start: int) -> tuple[str, int]:
    """The role after a turn opening at `start`, and where the turn's body begins."""
    for end in range(start + 1, min(start + _ROLE_LINE_TOKENS, len(ids)) + 1):
        text = processor.decode(ids[start:end])
        if "\n" in text:
            return text.split("\n", 1)[0].strip(), end
    return "", start


# ----------------------------------------------------------------------------- encoding


def encode_conversation(
    processor: Processor,
    record: dict[str, Any],
    markers: TurnMarkers,
    folder: Path = Path("."),
    source: str = "",
    max_soft_tokens: int = DEFAULT_BUDGET,
) -> Example:
    """One `{"messages": [...], "tools": [...]}` record -> an `Example` (media processed,
    `max_soft_tokens` per image)."""
    messages = _resolve_media(record["messages"], folder)
    tools = record.get("tools")
    try:
        ids, media = processor.prepare(
            messages, max_soft_tokens=max_soft_tokens, add_generation_prompt=False, tools=tools
        )
    except TrainingDataError:
        raise
    except Gemma4Error as e:  # an image that does not load, a bad tool declaration, ...
        raise TrainingDataError(f"{source}: {e}") from e
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise TrainingDataError(
            f"{source}: not a conversation the template can render ({e})"
        ) from e
    trained = model_token_mask(processor, markers, ids)
    if not any(trained):
        raise TrainingDataError(f"{source}: the conversation has no assistant turn to learn from")
    return Example(ids, trained, media, source)


def _media_token_ids(processor: Processor) -> set[int]:
    return {t for t in map(processor.token_id, (IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN)) if t}


def fit_length(
    example: Example, max_length: int, overflow: str, media_ids: set[int]
) -> Example | None:
    """`example` cut to `max_length` tokens ("truncate") or refused ("refuse"); a cut that
    would split media or leave no trained token is refused too (one clear line)."""
    if len(example) <= max_length:
        return example
    if overflow not in OVERFLOW:
        raise TrainingDataError(f"overflow must be one of {', '.join(OVERFLOW)} (got {overflow})")
    what = f"{example.source}: {len(example)} tokens, over --max-seq-len {max_length}"
    if overflow == "refuse":
        raise TrainingDataError(f"{what}; raise the limit or use --truncate")
    if any(t in media_ids for t in example.ids[max_length:]):
        raise TrainingDataError(f"{what}, and cutting it would split its media; raise the limit")
    ids, trained = example.ids[:max_length], example.trained[:max_length]
    if not any(trained[1:]):
        raise TrainingDataError(f"{what}, and nothing of the model's turns fits; raise the limit")
    return Example(ids, trained, example.media, example.source)


def load_split(
    processor: Processor,
    file: Path,
    max_length: int | None = None,
    overflow: str = "truncate",
) -> list[Example]:
    """Every conversation of one JSONL file, encoded (and fitted to `max_length`)."""
    markers = TurnMarkers.of(processor)
    media_ids = _media_token_ids(processor)
    examples = []
    for number, record in read_jsonl(file):
        example = encode_conversation(processor, record, markers, file.parent, f"{file}:{number}")
        if max_length is not None:
            example = fit_length(example, max_length, overflow, media_ids)
        examples.append(example)
    if not examples:
        raise TrainingDataError(f"{file}: no conversations in the file")
    return examples


def require_data_folder(folder: str | Path) -> Path:
    """`folder` if it holds a train.jsonl, else one clear error (checked before any work)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingDataError(f"{folder}: no such data folder")
    if not (folder / TRAIN_FILE).is_file():
        raise TrainingDataError(
            f"{folder}: no {TRAIN_FILE}; put one conversation a line there "
            '({"messages": [...]}), and optionally a valid.jsonl'
        )
    return folder


def load_dataset(
    processor: Processor,
    folder: str | Path,
    max_length: int | None = None,
    overflow: str = "truncate",
) -> tuple[list[Example], list[Example]]:
    """(train, valid) examples of a data folder; `valid` is empty without valid.jsonl."""
    folder = require_data_folder(folder)
    train = load_split(processor, folder / TRAIN_FILE, max_length, overflow)
    valid_file = folder / VALID_FILE
    valid = load_split(processor, valid_file, max_length, overflow) if valid_file.is_file() else []
    return train, valid


# ----------------------------------------------------------------------------- batching


def make_batch(examples: list[Example], pad_id: int = 0) -> Batch:
    """Right-pad a group of examples into one batch of next-token pairs."""
    width = max(len(e) for e in examples) - 1
    inputs = np.full((len(examples), width), pad_id, dtype=np.int32)
    positions, labels = [], []
    for row, example in enumerate(examples):
        n = len(example) - 1
        inputs[row, :n] = example.ids[:-1]
        for t in range(n):
            if example.trained[t + 1]:
                positions.append(row * width + t)
                labels.append(example.ids[t + 1])
    return Batch(
        mx.array(inputs),
        mx.array(np.array(positions, dtype=np.int32)),
        mx.array(np.array(labels, dtype=np.int32)),
        [e.media for e in examples],
        len(labels),
        [len(e) - 1 for e in examples],
    )


def length_batches(n_examples: int, lengths: list[int], batch_size: int) -> list[list[int]]:
    """Groups of example indices of similar length (sorted, then cut into batches), so that
    little of a batch is padding."""
    order = sorted(range(n_examples), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def iterate_batches(
    examples: list[Example], batch_size: int, seed: int = 0, pad_id: int = 0
) -> Iterator[Batch]:
    """Batches by length, in a shuffled order drawn anew each epoch from `seed`, forever.

    The sequence depends only on the examples, `batch_size` and `seed`, so a resumed run
    skips to exactly the batch it stopped at."""
    groups = length_batches(len(examples), [len(e) for e in examples], batch_size)
    epoch = 0
    while True:
        order = np.random.default_rng((seed, epoch)).permutation(len(groups))
        for g in order:
            yield make_batch([examples[i] for i in groups[g]], pad_id)
        epoch += 1


def validation_batches(examples: list[Example], batch_size: int, pad_id: int = 0) -> list[Batch]:
    groups = length_batches(len(examples), [len(e) for e in examples], batch_size)
    return [make_batch([examples[i] for i in g], pad_id) for g in groups]
