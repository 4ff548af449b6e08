"""A knn head on the mid-level taps never reads the last tap: its frames and its fit's held-out set and support
views stop after the last weighted tap's block, with scores and thresholds exactly as with every block run."""

from __future__ import annotations

import pytest
import torch

from inspection_core.errors import ConfigError
from scorer.fit import FitOptions, fit_head


class _BlockCalls:
    """Counts forward calls of the backbone's last block."""

    def __init__(self, backbone) -> None:  # noqa: ANN001
        self.n = 0
        self.handle = backbone.vit.blocks[-1].register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.n += 1


class _FullDepth:
    """Makes the backbone ignore ``depth`` (every block runs), to compare against."""

    def __init__(self, backbone, monkeypatch) -> None:  # noqa: ANN001
        real = backbone.extract
        monkeypatch.setattr(backbone, "extract", lambda px, depth=None: real(px))


def test_a_shallow_forward_gives_the_same_early_taps_and_zeros_after(tiny_vit) -> None:
    x = torch.rand(2, 3, tiny_vit.image_size, tiny_vit.image_size)
    full = tiny_vit.extract(x).tokens
    short = tiny_vit.extract(x, depth=2).tokens
    assert len(short) == len(full) == 4
    for a, b in zip(full[:2], short[:2], strict=True):
        assert torch.equal(a, b)
    assert all(torch.count_nonzero(t) == 0 and t.shape == full[0].shape for t in short[2:])
    for bad in (0, 5):
        with pytest.raises(ConfigError, match="depth must be 1..4"):
            tiny_vit.extract(x, depth=bad)


def test_head_depth_is_the_last_weighted_tap_for_knn_and_every_tap_for_learned_heads(
    tiny_vit, references, fitted_heads
) -> None:
    knn = fit_head(tiny_vit, references, method="knn", options=FitOptions(support_views="none", knn_taps="mid"))
    assert knn.options.tap_weights == (0.0, 1.0, 1.0, 0.0) and knn.depth == 3
    assert knn.with_options(tap_weights=None).depth == 4
    assert knn.with_options(tap_weights=(1.0, 0.0, 0.0, 0.0)).depth == 1
    assert fitted_heads["cff"].depth == 4 and fitted_heads["aprilgan"].depth == 4


def test_scoring_a_mid_tap_knn_head_skips_the_last_block_and_scores_the_same(tiny_vit, references, monkeypatch) -> None:
    knn = fit_head(tiny_vit, references, method="knn", options=FitOptions(support_views="none", knn_taps="mid"))
    calls = _BlockCalls(tiny_vit)
    try:
        shallow = knn.score(references)
        assert calls.n == 0  # block 4 never ran
        every = knn.with_options(tap_weights=None).score(references)
        assert calls.n > 0
    finally:
        calls.handle.remove()
    _FullDepth(tiny_vit, monkeypatch)
    full = knn.score(references)
    assert (shallow.image_scores == full.image_scores).all()
    assert (shallow.maps == full.maps).all()
    assert not (every.image_scores == full.image_scores).all()  # the comparison can tell heads apart


@pytest.mark.parametrize("taps", ["mid", "mid+first"])
def test_a_mid_tap_knn_fit_skips_the_last_block_yet_thresholds_as_with_every_block(
    tiny_vit, references, monkeypatch, taps
) -> None:
    opts = FitOptions(support_views="rot+flip", knn_taps=taps)
    calls = _BlockCalls(tiny_vit)
    try:
        shallow = fit_head(tiny_vit, references, method="knn", options=opts)
        # only the references themselves (the bank, at the fit's precision) ran every block
        assert calls.n == 1
    finally:
        calls.handle.remove()
    assert shallow.meta["view_taps"] == 3
    n_tok = shallow.grid[0] * shallow.grid[1]
    k = len(references)
    last = shallow.bank[-1].float()
    assert last[: k * n_tok].norm(dim=-1).min() > 0.5  # the references' rows of the unread tap are real
    assert torch.count_nonzero(last[k * n_tok :]) == 0  # the views' rows are zeros: never nearest
    _FullDepth(tiny_vit, monkeypatch)
    full = fit_head(tiny_vit, references, method="knn", options=opts)
    assert full.meta["view_taps"] == 3  # same rule; the backbone just ran every block
    assert shallow.options.tap_weights == full.options.tap_weights
    assert shallow.image_threshold == full.image_threshold
    assert shallow.pixel_threshold == full.pixel_threshold
    for a, b in zip(shallow.bank[:3], full.bank[:3], strict=True):
        assert torch.equal(a, b)
