"""Audio -> log-mel features for the audio tower, made as transformers' Gemma 4 extractor does.

Files are decoded with soundfile (WAV, FLAC, OGG, MP3 and the other libsndfile formats), mixed
to mono and resampled to 16 kHz with a windowed-sinc polyphase filter. Features: 20 ms periodic
Hann frames every 10 ms after a semicausal left pad of half a frame, a 512-point magnitude
spectrum, 128 HTK mel bins over 0-8 kHz and `log(mel + 1e-3)`. Clips longer than 30 s are cut
(`split_audio` splits long recordings at quiet points first; `join_transcripts` joins the texts).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import AudioError
from .media_files import checked_media_file

SAMPLE_RATE = 16_000
MEL_BINS = 128
FRAME_LENGTH = 320  # 20 ms
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 512
MEL_FLOOR = 1e-3
MAX_FREQUENCY = 8000.0
MAX_SAMPLES = 30 * SAMPLE_RATE  # one clip; longer audio is truncated
PAD_TO_MULTIPLE = 128  # samples; batches are padded to a multiple of this
MIN_SECONDS = 0.1
SILENCE_RMS = 1e-5  # about -100 dBFS


# ----------------------------------------------------------------------------- files


def load_audio(path: str | Path) -> np.ndarray:
    """A file's samples as float32 mono at 16 kHz (channels averaged, resampled if needed)."""
    import soundfile

    path = checked_media_file(path, "audio", AudioError)
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(
            f"{path}: not a readable audio file (not audio, or a codec libsndfile cannot decode; "
            "WAV, FLAC, OGG/Vorbis/Opus and MP3 are supported)"
        ) from e
    return check_wave(resample(samples.mean(axis=1), rate, SAMPLE_RATE), str(path))


