"""A chat conversation as data, saved as JSON with its prompt cache beside it, so a loaded
conversation continues without its history being processed again."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConversationError, Gemma4Error
from .files import access_error, require_writable_target, write_text_atomically

if TYPE_CHECKING:  # imports mlx-lm, which takes seconds: `gemma4 --help` need not wait
    from .prompt_cache import PromptCache


@dataclass
class Conversation:
    system: str | None = None  # system instructions
    think: bool = False  # thinking on for the next answers
    messages: list[dict[str, Any]] = field(default_factory=list)  # user and assistant turns

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages `stream_generate` takes: the system turn, when set, then the turns."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages


def kv_cache_file(file: str | Path) -> Path:
    """Where the prompt cache of a conversation saved to `file` goes."""
    file = Path(file)
    return file.with_name(file.name + ".kv.safetensors")


def _source_path(value: Any) -> str:
    """JSON for a decoded video in the history: the file it came from."""
    source = getattr(value, "source", None)
    if source is None:
        raise TypeError(f"cannot save {type(value).__name__}")
    return str(source)


def save_conversation(
    file: str | Path, conversation: Conversation, prompt_cache: PromptCache
) -> None:
    """Write `conversation` to `file` (JSON) and `prompt_cache` beside it, each atomically;
    both targets are checked first, so a refusal leaves neither half-written."""
    file = Path(file)
    state = {
        "system": conversation.system,
        "think": conversation.think,
        "messages": conversation.messages,
    }
    text = json.dumps(state, indent=2, ensure_ascii=False, default=_source_path)
    require_writable_target(file)
    require_writable_target(kv_cache_file(file))
    write_text_atomically(file, text)
    prompt_cache.save(kv_cache_file(file))


def load_conversation(file: str | Path, model) -> tuple[Conversation, PromptCache | None]:
    """The conversation saved to `file`, and its prompt cache when that is still usable for
    `model` (None otherwise: the history is then processed again on the next turn)."""
    from .prompt_cache import PromptCache

    file = Path(file)
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        conversation = Conversation(state["system"], state["think"], state["messages"])
    except OSError as e:
        raise access_error(file, "read", e) from e
    except (ValueError, KeyError, TypeError) as e:
        raise ConversationError(f"{file}: not a saved conversation ({e})") from e
    try:
        prompt_cache = PromptCache.load(model, kv_cache_file(file))
    except Gemma4Error:
        prompt_cache = None
    return conversation, prompt_cache
