"""`gemma4 transcribe FILE...`: speech to text (or translated text), long recordings in chunks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.files import access_error, require_writable_target, write_text_atomically
from mlx_gemma4.options import SamplingOptions
from mlx_gemma4.transcription import (
    Format,
    as_json,
    output_paths,
    render,
    transcribe_wave,
)

from . import options


def _destinations(files: list[str], out: Path | None, format: Format) -> list[Path | None]:
    """Where each transcript goes (None: stdout), every one checked writable before any work."""
    if out is None:
        return [None] * len(files)
    if len(files) == 1 and not out.is_dir():
        return [require_writable_target(out)]
    if out.exists() and not out.is_dir():
        raise Gemma4Error(f"{out}: with several files, --out must be a folder")
    paths = output_paths(files, out, format)
    if not out.exists():
        require_writable_target(out)  # made when the first transcript is written
        return paths
    return [require_writable_target(path) for path in paths]


def _write(destination: Path, text: str) -> None:
    try:
        destination.parent.mkdir(exist_ok=True)
    except OSError as e:
        raise access_error(destination.parent, "create the folder", e) from e
    write_text_atomically(destination, text)


def transcribe(
    files: Annotated[list[str], typer.Argument(metavar="FILE...", help="Audio files.")],
    model: options.Model = options.DEFAULT_MODEL,
    language: Annotated[
        str | None, typer.Option("--language", "-l", help="Spoken language (e.g. English).")
    ] = None,
    translate_to: Annotated[
        str | None, typer.Option("--translate-to", "-t", help="Translate into this language.")
    ] = None,
    format: Annotated[
        Format, typer.Option("--format", "-f", help="txt, srt, vtt (a cue per chunk) or json.")
    ] = Format.txt,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output file, or a folder for several files: talk.wav -> talk.srt "
            "(talk.wav.srt when two inputs share a name).",
        ),
    ] = None,
    max_tokens: options.MaxTokens = 512,
    temp: options.Temperature = 0.0,
    seed: options.Seed = None,
    dtype: options.Dtype = None,
    adapter: options.Adapter = None,
) -> None:
    """Transcribe (or translate) speech; recordings over 30 s go in chunks split at pauses."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mlx_gemma4 import load
    from mlx_gemma4.processing.audio import load_audio

    destinations = _destinations(files, out, format)
    waves = [load_audio(file) for file in files]  # bad files fail here, before the model loads
    loaded_model, processor = load(model, dtype=dtype, adapter_path=adapter)
    loaded_model.require_tower("audio")
    sampling = SamplingOptions(max_tokens=max_tokens, temperature=temp, seed=seed)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    console = Console(stderr=True)
    transcripts = []
    with Progress(*columns, console=console, transient=True) as progress:
        for file, wave, destination in zip(files, waves, destinations, strict=True):
            task = progress.add_task(Path(file).name, total=None)

            def advance(done: int, total: int, task=task) -> None:
                progress.update(task, completed=done, total=total)

            transcript = transcribe_wave(
                loaded_model, processor, wave, file, language, translate_to, sampling, advance
            )
            transcripts.append(transcript)
            if destination is not None:
                _write(destination, render(transcript, format))
                console.print(f"wrote {destination}", highlight=False)
    if out is not None:
        return
    if format is Format.json and len(transcripts) > 1:
        sys.stdout.write(
            json.dumps([as_json(t) for t in transcripts], indent=2, ensure_ascii=False) + "\n"
        )
        return
    for transcript in transcripts:
        if len(transcripts) > 1:
            sys.stdout.write(f"==> {transcript.file} <==\n")
        sys.stdout.write(render(transcript, format))
