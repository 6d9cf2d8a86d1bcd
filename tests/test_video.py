"""Video: frame sampling and timestamps, prompt expansion and frames as transformers makes them,
logits parity, generation with videos in chat and in the prompt cache, bad input."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import MM_TOKENS
from conftest import (
    gemma4_command,
    random_image,
    reference_greedy,
    relative_error,
    to_numpy,
    video_chat,
)

from mlx_gemma4 import PromptCache, load, load_model, stream_generate
from mlx_gemma4.generation import prompt_inputs
from mlx_gemma4.processing.images import process_images
from mlx_gemma4.processing.video import Video, VideoError, load_video, sample_indices

VIDEO = MM_TOKENS["video_token_id"]


def write_video(path, n_frames: int, fps: int = 10, size: tuple[int, int] = (70, 50)):
    """An MPEG-4 clip whose frame i is a flat gray of level 6 * i (to check which were taken)."""
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 8_000_000
        for i in range(n_frames):
            pixels = np.full((height, width, 3), 6 * i, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_sampling_matches_transformers():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total in (40, 97, 300):
        metadata = VideoMetadata(total_num_frames=total, fps=24.0)
        expected = default_sample_indices_fn(metadata, num_frames=32)
        assert np.array_equal(sample_indices(total), expected)
    assert np.array_equal(sample_indices(5), np.arange(5))  # short clips: every frame


def test_load_video_samples_uniform_frames_with_timestamps(tmp_path):
    path = write_video(tmp_path / "clip.mp4", n_frames=40, fps=10)
    video = load_video(path)
    assert len(video.frames) == 32
    expected = sample_indices(40) / 10
    assert np.allclose(video.timestamps, expected)
    levels = [np.asarray(frame, dtype=np.float32).mean() for frame in video.frames]
    assert np.allclose(levels, 6 * sample_indices(40), atol=2.5)  # the right frames, in order
    few = load_video(path, max_frames=4)
    assert few.timestamps == [0.0, 1.0, 2.0, 3.0]


def test_prompt_expansion_matches_transformers():
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.video_utils import VideoMetadata

    timestamps = [0.0, 2.5, 61.0, 3599.9]
    metadata = VideoMetadata(total_num_frames=36000, fps=10.0, frames_indices=[0, 25, 610, 35999])
    processor = SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    inputs = {"num_soft_tokens_per_video": [3], "video_metadata": [metadata]}
    expected = Gemma4Processor.replace_video_token(processor, inputs, 0)
    video = Video([random_image(8, 8)] * 4, timestamps)
    assert video.prompt_text(3, "<|image>", "<|video|>", "<image|>") == expected


def test_frames_match_transformers_image_processing(chat_checkpoint):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    _, processor = load(chat_checkpoint("multimodal")[0])
    frames = [random_image(101, 67, seed=i) for i in range(3)]
    inputs = processor("<|video|> what happens?", videos=[Video(frames, [0.0, 1.0, 2.0])])
    # transformers' video processor resizes with torchvision (not installable with CPU torch
    # here); its resize rule and layout are the image processor's, which we check against
    expected = Gemma4ImageProcessorPil(max_soft_tokens=70)(frames, return_tensors="np")
    assert (
        np.abs(np.array(inputs["pixel_values_videos"]) - expected["pixel_values"]).max() <= 2 / 255
    )
    assert np.array_equal(np.array(inputs["video_position_ids"]), expected["image_position_ids"])
    per_frame = int(expected["num_soft_tokens_per_image"][0])
    ids = np.array(inputs["input_ids"][0])
    assert (ids == VIDEO).sum() == 3 * per_frame
    assert (ids == MM_TOKENS["boi_token_id"]).sum() == 3
    assert processor.decode(ids.tolist()).count("00:0") == 3


def video_prompt(frames: int, per_frame: int) -> np.ndarray:
    block = [MM_TOKENS["boi_token_id"], *[VIDEO] * per_frame, MM_TOKENS["eoi_token_id"], 9]
    return np.array([[2, 5, 7, *block * frames, 11, 12]])


@pytest.mark.parametrize("variant", ["multimodal", "multimodal_bidirectional"])
def test_video_logits_match_transformers(tiny, variant):
    import torch

    folder, reference = tiny(variant)
    frames = [random_image(96, 48, seed=i) for i in range(3)]
    batch = process_images(frames, 70)
    ids = video_prompt(3, batch.soft_tokens[0])
    model = load_model(folder)
    ours = model(
        mx.array(ids),
        pixel_values_videos=mx.array(batch.pixel_values),
        video_position_ids=mx.array(batch.position_ids),
    )
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(ids),
            pixel_values_videos=torch.tensor(batch.pixel_values),
            video_position_ids=torch.tensor(batch.position_ids),
            num_frames_per_video=torch.tensor([3]),
            mm_token_type_ids=torch.tensor((ids == VIDEO).astype(np.int64) * 2),
        ).logits.numpy()
    assert relative_error(to_numpy(ours), expected) < 1e-4


def test_greedy_with_video_equals_transformers(chat_checkpoint):
    folder, reference = chat_checkpoint("multimodal_bidirectional")
    model, processor = load(folder)
    messages = video_chat()
    ours = [r.token for r in stream_generate(model, processor, messages, max_tokens=8)]
    inputs = processor(messages)
    ids = np.array(inputs["input_ids"])
    expected = reference_greedy(
        reference,
        ids[0].tolist(),
        8,
        processor.stop_token_ids,
        pixel_values_videos=inputs["pixel_values_videos"],
        video_position_ids=inputs["video_position_ids"],
        num_frames_per_video=np.array([3]),
        mm_token_type_ids=(ids == VIDEO).astype(np.int64) * 2,
    )
    assert ours == expected[: len(ours)]


def test_video_in_history_is_not_encoded_again(chat_checkpoint):
    model, processor = load(chat_checkpoint("multimodal")[0])
    cache = PromptCache(model)
    turn1 = video_chat()
    answer = "".join(
        r.text for r in stream_generate(model, processor, turn1, max_tokens=3, prompt_cache=cache)
    )
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "so"}]
    ids, media = processor.prepare(turn2)
    inputs = prompt_inputs(model, ids, media, cache)
    assert inputs.embeddings is None  # every frame is in the cached prefix
    assert len(inputs.todo) < len(ids) - sum(media.video_frames.soft_tokens)


def test_bad_videos(tmp_path, chat_checkpoint, monkeypatch):
    with pytest.raises(VideoError, match="no such video file"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        load_video(tmp_path / "empty.mp4")
    (tmp_path / "notes.mp4").write_text("not a video at all " * 20)
    with pytest.raises(VideoError, match="not a readable video"):
        load_video(tmp_path / "notes.mp4")
    _, processor = load(chat_checkpoint("multimodal")[0])
    with pytest.raises(VideoError, match="1 <|video|> placeholders for 2 videos"):
        processor.prepare("<|video|> hi", videos=[video_chat()[0]["content"][0]["video"]] * 2)
    good = write_video(tmp_path / "good.mp4", n_frames=3)
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(VideoError, match=r'pip install "mlx-gemma4\[video\]"'):
        load_video(good)


def test_ask_about_a_video(chat_checkpoint, tmp_path):
    import subprocess

    folder, _ = chat_checkpoint("multimodal")
    clip = write_video(tmp_path / "clip.mp4", n_frames=6, size=(96, 48))
    command = [*gemma4_command(), "ask", str(clip), "what happens?", "--model", str(folder)]
    result = subprocess.run([*command, "-n", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    prompt_tokens = int(result.stderr.split("prompt ")[1].split(" tokens")[0])
    per_frame = process_images([random_image(96, 48)], 70).soft_tokens[0]
    assert prompt_tokens > 6 * (per_frame + 2)  # six frames, each with its timestamp
    (tmp_path / "bad.mp4").write_text("no video here " * 10)
    command[command.index(str(clip))] = str(tmp_path / "bad.mp4")
    bad = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "bad.mp4: not a readable video" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0


def test_chat_attaches_a_video_and_saves_it_as_its_path(chat_checkpoint, tmp_path):
    import json

    from conftest import run_chat as chat

    folder, _ = chat_checkpoint("multimodal")
    clip = write_video(tmp_path / "clip.mp4", n_frames=4, size=(96, 48))
    saved = tmp_path / "talk.json"
    stdin = (
        f"/video {tmp_path / 'nope.mp4'}\n/video {clip}\nwhat happens\nand then\n/save {saved}\n"
    )
    result = chat(folder, stdin)
    assert result.returncode == 0, result.stderr
    assert "nope.mp4: no such video file" in result.stderr
    assert "attached" in result.stdout
    first, second = [line for line in result.stderr.splitlines() if "tok/s; prompt" in line]
    assert int(first.split("prompt ")[1].split(" tokens")[0]) > 4 * 20  # four frames
    assert "(0 cached)" not in second  # the frames stay in the reused cache
    parts = json.loads(saved.read_text())["messages"][0]["content"]
    assert parts[0] == {"type": "video", "video": str(clip)}
    reloaded = chat(folder, f"/load {saved}\nmore\n")
    assert reloaded.returncode == 0, reloaded.stderr
    assert "tok/s; prompt" in reloaded.stderr
