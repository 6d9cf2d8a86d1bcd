"""The processor: tokenizer, chat template and stop tokens of one checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..config import VisionConfig
from ..errors import ConfigError
from ..tools import normalize_tool_messages, tool_declarations
from .audio import AudioError, AudioFeatures, extract_features, to_wave
from .chat_template import BUILTIN_TEMPLATE, drop_thoughts
from .images import DEFAULT_BUDGET, PATCH_SIZE, POOLING, ImageBatch, ImageError, process_images
from .typed_placeholders import encode_marked, mark_typed_placeholders
from .video import DEFAULT_VIDEO_BUDGET, MAX_FRAMES, VideoError, load_video

Message = dict[str, Any]

# Control tokens of the Gemma 4 vocabulary, looked up by text so tiny test vocabularies work too.
TURN_END = "<turn|>"
CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
# Media placeholders; each expands to start + one soft token (the placeholder) per slot + end.
IMAGE_TOKEN, IMAGE_START, IMAGE_END = "<|image|>", "<|image>", "<image|>"
VIDEO_TOKEN = "<|video|>"  # video frames are wrapped in the image start and end tokens
AUDIO_TOKEN, AUDIO_START, AUDIO_END = "<|audio|>", "<|audio>", "<audio|>"
PLACEHOLDERS = (IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN)


@dataclass
class Media:
    """A prompt's processed media, each kind in prompt order."""

    images: ImageBatch | None = None
    video_frames: ImageBatch | None = None  # the frames of every video, concatenated
    audio: AudioFeatures | None = None  # every clip's log-mel features


def _generation_config_stops(folder: Path) -> list[int]:
    file = folder / "generation_config.json"
    if not file.is_file():
        return []
    try:
        eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]


