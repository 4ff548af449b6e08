"""Synthetic anomalies pasted onto normal references, for fitting without masks.

Two kinds, drawn half and half:

* **CutPaste** (Li et al., CVPR 2021): a rectangle (2-12 % of the image, aspect
  0.3-3.3, or a thin "scar") cut from a reference, brightness/contrast jittered,
  optionally rotated, pasted elsewhere; the mask is the pasted area.
* **Perlin blend** (DRAEM, Zavrtanik et al., ICCV 2021): a thresholded Perlin
  noise mask blends in a texture. No texture dataset is available offline, so the
  texture is the reference itself, rotated, inverted or re-contrasted and
  shifted, with blend factor 0.5-1.

Everything is numpy on uint8 RGB arrays and reproducible from a seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def _jitter(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = patch.astype(np.float32)
    mean = f.mean()
    contrast = rng.uniform(0.6, 1.5)
    bright = rng.uniform(-40, 40)
    f = (f - mean) * contrast + mean + bright
    if rng.random() < 0.3:
        f = 255 - f
    return np.clip(f, 0, 255).astype(np.uint8)


def cutpaste(
    img: np.ndarray, rng: np.random.Generator, source: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    src = img if source is None else np.asarray(Image.fromarray(source).resize((w, h), Image.BILINEAR))
    if rng.random() < 0.3:  # scar: thin long stripe
        ph = max(2, int(h * rng.uniform(0.02, 0.06)))
        pw = max(4, int(w * rng.uniform(0.15, 0.4)))
        if rng.random() < 0.5:
            ph, pw = min(h - 1, pw * h // max(w, 1)), max(2, ph * w // max(h, 1))
    else:
        area = h * w * rng.uniform(0.02, 0.12)
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
        ph = int(np.clip(np.sqrt(area / aspect), 2, h - 1))
        pw = int(np.clip(np.sqrt(area * aspect), 2, w - 1))
    ph, pw = max(2, min(ph, h - 1)), max(2, min(pw, w - 1))
    sy, sx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    patch = _jitter(src[sy : sy + ph, sx : sx + pw], rng)
    mask_patch = np.ones((ph, pw), dtype=bool)
    if rng.random() < 0.5:
        angle = rng.uniform(-45, 45)
        pil = Image.fromarray(patch).rotate(angle, expand=True, resample=Image.BILINEAR)
        mp = Image.fromarray(mask_patch.astype(np.uint8) * 255).rotate(angle, expand=True)
        patch, mask_patch = np.asarray(pil), np.asarray(mp) > 127
        ph, pw = patch.shape[:2]
        if ph >= h or pw >= w:
            patch, mask_patch = patch[: h - 1, : w - 1], mask_patch[: h - 1, : w - 1]
            ph, pw = patch.shape[:2]
    ty, tx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    out = img.copy()
    region = out[ty : ty + ph, tx : tx + pw]
    region[mask_patch] = patch[mask_patch]
    mask = np.zeros((h, w), dtype=bool)
    mask[ty : ty + ph, tx : tx + pw] = mask_patch
    return out, mask


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient noise in about [-1, 1]; shape need not be a multiple of res."""
    h, w = shape
    ry, rx = res
    gy = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grads = np.stack([np.cos(gy), np.sin(gy)], -1)
    ys = np.linspace(0, ry, h, endpoint=False)
    xs = np.linspace(0, rx, w, endpoint=False)
    yi, xi = np.floor(ys).astype(int), np.floor(xs).astype(int)
    yf, xf = ys - yi, xs - xi
    yf2, xf2 = np.meshgrid(yf, xf, indexing="ij")
    yi2, xi2 = np.meshgrid(yi, xi, indexing="ij")

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grads[yi2 + dy, xi2 + dx]
        return g[..., 0] * (yf2 - dy) + g[..., 1] * (xf2 - dx)

    u, v = _fade(xf2), _fade(yf2)
    n0 = dot(0, 0) * (1 - u) + dot(0, 1) * u
    n1 = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return np.sqrt(2) * (n0 * (1 - v) + n1 * v)


def perlin_blend(
    img: np.ndarray, rng: np.random.Generator, source: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    for _ in range(10):
        scale = 2 ** rng.integers(1, 5)
        noise = perlin_noise((h, w), (int(scale), int(scale)), rng)
        mask = noise > 0.5
        frac = mask.mean()
        if 0.005 < frac < 0.3:
            break
    else:
        mask = np.zeros((h, w), dtype=bool)
        cy, cx = h // 2, w // 2
        mask[cy - h // 8 : cy + h // 8, cx - w // 8 : cx + w // 8] = True
    src = img if source is None else np.asarray(Image.fromarray(source).resize((w, h), Image.BILINEAR))
    tex = Image.fromarray(src).rotate(float(rng.choice([90, 180, 270])), resample=Image.BILINEAR)
    tex = np.asarray(tex.resize((w, h), Image.BILINEAR))
    tex = np.roll(tex, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(0, 1))
    tex = _jitter(tex, rng)
    beta = rng.uniform(0.5, 1.0)
    m = mask[..., None].astype(np.float32)
    out = img.astype(np.float32) * (1 - m * beta) + tex.astype(np.float32) * (m * beta)
    return np.clip(out, 0, 255).astype(np.uint8), mask


def synthesize(references: Sequence[np.ndarray], n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """``n`` (image, mask, reference index) triples, alternating CutPaste and Perlin."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        j = i % len(references)
        img = references[j]
        other = references[int(rng.integers(0, len(references)))]
        for _ in range(5):
            fn = cutpaste if i % 2 == 0 else perlin_blend
            aug, mask = fn(img, rng, other)
            if mask.any():
                break
        out.append((aug, mask, j))
    return out
