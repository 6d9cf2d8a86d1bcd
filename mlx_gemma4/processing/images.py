"""Images -> patches for the vision tower, laid out as transformers' Gemma 4 image processor does.

Each image keeps its aspect ratio and is resized (bicubic) so both sides are multiples of
`patch_size * pooling_kernel_size` (16 x 3 = 48 px on every Gemma 4 checkpoint; the vision
config says) and its patches fit the soft-token budget times `pooling_kernel_size ** 2`.
Patches are flattened in (row, column, channel) order with pixels in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError
from .media_files import checked_media_file

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_BUDGET = 280
PATCH_SIZE = 16  # the defaults of the vision config
POOLING = 3
MAX_PIXELS = 64_000_000  # larger images are refused (decompression bombs)


@dataclass
class ImageBatch:
    pixel_values: np.ndarray  # [images, max_patches, 3 * patch^2], float32 in [0, 1]
    position_ids: np.ndarray  # [images, max_patches, 2] (x, y); padding is (-1, -1)
    soft_tokens: list[int]  # soft tokens per image

    def take(self, indices: list[int] | None = None) -> tuple[mx.array, mx.array]:
        """(pixel_values, position_ids) of the images at `indices` (all by default)."""
        if indices is None:
            return mx.array(self.pixel_values), mx.array(self.position_ids)
        return mx.array(self.pixel_values[indices]), mx.array(self.position_ids[indices])


def check_budget(budget: int) -> int:
    if budget not in SOFT_TOKEN_BUDGETS:
        allowed = ", ".join(map(str, SOFT_TOKEN_BUDGETS))
        raise ImageError(f"image budget {budget} is not one of {allowed} soft tokens")
    return budget


def open_image(source: str | Path | Image.Image) -> Image.Image:
    """An RGB image, EXIF orientation applied; transparency is composited onto white."""
    if isinstance(source, Image.Image):
        image, name = source, "image"
    else:
        path = checked_media_file(source, "image", ImageError)
        name = str(path)
        try:
            image = Image.open(path)
            image.load()
        except Image.DecompressionBombError as e:
            raise ImageError(f"{path}: image too large to open safely ({e})") from e
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ImageError(f"{path}: not a readable image (corrupt or unsupported format)") from e
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{name}: the image has no pixels ({image.width}x{image.height})")
    if image.width * image.height > MAX_PIXELS:
        raise ImageError(
            f"{name}: {image.width}x{image.height} exceeds the {MAX_PIXELS:,}-pixel limit"
        )
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def target_size(
    height: int, width: int, budget: int, patch_size: int = PATCH_SIZE, pooling: int = POOLING
) -> tuple[int, int]:
    """The largest aspect-preserving size in `patch_size * pooling` steps whose patches fit
    `budget * pooling ** 2`."""
    max_patches = budget * pooling**2
    step = patch_size * pooling
    scale = math.sqrt(max_patches * patch_size**2 / (height * width))
    new_height = int(math.floor(scale * height / step)) * step
    new_width = int(math.floor(scale * width / step)) * step
    longest = (max_patches // pooling**2) * step
    if new_height == 0 and new_width == 0:
        raise ImageError(f"a {width}x{height} image cannot be resized to fit the patch grid")
    if new_height == 0:  # very wide
        new_height, new_width = step, min(width // height * step, longest)
    elif new_width == 0:  # very tall
        new_width, new_height = step, min(height // width * step, longest)
    return new_height, new_width


def to_patches(
    image: Image.Image, budget: int, patch_size: int = PATCH_SIZE, pooling: int = POOLING
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> its patches [n, 3 p^2] and their (x, y) positions [n, 2]."""
    height, width = target_size(image.height, image.width, budget, patch_size, pooling)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, C]
    rows, columns = height // patch_size, width // patch_size
    patches = pixels.reshape(rows, patch_size, columns, patch_size, 3).transpose(0, 2, 1, 3, 4)
    x, y = np.meshgrid(np.arange(columns), np.arange(rows), indexing="xy")
    positions = np.stack([x, y], axis=-1).reshape(-1, 2)
    return patches.reshape(rows * columns, -1), positions


def process_images(
    images: list[str | Path | Image.Image],
    budget: int = DEFAULT_BUDGET,
    patch_size: int = PATCH_SIZE,
    pooling: int = POOLING,
) -> ImageBatch:
    """Open, resize and patchify images; pad each to the budget's patch count.

    `patch_size` and `pooling` (the pooling kernel size) come from the vision config."""
    max_patches = check_budget(budget) * pooling**2
    patches_dims = 3 * patch_size**2
    pixel_values = np.zeros((len(images), max_patches, patches_dims), dtype=np.float32)
    position_ids = np.full((len(images), max_patches, 2), -1, dtype=np.int64)
    soft_tokens = []
    for i, source in enumerate(images):
        patches, positions = to_patches(open_image(source), budget, patch_size, pooling)
        pixel_values[i, : len(patches)] = patches
        position_ids[i, : len(patches)] = positions
        soft_tokens.append(len(patches) // pooling**2)
    return ImageBatch(pixel_values, position_ids, soft_tokens)
