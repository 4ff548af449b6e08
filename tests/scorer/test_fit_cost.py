"""The fit's cost cuts must not change what it computes (issue 12: K=4 fit time)."""

from __future__ import annotations

from dataclasses import replace

import torch

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
