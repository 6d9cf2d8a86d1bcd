"""Audio through the processor, generation, the chat and `gemma4 transcribe` on tiny checkpoints.

Random weights cannot transcribe, so these check the pipeline (ids, features, reuse of the
cache, chunk timing, output formats) and the errors, not the words.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile
from checkpoints import MM_TOKENS
from conftest import first_logits, reference_greedy, relative_error, run_gemma4

from mlx_gemma4 import PromptCache, load, stream_generate
from mlx_gemma4.generation import prompt_inputs
from mlx_gemma4.processing.audio import SAMPLE_RATE, AudioError, split_audio

AUDIO_TOKEN, AUDIO_START, AUDIO_END = (
    MM_TOKENS["audio_token_id"],
    MM_TOKENS["boa_token_id"],
    MM_TOKENS["eoa_token_index"],
)


def speechlike(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Tones with a syllable-rate envelope: loud everywhere, like continuous speech."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    carrier = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(150, 3000, size=4))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    return (0.1 * carrier * envelope).astype(np.float32)


@pytest.fixture(scope="module")
def audio_checkpoint(chat_checkpoint):
    return chat_checkpoint("multimodal")


@pytest.fixture(scope="module")
def loaded(audio_checkpoint):
    return load(audio_checkpoint[0])


def audio_chat(*waves, text="what is said?"):
    parts = [{"type": "audio", "audio": wave} for wave in waves]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


# ----------------------------------------------------------------------------- processor


def test_processor_expands_placeholders_like_transformers(loaded, tmp_path):
    from transformers import Gemma4AudioFeatureExtractor

    _, processor = loaded
    short, long = speechlike(0.7, seed=1), speechlike(2.3, seed=2)
    file = tmp_path / "long.wav"
    soundfile.write(file, long, SAMPLE_RATE, subtype="FLOAT")  # lossless, as the array
    inputs = processor(text="first <|audio|> then <|audio|>", audio=[short, str(file)])
    reference = Gemma4AudioFeatureExtractor()([short, long], return_tensors="np")
    assert inputs["input_features"].shape == reference["input_features"].shape
    assert relative_error(inputs["input_features"], reference["input_features"]) < 1e-4
    np.testing.assert_array_equal(
        np.array(inputs["input_features_mask"]), reference["input_features_mask"]
    )

    ids = np.array(inputs["input_ids"][0])
    starts, ends = np.flatnonzero(ids == AUDIO_START), np.flatnonzero(ids == AUDIO_END)
    assert len(starts) == len(ends) == 2
    # transformers' count: ceil(duration / 40 ms) over the real mel frames
    counts = [ends[i] - starts[i] - 1 for i in range(2)]
    for count, wave in zip(counts, (short, long), strict=True):
        frames = (len(wave) + 160 - 321) // 160 + 1
        assert count == -(-frames // 4)
    assert all((ids[s + 1 : e] == AUDIO_TOKEN).all() for s, e in zip(starts, ends, strict=True))


def test_processor_rejects_mismatched_and_bad_audio(loaded, tmp_path):
    _, processor = loaded
    with pytest.raises(AudioError, match="1 <\\|audio\\|> placeholders for 2"):
        processor(text="<|audio|>", audio=[speechlike(1), speechlike(1)])
    with pytest.raises(AudioError, match="silent"):
        processor(audio_chat(np.zeros(SAMPLE_RATE, np.float32)))
    with pytest.raises(AudioError, match="no such audio file"):
        processor(audio_chat(str(tmp_path / "gone.wav")))


# ----------------------------------------------------------------------------- generation


def test_greedy_with_audio_equals_transformers(audio_checkpoint, loaded):
    _, reference = audio_checkpoint
    model, processor = loaded
    messages = audio_chat(speechlike(1.3, seed=3), speechlike(0.6, seed=4))
    ours = [r.token for r in stream_generate(model, processor, messages, max_tokens=8)]
    inputs = processor(messages)
    expected = reference_greedy(
        reference,
        np.array(inputs["input_ids"])[0].tolist(),
        8,
        processor.stop_token_ids,
        input_features=inputs["input_features"],
        input_features_mask=inputs["input_features_mask"],
    )
    assert ours == expected[: len(ours)]


def test_audio_in_history_is_not_encoded_again(loaded):
    model, processor = loaded
    first, second = speechlike(1.0, seed=5), speechlike(1.7, seed=6)
    encoded = []
    tower = model.audio_features

    def counting(features, mask):
        encoded.append(features.shape[0])
        return tower(features, mask)

    cache = PromptCache(model)
    model.audio_features = counting
    try:
        turn1 = audio_chat(first)
        answer = "".join(
            r.text
            for r in stream_generate(model, processor, turn1, max_tokens=3, prompt_cache=cache)
        )
        assert encoded == [1]
        turn2 = turn1 + [{"role": "assistant", "content": answer}, *audio_chat(second, text="and?")]
        reused, response = first_logits(model, processor, turn2, cache)
        assert encoded == [1, 1]  # only the new clip went through the tower
        assert response.reused_tokens > 25  # the first clip's 25 soft tokens came from the cache
        fresh, _ = first_logits(model, processor, turn2, PromptCache(model))
        assert encoded == [1, 1, 2]
    finally:
        del model.audio_features
    assert relative_error(reused, fresh) < 1e-4

    ids, media = processor.prepare(turn2 + [{"role": "assistant", "content": "x"}])
    inputs = prompt_inputs(model, ids, media, cache)
    assert AUDIO_TOKEN not in inputs.todo  # both clips are cached now: no tower, no features
    assert inputs.embeddings is None


def test_a_model_without_audio_tower_refuses_audio(chat_checkpoint):
    model, processor = load(chat_checkpoint("ple_kv_shared")[0])
    with pytest.raises(AudioError, match="no audio tower"):
        list(stream_generate(model, processor, audio_chat(speechlike(1.0)), max_tokens=2))


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory):
    """65 s of loud sound with one pause at 25-25.8 s: one quiet cut, then one overlapping."""
    wave = speechlike(65.0, seed=7)
    wave[int(25.0 * SAMPLE_RATE) : int(25.8 * SAMPLE_RATE)] *= 1e-3
    file = tmp_path_factory.mktemp("audio") / "talk.wav"
    soundfile.write(file, wave, SAMPLE_RATE)
    return file, split_audio(wave)


TIMING = re.compile(r"^(\d\d):(\d\d):(\d\d)([,.])(\d\d\d) --> (\d\d):(\d\d):(\d\d)[,.](\d\d\d)$")


def _seconds(h, m, s, ms) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def test_transcribe_long_audio_in_every_format(gemma4, audio_checkpoint, long_recording, tmp_path):
    from mlx_gemma4.transcription import Cue, Format, Transcript, render

    folder, _ = audio_checkpoint
    file, chunks = long_recording
    assert len(chunks) == 3 and 25.0 <= chunks[0].end <= 25.8 and chunks[2].overlaps_previous
    common = ["transcribe", str(file), "-m", str(folder), "-n", "2"]

    result = gemma4(
        *common, "-l", "German", "-t", "French", "-f", "json", "-o", str(tmp_path / "t.json")
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "t.json").read_text())
    assert (data["file"], data["task"], data["duration"]) == (str(file), "translate", 65.0)
    assert (data["language"], data["target_language"]) == ("German", "French")
    assert [(c["start"], c["end"]) for c in data["chunks"]] == [
        (round(c.start, 3), round(c.end, 3)) for c in chunks
    ]
    assert data["text"] == " ".join(c["text"] for c in data["chunks"] if c["text"])

    srt = gemma4(*common, "-f", "srt")
    assert srt.returncode == 0, srt.stderr
    transcript = Transcript(
        str(file),
        65.0,
        "transcribe",
        None,
        None,
        [Cue(c["start"], c["end"], c["text"]) for c in data["chunks"]],
    )
    for format, text, separator in (
        ("srt", srt.stdout, ","),
        ("vtt", render(transcript, Format.vtt), "."),
    ):
        lines = text.splitlines()
        assert (lines[0] == "WEBVTT") == (format == "vtt")
        timings = [TIMING.match(line) for line in lines if TIMING.match(line)]
        assert 1 <= len(timings) <= 3
        for match in timings:
            assert match.group(4) == separator
        starts = [_seconds(*m.group(1, 2, 3, 5)) for m in timings]
        ends = [_seconds(*m.group(6, 7, 8, 9)) for m in timings]
        assert set(ends) <= {round(c.end, 3) for c in chunks}
        assert all(s < e for s, e in zip(starts, ends, strict=True))
        assert all(e <= s for e, s in zip(ends, starts[1:], strict=False))  # no overlapping cues
        if format == "srt":
            numbers = [line for line in lines if line.isdigit()]
            assert numbers == [str(i) for i in range(1, len(timings) + 1)]


def test_subtitle_cues_follow_the_chunks():
    from mlx_gemma4.transcription import Cue, Format, Transcript, render

    cues = [Cue(0.0, 25.35, "one two"), Cue(25.35, 53.9, ""), Cue(52.9, 3725.5, "three")]
    transcript = Transcript("x.wav", 3725.5, "transcribe", None, None, cues)
    assert render(transcript, Format.srt) == (
        "1\n00:00:00,000 --> 00:00:25,350\none two\n\n2\n00:00:53,900 --> 01:02:05,500\nthree\n"
    )
    assert render(transcript, Format.vtt).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:25.350\n")
    assert render(transcript, Format.txt) == "one two three\n"


def test_transcribe_several_files_into_a_folder(gemma4, audio_checkpoint, tmp_path):
    folder, _ = audio_checkpoint
    files = []
    for name, seconds in (("a.ogg", 1.5), ("b.mp3", 2.5)):
        files.append(tmp_path / name)
        soundfile.write(files[-1], speechlike(seconds, seed=len(files)), 44_100)
    out = tmp_path / "out"
    out.mkdir()
    result = gemma4(
        "transcribe", *map(str, files), "-m", str(folder), "-n", "2", "-f", "vtt", "-o", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.vtt", "b.vtt"]
    assert all(p.read_text().startswith("WEBVTT\n") for p in out.iterdir())


def test_transcribe_never_overwrites_an_output_of_the_same_run(gemma4, audio_checkpoint, tmp_path):
    folder, _ = audio_checkpoint
    files = [tmp_path / "a.wav", tmp_path / "a.flac", tmp_path / "b.wav"]
    for seed, file in enumerate(files):
        soundfile.write(file, speechlike(1.5, seed=seed), SAMPLE_RATE)
    out = tmp_path / "out"
    result = gemma4("transcribe", *map(str, files), "-m", str(folder), "-n", "2", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.flac.txt", "a.wav.txt", "b.txt"]
    twice = gemma4("transcribe", str(files[2]), str(files[2]), "-m", str(folder), "-o", str(out))
    assert twice.returncode == 1 and "is given twice" in twice.stderr


def test_transcribe_errors_are_one_line_and_write_nothing(
    gemma4, audio_checkpoint, chat_checkpoint, tmp_path
):
    folder, _ = audio_checkpoint
    silent, notes, good = tmp_path / "silent.wav", tmp_path / "notes.mp3", tmp_path / "ok.wav"
    soundfile.write(silent, np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    notes.write_text("not audio at all")
    soundfile.write(good, speechlike(1.0), SAMPLE_RATE)
    out = tmp_path / "t.txt"
    cases = [
        ([str(tmp_path / "missing.wav")], folder, "no such audio file"),
        ([str(good), str(notes)], folder, "not a readable audio file"),
        ([str(silent)], folder, "silent"),
        ([str(good)], chat_checkpoint("ple_kv_shared")[0], "no audio tower"),
    ]
    for files, model, message in cases:
        result = gemma4("transcribe", *files, "-m", str(model), "-o", str(out))
        assert result.returncode == 1 and message in result.stderr
        assert result.stderr.strip().count("\n") == 0
        assert not out.exists() and list(tmp_path.glob(".t.txt*")) == []
    result = run_gemma4("transcribe", str(silent), "-m", str(folder))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "silent" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_chat_attaches_audio(audio_checkpoint, tmp_path):
    folder, _ = audio_checkpoint
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, speechlike(1.2), 22_050)
    script = f"/audio {tmp_path / 'none.wav'}\n/audio {clip}\nwhat do you hear?\nand now?\n"
    result = run_gemma4("chat", "-m", str(folder), "-n", "3", stdin=script)
    assert result.returncode == 0, result.stderr
    assert "no such audio file" in result.stderr
    assert f"attached {clip}" in result.stdout
    stats = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(stats) == 2
    cached = int(re.search(r"\((\d+) cached\)", stats[1]).group(1))
    assert cached > 30  # the second turn reuses the first, audio soft tokens included
