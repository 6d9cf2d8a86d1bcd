"""Audio input side: files, resampling, log-mel features against transformers, long-audio chunks."""

from __future__ import annotations

import types

import numpy as np
import pytest
import soundfile
from conftest import relative_error

from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.processing.audio import (
    SAMPLE_RATE,
    AudioError,
    extract_features,
    join_transcripts,
    load_audio,
    resample,
    split_audio,
    to_wave,
)


def tone(frequency: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def peak_frequency(wave: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


def rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))


# ----------------------------------------------------------------------------- features


@pytest.fixture(scope="module")
def reference_extractor():
    from transformers import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor()


@pytest.mark.parametrize(
    "lengths",
    [[16_000], [483], [1_600, 23_456, 8_001], [30 * SAMPLE_RATE + 777]],
    ids=["1s", "shortest", "padded-batch", "over-30s"],
)
def test_features_match_transformers(reference_extractor, lengths):
    rng = np.random.default_rng(len(lengths))
    waves = [
        (0.1 * rng.standard_normal(n) + np.sin(np.arange(n) * 0.17)).astype(np.float32)
        for n in lengths
    ]
    reference = reference_extractor(waves, return_tensors="np")
    ours = extract_features(waves)
    assert ours.features.shape == reference["input_features"].shape
    assert relative_error(ours.features, reference["input_features"]) < 1e-4
    np.testing.assert_array_equal(ours.mask, reference["input_features_mask"])
    # soft tokens per clip as transformers' processor counts the placeholders it expands
    processor = types.SimpleNamespace(boa_token="[", eoa_token="]", audio_token="a")
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    for i, count in enumerate(ours.soft_tokens):
        expanded = Gemma4Processor.replace_audio_token(processor, reference, i)
        assert expanded.count("a") == count > 0


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("rate", [44_100, 48_000, 8_000, 22_050])
def test_resampling_keeps_a_tone(rate):
    out = resample(tone(1000, rate, 1.0), rate)
    assert len(out) == SAMPLE_RATE
    inner = out[1000:-1000]  # away from the zero-padded edges
    assert abs(peak_frequency(inner) - 1000) <= 2
    assert abs(rms(inner) * np.sqrt(2) - 0.5) < 1e-3


@pytest.mark.parametrize("rate", [44_100, 48_000])
def test_resampling_suppresses_tones_above_the_new_nyquist(rate):
    # 9.5 kHz would fold to 6.5 kHz; a linear interpolator lets much of it through
    out = resample(tone(9_500, rate, 1.0), rate)[1000:-1000]
    assert 20 * np.log10(rms(out) / (0.5 / np.sqrt(2))) < -80
    naive = np.interp(
        np.arange(SAMPLE_RATE) * rate / SAMPLE_RATE, np.arange(rate), tone(9_500, rate, 1)
    )
    assert 20 * np.log10(rms(naive[1000:-1000]) / (0.5 / np.sqrt(2))) > -40  # the test can fail


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    "extension, tolerance", [("wav", 1e-3), ("flac", 1e-3), ("ogg", 2e-2), ("mp3", 2e-2)]
)
def test_files_are_decoded_to_16k_mono(tmp_path, extension, tolerance):
    left, right = tone(1000, 44_100, 1.0), tone(1000, 44_100, 1.0, amplitude=0.25)
    path = tmp_path / f"tone.{extension}"
    soundfile.write(path, np.stack([left, right], axis=1), 44_100)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - SAMPLE_RATE) <= 0.01 * SAMPLE_RATE
    inner = wave[2000:-2000]
    assert abs(peak_frequency(inner) - 1000) <= 2
    # the channels are averaged: amplitude (0.5 + 0.25) / 2
    assert abs(rms(inner) * np.sqrt(2) - 0.375) < tolerance


def test_arrays_are_taken_as_16k_and_stereo_is_averaged():
    stereo = np.stack([tone(300, SAMPLE_RATE, 0.5), -tone(300, SAMPLE_RATE, 0.5) * 0.5], axis=1)
    wave = to_wave(stereo)
    np.testing.assert_allclose(wave, stereo.mean(axis=1), atol=1e-7)


