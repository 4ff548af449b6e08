"""Overlays a person can read: the verdict label scales with the image."""

from __future__ import annotations

import numpy as np
import pytest

from scorer.visualize import label_font_size, overlay


def _label_height(size: int) -> int:
    """Rows of the black label box in column 0 (the blended heat map is never pure black)."""
    img = np.full((size, size, 3), 200, np.uint8)
    out = np.asarray(overlay(img, np.zeros((8, 8), np.float32), pixel_threshold=1.0, verdict="DEFECT 1.23"))
    return int((out[:, 0] == 0).all(axis=1).sum())


def test_label_font_grows_with_the_image() -> None:
    assert label_font_size(2000) > label_font_size(500) > label_font_size(100) >= 10
    small, big = _label_height(192), _label_height(1536)
    assert small >= 10  # at least the old bitmap font's height
    assert big >= 6 * small  # 8x the image, ~8x the label: readable on a camera frame


@pytest.mark.parametrize("verdict", ["OK 0.42", "DEFECT 3.10"])
def test_label_box_holds_the_text(verdict: str) -> None:
    img = np.full((600, 400, 3), 200, np.uint8)
    out = np.asarray(overlay(img, np.zeros((8, 8), np.float32), pixel_threshold=1.0, verdict=verdict))
    box = (out == 0).all(axis=2)
    rows, cols = np.flatnonzero(box[:, 0]), np.flatnonzero(box[0])
    text = out[: rows[-1] + 1, : cols[-1] + 1]
    colour = (255, 64, 64) if verdict.startswith("DEFECT") else (64, 255, 64)
    assert (text == colour).all(axis=2).sum() > 50  # the text is drawn inside the box, in its colour
