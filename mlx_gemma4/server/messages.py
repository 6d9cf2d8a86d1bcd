"""OpenAI chat messages -> the package's chat messages, with every media part decoded here (in
the request's worker thread), so the engine thread only turns pixels and samples into tokens.

Media come as data URLs (or base64 audio) in the request; a local path is read only when the
server allows it, and then only as an absolute path without `..`, resolved to the real file.
Remote URLs are never fetched.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from ..errors import Gemma4Error, ServerRequestError
from ..memory import format_bytes
from ..processing.audio import load_audio
from ..processing.images import MAX_PIXELS, open_image
from ..processing.video import MAX_FRAMES, Video, load_video
from .schemas import AudioPart, ChatMessage, ImagePart, TextPart, VideoPart

DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.DOTALL)
MIB = 1024 * 1024


@dataclass(frozen=True)
class MediaPolicy:
    """What a request's media may be: local paths only when `allow_local_paths`; each decoded
    part at most `max_media_bytes`, each image at most `max_image_pixels`."""

    allow_local_paths: bool = False
    max_media_bytes: int = 20 * MIB
    max_image_pixels: int = MAX_PIXELS
    max_frames: int = MAX_FRAMES


def chat_messages(messages: list[ChatMessage], policy: MediaPolicy) -> list[dict[str, Any]]:
    """The conversation as `stream_generate` and `BatchGenerator.submit` take it."""
    return [_message(m, f"messages[{i}]", policy) for i, m in enumerate(messages)]


def _message(message: ChatMessage, where: str, policy: MediaPolicy) -> dict[str, Any]:
    result: dict[str, Any] = {"role": message.role}
    content = message.content
    if message.role == "user" and isinstance(content, list):
        result["content"] = [
            _part(part, f"{where}.content[{i}]", policy) for i, part in enumerate(content)
        ]
    else:
        result["content"] = _text_only(content, f"{where}.content", message.role)
    if message.name is not None:
        result["name"] = message.name
    if message.tool_calls:
        result["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    if message.reasoning_content is not None:
        result["reasoning_content"] = message.reasoning_content
    return result


def _text_only(content: str | list | None, where: str, role: str) -> str | None:
    """The text of a message that may carry no media (a system, assistant or tool message)."""
    if content is None or isinstance(content, str):
        return content
    for i, part in enumerate(content):
        if not isinstance(part, TextPart):
            raise ServerRequestError(
                f"{where}[{i}]: a {role} message takes text parts only, not {part.type}"
            )
    return "".join(part.text for part in content)


def _part(part, where: str, policy: MediaPolicy) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        return {"type": "image", "image": load_image(part.image_url.url, where, policy)}
    if isinstance(part, AudioPart):
        data = decode_base64(part.input_audio.data, f"{where}.input_audio.data", policy)
        suffix = "." + re.sub(r"[^a-z0-9]", "", part.input_audio.format.lower())
        return {"type": "audio", "audio": decode_audio(data, suffix, f"{where}.input_audio")}
    if isinstance(part, VideoPart):
        return {"type": "video", "video": load_video_url(part.video_url.url, where, policy)}
    raise ServerRequestError(f"{where}: unsupported content part")  # the schema allows no other


# ---------------------------------------------------------------------------- sources


def decode_base64(data: str, where: str, policy: MediaPolicy) -> bytes:
    if len(data) * 3 // 4 > policy.max_media_bytes:
        raise ServerRequestError(
            f"{where}: larger than the server's limit of {format_bytes(policy.max_media_bytes)} "
            "per media part; send a smaller file"
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ServerRequestError(f"{where}: not valid base64") from None


def _source(url: str, where: str, policy: MediaPolicy) -> bytes | str:
    """The bytes of a data URL, or the resolved path of an allowed local file."""
    match = DATA_URL.match(url)
    if match:
        if ";base64" not in match["params"]:
            raise ServerRequestError(f"{where}: a data URL must be base64-encoded (;base64,)")
        return decode_base64(match["data"], f"{where} data URL", policy)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp"):
        raise ServerRequestError(
            f"{where}: remote URLs are not fetched by this server; send the file as a "
            "base64 data URL"
        )
    if parsed.scheme not in ("", "file"):
        raise ServerRequestError(f"{where}: unsupported URL scheme {parsed.scheme!r}")
    return local_path(unquote(parsed.path) if parsed.scheme == "file" else url, where, policy)


def local_path(path: str, where: str, policy: MediaPolicy) -> str:
    """An absolute local path, `..`-free, as its real (symlink-resolved) location; refused
    unless the server allows local paths."""
    if not policy.allow_local_paths:
        raise ServerRequestError(
            f"{where}: local file paths are not allowed on this server (start it with "
            "--allow-local-paths); send the file as a base64 data URL"
        )
    parts = PurePosixPath(path).parts
    if not PurePosixPath(path).is_absolute():
        raise ServerRequestError(f"{where}: a local path must be absolute, got {path!r}")
    if ".." in parts:
        raise ServerRequestError(f"{where}: '..' is not allowed in a local path")
    return os.path.realpath(path)


def _size_checked(path: str, where: str, policy: MediaPolicy) -> None:
    try:
        size = os.path.getsize(path)
    except OSError:
        return  # the loader names the cause
    if size > policy.max_media_bytes:
        raise ServerRequestError(
            f"{where}: {path} is larger than the server's limit of "
            f"{format_bytes(policy.max_media_bytes)} per media part"
        )


def load_image(url: str, where: str, policy: MediaPolicy) -> Image.Image:
    source = _source(url, f"{where}.image_url.url", policy)
    if isinstance(source, str):
        _size_checked(source, where, policy)
        image = _reraised(lambda: open_image(source), where)
    else:
        try:
            image = Image.open(io.BytesIO(source))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            raise ServerRequestError(
                f"{where}.image_url: not a readable image (corrupt or unsupported format)"
            ) from None
    if image.width * image.height > policy.max_image_pixels:
        raise ServerRequestError(
            f"{where}.image_url: {image.width}x{image.height} exceeds the server's "
            f"{policy.max_image_pixels:,}-pixel limit per image"
        )
    return _reraised(lambda: open_image(image), where) if isinstance(source, bytes) else image


def decode_audio(data: bytes, suffix: str, where: str):
    """Encoded audio bytes (WAV, FLAC, OGG, MP3) -> float32 mono samples at 16 kHz."""
    with tempfile.NamedTemporaryFile(suffix=suffix) as file:
        file.write(data)
        file.flush()
        return _reraised(lambda: load_audio(file.name), where, file.name)


def load_video_url(url: str, where: str, policy: MediaPolicy) -> Video:
    source = _source(url, f"{where}.video_url.url", policy)
    if isinstance(source, str):
        _size_checked(source, where, policy)
        return _reraised(lambda: load_video(source, policy.max_frames), where)
    with tempfile.NamedTemporaryFile(suffix=".mp4") as file:
        file.write(source)
        file.flush()
        return _reraised(lambda: load_video(file.name, policy.max_frames), where, file.name)


def _reraised(load, where: str, temporary: str | None = None):
    """`load()`, its one-line error prefixed with the request field (and a temporary file's
    name, which means nothing to the client, replaced by it)."""
    try:
        return load()
    except Gemma4Error as error:
        message = str(error)
        if temporary is not None:
            message = message.replace(temporary, "the data")
        raise ServerRequestError(f"{where}: {message}") from None
