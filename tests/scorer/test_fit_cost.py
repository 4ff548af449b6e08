"""The fit's cost cuts must not change what it computes (issue 12: K=4 fit time)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from inspection_core.errors import HeadError
from scorer.fit import FitOptions, _bank_without, fit_head
from scorer.head import build_bank, search_dtype


def test_leave_one_out_bank_is_the_rebuilt_one(tiny_vit, references) -> None:
    from scorer.fit import concat_outputs

    feats = tiny_vit.embed(references[:3])
    both = concat_outputs([feats, feats])  # a reference and its "view": bank image i comes from i % 3
    head = fit_head(tiny_vit, references[:3], method="knn", options=FitOptions(support_views="none"))
    head = replace(head, bank=build_bank(both.tokens), meta={**head.meta, "bank_sources": 3})
    for j in range(3):
        fast = _bank_without(head, both, j).bank
        keep = [i for i in range(6) if i % 3 != j]
        slow = build_bank([t[keep] for t in both.tokens])
        assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
        assert fast[0].shape[0] == 4 * both.tokens[0].shape[1]


def test_search_dtype_follows_the_backbone_precision(tiny_vit, references) -> None:
    head = fit_head(tiny_vit, references[:2], method="knn")
    old = tiny_vit.precision
    try:
        tiny_vit.set_precision("fp32")
        assert search_dtype(head) == head.options.bank_dtype == "float32"
        tiny_vit.set_precision("bf16")
        assert search_dtype(head) == "bfloat16"
        assert search_dtype(head.with_options(bank_dtype="float16")) == "bfloat16"
        assert search_dtype(replace(head, backbone=None)) == "float32"
    finally:
        tiny_vit.set_precision(old)


def test_thresholds_record_their_search_dtype(tiny_vit, references) -> None:
    old = tiny_vit.precision
    try:
        tiny_vit.set_precision("bf16")
        head = fit_head(tiny_vit, references[:2], method="knn")
    finally:
        tiny_vit.set_precision(old)
    assert head.meta["fit_metrics"]["search_dtype"] == "bfloat16"
    assert head.options.bank_dtype == "float32"  # the artifact keeps its own; a worker resolves "auto" itself


@pytest.mark.parametrize("taps", ["mid+first", "auto"])
def test_thresholds_reuse_the_tap_judgements_search_and_come_out_the_same(
    tiny_vit, references, monkeypatch, taps
) -> None:
    """The tap choice searches the held-out set once; the thresholds fuse that search instead of searching
    again, with the same thresholds and held-out figures to the bit. The comparison fit searches anew."""
    from scorer import head as head_mod
    from scorer.fit import knn as fit_mod

    opts = FitOptions(support_views="flip", knn_taps=taps, n_validation=5)
    rows = []
    real_search = head_mod.nn_distance

    def counting(query, bank, **kw):  # noqa: ANN001, ANN003, ANN202
        rows.append(query.shape[0])
        return real_search(query, bank, **kw)

    monkeypatch.setattr(head_mod, "nn_distance", counting)
    shared = fit_head(tiny_vit, references, method="knn", options=opts)
    n_shared = sum(rows)
    rows.clear()
    real_judge = fit_mod._held_out_per_tap
    monkeypatch.setattr(fit_mod, "_held_out_per_tap", lambda *a: (*real_judge(*a)[:2], None))
    fresh = fit_head(tiny_vit, references, method="knn", options=opts)
    n_fresh = sum(rows)
    assert shared.options.tap_weights == fresh.options.tap_weights
    assert (shared.image_threshold, shared.pixel_threshold) == (fresh.image_threshold, fresh.pixel_threshold)
    assert shared.meta["fit_metrics"] == fresh.meta["fit_metrics"]
    weighted = sum(w > 0 for w in shared.options.tap_weights)
    judged = 3 if taps == "mid+first" else 4  # mid+first never judges (nor searches) the last tap
    held = len(references) + opts.n_validation  # leave-one-out normals and synthetic anomalies
    assert n_shared == judged * held
    assert n_fresh == (judged + weighted) * held


def test_thresholds_refuse_a_search_of_other_taps(tiny_vit, references) -> None:
    from scorer.fit import held_out_set, search_held_out
    from scorer.fit import set_thresholds as calibrate_thresholds
    from scorer.head import knn_head

    opts = FitOptions(n_validation=3)
    feats = tiny_vit.embed(references)
    held = held_out_set(tiny_vit, references, feats, opts, 0)
    head = knn_head(tiny_vit, feats).with_options(tap_weights=(0.0, 1.0, 1.0, 1.0))
    search = search_held_out(head, feats, held, [0, 1, 2])
    with pytest.raises(HeadError, match=r"covers taps \(0, 1, 2\).*weights taps \[1, 2, 3\]"):
        calibrate_thresholds(head, feats, held, opts, search=search)
    ok = calibrate_thresholds(head.with_options(tap_weights=(1.0, 0.0, 1.0, 0.0)), feats, held, opts, search=search)
    again = calibrate_thresholds(head.with_options(tap_weights=(1.0, 0.0, 1.0, 0.0)), feats, held, opts)
    assert ok.image_threshold == again.image_threshold and ok.pixel_threshold == again.pixel_threshold
