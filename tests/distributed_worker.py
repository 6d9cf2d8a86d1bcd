"""One rank of tests/test_distributed.py, started by `mlx.launch -n 2 --backend ring`.

argv: a JSON file {"cases": [...], "bad": [...], "cli": [...], "out": dir, "lose_rank_1": bool}.
A case {"name", "path", "mode" or "experts", "media": [kinds]} loads the rank's share of the
checkpoint, records its weight bytes, the logits of a fixed prompt and a greedy continuation
(and the same for a prompt with each media kind), then the same from the whole model loaded
alone. A "bad" case records the error each rank gets; a "cli" entry {"name", "args", "stdin"}
runs one `gemma4` command. Everything shares this one launch. Each rank writes what it saw to
out/rank<r>.json.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_gemma4 import load_model
from mlx_gemma4.collectives import init, lost_ranks_reported
from mlx_gemma4.errors import Gemma4Error
from mlx_gemma4.models.sharding import weight_bytes

PROMPT = [[2, 17, 301, 45, 99, 7, 250, 13, 88, 400, 5, 61]]
STEPS = 6


def greedy(model, steps: int = STEPS) -> tuple[np.ndarray, list[int]]:
    """Logits of the prompt's second half and `steps` greedy tokens, through the model's cache.

    The first half is a prefill chunk of its own that evaluates only the caches, as
    generation does: every rank must still run every collective of that pass."""
    cache = model.make_cache()
    half = len(PROMPT[0]) // 2
    model(mx.array(PROMPT)[:, :half], cache=cache)
    mx.eval([c.state for c in cache])
    logits = model(mx.array(PROMPT)[:, half:], cache=cache)
    return _continue(model, cache, logits, steps)


def _continue(model, cache, logits: mx.array, steps: int) -> tuple[np.ndarray, list[int]]:
    first = np.array(logits[0].astype(mx.float32))
    tokens = []
    token = mx.argmax(logits[:, -1], axis=-1)
    for _ in range(steps):
        tokens.append(int(token.item()))
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
    return first, tokens


def media_prompt(model, kind: str) -> tuple[list[int], dict]:
    """Token ids with one `kind` item ("image", "video" or "audio") and its model inputs, laid
    out as the checkpoint's processor lays them out."""
    from checkpoints import MM_TOKENS, clips, patches

    from mlx_gemma4.models.audio import soft_token_counts

    unified = model.config.model_type == "gemma4_unified"
    if kind == "audio":
        if unified:
            from unified_checkpoints import waveform_frames

            features, mask = waveform_frames([5], seed=2)
            count = 5
        else:
            features, mask = clips([20], seed=2)
            count = soft_token_counts(mask)[0]
        inputs = {"input_features": mx.array(features), "input_features_mask": mx.array(mask)}
        placeholder, count = MM_TOKENS["audio_token_id"], int(count)
    else:
        if unified:
            from unified_checkpoints import merged_patches

            pixels, positions = merged_patches([(2, 2)], max_tokens=6, seed=1)
        else:
            pixels, positions = patches([(6, 6)], max_tokens=4, seed=1)
        names = ("pixel_values", "image_position_ids")
        if kind == "video":
            names = ("pixel_values_videos", "video_position_ids")
        inputs = dict(zip(names, (mx.array(pixels), mx.array(positions)), strict=True))
        placeholder, count = MM_TOKENS[f"{kind}_token_id"], 4
    begin, end = (474, 475) if kind == "audio" else (470, 471)
    ids = [2, 17, begin, *[placeholder] * count, end, 301, 45]
    return ids, inputs


def media_run(model, kind: str) -> tuple[np.ndarray, list[int]]:
    """Logits of a prompt with one `kind` item, then greedy tokens through the cache."""
    ids, inputs = media_prompt(model, kind)
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache=cache, **inputs)
    return _continue(model, cache, logits, STEPS)


def refused(model) -> str:
    """The error every rank gets for pixels rank 0's tower cannot take (the ranks stay in
    step: the media runs after it still pair their collectives)."""
    try:
        model.vision_features(mx.zeros((1, 2, 5)), mx.zeros((1, 2, 2), dtype=mx.int32))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return ""


def media_bytes(model) -> int:
    """Bytes of the weights that turn media into soft tokens (towers, 12B's embedders)."""
    media = ("vision_tower", "vision_embedder", "embed_vision", "audio_tower", "embed_audio")
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.startswith(media))


def run_case(case: dict, group) -> dict:
    mx.clear_cache()
    before = mx.get_active_memory()
    if "experts" in case:  # the whole model loaded, then cut: `model.shard(group, experts)`
        sharded = load_model(case["path"]).shard(group, experts=case["experts"])
    else:
        sharded = load_model(case["path"], group=group, mode=case["mode"])
    gc.collect()
    resident = mx.get_active_memory() - before
    held = weight_bytes(sharded)
    media_held = media_bytes(sharded)
    seen = {"text": greedy(sharded)}
    refusal = refused(sharded) if case.get("media") else None
    for kind in case.get("media", ()):
        seen[kind] = media_run(sharded, kind)
    del sharded
    gc.collect()
    whole = load_model(case["path"])
    result = {
        "weight_bytes": held,
        "media_bytes": media_held,
        "refused": refusal,
        "resident_bytes": resident,
        "whole_bytes": weight_bytes(whole),
    }
    for part, (logits, tokens) in seen.items():
        reference, reference_tokens = greedy(whole) if part == "text" else media_run(whole, part)
        result[part] = {
            "max_error": float(np.abs(logits - reference).max()),
            "tokens": tokens,
            "reference_tokens": reference_tokens,
        }
    return result


def run_cli(entry: dict) -> dict:
    """One `gemma4 ARGS` command in this process, as `mlx.launch -- gemma4 ARGS` runs it on
    this rank: its stdout, stderr and exit status. `--distributed` silences a follower's
    streams; the runner gives each command fresh ones (and `stdin`) and restores them."""
    from typer.testing import CliRunner

    from mlx_gemma4.cli.app import app

    result = CliRunner().invoke(app, entry["args"], input=entry.get("stdin", ""))
    out = {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        out["exception"] = repr(result.exception)
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    group = init()
    results: dict = {"rank": group.rank(), "size": group.size(), "cases": {}, "bad": {}}
    for case in spec["cases"]:
        results["cases"][case["name"]] = run_case(case, group)
    for case in spec["bad"]:
        try:
            load_model(case["path"], group=group, mode=case["mode"])
            results["bad"][case["name"]] = None
        except Gemma4Error as e:
            results["bad"][case["name"]] = str(e)
    results["cli"] = {entry["name"]: run_cli(entry) for entry in spec.get("cli", ())}
    out = Path(spec["out"])
    if spec.get("lose_rank_1"):
        # rank 1 leaves; rank 0's next collective must fail with one clear error, not hang
        (out / f"rank{group.rank()}.json").write_text(json.dumps(results))
        if group.rank() == 1:
            sys.stdout.flush()
            os._exit(0)
        try:
            with lost_ranks_reported():
                for _ in range(50):
                    mx.eval(mx.distributed.all_sum(mx.ones(4), group=group))
            results["lost"] = None
        except Gemma4Error as e:
            results["lost"] = str(e)
    (out / f"rank{group.rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
