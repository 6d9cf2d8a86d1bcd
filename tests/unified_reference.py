"""transformers' gemma4_unified preprocessing as the reference, where its classes need torchvision
(which has no build for the CPU torch these tests use)."""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import numpy as np
import torch


def _function_from_source(path: Path, name: str):
    """A top-level function of a source file, compiled on its own (its module imports
    torchvision at the top, which this function does not use)."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"torch": torch, "math": math}
    exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def patches_merge():
    """transformers' `patches_merge` (gemma4_unified's image processor), unchanged."""
    import transformers.models.gemma4_unified as package

    source = Path(inspect.getfile(package)).parent / "image_processing_gemma4_unified.py"
    return _function_from_source(source, "patches_merge")


def unified_images(images, budget: int):
    """(pixel_values, image_position_ids, soft tokens) as `Gemma4UnifiedImageProcessor` makes
    them: the Gemma 4 resize and 16 px patches (its PIL processor), then transformers' merge into
    48 px patches, padded to the budget."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    out = Gemma4ImageProcessorPil(max_soft_tokens=budget)(images, return_tensors="np")
    merge = patches_merge()
    pixels = np.zeros((len(images), budget, 3 * 48 * 48), np.float32)
    positions = np.full((len(images), budget, 2), -1, np.int64)
    counts = []
    for i in range(len(images)):
        real = (out["image_position_ids"][i] >= 0).all(-1)
        patches = torch.tensor(out["pixel_values"][i][real])[None]
        xy = torch.tensor(out["image_position_ids"][i][real])[None]
        merged, merged_xy = merge(patches, xy, patches.shape[1] // 9)
        n = merged.shape[1]
        pixels[i, :n], positions[i, :n] = merged[0].numpy(), merged_xy[0].numpy()
        counts.append(n)
    return pixels, positions, counts