def test_bad_audio_files_get_one_clear_error(tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is text, not sound")
    empty_file = tmp_path / "empty.flac"
    empty_file.write_bytes(b"")
    no_samples = tmp_path / "nothing.wav"
    soundfile.write(no_samples, np.zeros((0, 1), np.float32), SAMPLE_RATE)
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    short = tmp_path / "click.wav"
    soundfile.write(short, tone(1000, SAMPLE_RATE, 0.01), SAMPLE_RATE)
    cases = {
        tmp_path / "missing.wav": "no such audio file",
        not_audio: "not a readable audio file",
        empty_file: "the file is empty",
        no_samples: "no samples",
        silent: "silent",
        short: "too short",
    }
    for path, message in cases.items():
        with pytest.raises(AudioError) as error:
            load_audio(path)
        assert isinstance(error.value, Gemma4Error)
        text = str(error.value)
        assert message in text and str(path) in text and "\n" not in text


def test_bad_arrays_get_one_clear_error():
    for wave, message in [
        (np.zeros(0), "empty"),
        (np.zeros(SAMPLE_RATE), "silent"),
        (np.full(SAMPLE_RATE, np.nan), "NaN"),
        (np.ones((2, 2, 2)), "expected mono"),
    ]:
        with pytest.raises(AudioError, match=message):
            to_wave(wave)


# ----------------------------------------------------------------------------- long audio


def test_split_cuts_in_the_quiet_gap():
    rng = np.random.default_rng(0)
    wave = (0.3 * rng.standard_normal(75 * SAMPLE_RATE)).astype(np.float32)
    gap = slice(int(26.0 * SAMPLE_RATE), int(26.6 * SAMPLE_RATE))
    wave[gap] *= 1e-3
    chunks = split_audio(wave, max_seconds=30)
    assert 26.0 <= chunks[0].end <= 26.6 and not chunks[1].overlaps_previous
    assert chunks[1].start == chunks[0].end
    # no gap after that: the second cut is in noise, so the third chunk overlaps the second
    assert chunks[2].overlaps_previous and chunks[2].start < chunks[1].end
    assert chunks[-1].end == 75.0
    for chunk in chunks:
        assert len(chunk.wave) <= 30 * SAMPLE_RATE
        assert len(chunk.wave) == round((chunk.end - chunk.start) * SAMPLE_RATE)
    np.testing.assert_array_equal(
        np.concatenate([c.wave for c in chunks[:2]]), wave[: int(chunks[1].end * SAMPLE_RATE)]
    )


def test_short_audio_is_one_chunk():
    wave = tone(440, SAMPLE_RATE, 12.0)
    (chunk,) = split_audio(wave)
    assert (chunk.start, chunk.end) == (0.0, 12.0) and len(chunk.wave) == len(wave)


@pytest.mark.parametrize(
    "texts, overlapped, expected",
    [
        (["the quick brown fox", "brown fox jumps"], True, "the quick brown fox jumps"),
        (["the quick brown fo", "brown fox jumps"], True, "the quick brown fox jumps"),
        (["the quick brown fox", "own fox jumps"], True, "the quick brown fox jumps"),
        (["one two three four xq", "zz three four five"], True, "one two three four five"),
        (["Hello, World.", "world. How are you?"], True, "Hello, world. How are you?"),
        (["a b c", "x y z"], True, "a b c x y z"),
        (["I said that", "that is true"], False, "I said that that is true"),
        (["", "only the second"], True, "only the second"),
    ],
)
def test_join_transcripts(texts, overlapped, expected):
    assert join_transcripts(texts, [False, overlapped]) == expected


def test_join_transcripts_of_a_known_text():
    words = [f"w{i}" for i in range(200)]
    texts, flags = [], []
    for start in range(0, 200, 37):  # chunks of 40 words overlapping by 3
        texts.append(" ".join(words[start : start + 40]))
        flags.append(start > 0)
    assert join_transcripts(texts, flags) == " ".join(words)