class Processor:
    """Turns prompts (text, token ids or chat messages) into token ids, and ids back into text.

    `tokenizer` is mlx-lm's `TokenizerWrapper` (its streaming detokenizer is reused).
    """

    def __init__(self, tokenizer, chat_template: str | None, stop_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or BUILTIN_TEMPLATE
        self.has_own_template = chat_template is not None
        self.stop_token_ids = stop_token_ids
        self.channel_open = self.token_id(CHANNEL_OPEN)
        self.channel_close = self.token_id(CHANNEL_CLOSE)
        self.patch_size, self.pooling = PATCH_SIZE, POOLING  # the vision config's, when it has one
        self.extract_audio = extract_features  # 16 kHz clips -> the model's audio features

    @classmethod
    def from_folder(
        cls, folder: Path, config_stop_ids: list[int], vision_config: VisionConfig | None = None
    ) -> Processor:
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
            raise ConfigError(
                f"{folder}: no tokenizer.json or tokenizer.model; copy the tokenizer files of the "
                "original checkpoint into this folder"
            )
        stops = {*config_stop_ids, *_generation_config_stops(folder)}
        tokenizer = load_tokenizer(folder, eos_token_ids=sorted(stops))
        processor = cls(tokenizer, tokenizer._tokenizer.chat_template, set())
        if vision_config is not None:
            processor.patch_size = vision_config.patch_size
            processor.pooling = vision_config.pooling_kernel_size
        turn_end = processor.token_id(TURN_END)
        processor.stop_token_ids = set(tokenizer.eos_token_ids) | (
            {turn_end} if turn_end is not None else set()
        )
        return processor

    def token_id(self, token: str) -> int | None:
        ids = self.tokenizer._tokenizer.convert_tokens_to_ids([token])
        unk = self.tokenizer._tokenizer.unk_token_id
        return ids[0] if ids and ids[0] is not None and ids[0] != unk else None

    @property
    def bos_token(self) -> str:
        return self.tokenizer._tokenizer.bos_token or ""

    def apply_chat_template(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render chat messages with the checkpoint's template (earlier thoughts dropped).

        `tools=[...]` (OpenAI function dicts or Python functions) are declared to the model;
        OpenAI `role: "tool"` messages become the template's tool responses."""
        if template_kwargs.get("tools") is not None:
            template_kwargs["tools"] = tool_declarations(template_kwargs["tools"])
        text = self.tokenizer._tokenizer.apply_chat_template(
            drop_thoughts(normalize_tool_messages(messages)),
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            tokenize=False,
            **template_kwargs,
        )
        return self.encode(text) if tokenize else text

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a BOS is added unless the text already starts with one."""
        add_bos = not (self.bos_token and text.startswith(self.bos_token))
        return self.tokenizer._tokenizer.encode(text, add_special_tokens=add_bos)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def prepare(
        self,
        prompt: str | list[int] | list[Message],
        images: list | None = None,
        max_soft_tokens: int = DEFAULT_BUDGET,
        *,
        videos: list | None = None,
        video_soft_tokens: int = DEFAULT_VIDEO_BUDGET,
        max_frames: int = MAX_FRAMES,
        audio: list | None = None,
        **template_kwargs: Any,
    ) -> tuple[list[int], Media]:
        """Token ids of a prompt (text, token ids or chat messages) and its processed media.

        Each `<|image|>` placeholder (chat messages write one per image part) becomes
        `<|image>` + one image token per soft token + `<image|>`; each `<|video|>` becomes,
        per sampled frame, its `mm:ss` timestamp and the frame's tokens wrapped the same way;
        each `<|audio|>` (audio: a file path or 16 kHz samples) becomes `<|audio>` + one audio
        token per 40 ms soft token + `<audio|>`.
        """
        if not isinstance(prompt, str):
            if not (prompt and isinstance(prompt[0], dict)):
                if images or videos or audio:
                    raise ImageError("media need a text or chat prompt with placeholders")
                return [int(t) for t in prompt], Media()
            if images is None:
                images = _media_parts(prompt, "image")
            if videos is None:
                videos = _media_parts(prompt, "video")
            if audio is None:
                audio = _media_parts(prompt, "audio")
            typed = mark_typed_placeholders(prompt, PLACEHOLDERS)  # text, not media
            prompt = self.apply_chat_template(typed, **template_kwargs)
        images, videos, audio = images or [], videos or [], audio or []
        _check_placeholders(prompt, IMAGE_TOKEN, images, ImageError)
        _check_placeholders(prompt, VIDEO_TOKEN, videos, VideoError)
        _check_placeholders(prompt, AUDIO_TOKEN, audio, AudioError)
        media = Media()
        if images:
            media.images = process_images(images, max_soft_tokens, self.patch_size, self.pooling)
            tokens = iter(media.images.soft_tokens)
            prompt = _expand(
                prompt, IMAGE_TOKEN, lambda: IMAGE_START + IMAGE_TOKEN * next(tokens) + IMAGE_END
            )
        if videos:
            clips = [load_video(video, max_frames) for video in videos]
            frames = [frame for clip in clips for frame in clip.frames]
            media.video_frames = process_images(
                frames, video_soft_tokens, self.patch_size, self.pooling
            )
            per_frame = media.video_frames.soft_tokens[0]  # one size for every frame of a clip
            clip_iter = iter(clips)
            prompt = _expand(
                prompt,
                VIDEO_TOKEN,
                lambda: next(clip_iter).prompt_text(per_frame, IMAGE_START, VIDEO_TOKEN, IMAGE_END),
            )
        if audio:
            if self.token_id(AUDIO_TOKEN) is None:
                raise AudioError(f"the tokenizer has no {AUDIO_TOKEN} token; it cannot take audio")
            media.audio = self.extract_audio([to_wave(clip) for clip in audio])
            counts = iter(media.audio.soft_tokens)
            prompt = _expand(
                prompt, AUDIO_TOKEN, lambda: AUDIO_START + AUDIO_TOKEN * next(counts) + AUDIO_END
            )
        return encode_marked(prompt, PLACEHOLDERS, self.encode, self._encode_plain), media

    def _encode_plain(self, text: str, split_special_tokens: bool) -> list[int]:
        return self.tokenizer._tokenizer.encode(
            text, add_special_tokens=False, split_special_tokens=split_special_tokens
        )

    def __call__(
        self,
        text: str | list[Message],
        images: list | None = None,
        max_soft_tokens: int = DEFAULT_BUDGET,
        **kwargs: Any,
    ) -> dict[str, mx.array]:
        """`input_ids` [1, T]; with images `pixel_values` and `image_position_ids`, with
        videos `pixel_values_videos` and `video_position_ids`, with audio `input_features` and
        `input_features_mask` (transformers' layouts)."""
        ids, media = self.prepare(text, images, max_soft_tokens, **kwargs)
        inputs = {"input_ids": mx.array([ids])}
        if media.images is not None:
            inputs["pixel_values"], inputs["image_position_ids"] = media.images.take()
        if media.video_frames is not None:
            inputs["pixel_values_videos"], inputs["video_position_ids"] = media.video_frames.take()
        if media.audio is not None:
            inputs["input_features"], inputs["input_features_mask"] = media.audio.take()
        return inputs


def _check_placeholders(prompt: str, token: str, media: list, error: type[Exception]) -> None:
    if prompt.count(token) != len(media):
        kind = token.strip("<|>")
        raise error(
            f"the prompt has {prompt.count(token)} {token} placeholders for {len(media)} "
            f"{kind}s; write one placeholder per {kind}"
        )


def _expand(prompt: str, token: str, replacement) -> str:
    """Replace each `token` in `prompt` by successive `replacement()` strings."""
    pieces = prompt.split(token)
    return pieces[0] + "".join(replacement() + piece for piece in pieces[1:])


def _media_parts(messages: list[Message], kind: str) -> list:
    return [
        part[kind]
        for message in messages
        if not isinstance(message.get("content"), str)
        for part in message.get("content") or []
        if part.get("type") == kind
    ]
