"""The `gemma4` Typer app: a thin skin over the Python API, one module per command."""

from __future__ import annotations

import typer
from rich.console import Console

from mlx_gemma4 import __version__
from mlx_gemma4.errors import Gemma4Error

from . import ask, chat, detect, generate, info, quantize, transcribe

app = typer.Typer(
    name="gemma4",
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


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mlx-gemma4 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Gemma 4 on Apple Silicon, MLX-native."""


def main() -> None:
    """Console entry point: bad input ends in one line on stderr, never a traceback."""
    try:
        app()
    except Gemma4Error as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
