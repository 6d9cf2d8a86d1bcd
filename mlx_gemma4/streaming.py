"""Generated tokens -> text, split into the model's thought and its answer, valid UTF-8 always."""

from __future__ import annotations

from .processing import Processor


class TextStream:
    """Feeds tokens through mlx-lm's streaming detokenizer and routes text by channel.

    Gemma 4 thinks in a channel: `<|channel>thought\\n ... <channel|>` then the answer. The
    channel and stop tokens never reach the text; the channel name line is consumed. Other
    control tokens (`<|tool_call>`, `<|"|>`, ...) come through as their text, for the tool-call
    stream to read. `stop_token_ids` defaults to the processor's.
    """

    def __init__(self, processor: Processor, stop_token_ids: set[int] | None = None):
        self.processor = processor
        self.stop_token_ids = processor.stop_token_ids if stop_token_ids is None else stop_token_ids
        self.detokenizer = processor.tokenizer.detokenizer
        self.detokenizer.reset()
        self.channel = "answer"  # "answer", "header" (the channel name line) or "thought"
        self._header = ""

    def add(self, token: int) -> tuple[str, str]:
        """The new (answer, thought) text that `token` completes."""
        if token in (self.processor.channel_open, self.processor.channel_close):
            flushed = self.flush()
            self.channel = "header" if token == self.processor.channel_open else "answer"
            return flushed
        if token in self.stop_token_ids:
            return self.flush()
        self.detokenizer.add_token(token)
        return self._route(self.detokenizer.last_segment)

    def flush(self) -> tuple[str, str]:
        """Text held back waiting for more tokens (an unfinished character, a word)."""
        self.detokenizer.finalize()
        return self._route(self.detokenizer.last_segment)

    def _route(self, text: str) -> tuple[str, str]:
        if self.channel == "header":
            self._header += text
            if "\n" not in self._header:
                return "", ""
            _, text = self._header.split("\n", 1)
            self._header, self.channel = "", "thought"
        return (text, "") if self.channel == "answer" else ("", text)


class StopStrings:
    """Holds back just enough answer text to cut it at the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        """The text safe to emit now, and whether a stop string was reached."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        cut = max(0, len(self.held) - self.hold)
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def drain(self) -> str:
        out, self.held = self.held, ""
        return out