def check_wave(wave: np.ndarray, name: str = "audio") -> np.ndarray:
    """`wave` as float32 mono, refused with one line when empty, too short, silent or not finite."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2:  # [samples, channels]
        wave = wave.mean(axis=1)
    if wave.ndim != 1:
        raise AudioError(f"{name}: expected mono samples [n] or [n, channels], got {wave.shape}")
    if wave.size == 0:
        raise AudioError(f"{name}: the audio is empty (no samples)")
    if not np.isfinite(wave).all():
        raise AudioError(f"{name}: the audio has NaN or infinite samples")
    if wave.size < MIN_SECONDS * SAMPLE_RATE:
        raise AudioError(
            f"{name}: the audio is too short ({wave.size / SAMPLE_RATE * 1000:.0f} ms; "
            f"at least {MIN_SECONDS * 1000:.0f} ms needed)"
        )
    if np.sqrt(np.mean(np.square(wave, dtype=np.float64))) < SILENCE_RMS:
        raise AudioError(f"{name}: the audio is silent")
    return wave


def to_wave(source: str | Path | np.ndarray) -> np.ndarray:
    """A path (decoded, resampled) or an array (taken to be 16 kHz) as checked float32 mono."""
    if isinstance(source, (str, Path)):
        return load_audio(source)
    return check_wave(source)


# ----------------------------------------------------------------------------- resampling


def _kaiser_sinc(t: np.ndarray, cutoff: float, half_width: float, beta: float) -> np.ndarray:
    """Low-pass taps at offsets `t` (samples): sinc of normalized `cutoff`, Kaiser-windowed."""
    inside = np.abs(t) <= half_width
    ratio = np.clip(t / half_width, -1.0, 1.0)
    window = np.i0(beta * np.sqrt(1.0 - ratio**2)) / np.i0(beta)
    return np.where(inside, 2 * cutoff * np.sinc(2 * cutoff * t) * window, 0.0)


def resample(
    wave: np.ndarray,
    rate: int,
    target: int = SAMPLE_RATE,
    zero_crossings: int = 32,
    rolloff: float = 0.92,
    beta: float = 10.0,
    block: int = 4096,
) -> np.ndarray:
    """Band-limited resampling by a rational factor (polyphase windowed sinc).

    Conceptually: insert `up - 1` zeros between samples, low-pass at `rolloff` times the lower
    Nyquist frequency, keep every `down`-th sample. Only the taps that meet real samples are
    computed: output n sits at `n * down` on the upsampled grid and uses one filter phase.
    """
    wave = np.asarray(wave, dtype=np.float64)
    if rate == target:
        return wave.astype(np.float32)
    if rate <= 0:
        raise AudioError(f"sample rate {rate} is not positive")
    gcd = math.gcd(int(rate), int(target))
    up, down = target // gcd, rate // gcd
    cutoff = rolloff * 0.5 / max(up, down)  # cycles per upsampled sample
    half_width = zero_crossings / (2 * cutoff)  # upsampled samples each side of the centre
    shift = int(half_width)
    taps = (shift + int(half_width)) // up + 2
    # phases[p, j]: weight of input sample (base - j) for an output at offset p past base * up
    offsets = np.arange(up)[:, None] - shift + np.arange(taps)[None, :] * up
    phases = up * _kaiser_sinc(offsets, cutoff, half_width, beta)

    n_out = -(-len(wave) * up // down)
    pad = taps + 1
    padded = np.concatenate([np.zeros(pad), wave, np.zeros(pad)])
    out = np.empty(n_out, dtype=np.float32)
    for start in range(0, n_out, block):
        positions = np.arange(start, min(start + block, n_out), dtype=np.int64) * down + shift
        base, offset = np.divmod(positions, up)
        windows = padded[(base + pad)[:, None] - np.arange(taps)[None, :]]
        out[start : start + len(positions)] = np.einsum("nt,nt->n", windows, phases[offset])
    return out


# ----------------------------------------------------------------------------- features


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filters(
    bins: int = MEL_BINS, fft_length: int = FFT_LENGTH, top: float = MAX_FREQUENCY
) -> np.ndarray:
    """[fft_length // 2 + 1, bins] triangular HTK-mel filters over 0..`top` Hz, unnormalized."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(top), bins + 2))
    frequencies = np.linspace(0, SAMPLE_RATE // 2, fft_length // 2 + 1)
    widths = np.diff(edges)
    distance = edges[None, :] - frequencies[:, None]  # [frequencies, bins + 2]
    rising = -distance[:, :-2] / widths[:-1]
    falling = distance[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


_MEL_FILTERS = mel_filters()
# periodic Hann: the window of a frame that repeats every FRAME_LENGTH samples
_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(FRAME_LENGTH) / FRAME_LENGTH)).astype(
    np.float32
)


def frame_count(samples: int) -> int:
    """Mel frames of `samples` samples: frames of FRAME_LENGTH + 1 after the half-frame left pad."""
    return max(0, (samples + FRAME_LENGTH // 2 - (FRAME_LENGTH + 1)) // HOP_LENGTH + 1)


def log_mel(wave: np.ndarray) -> np.ndarray:
    """[frames, 128] log-mel features of one float32 clip."""
    padded = np.concatenate([np.zeros(FRAME_LENGTH // 2, np.float32), wave.astype(np.float32)])
    n = frame_count(len(wave))
    # frames hold FRAME_LENGTH + 1 samples (room for pre-emphasis); without it the last is unused
    frames = np.lib.stride_tricks.as_strided(
        padded,
        shape=(n, FRAME_LENGTH),
        strides=(padded.strides[0] * HOP_LENGTH, padded.strides[0]),
        writeable=False,
    )
    magnitude = np.abs(np.fft.rfft(frames * _WINDOW, n=FFT_LENGTH, axis=-1))
    return np.log(magnitude @ _MEL_FILTERS + MEL_FLOOR).astype(np.float32)


def soft_token_count(frames_mask: np.ndarray) -> int:
    """Audio soft tokens of one clip: its valid frames after two stride-2 (k 3, pad 1) convs."""
    mask = np.asarray(frames_mask, dtype=bool)
    for _ in range(2):
        length = (len(mask) - 1) // 2 + 1
        mask = mask[::2][:length]
    return int(mask.sum())


@dataclass
class AudioFeatures:
    features: np.ndarray  # [clips, frames, 128] float32, zero on padding frames
    mask: np.ndarray  # [clips, frames] bool, True where a frame holds only real samples
    soft_tokens: list[int]  # soft tokens per clip
    lengths: list[int]  # samples per clip (after the 30 s cut)

    def take(self, indices: list[int] | None = None) -> tuple[mx.array, mx.array]:
        """(input_features, input_features_mask) of the clips at `indices` (all by default),
        padded only as far as those clips need: as if they had been extracted on their own."""
        indices = list(range(len(self.lengths))) if indices is None else list(indices)
        longest = max(self.lengths[i] for i in indices)
        frames = frame_count(-(-longest // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE)
        return mx.array(self.features[indices, :frames]), mx.array(self.mask[indices, :frames])


def extract_features(waves: list[np.ndarray]) -> AudioFeatures:
    """Log-mel features of 16 kHz clips, batched as transformers' feature extractor does.

    Each clip is cut to 30 s, the batch is zero-padded to its longest clip rounded up to a
    multiple of 128 samples, and a frame counts as valid only when its whole window (including
    the sample one past the frame) lies inside the real audio.
    """
    waves = [np.asarray(w, dtype=np.float32)[:MAX_SAMPLES] for w in waves]
    longest = max(len(w) for w in waves)
    length = -(-longest // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    batch = np.zeros((len(waves), length), dtype=np.float32)
    frames = frame_count(length)
    mask = np.zeros((len(waves), frames), dtype=bool)
    for i, wave in enumerate(waves):
        batch[i, : len(wave)] = wave
        mask[i, : frame_count(len(wave))] = True
    features = np.stack([log_mel(wave) for wave in batch]) * mask[..., None]
    soft_tokens = [soft_token_count(m) for m in mask]
    return AudioFeatures(features, mask, soft_tokens, [len(w) for w in waves])


# ----------------------------------------------------------------------------- long audio


@dataclass
class AudioChunk:
    wave: np.ndarray
    start: float  # seconds into the recording
    end: float
    overlaps_previous: bool  # starts before the previous chunk ended (no quiet place to cut)


def _frame_energy(wave: np.ndarray, frame: int) -> np.ndarray:
    """Mean square of consecutive `frame`-sample frames (the tail shorter than a frame dropped)."""
    usable = len(wave) // frame * frame
    return np.mean(np.square(wave[:usable].reshape(-1, frame), dtype=np.float64), axis=1)


def split_audio(
    wave: np.ndarray,
    max_seconds: float = 30.0,
    search_seconds: float = 8.0,
    overlap_seconds: float = 1.0,
    rate: int = SAMPLE_RATE,
) -> list[AudioChunk]:
    """Cut a recording into chunks of at most `max_seconds`, at quiet places where possible.

    Each cut is placed at the quietest 100 ms (by energy) within the last `search_seconds`
    before the limit. When even that place is loud (speech through the whole window, so a word
    may be cut), the next chunk starts `overlap_seconds` earlier and `join_transcripts` removes
    the words heard twice.
    """
    limit = int(max_seconds * rate)
    frame = rate // 10
    search = min(int(search_seconds * rate), limit // 2)
    overlap = min(int(overlap_seconds * rate), search // 2)
    energy = _frame_energy(wave, frame)
    loud = float(np.median(energy[energy > 0])) if (energy > 0).any() else 0.0
    quiet = 0.01 * loud  # 20 dB under the typical frame

    chunks, start, overlapped = [], 0, False
    while True:
        if len(wave) - start <= limit:
            end = len(wave)
        else:
            first, last = (start + limit - search) // frame, (start + limit) // frame
            best = first + _quietest(energy[first:last])
            end = best * frame + frame // 2  # the middle of the quietest frame
        chunks.append(AudioChunk(wave[start:end], start / rate, end / rate, overlapped))
        if end >= len(wave):
            return chunks
        overlapped = energy[end // frame] > quiet
        start = end - overlap if overlapped else end


def _quietest(energy: np.ndarray) -> int:
    """Index of the quietest frame; among equally quiet ones, the latest (longest chunk)."""
    return len(energy) - 1 - int(np.argmin(energy[::-1]))


_WORD_CHARACTERS = re.compile(r"\W+", re.UNICODE)


def _normalize(word: str) -> str:
    return _WORD_CHARACTERS.sub("", word).casefold()


def join_transcripts(
    texts: list[str], overlapped: list[bool] | None = None, max_overlap: int = 30
) -> str:
    """Join chunk transcripts, dropping the words an overlapping seam made appear twice.

    `overlapped[i]` says chunk i began before chunk i - 1 ended (see `split_audio`); seams
    without overlap are joined as they are, so a real repeated word ("that that") survives.
    At an overlapping seam the longest run of words (compared without case or punctuation)
    that ends the text so far and starts the next one is kept once. The chunk edge may cut a
    word: the run may end in a prefix of its word ("brown fo" / "brown fox") and start with a
    suffix ("own fox" / "brown fox"), and up to two garbled words may sit beyond it on either
    side; such looser matches need a run of at least two words.
    """
    return " ".join(piece for piece in seam_pieces(texts, overlapped, max_overlap) if piece)


def seam_pieces(
    texts: list[str], overlapped: list[bool] | None = None, max_overlap: int = 30
) -> list[str]:
    """Each chunk's share of `join_transcripts(texts, overlapped)` (for timed subtitles)."""
    overlapped = overlapped or [False] * len(texts)
    pieces: list[list[str]] = []
    for text, overlaps in zip(texts, overlapped, strict=True):
        new = text.split()
        so_far = [word for piece in pieces for word in piece]
        if overlaps and so_far and new:
            drop_end, drop_start = _seam(so_far, new, max_overlap)
            new = new[drop_start:]
            for piece in reversed(pieces):  # the dropped words may span several pieces
                taken = min(drop_end, len(piece))
                del piece[len(piece) - taken :]
                drop_end -= taken
        pieces.append(new)
    return [" ".join(piece) for piece in pieces]


def _run_matches(before: list[str], after: list[str]) -> tuple[bool, bool]:
    """(matches at all, only loosely): equal words, or a cut word at either end of the run."""
    if before == after:
        return True, False
    inner = before[1:-1] == after[1:-1] if len(before) > 1 else True
    first_ok = before[0] == after[0] or (len(before) > 1 and before[0].endswith(after[0]))
    last_ok = before[-1] == after[-1] or (len(before) > 1 and after[-1].startswith(before[-1]))
    if len(before) == 1:
        return False, False
    return inner and first_ok and last_ok and all(after) and all(before), True


def _seam(before: list[str], after: list[str], max_overlap: int) -> tuple[int, int]:
    """(words to drop from the end of `before`, from the start of `after`) at one seam.

    The run is kept as `before` wrote its first words and as `after` wrote its last one, so a
    word cut by either chunk edge comes out whole.
    """
    tail = [_normalize(w) for w in before[-(max_overlap + 2) :]]
    head = [_normalize(w) for w in after[: max_overlap + 2]]
    best, best_key = (0, 0), (0, 0, 0)
    for skip_end in range(3):
        for skip_start in range(3):
            end = len(tail) - skip_end
            for k in range(min(end, len(head) - skip_start, max_overlap), 0, -1):
                matched, loose = _run_matches(
                    tail[end - k : end], head[skip_start : skip_start + k]
                )
                if not matched or ((loose or skip_end or skip_start) and k < 2):
                    continue
                key = (k, -(skip_end + skip_start), -loose)
                if key > best_key:
                    best_key, best = key, (skip_end + 1, skip_start + k - 1)
                break
    return best
