"""`gemma4 chat`: the terminal chat. Streams answers, keeps the KV cache across turns."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from mlx_gemma4.errors import Gemma4Error, PromptTooLongError

from . import options

HELP = '''commands:
  /help          this help
  /reset         forget the conversation
  /system TEXT   set the system instructions (starts over)
  /think         switch thinking on or off
  /image PATH    attach an image to your next message
  /video PATH    attach a video (up to 32 frames) to your next message
  /audio PATH    attach an audio file to your next message
  /save FILE     save the conversation (its KV cache goes beside it)
  /load FILE     continue a conversation saved with /save
  /exit          leave (Ctrl-D does too)
multi-line input: a line ending in \\ continues; or wrap the text in """ lines.
Ctrl-C stops the answer being written.'''

DIM, RESET = "\x1b[2m", "\x1b[0m"


def read_message(read_line: Callable[[str], str]) -> str:
    """One user message: a line, backslash-continued lines, or a \"\"\"-fenced block."""
    line = read_line(">>> ")
    if line.strip().startswith('"""'):
        lines = [line.strip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            lines.append(read_line("... "))
        lines[-1] = lines[-1].rstrip()[:-3]
        return "\n".join(lines).strip()
    while line.endswith("\\"):
        line = line[:-1] + "\n" + read_line("... ")
    return line.strip()


MEDIA = ("image", "video", "audio")


def _open_media(kind: str, path: str):
    """The checked image, decoded video or audio wave of a file (one clear error if bad)."""
    from mlx_gemma4.processing import audio, images, video

    opener = {"image": images.open_image, "video": video.load_video, "audio": audio.load_audio}
    return opener[kind](path)


def _note_long_audio(wave) -> None:
    from mlx_gemma4.processing.audio import MAX_SAMPLES, SAMPLE_RATE

    if len(wave) > MAX_SAMPLES:
        typer.echo(
            f"note: the model hears the first {MAX_SAMPLES // SAMPLE_RATE} s of this "
            f"{len(wave) / SAMPLE_RATE:.0f} s recording (gemma4 transcribe takes any length)",
            err=True,
        )


def _source_path(value):
    """JSON for a decoded video in the history: the file it came from."""
    source = getattr(value, "source", None)
    if source is None:
        raise TypeError(f"cannot save {type(value).__name__}")
    return str(source)


class Chat:
    """A conversation with one model: history, settings and the reusable prompt cache."""

    def __init__(self, model, processor, system, think, sampling, stats, interactive):
        from mlx_gemma4 import PromptCache, stream_generate

        self._stream_generate = stream_generate
        self.model, self.processor = model, processor
        self.system, self.think = system, think
        self.sampling, self.stats, self.interactive = sampling, stats, interactive
        self.messages: list[dict] = []
        self.attachments: list[dict] = []  # content parts for the next user message
        self.prompt_cache = PromptCache(model)
        self.kv_quantization = None  # float KV caches unless use_kv_quantization says otherwise

    def use_kv_quantization(self, kv_quantization) -> None:
        self.kv_quantization = kv_quantization
        self.prompt_cache.use_kv_quantization(kv_quantization)

    def conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def _thought(self, text: str) -> None:
        if self.interactive:
            sys.stdout.write(f"{DIM}{text}{RESET}")
        else:
            sys.stderr.write(text)

    def answer(self, text: str) -> None:
        content = [*self.attachments, {"type": "text", "text": text}] if self.attachments else text
        self.attachments = []
        self.messages.append({"role": "user", "content": content})
        parts, last = [], None
        try:
            for last in self._stream_generate(
                self.model,
                self.processor,
                self.conversation(),
                prompt_cache=self.prompt_cache,
                enable_thinking=self.think,
                **self.sampling,
            ):
                if last.thought:
                    self._thought(last.thought)
                parts.append(last.text)
                sys.stdout.write(last.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except Gemma4Error as e:  # e.g. the conversation outgrew the context: say so, go on
            self.messages.pop()
            advice = (
                "; or /reset to start a new conversation"
                if isinstance(e, PromptTooLongError)
                else ""
            )
            typer.echo(f"error: {e}{advice}", err=True)
            return
        # even a stopped answer stays in the history, as far as it got
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        sys.stdout.write("\n")
        sys.stdout.flush()
        if self.stats and last is not None:
            typer.echo(options.stats_line(last), err=True)

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, argument = line[1:].partition(" ")
        argument = argument.strip()
        if name == "exit":
            return False
        if name == "reset":
            self.messages, self.attachments = [], []
            typer.echo("conversation and attachments cleared")
        elif name == "system":
            self.system, self.messages, self.attachments = argument or None, [], []
            typer.echo("system instructions set; conversation and attachments cleared")
        elif name == "think":
            self.think = not self.think
            typer.echo(f"thinking {'on' if self.think else 'off'}")
        elif name in ("save", "load", *MEDIA) and not argument:
            typer.echo(f"/{name} needs a file name", err=True)
        elif name in MEDIA:
            self.attach(name, argument)
        elif name == "save":
            self.save(Path(argument))
        elif name == "load":
            self.load(Path(argument))
        else:
            if name != "help":
                typer.echo(f"unknown command /{name}", err=True)
            typer.echo(HELP)
        return True

    def attach(self, kind: str, path: str) -> None:
        """Check (and for video, decode) the file now: a bad one is reported at once."""
        tower = "audio_tower" if kind == "audio" else "vision_tower"
        if tower not in self.model:
            typer.echo(
                f"this model has no {tower.replace('_', ' ')}; it cannot take {kind}", err=True
            )
            return
        try:
            item = _open_media(kind, path)
        except Gemma4Error as e:
            typer.echo(f"error: {e}", err=True)
            return
        if kind == "audio":
            _note_long_audio(item)
        # decoded frames are kept: history is re-processed each turn (its tokens come from cache)
        self.attachments.append({"type": kind, kind: item if kind == "video" else path})
        count = sum(part["type"] == kind for part in self.attachments)
        typer.echo(f"attached {path} ({count} {kind} file(s) for your next message)")

    def save(self, file: Path) -> None:
        """Write the conversation and its KV cache; a file-system refusal is one line and the
        chat goes on."""
        from mlx_gemma4.files import require_writable_target, write_text_atomically

        state = {"system": self.system, "think": self.think, "messages": self.messages}
        text = json.dumps(state, indent=2, ensure_ascii=False, default=_source_path)
        kv = file.with_name(file.name + ".kv.safetensors")
        try:
            require_writable_target(kv)  # both files or neither
            write_text_atomically(file, text)
            self.prompt_cache.save(kv)
        except Gemma4Error as e:
            typer.echo(f"error: {e}; the conversation is kept", err=True)
            return
        typer.echo(f"saved {len(self.messages)} messages to {file}")

    def load(self, file: Path) -> None:
        from mlx_gemma4 import Gemma4Error, PromptCache

        try:
            state = json.loads(file.read_text(encoding="utf-8"))
            system, think, messages = state["system"], state["think"], state["messages"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            typer.echo(f"{file}: not a saved conversation ({e})", err=True)
            return
        self.system, self.think, self.messages = system, think, messages
        kv = file.with_name(file.name + ".kv.safetensors")
        try:
            self.prompt_cache = PromptCache.load(self.model, kv)
        except Gemma4Error:
            self.prompt_cache = PromptCache(self.model)  # the history is re-read on the next turn
        self.prompt_cache.use_kv_quantization(self.kv_quantization)  # another setting: re-read
        typer.echo(f"loaded {len(messages)} messages from {file}")

    def run(self, read_line: Callable[[str], str]) -> None:
        while True:
            try:
                text = read_message(read_line)
            except EOFError:
                break
            except KeyboardInterrupt:
                typer.echo("\n(Ctrl-D or /exit to leave)")
                continue
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    break
                continue
            try:
                self.answer(text)
            except KeyboardInterrupt:  # landed outside the streaming loop
                typer.echo(" [stopped]")


def _pipe_reader() -> Callable[[str], str]:
    lines = iter(sys.stdin)

    def read_line(_prompt: str) -> str:
        try:
            return next(lines).rstrip("\n")
        except StopIteration:
            raise EOFError from None

    return read_line


def chat(
    model: options.Model = options.DEFAULT_MODEL,
    system: options.System = None,
    think: options.Think = False,
    budget: options.Budget = 280,
    max_tokens: options.MaxTokens = 1024,
    temp: options.Temperature = 0.0,
    top_p: options.TopP = 0.0,
    top_k: options.TopK = 0,
    min_p: options.MinP = 0.0,
    repetition_penalty: options.RepetitionPenalty = None,
    seed: options.Seed = None,
    dtype: options.Dtype = None,
    stats: options.Stats = True,
    kv_bits: options.KVBits = None,
    kv_key_bits: options.KVKeyBits = None,
    kv_value_bits: options.KVValueBits = None,
) -> None:
    """Chat in the terminal; reads the conversation from stdin when it is not a terminal."""
    from mlx_gemma4 import load
    from mlx_gemma4.processing.images import check_budget

    interactive = sys.stdin.isatty()
    check_budget(budget)
    kv_quantization = options.kv_quantization(kv_bits, kv_key_bits, kv_value_bits)
    if interactive:  # loading takes seconds: say what is happening
        typer.echo(f"loading {model} ...", err=True)
    loaded_model, processor = load(model, dtype=dtype)
    sampling = options.sampling(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed)
    sampling["max_soft_tokens"] = budget
    session = Chat(loaded_model, processor, system, think, sampling, stats, interactive)
    session.use_kv_quantization(kv_quantization)
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        typer.echo(f"gemma4 chat: {model}. /help for commands, Ctrl-D to leave.")
        session.run(input)
    else:
        session.run(_pipe_reader())
