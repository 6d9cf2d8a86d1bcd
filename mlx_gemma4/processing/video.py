"""Videos -> timestamped frames, decoded with PyAV (the optional `video` extra).

Frames are sampled uniformly as transformers does (frame `i * total // n` for `n` frames, at
most 32 by default); each is then an image of 70 soft tokens by default, preceded in the
prompt by its `mm:ss` timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import VideoError
from .media_files import checked_media_file

MAX_FRAMES = 32
DEFAULT_VIDEO_BUDGET = 70
FALLBACK_FPS = 24.0  # what transformers assumes when a video does not say
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg"})


@dataclass
class Video:
    """Sampled frames and the time of each, in seconds."""

    frames: list[Image.Image]
    timestamps: list[float]
    source: Path | None = None  # the file they were decoded from

    def prompt_text(self, soft_tokens: int, start: str, token: str, end: str) -> str:
        """The placeholder expansion: `mm:ss <start>token * n<end>` per frame, space-joined."""
        return " ".join(
            f"{timestamp(t)} {start}{token * soft_tokens}{end}" for t in self.timestamps
        )


def is_video_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def timestamp(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def sample_indices(total: int, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """Uniformly spaced frame indices; every frame when there are fewer than `max_frames`."""
    n = min(total, max_frames)
    return np.arange(n) * total // n


def _import_av():
    try:
        import av
    except ImportError:
        raise VideoError(
            'video input needs PyAV: pip install "mlx-gemma4[video]" (or pip install av)'
        ) from None
    return av


def _count_frames(av, path: Path) -> int:
    """Frames in the first video stream, by demuxing when the container does not say."""
    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def load_video(source: str | Path | Video, max_frames: int = MAX_FRAMES) -> Video:
    """Decode `max_frames` uniformly spaced RGB frames of a video file."""
    if isinstance(source, Video):
        return source
    if max_frames < 1:
        raise VideoError(f"max_frames must be at least 1, got {max_frames}")
    path = checked_media_file(source, "video", VideoError)
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or FALLBACK_FPS)
            total = stream.frames or _count_frames(av, path)
            if total == 0:
                raise VideoError(f"{path}: the video has no frames")
            wanted = sample_indices(total, max_frames)
            frames, found = [], []
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    frames.append(frame.to_image().convert("RGB"))
                    found.append(index)
                    if len(found) == len(wanted):
                        break
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: not a readable video (corrupt or unsupported format)") from e
    if not frames:
        raise VideoError(f"{path}: no frame could be decoded")
    return Video(frames, [index / fps for index in found], path)
