"""Transcription and translation of speech of any length: chunks split at pauses, one request per
chunk, the overlapping seams joined, and the result as text, SubRip, WebVTT or JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from .errors import AudioError
from .options import SamplingOptions
from .processing.audio import (
    MIN_SECONDS,
    SAMPLE_RATE,
    SILENCE_RMS,
    AudioChunk,
    seam_pieces,
    split_audio,
)


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
    """The transcript as the text of a .txt, .srt, .vtt or .json file."""
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


def output_paths(files: list[str], folder: Path, format: Format) -> list[Path]:
    """One output per input in `folder`: `talk.srt` for `talk.wav`, or `talk.wav.srt` and
    `talk.mp3.srt` when two inputs share a stem, so no output of a run replaces another."""
    twice = {file for file in files if files.count(file) > 1}
    if twice:
        raise AudioError(f"{sorted(twice)[0]} is given twice; give each file once")
    stems = [Path(file).stem for file in files]
    return [
        folder / f"{stem if stems.count(stem) == 1 else Path(file).name}.{format.value}"
        for file, stem in zip(files, stems, strict=True)
    ]


def chunk_requests(
    wave: np.ndarray, language: str | None = None, translate_to: str | None = None
) -> tuple[list[AudioChunk], list[list[dict] | None]]:
    """A 16 kHz recording split into chunks, and per chunk the chat messages that ask the model
    about it (None for a chunk with nothing to hear)."""
    chunks = split_audio(wave)
    request = instruction(language, translate_to)
    requests = []
    for chunk in chunks:
        loud = np.sqrt(np.mean(np.square(chunk.wave, dtype=np.float64))) >= SILENCE_RMS
        if loud and len(chunk.wave) >= MIN_SECONDS * SAMPLE_RATE:
            content = [{"type": "audio", "audio": chunk.wave}, {"type": "text", "text": request}]
            requests.append([{"role": "user", "content": content}])
        else:
            requests.append(None)  # nothing to hear in this stretch
    return chunks, requests


def assemble_transcript(
    name: str,
    duration: float,
    chunks: list[AudioChunk],
    texts: list[str],
    language: str | None = None,
    translate_to: str | None = None,
) -> Transcript:
    """The transcript of a recording from its chunks' answers, the seams joined."""
    pieces = seam_pieces(texts, [chunk.overlaps_previous for chunk in chunks])
    cues = [Cue(c.start, c.end, text) for c, text in zip(chunks, pieces, strict=True)]
    kind = "translate" if translate_to else "transcribe"
    return Transcript(name, duration, kind, language, translate_to, cues)


def transcribe_wave(
    model,
    processor,
    wave: np.ndarray,
    name: str,
    language: str | None = None,
    translate_to: str | None = None,
    sampling: SamplingOptions | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> Transcript:
    """Split 16 kHz `wave`, ask the model about each chunk in turn, join the seams.

    `sampling` is how each chunk's answer is generated (greedy by default); `on_chunk(done,
    total)` is called after each chunk (a progress bar)."""
    from .generation import generate  # imports mlx-lm (seconds): only when there is work

    chunks, requests = chunk_requests(wave, language, translate_to)
    texts = []
    for done, messages in enumerate(requests, start=1):
        texts.append(
            ""
            if messages is None
            else generate(model, processor, messages, sampling=sampling).strip()
        )
        if on_chunk is not None:
            on_chunk(done, len(chunks))
    duration = len(wave) / SAMPLE_RATE
    return assemble_transcript(name, duration, chunks, texts, language, translate_to)
