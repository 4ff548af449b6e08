"""A batch of several products' frames embedded once: each head scores its own rows of the shared backbone pass
and gets what it gets scoring its frames alone (image scores, maps, verdicts, regions), with the pass run only
as deep as the deepest head needs and split only where the resize or the backbone differs."""

from __future__ import annotations

import numpy as np
import pytest

from scorer.fit import fit_head
from scorer.head import Head, Scores, score_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def _between_pixels(maps: np.ndarray, q: float = 0.9) -> float:
    """A pixel threshold near the ``q`` quantile of the maps, midway in a gap between map values, so regions do
    not hinge on float rounding."""
    v = np.unique(maps.astype(np.float32))
    i = int(q * (len(v) - 1))
    gaps = np.diff(v[i : i + 200])
    j = i + int(np.argmax(gaps))
    return float((v[j] + v[j + 1]) / 2)


def _with_thresholds(head: Head, images: list[np.ndarray]) -> Head:
    """The head with an image threshold between its frames' scores and a pixel threshold that finds regions."""
    alone = head.score(images)
    return head.with_thresholds(image=float(np.median(alone.image_scores)), pixel=_between_pixels(alone.maps))


def _assert_same(got: Scores, want: Scores) -> None:
    np.testing.assert_allclose(got.image_scores, want.image_scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.normalized_scores, want.normalized_scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.maps.astype(np.float32), want.maps.astype(np.float32), atol=1e-3, rtol=0)
    assert got.maps.dtype == want.maps.dtype == np.float16 and got.maps.shape == want.maps.shape
    assert list(got.is_defect) == list(want.is_defect)
    assert [[(r.x_min, r.y_min, r.x_max, r.y_max, r.area) for r in rs] for rs in got.regions] == [
        [(r.x_min, r.y_min, r.x_max, r.y_max, r.area) for r in rs] for rs in want.regions
    ]
    for g, w in zip(got.regions, want.regions, strict=True):
        np.testing.assert_allclose([r.peak for r in g], [r.peak for r in w], atol=1e-5)


@pytest.fixture(scope="module")
def products(tiny_vit, references, fitted_heads, make_refs) -> list[tuple[Head, list[np.ndarray]]]:
    """Four products' heads (a knn head whose tap weights stop at tap 2, a cff head reading all four taps, a
    full-depth knn head, a letterboxed knn head) and two frames each, of two sizes."""
    knn = fit_head(tiny_vit, references, method="knn")
    shallow = knn.with_options(tap_weights=(1.0, 1.0, 0.0, 0.0))
    full = knn.with_options(tap_weights=None)
    boxed = knn.with_options(letterbox=True)
    assert shallow.depth == 2 and fitted_heads["cff"].depth == 4 and boxed.options.letterbox
    frames = make_refs(4, seed=7) + make_refs(4, (48, 80), seed=8)
    for img in frames[::3]:
        img[10:20, 12:24] = 255  # a bright patch: some frames stand out
    heads = [shallow, fitted_heads["cff"], full, boxed]
    return [(_with_thresholds(h, frames[2 * k : 2 * k + 2]), frames[2 * k : 2 * k + 2]) for k, h in enumerate(heads)]


def test_each_product_scores_as_it_does_alone_with_one_pass_per_resize(products) -> None:
    want = [head.score(images) for head, images in products]
    assert any(r for s in want for r in s.regions) and any(s.is_defect.any() for s in want)
    got = score_batch(products, batch_size=8)
    assert got.passes == 2  # the squashed heads' six frames together, the letterboxed head's two
    assert len(got.scores) == len(products)
    for g, w in zip(got.scores, want, strict=True):
        _assert_same(g, w)


def test_frames_interleaved_across_products_and_passes_come_back_in_each_products_order(products) -> None:
    squashed = products[:3]
    # the first product's frames in the first and the last pass of four frames, the others' in between
    groups = [(squashed[0][0], [*squashed[0][1], *squashed[0][1][::-1]]), squashed[1], squashed[2]]
    got = score_batch(groups, batch_size=4)
    assert got.passes == 2
    for g, (head, images) in zip(got.scores, groups, strict=True):
        _assert_same(g, head.score(images))


def test_the_pass_stops_at_the_deepest_tap_its_heads_read(products, tiny_vit) -> None:
    calls = []
    handle = tiny_vit.vit.blocks[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        score_batch(products[:1], batch_size=8)  # tap weights stop at tap 2: the last block never runs
        assert not calls
        score_batch(products[:2], batch_size=8)  # the cff head reads every tap
        assert len(calls) == 1
    finally:
        handle.remove()


def test_heads_on_another_backbone_get_their_own_pass(products, tiny_vit_seed1, references) -> None:
    other = fit_head(tiny_vit_seed1, references, method="knn")
    images = products[0][1]
    got = score_batch([products[0], (other, images)], batch_size=8)
    assert got.passes == 2
    _assert_same(got.scores[1], other.score(images))
