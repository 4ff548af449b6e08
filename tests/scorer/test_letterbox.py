"""Aspect-preserving letterbox: geometry, both preprocessing paths, maps and regions in source pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scorer.artifact import load_head, save_head
from scorer.backbones.base import letterbox_box, preprocess_images, preprocess_tensors
from scorer.fit import FitOptions, fit_head
from scorer.head import ScoreOptions, knn_head, to_source_maps

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_letterbox_box_fits_and_centres() -> None:
    assert letterbox_box(100, 300, 448) == (149, 0, 298, 448)  # 100 * 448/300 = 149.3 -> 149 rows, centred
    assert letterbox_box(300, 100, 448) == (0, 149, 448, 298)
    assert letterbox_box(64, 64, 32) == (0, 0, 32, 32)


def test_numpy_and_tensor_paths_letterbox_alike() -> None:
    img = np.random.default_rng(0).integers(0, 256, (30, 90, 3), dtype=np.uint8)
    a = preprocess_images([img], 48, MEAN, STD, letterbox=True)
    b = preprocess_tensors([torch.from_numpy(img).permute(2, 0, 1).contiguous()], 48, MEAN, STD, letterbox=True)
    y0, x0, y1, x1 = letterbox_box(30, 90, 48)
    pad = (0 - 0.5) / 0.25  # black, normalised
    for t in (a, b):
        assert torch.all(t[:, :, :y0] == pad) and torch.all(t[:, :, y1:] == pad)
        assert t[:, :, y0:y1].std() > 0.2  # the image is there
    # both resample the same content (PIL vs antialiased torch bicubic differ by rounding only)
    assert (a - b)[:, :, y0 + 1 : y1 - 1].abs().mean() < 0.1


def test_source_maps_cover_only_the_content_box() -> None:
    grid = torch.zeros(1, 1, 8, 8)
    grid[..., :2, :] = 5.0  # top padding rows hot, as a padded canvas would never be in a real map
    grid[..., 6:, :] = 5.0
    content = torch.tensor([[0.25, 0.0, 0.75, 1.0]])  # image occupies the middle half of the rows
    m = to_source_maps(grid, 16, content)
    assert m.shape == (1, 1, 16, 16)
    assert m.max() < 1e-6  # nothing of the padding reaches the map
    full = to_source_maps(grid, 16, None)
    assert full.max() == pytest.approx(5.0)


def _wide_texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(90, 140, (48, 192, 1), dtype=np.uint8)
    return np.repeat(base, 3, axis=2)


def test_letterboxed_regions_land_on_the_defect_in_source_pixels(tiny_vit) -> None:
    ref = _wide_texture(3)
    opts = ScoreOptions(letterbox=True, smooth_sigma=1.0)
    head = knn_head(tiny_vit, tiny_vit.embed([ref], letterbox=True), opts)
    bad = ref.copy()
    bad[12:36, 140:170] = np.random.default_rng(9).integers(0, 256, (24, 30, 3), dtype=np.uint8)
    s = head.with_thresholds(image=1.0, pixel=float("inf")).score([bad])
    amap = s.maps[0].astype(np.float32)
    head = head.with_thresholds(image=1.0, pixel=0.5 * float(amap.max()))
    s = head.score([bad])
    assert s.regions[0], "no region found"
    r = s.regions[0][0]  # the strongest region, in source pixels (192 wide, 48 high)
    assert r.x_max <= 192 and r.y_max <= 48
    cx, cy = (r.x_min + r.x_max) / 2, (r.y_min + r.y_max) / 2
    assert 130 <= cx <= 180 and 4 <= cy <= 44, r
    # the map is the source image resampled to 256 x 256: its peak is over the defect's columns
    y, x = np.unravel_index(amap.argmax(), amap.shape)
    assert 140 * 256 / 192 - 20 <= x <= 170 * 256 / 192 + 20, (y, x)
    # an untouched image scores near zero everywhere: the padding adds nothing
    same = head.score([ref])
    assert float(same.image_scores[0]) < 0.2 * float(s.image_scores[0])


def test_letterbox_is_kept_by_the_artifact_and_used_by_fit(tiny_vit, tmp_path) -> None:
    refs = [_wide_texture(i) for i in range(2)]
    opts = FitOptions(steps_stage1=2, steps_stage2=1, n_synthetic=2, score=ScoreOptions(letterbox=True))
    head = fit_head(tiny_vit, refs, options=opts, method="knn")
    assert head.options.letterbox
    path = tmp_path / "p-v1.safetensors"
    save_head(head, path)
    again = load_head(path, tiny_vit)
    assert again.options.letterbox
    a, b = head.score(refs), again.score(refs)
    np.testing.assert_allclose(a.image_scores, b.image_scores, rtol=1e-4, atol=1e-6)


def test_full_content_box_equals_the_squash_upsampling() -> None:
    grid = torch.rand(2, 3, 8, 8)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    torch.testing.assert_close(to_source_maps(grid, 32, full), to_source_maps(grid, 32, None), atol=1e-5, rtol=0)
