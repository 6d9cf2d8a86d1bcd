"""The `gemma4` Typer app: a thin skin over the Python API, one module per command."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from mlx_gemma4 import __version__
from mlx_gemma4.errors import Gemma4Error

try:  # recent Typer parses with its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # older Typer uses click itself
    from click import exceptions as click_errors

from . import ask, chat, detect, generate, info, quantize, serve, transcribe


def _say_error(message: str) -> None:
    # the message is text, not markup: "[serve]" or a path with brackets must print as it is
    Console(stderr=True).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
    )


def _usage_line(error: click_errors.UsageError) -> str:
    command = error.ctx.command_path if error.ctx else "gemma4"
    return f"{command}: {error.format_message()} (see {command} --help)"


class _OneLineErrors(TyperGroup):
    """Bad input (a Gemma4Error, or a usage error such as `--temp -1` or an unknown option)
    ends in one line on stderr and exit status 1, in the console script and under a test
    runner alike."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click_errors.NoArgsIsHelpError as e:  # a bare `gemma4` asks for the help
            e.exit_code = 0
            raise
        except click_errors.UsageError as e:
            _say_error(_usage_line(e))
            raise typer.Exit(1) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click_errors.NoArgsIsHelpError:
            raise
        except click_errors.UsageError as e:
            _say_error(_usage_line(e))
            raise typer.Exit(1) from None
        except Gemma4Error as e:
            _say_error(str(e))
            raise typer.Exit(1) from None


app = typer.Typer(
    name="gemma4",
    cls=_OneLineErrors,
    help="Gemma 4 on Apple Silicon, MLX-native.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("info")(info.info)
app.command("chat")(chat.chat)
app.command("generate")(generate.generate)
app.command("ask")(ask.ask)
app.command("detect")(detect.detect)
app.command("transcribe")(transcribe.transcribe)
app.command("quantize")(quantize.quantize)
app.command("serve")(serve.serve)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mlx-gemma4 {__version__}")
        raise typer.Exit()


@app.callback(cls=_OneLineErrors)
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Gemma 4 on Apple Silicon, MLX-native."""


def main() -> None:
    """Console entry point (also `python -m mlx_gemma4.cli`, under the same name): bad input
    ends in one line on stderr, never a traceback."""
    app(prog_name="gemma4")
