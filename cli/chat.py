"""`gemma4 chat`: the terminal chat. Streams answers, keeps the KV cache across turns."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from mlx_gemma4.conversation import Conversation, load_conversation, save_conversation
from mlx_gemma4.errors import Gemma4Error, PromptTooLongError
from mlx_gemma4.options import MediaOptions, SamplingOptions

from . import distributed as parallel
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


def call_text(call) -> str:
    """`name({"arg": value})`: a call as the chat shows it."""
    return f"{call.name}({json.dumps(call.arguments, ensure_ascii=False)})"


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


class Chat:
    """A conversation with one model: history, settings and the reusable prompt cache."""

    def __init__(
        self,
        model,
        processor,
        conversation: Conversation,
        sampling: SamplingOptions,
        media_options: MediaOptions,
        stats: bool,
        interactive: bool,
        tools: list | None = None,
        run_without_asking: bool = False,
    ):
        from mlx_gemma4 import PromptCache, stream_generate

        self._stream_generate = stream_generate
        self.model, self.processor = model, processor
        self.conversation = conversation
        self.sampling, self.media_options = sampling, media_options
        self.stats, self.interactive = stats, interactive
        self.tools, self.run_without_asking = tools, run_without_asking
        self.attachments: list[dict] = []  # content parts for the next user message
        self.prompt_cache = PromptCache(model)
        self.kv_quantization = None  # float KV caches unless use_kv_quantization says otherwise
        self._read_line: Callable[[str], str] = input
        self._line_open = False  # the answer being written has not ended its line
        self.last_response = None  # the latest response of the turn being written
        self.draft_settings: dict = {}  # speculative decoding's drafter, when one is given

    def use_kv_quantization(self, kv_quantization) -> None:
        self.kv_quantization = kv_quantization
        self.prompt_cache.use_kv_quantization(kv_quantization)

    def _thought(self, text: str) -> None:
        if self.interactive:
            sys.stdout.write(f"{DIM}{text}{RESET}")
        else:
            sys.stderr.write(text)

    def _shown(self, responses: Iterable, parts: list[str]) -> Iterator:
        """`responses`, each written out as it passes (its answer text also kept in `parts`,
        the response itself as `last_response`)."""
        for response in responses:
            if response.thought:
                self._thought(response.thought)
            parts.append(response.text)
            sys.stdout.write(response.text)
            sys.stdout.flush()
            if response.text:
                self._line_open = not response.text.endswith("\n")
            self.last_response = response
            yield response

    def _end_line(self) -> None:
        if self._line_open:
            sys.stdout.write("\n")
            self._line_open = False

    def _confirm(self, call) -> bool:
        """Ask before running a call (the next input line answers when reading a pipe)."""
        self._end_line()
        question = f"run {call_text(call)}? [y/N] "
        try:
            reply = self._read_line(question)
        except EOFError:
            reply = ""
        if not self.interactive:  # a pipe echoes nothing: show the question and its answer
            typer.echo(question + reply)
        return reply.strip().lower() in ("y", "yes")

    def _show_call(self, call, result) -> None:
        self._end_line()
        line = f"[tool] {call_text(call)} -> {json.dumps(result, ensure_ascii=False)}"
        typer.echo(f"{DIM}{line}{RESET}" if self.interactive else line)

    def _generate(self, parts: list[str]) -> None:
        """Write the turn out as it comes, and add it to the history; with tools, through the
        agent loop (the calls the model makes are run, and the model goes on)."""
        settings = dict(
            prompt_cache=self.prompt_cache,
            enable_thinking=self.conversation.think,
            sampling=self.sampling,
            media_options=self.media_options,
            **self.draft_settings,
        )
        if not self.tools:
            messages = self.conversation.chat_messages()
            for _ in self._shown(
                self._stream_generate(self.model, self.processor, messages, **settings), parts
            ):
                pass
            self.conversation.messages.append({"role": "assistant", "content": "".join(parts)})
            return

        from mlx_gemma4.agent import run_agent

        def generate_fn(model, processor, history, **kwargs):
            return self._shown(self._stream_generate(model, processor, history, **kwargs), parts)

        result = run_agent(
            self.model,
            self.processor,
            self.conversation.chat_messages(),
            self.tools,
            generate_fn=generate_fn,
            on_call=self._show_call,
            confirm=None if self.run_without_asking else self._confirm,
            **settings,
        )
        # the history keeps the tool turns, in the template's form; the system turn stays apart
        self.conversation.messages = result.messages[1 if self.conversation.system else 0 :]
        if result.finish_reason == "max_steps":
            self._end_line()
            typer.echo("(stopped: the model kept calling tools)", err=True)

    def answer(self, text: str) -> None:
        content = [*self.attachments, {"type": "text", "text": text}] if self.attachments else text
        self.attachments = []
        messages = self.conversation.messages
        messages.append({"role": "user", "content": content})
        parts, self.last_response = [], None
        try:
            self._generate(parts)
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
            # even a stopped answer stays in the history, as far as it got
            messages.append({"role": "assistant", "content": "".join(parts)})
        except Gemma4Error as e:  # e.g. the conversation outgrew the context: say so, go on
            messages.pop()
            advice = "; or /reset to start a new conversation"
            typer.echo(f"error: {e}{advice if isinstance(e, PromptTooLongError) else ''}", err=True)
            return
        sys.stdout.write("\n")
        sys.stdout.flush()
        self._line_open = False
        if self.stats and self.last_response is not None:
            typer.echo(options.stats_line(self.last_response), err=True)

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, argument = line[1:].partition(" ")
        argument = argument.strip()
        if name == "exit":
            return False
        if name == "reset":
            self.conversation.messages, self.attachments = [], []
            typer.echo("conversation and attachments cleared")
        elif name == "system":
            self.conversation.system = argument or None
            self.conversation.messages, self.attachments = [], []
            typer.echo("system instructions set; conversation and attachments cleared")
        elif name == "think":
            self.conversation.think = not self.conversation.think
            typer.echo(f"thinking {'on' if self.conversation.think else 'off'}")
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
        try:
            self.model.require_tower(kind)
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
        try:
            save_conversation(file, self.conversation, self.prompt_cache)
        except Gemma4Error as e:
            typer.echo(f"error: {e}; the conversation is kept", err=True)
            return
        typer.echo(f"saved {len(self.conversation.messages)} messages to {file}")

    def load(self, file: Path) -> None:
        from mlx_gemma4 import PromptCache

        try:
            conversation, prompt_cache = load_conversation(file, self.model)
        except Gemma4Error as e:
            typer.echo(f"error: {e}", err=True)
            return
        self.conversation, self.attachments = conversation, []
        # without a usable cache file, the history is processed again on the next turn
        self.prompt_cache = prompt_cache or PromptCache(self.model)
        self.prompt_cache.use_kv_quantization(self.kv_quantization)  # another setting: re-read
        typer.echo(f"loaded {len(conversation.messages)} messages from {file}")

    def run(self, read_line: Callable[[str], str]) -> None:
        self._read_line = read_line
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


@options.with_generation_flags(max_tokens=1024)
@parallel.reports_lost_ranks
def chat(
    flags: options.GenerationFlags,
    model: options.Model = options.DEFAULT_MODEL,
    system: options.System = None,
    budget: options.Budget = 280,
    tools: options.Tools = None,
    yes: Annotated[
        bool,
        typer.Option("--yes", "-y", metavar="", help="Run tool calls without asking first."),
    ] = False,
    adapter: options.Adapter = None,
    distributed: parallel.Distributed = None,
    distributed_timeout: parallel.DistributedTimeout = parallel.DEFAULT_TIMEOUT,
) -> None:
    """Chat in the terminal; reads the conversation from stdin when it is not a terminal.

    With --tools, the model may call the tools: each call is shown, asked about (y/N; when
    reading a pipe the next input line answers) unless --yes, run, and its result given back."""
    from mlx_gemma4 import load
    from mlx_gemma4.processing.images import check_budget
    from mlx_gemma4.tools import load_tools

    group = parallel.start(distributed)
    interactive = sys.stdin.isatty() and not (group and group.rank())
    check_budget(budget)
    tool_list = load_tools(tools) if tools is not None else None
    if interactive:  # loading takes seconds: say what is happening
        typer.echo(f"loading {model} ...", err=True)
    loaded_model, processor = load(
        model,
        dtype=flags.dtype,
        adapter_path=adapter,
        **parallel.load_options(group, distributed),
    )
    conversation = Conversation(system=system, think=flags.think)
    media_options = MediaOptions(max_soft_tokens=budget)
    session = Chat(
        loaded_model,
        processor,
        conversation,
        flags.sampling,
        media_options,
        flags.stats,
        interactive,
        tools=tool_list,
        run_without_asking=yes,
    )
    session.use_kv_quantization(flags.kv_quantization)
    session.draft_settings = flags.draft_settings(loaded_model)
    session._stream_generate = parallel.watching(
        session._stream_generate, group, distributed_timeout
    )
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        typer.echo(f"gemma4 chat: {model}. /help for commands, Ctrl-D to leave.")
        session.run(parallel.shared_reader(input, group, distributed_timeout))
    else:
        session.run(parallel.shared_reader(_pipe_reader(), group, distributed_timeout))
