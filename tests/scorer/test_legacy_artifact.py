"""Artifacts written before the head types were split must still load and score as they did.

``legacy_heads/legacy-*.safetensors`` were written by the single-class head (tiny-vit, random weights, two references)
together with ``legacy_heads/legacy-scores.json``: what each head scored on two queries then.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scorer.artifact import head_to_bytes, load_head

DATA = Path(__file__).parent / "legacy_heads"
EXPECTED = json.loads((DATA / "legacy-scores.json").read_text())

pytestmark = pytest.mark.usefixtures("single_thread")


def _queries(make_refs) -> list[np.ndarray]:  # noqa: ANN001
    rng = np.random.default_rng(7)
    return [*make_refs(1, seed=3), rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)]


@pytest.mark.parametrize("method", ["knn", "aprilgan", "cff"])
def test_a_legacy_artifact_loads_and_scores_as_it_did(tiny_vit, make_refs, method: str) -> None:
    want = EXPECTED[method]
    head = load_head(DATA / f"legacy-{method}.safetensors", tiny_vit)
    assert head.method == method and head.meta["product"] == "legacy"
    assert (head.image_threshold, head.pixel_threshold) == (want["image_threshold"], want["pixel_threshold"])
    old = tiny_vit.precision
    try:
        tiny_vit.set_precision("fp32")  # the scores were recorded at fp32; other tests may leave it at bf16
        s = head.score(_queries(make_refs))
    finally:
        tiny_vit.set_precision(old)
    np.testing.assert_allclose(s.image_scores, want["image_scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([m.astype(np.float64).sum() for m in s.maps], want["map_sums"], rtol=1e-4)
    np.testing.assert_allclose([m.max() for m in s.maps], want["map_max"], rtol=1e-3)


@pytest.mark.parametrize("method", ["knn", "aprilgan", "cff"])
def test_a_legacy_artifact_written_again_loads_the_same(tmp_path: Path, tiny_vit, method: str) -> None:
    head = load_head(DATA / f"legacy-{method}.safetensors", tiny_vit)
    again = tmp_path / "again.safetensors"
    again.write_bytes(head_to_bytes(head))
    back = load_head(again, tiny_vit)
    assert type(back) is type(head) and back.method == head.method and back.options == head.options
    assert back.bank_features == head.bank_features
    for name in ("bank", "proj_w", "proj_b", "calib_w", "calib_b"):
        a, b = getattr(head, name), getattr(back, name)
        assert (a is None) == (b is None)
        assert a is None or all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a, b, strict=True))
