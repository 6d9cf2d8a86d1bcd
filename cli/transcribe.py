"""`gemma4 transcribe FILE...`: speech to text (or translated text), long recordings in chunks."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from mlx_gemma4.errors import Gemma4Error

from . import options


class Format(str, Enum):
    txt = "txt"
    srt = "srt"
    vtt = "vtt"
    json = "json"


@dataclass
class Cue:
    start: float  # seconds
    end: float
    text: str


@dataclass
class Transcript:
    file: str
    duration: float
    task: str  # "transcribe" or "translate"
    language: str | None  # spoken language, when given
    target: str | None  # translation language
    cues: list[Cue]

    @property
    def text(self) -> str:
        return " ".join(cue.text for cue in self.cues if cue.text)


def instruction(language: str | None, translate_to: str | None) -> str:
    """The request that follows each audio chunk."""
    if translate_to:
        source = f" from {language}" if language else ""
        return (
            f"Translate the following speech segment{source} into {translate_to}. "
            "Reply with the translation only."
        )
    spoken = f"in {language}" if language else "in its original language"
    return f"Transcribe the following speech segment {spoken}. Reply with the transcription only."


def _timestamp(seconds: float, separator: str) -> str:
    milliseconds = round(seconds * 1000)
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, milliseconds = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{separator}{milliseconds:03d}"


def _subtitle_cues(transcript: Transcript) -> list[Cue]:
    """Cues with text, each starting no earlier than the previous one ends (chunks overlap)."""
    cues, previous_end = [], 0.0
    for cue in transcript.cues:
        if cue.text:
            cues.append(Cue(max(cue.start, previous_end), cue.end, cue.text))
        previous_end = cue.end
    return cues


def render(transcript: Transcript, format: Format) -> str:
    if format is Format.txt:
        return transcript.text + "\n"
    if format is Format.json:
        return json.dumps(as_json(transcript), indent=2, ensure_ascii=False) + "\n"
    separator = "," if format is Format.srt else "."
    blocks = []
    for number, cue in enumerate(_subtitle_cues(transcript), start=1):
        timing = f"{_timestamp(cue.start, separator)} --> {_timestamp(cue.end, separator)}"
        blocks.append(
            f"{number}\n{timing}\n{cue.text}\n"
            if format is Format.srt
            else f"{timing}\n{cue.text}\n"
        )
    header = "WEBVTT\n\n" if format is Format.vtt else ""
    return header + "\n".join(blocks)


def as_json(transcript: Transcript) -> dict:
    return {
        "file": transcript.file,
        "duration": round(transcript.duration, 3),
        "task": transcript.task,
        "language": transcript.language,
        "target_language": transcript.target,
        "text": transcript.text,
        "chunks": [
            {"start": round(c.start, 3), "end": round(c.end, 3), "text": c.text}
            for c in transcript.cues
        ],
    }


def write_atomically(file: Path, text: str) -> None:
    """Write `text` to `file` through a temporary file in the same folder, then rename."""
    file.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, file)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def transcribe_wave(
    model,
    processor,
    wave: np.ndarray,
    name: str,
    language: str | None,
    translate_to: str | None,
    sampling: dict,
    progress=None,
) -> Transcript:
    """Split, ask the model about each chunk in turn, join the seams."""
    from mlx_gemma4 import generate
    from mlx_gemma4.processing.audio import (
        MIN_SECONDS,
        SAMPLE_RATE,
        SILENCE_RMS,
        seam_pieces,
        split_audio,
    )

    chunks = split_audio(wave)
    request = instruction(language, translate_to)
    task = progress.add_task(Path(name).name, total=len(chunks)) if progress else None
    texts = []
    for chunk in chunks:
        loud = np.sqrt(np.mean(np.square(chunk.wave, dtype=np.float64))) >= SILENCE_RMS
        if loud and len(chunk.wave) >= MIN_SECONDS * SAMPLE_RATE:
            content = [{"type": "audio", "audio": chunk.wave}, {"type": "text", "text": request}]
            messages = [{"role": "user", "content": content}]
            texts.append(generate(model, processor, messages, **sampling).strip())
        else:
            texts.append("")  # nothing to hear in this stretch
        if progress:
            progress.advance(task)
    pieces = seam_pieces(texts, [chunk.overlaps_previous for chunk in chunks])
    cues = [Cue(c.start, c.end, text) for c, text in zip(chunks, pieces, strict=True)]
    duration = len(wave) / SAMPLE_RATE
    kind = "translate" if translate_to else "transcribe"
    return Transcript(name, duration, kind, language, translate_to, cues)


def _destinations(files: list[str], out: Path | None, format: Format) -> list[Path | None]:
    if out is None:
        return [None] * len(files)
    if len(files) == 1 and not out.is_dir():
        return [out]
    if out.exists() and not out.is_dir():
        raise Gemma4Error(f"{out}: with several files, --out must be a folder")
    return [out / f"{Path(file).stem}.{format.value}" for file in files]


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
        typer.Option("--out", "-o", help="Output file (a folder when several files are given)."),
    ] = None,
    max_tokens: options.MaxTokens = 512,
    temp: options.Temperature = 0.0,
    seed: options.Seed = None,
    dtype: options.Dtype = None,
) -> None:
    """Transcribe (or translate) speech; recordings over 30 s go in chunks split at pauses."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mlx_gemma4 import load
    from mlx_gemma4.processing.audio import load_audio

    destinations = _destinations(files, out, format)
    waves = [load_audio(file) for file in files]  # bad files fail here, before the model loads
    loaded_model, processor = load(model, dtype=dtype)
    if "audio_tower" not in loaded_model:
        raise Gemma4Error(f"{model}: this checkpoint has no audio tower (E2B and E4B have one)")
    sampling = options.sampling(max_tokens, temp, 0.0, 0, 0.0, None, seed)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    console = Console(stderr=True)
    transcripts = []
    with Progress(*columns, console=console, transient=True) as progress:
        for file, wave, destination in zip(files, waves, destinations, strict=True):
            transcript = transcribe_wave(
                loaded_model, processor, wave, file, language, translate_to, sampling, progress
            )
            transcripts.append(transcript)
            if destination is not None:
                write_atomically(destination, render(transcript, format))
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
