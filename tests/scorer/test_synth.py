"""scorer.synth: seeded synthetic anomalies that change the image only under their mask."""

from __future__ import annotations

import numpy as np
import pytest

from scorer.synth import cutpaste, perlin_blend, perlin_noise, synthesize


def _refs(shapes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for h, w in shapes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx * yy) % 256], -1)
        out.append(np.clip(base + rng.integers(-10, 11, base.shape), 0, 255).astype(np.uint8))
    return out


def test_deterministic_per_seed() -> None:
    refs = _refs([(48, 64), (48, 64)])
    a = synthesize(refs, 6, seed=5)
    b = synthesize(refs, 6, seed=5)
    c = synthesize(refs, 6, seed=6)
    assert len(a) == 6
    for (ia, ma, ja), (ib, mb, jb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
        assert ja == jb
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True))
    refs_copy = [r.copy() for r in refs]
    synthesize(refs, 4, seed=0)
    for r, rc in zip(refs, refs_copy, strict=True):
        np.testing.assert_array_equal(r, rc)  # the references are never written to


@pytest.mark.parametrize("shape", [(64, 64), (37, 53), (96, 24), (16, 16)])
def test_shapes_masks_and_changes_confined_to_mask(shape: tuple[int, int]) -> None:
    refs = _refs([shape, shape, shape], seed=sum(shape))
    for seed in range(4):
        out = synthesize(refs, 8, seed=seed)
        for i, (img, mask, j) in enumerate(out):
            ref = refs[j]
            assert j == i % len(refs)
            assert img.shape == ref.shape and img.dtype == np.uint8
            assert mask.shape == shape and mask.dtype == np.bool_
            assert mask.any(), (shape, seed, i)
            changed = (img != ref).any(-1)
            # pixels outside the mask are unchanged, CutPaste (even i) and Perlin (odd i) alike
            assert not (changed & ~mask).any(), (shape, seed, i)
            assert changed.any(), (shape, seed, i)


def test_cutpaste_and_perlin_confined_with_other_source() -> None:
    img, other = _refs([(40, 60), (30, 30)], seed=3)
    for s in range(10):
        rng = np.random.default_rng(s)
        for fn in (cutpaste, perlin_blend):
            out, mask = fn(img, rng, other)
            assert out.shape == img.shape and out.dtype == np.uint8 and mask.shape == img.shape[:2]
            assert not ((out != img).any(-1) & ~mask).any()


def test_cutpaste_area_is_bounded() -> None:
    img = _refs([(64, 64)])[0]
    fracs = [cutpaste(img, np.random.default_rng(s))[1].mean() for s in range(30)]
    assert 0 < min(fracs) and max(fracs) < 0.5


@pytest.mark.parametrize("shape,res", [((37, 50), (4, 3)), ((64, 64), (8, 8)), ((10, 7), (2, 5)), ((5, 5), (1, 1))])
def test_perlin_noise_shape_for_non_multiples(shape: tuple[int, int], res: tuple[int, int]) -> None:
    n = perlin_noise(shape, res, np.random.default_rng(0))
    assert n.shape == shape
    assert np.isfinite(n).all()
    assert np.abs(n).max() <= 1.5
    np.testing.assert_array_equal(n, perlin_noise(shape, res, np.random.default_rng(0)))
    assert n[0, 0] == pytest.approx(0.0, abs=1e-12)  # gradient noise vanishes on lattice points
