"""Heatmap overlays a person can look at: the map in jet colours over the image, regions boxed."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from scorer.head import Region


def jet(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 with the classic jet colour map."""
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def label_font_size(height: int) -> int:
    """Verdict text size in pixels: 4 % of the image height, so it stays readable on a 4000-pixel frame."""
    return max(10, round(0.04 * height))


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Scalable built-in font (Pillow >= 10.1; the bitmap default is 11 px); cached, workers draw per defect."""
    return ImageFont.load_default(size=size)


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    *,
    pixel_threshold: float,
    regions: Sequence[Region] = (),
    alpha: float = 0.45,
    verdict: str | None = None,
) -> Image.Image:
    """Source-size overlay; colour scale: 0 -> blue, threshold -> orange, 1.5 x threshold -> red.

    The verdict label is sized from the image height (:func:`label_font_size`), so it reads the same at any size.
    """
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
        size = label_font_size(h)
        font = _font(size)
        pad = max(2, size // 4)
        _, _, x1, y1 = draw.textbbox((pad, pad), verdict, font=font)
        draw.rectangle([0, 0, x1 + pad, y1 + pad], fill=(0, 0, 0))
        draw.text((pad, pad), verdict, font=font, fill=(255, 64, 64) if verdict.startswith("DEFECT") else (64, 255, 64))
    return pil
