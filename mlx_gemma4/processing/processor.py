"""The processor: tokenizer, chat template and stop tokens of one checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import ConfigError
from .chat_template import BUILTIN_TEMPLATE, drop_thoughts
from .images import DEFAULT_BUDGET, ImageBatch, ImageError, process_images

Message = dict[str, Any]

# Control tokens of the Gemma 4 vocabulary, looked up by text so tiny test vocabularies work too.
TURN_END = "<turn|>"
CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
IMAGE_TOKEN, IMAGE_START, IMAGE_TOKEN, IMAGE_END = (
    "<|image|>",
    "<|image>",
    "<|image|>",
    "<image|>",
)


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

    @classmethod
    def from_folder(cls, folder: Path, config_stop_ids: list[int]) -> Processor:
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
            raise ConfigError(
                f"{folder}: no tokenizer.json or tokenizer.model; copy the tokenizer files of the "
                "original checkpoint into this folder"
            )
        stops = {*config_stop_ids, *_generation_config_stops(folder)}
        tokenizer = load_tokenizer(folder, eos_token_ids=sorted(stops))
        processor = cls(tokenizer, tokenizer._tokenizer.chat_template, set())
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
        """Render chat messages with the checkpoint's template (earlier thoughts dropped)."""
        text = self.tokenizer._tokenizer.apply_chat_template(
            drop_thoughts(messages),
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
        **template_kwargs: Any,
    ) -> tuple[list[int], ImageBatch | None]:
        """Token ids of a prompt (text, token ids or chat messages) and its processed images.

        Each `<|image|>` placeholder (chat messages write one per image part) becomes
        `<|image>` + one image token per soft token + `<image|>`.
        """
        if not isinstance(prompt, str):
            if not (prompt and isinstance(prompt[0], dict)):
                if images:
                    raise ImageError("images need a text or chat prompt with <|image|> places")
                return [int(t) for t in prompt], None
            if images is None:
                images = [part["image"] for part in _image_parts(prompt)]
            prompt = self.apply_chat_template(prompt, **template_kwargs)
        images = images or []
        if prompt.count(IMAGE_TOKEN) != len(images):
            raise ImageError(
                f"the prompt has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders "
                f"for {len(images)} images"
            )
        if not images:
            return self.encode(prompt), None
        batch = process_images(images, max_soft_tokens)
        pieces = prompt.split(IMAGE_TOKEN)
        expanded = pieces[0] + "".join(
            IMAGE_START + IMAGE_TOKEN * n + IMAGE_END + piece
            for n, piece in zip(batch.soft_tokens, pieces[1:], strict=True)
        )
        return self.encode(expanded), batch

    def __call__(
        self,
        text: str | list[Message],
        images: list | None = None,
        max_soft_tokens: int = DEFAULT_BUDGET,
        **template_kwargs: Any,
    ) -> dict[str, mx.array]:
        """`input_ids` [1, T]; with images also `pixel_values` and `image_position_ids`."""
        ids, batch = self.prepare(text, images, max_soft_tokens, **template_kwargs)
        inputs = {"input_ids": mx.array([ids])}
        if batch is not None:
            inputs["pixel_values"] = mx.array(batch.pixel_values)
            inputs["image_position_ids"] = mx.array(batch.position_ids)
        return inputs


def _image_parts(messages: list[Message]) -> list[dict]:
    return [
        part
        for message in messages
        if not isinstance(message.get("content"), str)
        for part in message.get("content") or []
        if part.get("type") == "image"
    ]
