"""A synthetic demo product for machines without ../shared/datasets (make run on a fresh clone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, size: int = 192) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    base = 128 + 30 * np.sin(x / 6.0) * np.cos(y / 9.0) + rng.normal(0, 6, (size, size))
    return np.clip(base, 0, 255).astype(np.uint8)


def make_demo_dataset(root: str | Path, n_train: int = 8, n_good: int = 6, n_bad: int = 6, seed: int = 0) -> Path:
    """A brushed-metal-like texture product in MVTec layout, defects are dark scratches and blobs."""
    r = Path(root) / "demo_texture"
    rng = np.random.default_rng(seed)
    for d in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (r / d).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(_texture(rng)).save(r / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(_texture(rng)).save(r / "test/good" / f"{i:03d}.png")
    for i in range(n_bad):
        img = _texture(rng)
        mask = np.zeros_like(img, dtype=bool)
        cy, cx = rng.integers(40, 150, 2)
        if i % 2:
            mask[cy : cy + 4, cx - 30 : cx + 30] = True
        else:
            yy, xx = np.mgrid[0:192, 0:192]
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(64, 225)
        img[mask] = 30
        Image.fromarray(img).save(r / "test/scratch" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(r / "ground_truth/scratch" / f"{i:03d}_mask.png")
    return r
