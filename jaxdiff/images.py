"""Image grids: arrays in [0, 1] -> PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255] (rounded, clipped)."""
    return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, padding: int = 2) -> np.ndarray:
    """Tiles ``images`` [N, H, W, C] (float in [0, 1]) into one uint8 [rows*H', cols*W', C] array.

    Example::

        grid = make_grid(np.random.rand(10, 64, 64, 3), ncols=5)   # 2 rows of 5, as the book shows
    """
    images = to_uint8(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.zeros((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_image_grid(
    images: np.ndarray, path: str | os.PathLike, ncols: int | None = None, scale: int | None = None
) -> Path:
    """Writes ``images`` [N, H, W, C] in [0, 1] as a PNG grid (atomically) and returns the path.

    Small images are enlarged (nearest neighbour) so the grid is at least ~512 pixels wide.
    """
    grid = make_grid(images, ncols)
    if scale is None:
        scale = max(1, 512 // grid.shape[1])
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
