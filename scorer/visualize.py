"""Heatmap overlays a person can look at: the map in jet colours over the image, regions boxed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from scorer.head import Region


def jet(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 with the classic jet colour map."""
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    *,
    pixel_threshold: float,
    regions: Sequence[Region] = (),
    alpha: float = 0.45,
    verdict: str | None = None,
) -> Image.Image:
    """Source-size overlay; colour scale: 0 -> blue, threshold -> orange, 1.5 x threshold -> red."""
    h, w = image.shape[:2]
    m = np.asarray(Image.fromarray(amap.astype(np.float32)).resize((w, h), Image.BILINEAR))
    scale = pixel_threshold if np.isfinite(pixel_threshold) and pixel_threshold > 0 else float(m.max() or 1.0)
    heat = jet(m / (1.5 * scale))
    out = (image.astype(np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha).astype(np.uint8)
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    for r in regions:
        draw.rectangle(
            [r.x_min, r.y_min, max(r.x_min, r.x_max - 1), max(r.y_min, r.y_max - 1)], outline=(255, 0, 0), width=2
        )
    if verdict:
        draw.rectangle([0, 0, 8 * len(verdict) + 8, 14], fill=(0, 0, 0))
        draw.text((4, 1), verdict, fill=(255, 64, 64) if verdict.startswith("DEFECT") else (64, 255, 64))
    return pil
