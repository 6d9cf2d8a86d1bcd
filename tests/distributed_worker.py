"""One rank of tests/test_distributed.py, started by `mlx.launch -n 2 --backend ring`.

argv: a JSON file {"cases": [{"name", "path", "mode" or "experts"}], "bad": [...], "out": dir}.
For each case the rank loads its share of the checkpoint, records its weight bytes, the logits
of a fixed prompt and a greedy continuation, then the same from the whole model loaded alone;
each rank writes what it saw to out/rank<r>.json. "bad" cases record the error each rank gets.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

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
    first = np.array(logits[0].astype(mx.float32))
    tokens = []
    token = mx.argmax(logits[:, -1], axis=-1)
    for _ in range(steps):
        tokens.append(int(token.item()))
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
    return first, tokens


def image_logits(model) -> np.ndarray | str:
    """Logits of a prompt with one image, or the error a pipeline gives for media."""
    from checkpoints import MM_TOKENS, patches

    pixels, positions = patches([(6, 6)], max_tokens=4, seed=1)
    ids = [[2, MM_TOKENS["boi_token_id"], *[MM_TOKENS["image_token_id"]] * 4, 471, 17, 301]]
    try:
        logits = model(
            mx.array(ids), pixel_values=mx.array(pixels), image_position_ids=mx.array(positions)
        )
    except Gemma4Error as e:
        return str(e)
    return np.array(logits.astype(mx.float32))


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
    logits, tokens = greedy(sharded)
    seen = image_logits(sharded) if case.get("image") else None
    del sharded
    gc.collect()
    whole = load_model(case["path"])
    reference, reference_tokens = greedy(whole)
    image = {}
    if isinstance(seen, str):
        image = {"image_refused": seen}
    elif seen is not None:
        image = {"image_error": float(np.abs(seen - image_logits(whole)).max())}
    return {
        **image,
        "weight_bytes": held,
        "resident_bytes": resident,
        "whole_bytes": weight_bytes(whole),
        "max_error": float(np.abs(logits - reference).max()),
        "tokens": tokens,
        "reference_tokens": reference_tokens,
    }


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
    out = Path(spec["out"])
    if spec.get("lose_rank_1"):
        # rank 1 leaves; rank 0's next collective must fail with one clear error, not hang
        (out / f"rank{group.rank()}.json").write_text(json.dumps(results))
        if group.rank() == 1:
            sys.stdout.flush()
            import os

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
