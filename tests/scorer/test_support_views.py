"""Support augmentation of the knn bank: flips and quarter turns of each reference, left out with it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from inspection_core.errors import ConfigError
from scorer.artifact import load_head, save_head
from scorer.fit import FitOptions, _bank_without, fit_head, support_views, views_for

OPTS = FitOptions(n_validation=4, guard=False, support_views="none")


def test_views_are_the_flips_and_quarter_turns_after_the_square_resize(make_refs) -> None:
    img = make_refs(1, size_hw=(40, 72))[0]  # not square: turned after the resize, never stretched the other way
    v = support_views(img, "rot+flip", 56, letterbox=False)
    assert len(v) == 5 and all(x.shape == (56, 56, 3) for x in v)
    np.testing.assert_array_equal(v[2], np.rot90(v[4], 2))  # a quarter turn and three quarters: a half turn apart
    assert [x.shape for x in support_views(img, "rot", 56, letterbox=True)] == [(72, 40, 3), (40, 72, 3), (72, 40, 3)]
    assert support_views(img, "none", 56, letterbox=False) == []
    assert views_for("auto", 1) == views_for("auto", 4) == "rot+flip" and views_for("auto", 5) == "none"


def test_a_turned_part_is_normal_only_with_turned_views_in_the_bank(tiny_vit, make_refs) -> None:
    rng = np.random.default_rng(3)
    ref = (rng.random((56, 56, 3)) * 255).astype(np.uint8)  # no symmetry to hide behind
    plain = fit_head(tiny_vit, [ref], options=OPTS, method="knn")
    turned = fit_head(tiny_vit, [ref], options=replace(OPTS, support_views="rot"), method="knn")
    query = [np.ascontiguousarray(np.rot90(ref))]
    assert turned.score(query).image_scores[0] < 0.2 * plain.score(query).image_scores[0]
    assert turned.meta["support_views"] == "rot" and turned.meta["bank_images"] == 4 and turned.meta["shots"] == 1
    assert turned.bank[0].shape[0] == 4 * plain.bank[0].shape[0]


def test_leave_one_out_drops_every_view_of_the_reference(tiny_vit, make_refs, tmp_path) -> None:
    refs = make_refs(3)
    head = fit_head(tiny_vit, refs, options=replace(OPTS, support_views="flip"), method="knn")
    n = head.bank[0].shape[0] // 9  # 3 references x (itself + 2 flips)
    per_ref = [support_views(r, "flip", tiny_vit.image_size, False) for r in refs]
    feats = tiny_vit.embed(refs + [per_ref[r][i] for i in range(2) for r in range(3)])
    sub = _bank_without(head, feats, 1)
    assert sub.bank[0].shape[0] == 6 * n  # 2 references x 3 views: nothing of reference 1 is left
    assert head.meta["fit_metrics"]["held_out"] == "leave-one-out"
    save_head(head, tmp_path / "h.safetensors", product="p", version=1)
    back = load_head(tmp_path / "h.safetensors", tiny_vit)
    assert back.meta["support_views"] == "flip" and back.bank[0].shape == head.bank[0].shape


def test_bad_support_views_name_the_choices() -> None:
    with pytest.raises(ConfigError, match="support_views must be one of none, flip, rot, rot\\+flip, auto"):
        FitOptions(support_views="mirror")
    opts, _ = FitOptions().with_strings({"support_views": "flip"})
    assert opts.support_views == "flip"


def test_the_default_adds_views_up_to_four_references(tiny_vit, make_refs) -> None:
    refs = make_refs(5)
    four = fit_head(tiny_vit, refs[:4], options=FitOptions(n_validation=4), method="knn")
    five = fit_head(tiny_vit, refs, options=FitOptions(n_validation=4), method="knn")
    assert four.meta["support_views"] == "rot+flip" and four.meta["bank_images"] == 4 * 6
    assert five.meta["support_views"] == "none" and five.meta["bank_images"] == 5  # the bank never exceeds 24
