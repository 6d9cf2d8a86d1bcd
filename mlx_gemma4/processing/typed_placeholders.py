"""Media placeholders typed as text are text, not media.

A message (or an earlier answer) may contain the characters `<|image|>`; only the placeholders
the chat template writes for media parts stand for media. Typed ones are marked before the
template runs and encoded as plain characters, so they never take a medium's place.
"""

from __future__ import annotations

import re
from typing import Any

# private-use characters around the index of a placeholder typed as text
_MARK = "\ue000{}\ue001"
_MARKED = re.compile("\ue000(\\d)\ue001")


def mark_typed_placeholders(
    messages: list[dict[str, Any]], placeholders: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Copies of `messages` whose text has each of `placeholders` replaced by a mark."""

    def mark(text: str) -> str:
        for index, placeholder in enumerate(placeholders):
            text = text.replace(placeholder, _MARK.format(index))
        return text

    def mark_part(part: Any) -> Any:
        is_text = isinstance(part, dict) and part.get("type") == "text"
        if is_text and isinstance(part.get("text"), str):
            return {**part, "text": mark(part["text"])}
        return part

    marked = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            content = mark(content)
        elif isinstance(content, list):
            content = [mark_part(part) for part in content]
        marked.append({**message, "content": content})
    return marked


def encode_marked(text: str, placeholders: tuple[str, ...], encode, encode_plain) -> list[int]:
    """Token ids of `text`: `encode` for the text between marks (the first piece with a BOS),
    `encode_plain(text, split_special_tokens)` without one; marked placeholders as characters."""
    pieces = _MARKED.split(text)  # text, index, text, index, ..., text
    ids = encode(pieces[0])
    for index, piece in zip(pieces[1::2], pieces[2::2], strict=True):
        ids += encode_plain(placeholders[int(index)], True)
        if piece:
            ids += encode_plain(piece, False)
    return ids
