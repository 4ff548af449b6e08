"""scorer.head (identity init, folding, kNN maps, scores, regions, compatibility)
and scorer.fit (fit_head with and without a base head) on the tiny-vit backbone."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inspection_core.errors import ConfigError, HeadError, ImageError
from scorer.backbones import load_backbone
from scorer.backbones.base import BackboneOutput
from scorer.fit import FitOptions, fit_head, fit_heads_from_features
from scorer.head import Head, ScoreOptions, build_bank, check_compatible, find_regions, knn_head

S, D, E, G = 4, 32, 24, 8  # stages, token width, projection width, grid

pytestmark = pytest.mark.usefixtures("single_thread")


def _tokens(b: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, G * G, D, generator=g) for _ in range(S)]


def _parts(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    proj_w = [torch.randn(E, D, generator=g) / math.sqrt(D) for _ in range(S)]
    proj_b = [0.1 * torch.randn(E, generator=g) for _ in range(S)]
    protos = F.normalize(torch.randn(S, E, 2, generator=g), dim=1)
    return dict(proj_w=proj_w, proj_b=proj_b, prototypes=protos)


def _head(method: str, bank: list[torch.Tensor], bank_features: str, parts: dict, **kw: object) -> Head:
    return Head(
        method=method,
        backbone_spec="tiny-vit",
        weights_id="random:0",
        taps=(1, 2, 3, 4),
        image_size=64,
        grid=(G, G),
        bank=bank,
        bank_features=bank_features,
        options=ScoreOptions(),
        **parts,
        **kw,  # type: ignore[arg-type]
    )


def _projected(tokens: list[torch.Tensor], parts: dict) -> list[torch.Tensor]:
    return [F.linear(t, parts["proj_w"][i], parts["proj_b"][i]) for i, t in enumerate(tokens)]


def _out(tokens: list[torch.Tensor]) -> BackboneOutput:
    return BackboneOutput(tokens, (G, G))


# -- (1) identity init ---------------------------------------------------------------
def test_identity_calibration_is_a_pass_through() -> None:
    parts = _parts()
    ref, query = _tokens(2, 1), _tokens(3, 2)
    bank_proj = build_bank(_projected(ref, parts))
    ident = dict(calib_w=[torch.eye(E) for _ in range(S)], calib_b=[torch.zeros(E) for _ in range(S)])
    april = _head("aprilgan", bank_proj, "projected", parts)
    cff = _head("cff", bank_proj, "projected", parts, **ident)
    # the calibrated bank of an identity calibration is the projected bank
    cff_cal = _head("cff", bank_proj, "calibrated", parts, **ident)
    cal_bank = build_bank(cff_cal.stage_features(ref)[0])
    for a, b in zip(cal_bank, bank_proj, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=0)  # float16 storage
    cff_cal = replace(cff_cal, bank=cal_bank)
    ra = april.score_tokens(_out(query), per_stage=True)
    for h in (cff, cff_cal):
        for fold in (True, False):
            r = h.score_tokens(_out(query), fold=fold, per_stage=True)
            torch.testing.assert_close(r.maps, ra.maps, atol=1e-5, rtol=0)
            torch.testing.assert_close(r.image_scores, ra.image_scores, atol=1e-5, rtol=0)
            torch.testing.assert_close(r.stage_maps, ra.stage_maps, atol=1e-5, rtol=0)
    # the same holds with the raw-token bank of April-GAN
    raw = build_bank(ref)
    r1 = _head("aprilgan", raw, "raw", parts).score_tokens(_out(query))
    r2 = _head("cff", raw, "raw", parts, **ident).score_tokens(_out(query))
    torch.testing.assert_close(r2.maps, r1.maps, atol=1e-5, rtol=0)


# -- (2) folding ------------------------------------------------------------------------
def _random_calib(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        calib_w=[torch.eye(E) + 0.3 * torch.randn(E, E, generator=g) / math.sqrt(E) for _ in range(S)],
        calib_b=[0.2 * torch.randn(E, generator=g) for _ in range(S)],
    )


@pytest.mark.parametrize("bank_features", ["projected", "calibrated", "raw"])
def test_folded_equals_unfolded(bank_features: str) -> None:
    parts, calib = _parts(3), _random_calib(4)
    ref, query = _tokens(2, 5), _tokens(3, 6)
    h = _head("cff", [torch.empty(0)] * S, bank_features, parts, **calib)
    cal, proj = h.stage_features(ref, fold=False)
    bank = build_bank({"raw": ref, "projected": proj, "calibrated": cal}[bank_features])
    h = replace(h, bank=bank)
    f_fold, _ = h.stage_features(query, fold=True)
    f_unf, _ = h.stage_features(query, fold=False)
    for a, b in zip(f_fold, f_unf, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    r1, r2 = h.score_tokens(_out(query), fold=True), h.score_tokens(_out(query), fold=False)
    torch.testing.assert_close(r1.maps, r2.maps, atol=1e-4, rtol=0)
    torch.testing.assert_close(r1.image_scores, r2.image_scores, atol=1e-4, rtol=0)
    # and the calibration really changes the maps (so the comparison above means something)
    plain = replace(h, calib_w=None, calib_b=None).score_tokens(_out(query))
    assert (plain.maps - r1.maps).abs().max() > 1e-2


def test_folded_is_the_composition() -> None:
    parts, calib = _parts(7), _random_calib(8)
    h = _head("cff", build_bank(_tokens(1, 0)), "raw", parts, **calib)
    for i, (w, b) in enumerate(h.folded()):
        cw, cb = calib["calib_w"][i].double(), calib["calib_b"][i].double()
        pw, pb = parts["proj_w"][i].double(), parts["proj_b"][i].double()
        torch.testing.assert_close(w.double(), cw @ pw, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.double(), cw @ pb + cb, atol=1e-5, rtol=0)
    # no calibration: folding is the projection itself
    plain = _head("aprilgan", h.bank, "raw", parts).folded()
    for (w, b), pw, pb in zip(plain, parts["proj_w"], parts["proj_b"], strict=True):
        assert torch.equal(w, pw) and torch.equal(b, pb)
    with pytest.raises(HeadError):
        replace(h, method="knn", proj_w=None, proj_b=None, calib_w=None, calib_b=None, prototypes=None).folded()


# -- fusion, image score and bank chunking ------------------------------------------------
def test_fusion_rule_and_image_score() -> None:
    parts, calib = _parts(9), _random_calib(10)
    ref, query = _tokens(2, 11), _tokens(2, 12)
    cff = _head("cff", [torch.empty(0)] * S, "calibrated", parts, **calib)
    cff = replace(cff, bank=build_bank(cff.stage_features(ref)[0]))
    r = cff.score_tokens(_out(query), per_stage=True)
    assert r.stage_maps.shape == (2, S, 256, 256)
    torch.testing.assert_close(r.maps, r.stage_maps.sum(1), atol=1e-5, rtol=1e-5)  # April-GAN: plain sum
    knn = _head("knn", build_bank(ref), "raw", dict(proj_w=None, proj_b=None, prototypes=None))
    rk = knn.score_tokens(_out(query), per_stage=True)
    torch.testing.assert_close(rk.maps, rk.stage_maps.mean(1), atol=1e-6, rtol=1e-5)
    # image score: mean of the top 1 % of the fused map, or its max
    flat = r.maps.flatten(1)
    k = round(flat.shape[1] * 0.01)
    torch.testing.assert_close(r.image_scores, flat.topk(k, 1).values.mean(1))
    rmax = cff.with_options(image_score="max").score_tokens(_out(query))
    torch.testing.assert_close(rmax.image_scores, flat.amax(1))
    # the bank is searched in chunks; the chunk size must not matter
    rchunk = cff.with_options(bank_chunk=7).score_tokens(_out(query))
    torch.testing.assert_close(rchunk.maps, r.maps, atol=1e-5, rtol=0)
    # no smoothing: bilinear with align_corners keeps the grid values at the corners, and each
    # stage's grid value is (1 - max cosine to the bank) + P(anomalous | prototypes, T = 100)
    raw_map = cff.with_options(smooth_sigma=0.0).score_tokens(_out(query)).maps
    cal, _ = cff.stage_features(query)
    expected = torch.zeros(2)
    for i in range(S):
        f = F.normalize(cal[i][:, 0], dim=-1)  # token 0 = top-left patch
        dist = 1 - (f @ cff.bank[i].float().T).amax(-1)
        logits = 100 * f @ parts["prototypes"][i]
        expected += dist + torch.sigmoid(logits[:, 1] - logits[:, 0])
    torch.testing.assert_close(raw_map[:, 0, 0], expected, atol=1e-4, rtol=0)


# -- (3) kNN head ------------------------------------------------------------------------
def test_knn_identical_query_is_near_zero_and_alteration_is_located(tiny_vit, make_refs) -> None:
    (ref,) = make_refs(1, seed=11)
    head = knn_head(tiny_vit, tiny_vit.embed([ref]))
    assert head.method == "knn" and head.bank_features == "raw" and head.proj_w is None
    assert [tuple(b.shape) for b in head.bank] == [(G * G, D)] * S and head.bank[0].dtype == torch.float16
    same = head.score_tokens(tiny_vit.embed([ref]))
    assert same.maps.shape == (1, 256, 256)
    assert same.maps.abs().max().item() < 5e-3
    altered = ref.copy()
    altered[16:32, 40:56] = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    r = head.score_tokens(tiny_vit.embed([altered]))
    amap = r.maps[0].numpy()
    y, x = np.unravel_index(amap.argmax(), amap.shape)
    assert 64 <= y < 128 and 160 <= x < 224, (y, x)  # 64 px image -> 256 px map: x4
    assert r.image_scores[0] > 10 * max(same.image_scores[0].item(), 1e-4)
    assert amap[:, :100].max() < 0.25 * amap.max()  # the far-away, untouched side stays quiet


# -- (4) scores and regions ------------------------------------------------------------------
def test_find_regions_scales_boxes_to_source() -> None:
    amap = np.zeros((256, 256), np.float32)
    amap[64:128, 32:96] = 0.9
    amap[200:210, 200:256] = 0.6
    amap[0, 0] = amap[1, 1] = 0.7  # diagonal neighbours: one component (8-connectivity)
    regions = find_regions(amap, 0.5, (128, 512))  # source H = 128, W = 512
    assert [round(r.peak, 3) for r in regions] == [0.9, 0.7, 0.6]  # sorted by peak
    big, diag, stripe = regions
    assert (big.x_min, big.y_min, big.x_max, big.y_max) == (64, 32, 192, 64)
    assert big.area == 64 * 64  # 64 x 64 map pixels, each 2 x 0.5 source pixels
    assert (stripe.x_min, stripe.y_min, stripe.x_max, stripe.y_max) == (400, 100, 512, 105)
    assert stripe.area == 10 * 56
    assert (diag.x_min, diag.y_min, diag.x_max, diag.y_max) == (0, 0, 4, 1)
    assert [r.peak for r in find_regions(amap, 0.5, (128, 512), min_area=1000)] == [pytest.approx(0.9)]
    assert find_regions(amap, float("nan"), (128, 512)) == []
    assert find_regions(amap, 1.0, (128, 512)) == []


def test_head_score_outputs(fitted_heads, references) -> None:
    head = fitted_heads["cff"]
    rng = np.random.default_rng(0)
    images = [references[0], rng.integers(0, 256, (40, 100, 3), dtype=np.uint8), references[1][:, :50]]
    s = head.score(images, batch_size=2)
    assert s.maps.dtype == np.float16 and s.maps.shape == (3, 256, 256)
    assert s.image_scores.shape == (3,) and np.isfinite(s.image_scores).all()
    np.testing.assert_allclose(s.normalized_scores, s.image_scores / head.image_threshold, rtol=1e-6)
    np.testing.assert_array_equal(s.is_defect, s.image_scores >= head.image_threshold)
    assert s.is_defect[1] and not s.is_defect[0]  # noise is a defect, a reference is not
    # verdicts around a threshold in the middle of the scores
    mid = float(np.sort(s.image_scores)[1])
    s2 = head.with_thresholds(image=mid).score(images)
    np.testing.assert_array_equal(s2.is_defect, s.image_scores >= mid)
    assert s2.normalized_scores[np.argsort(s.image_scores)[1]] == pytest.approx(1.0)
    # a pixel threshold below the whole map: one region covering the whole source image
    low = head.with_thresholds(pixel=float(s.maps.min()) - 1.0).score(images)
    for img, regs in zip(images, low.regions, strict=True):
        h, w = img.shape[:2]
        assert len(regs) == 1
        r = regs[0]
        assert (r.x_min, r.y_min, r.x_max, r.y_max) == (0, 0, w, h)
        assert r.area == h * w
    # batching does not change results
    one = head.score(images, batch_size=1)
    np.testing.assert_allclose(one.image_scores, s.image_scores, rtol=1e-5, atol=1e-6)


def test_head_score_without_thresholds_and_empty(fitted_heads, references) -> None:
    head = fitted_heads["cff"].with_thresholds(image=float("nan"), pixel=float("nan"))
    head = replace(head, image_threshold=float("nan"), pixel_threshold=float("nan"))
    s = head.score(references[:2])
    assert np.isnan(s.normalized_scores).all() and not s.is_defect.any() and s.regions == [[], []]
    e = head.score([])
    assert e.maps.shape == (0, 256, 256) and e.maps.dtype == np.float16 and e.regions == []
    with pytest.raises(HeadError, match="backbone"):
        replace(head, backbone=None).score(references[:1])
    with pytest.raises(ImageError, match="image 1"):
        head.score([references[0], references[1].astype(np.float32)])


# -- (5) mismatches --------------------------------------------------------------------------
def test_grid_or_stage_mismatch_raises(fitted_heads, references) -> None:
    head = fitted_heads["cff"]
    small = [t[:, :16] for t in _tokens(1, 0)]
    with pytest.raises(HeadError, match="grid"):
        head.score_tokens(BackboneOutput(small, (4, 4)))
    with pytest.raises(HeadError, match="stages"):
        head.score_tokens(BackboneOutput(_tokens(1, 0)[:3], (G, G)))
    bb32 = load_backbone("tiny-vit", image_size=32)  # 4 x 4 grid
    with pytest.raises(HeadError, match="grid"):
        replace(head, backbone=bb32).score(references[:1])
    with pytest.raises(HeadError, match="image size 64"):
        check_compatible(head, bb32)


def test_check_compatible_names_the_mismatch(fitted_heads, tiny_vit, tiny_vit_seed1) -> None:
    head = fitted_heads["cff"]
    check_compatible(head, tiny_vit)
    with pytest.raises(HeadError, match="random:0.*random:1"):
        check_compatible(head, tiny_vit_seed1)
    with pytest.raises(HeadError, match="dinov2-vits14"):
        check_compatible(replace(head, backbone_spec="dinov2-vits14"), tiny_vit)
    with pytest.raises(HeadError, match="taps"):
        check_compatible(replace(head, taps=(1, 2, 3, 5)), tiny_vit)


def test_head_validation() -> None:
    with pytest.raises(ConfigError):
        _head("patchcore", build_bank(_tokens(1, 0)), "raw", _parts())
    with pytest.raises(HeadError):
        _head("cff", build_bank(_tokens(1, 0))[:3], "raw", _parts())
    with pytest.raises(HeadError):
        Head("knn", "tiny-vit", "random:0", (1, 2, 3, 4), 64, (G, G), build_bank(_tokens(1, 0)), "projected")
    with pytest.raises(ConfigError):
        ScoreOptions(image_score="mean")


# -- fit ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,held_out", [(1, "augmented views"), (3, "leave-one-out")])
def test_fit_head_thresholds_and_metrics(
    tiny_vit, references, fit_options, fitted_heads, k: int, held_out: str
) -> None:
    head = fit_head(tiny_vit, references[:k], options=fit_options, method="cff")
    assert head.method == "cff" and head.bank_features == "calibrated"
    assert math.isfinite(head.image_threshold) and math.isfinite(head.pixel_threshold)
    fm = head.meta["fit_metrics"]
    assert fm["held_out"] == held_out
    n_normal = fit_options.n_augment_k1 if k == 1 else k
    assert len(fm["normal_scores"]) == n_normal
    assert head.image_threshold >= max(fm["normal_scores"])  # no held-out normal is a false alarm
    assert head.pixel_threshold >= fm["normal_pixel_quantile"]
    assert head.meta["shots"] == k
    assert [tuple(b.shape) for b in head.bank] == [(k * G * G, D)] * S
    assert head.calib_w is not None and head.backbone is tiny_vit
    if k == 3:  # same references, options and seed as the session fixture: the same head
        ref = fitted_heads["cff"]
        assert (head.image_threshold, head.pixel_threshold) == (ref.image_threshold, ref.pixel_threshold)
        for a, b in zip(head.calib_w + head.proj_w, ref.calib_w + ref.proj_w, strict=True):
            assert torch.equal(a, b)


def test_fit_without_stage2_and_raw_bank_equals_aprilgan(tiny_vit, references, fit_options) -> None:
    """Stage 2 starts from identity: with no steps the CFF head must score exactly like April-GAN."""
    opts = replace(fit_options, steps_stage2=0, bank_features="raw")
    heads = fit_heads_from_features(tiny_vit, references[:2], tiny_vit.embed(references[:2]), options=opts)
    cff, april = heads["cff"], heads["aprilgan"]
    assert april.method == "aprilgan" and april.calib_w is None
    for w, b in zip(cff.calib_w, cff.calib_b, strict=True):
        assert torch.equal(w, torch.eye(w.shape[0])) and not b.any()
    feats = tiny_vit.embed(references)
    r1, r2 = cff.score_tokens(feats), april.score_tokens(feats)
    torch.testing.assert_close(r1.maps, r2.maps, atol=1e-5, rtol=0)
    assert cff.image_threshold == pytest.approx(april.image_threshold, rel=1e-5)
    assert cff.pixel_threshold == pytest.approx(april.pixel_threshold, rel=1e-5)


def test_fit_knn(tiny_vit, references, fit_options) -> None:
    head = fit_head(tiny_vit, references, options=fit_options, method="knn")
    assert head.method == "knn" and head.proj_w is None
    assert math.isfinite(head.image_threshold) and math.isfinite(head.pixel_threshold)
    assert head.meta["fit_metrics"]["held_out"] == "leave-one-out"
    s = head.score(references[:1])
    assert s.maps.shape == (1, 256, 256)
    with pytest.raises(ConfigError):
        fit_head(tiny_vit, references, options=fit_options, method="patchcore")


def test_fit_reference_validation(tiny_vit, references, fit_options) -> None:
    with pytest.raises(ConfigError):
        fit_head(tiny_vit, [], options=fit_options)
    with pytest.raises(ImageError, match="reference 1"):
        fit_head(tiny_vit, [references[0], references[1].astype(np.float32)], options=fit_options)
    with pytest.raises(ImageError, match="reference 0"):
        fit_head(tiny_vit, [references[0][..., 0]], options=fit_options)
    with pytest.raises(ImageError):
        fit_head(tiny_vit, [np.zeros((64, 64, 4), np.uint8)], options=fit_options, method="knn")
    with pytest.raises(ConfigError):
        FitOptions(bank_features="fused")


def test_fit_with_base_head_for_another_backbone(fitted_heads, tiny_vit, tiny_vit_seed1, references, fit_options):
    base = fitted_heads["cff"]
    with pytest.raises(HeadError, match="random:1"):
        fit_head(tiny_vit, references[:2], base_head=replace(base, weights_id="random:1"), options=fit_options)
    with pytest.raises(HeadError, match="random:0"):
        fit_head(tiny_vit_seed1, references[:2], base_head=base, options=fit_options)
    with pytest.raises(HeadError, match="clip:ViT-B-16"):
        fit_head(tiny_vit, references[:2], base_head=replace(base, backbone_spec="clip:ViT-B-16"), options=fit_options)
    knn = knn_head(tiny_vit, tiny_vit.embed(references[:1]))
    with pytest.raises(HeadError, match="projection"):
        fit_head(tiny_vit, references[:2], base_head=knn, options=fit_options)


def test_fit_with_base_head_reuses_projections(fitted_heads, tiny_vit, fit_options, make_refs) -> None:
    base = fitted_heads["cff"]
    new_refs = make_refs(2, seed=42)
    head = fit_head(tiny_vit, new_refs, base_head=base, options=fit_options)
    assert head.meta["base_head"] is True
    for a, b in zip(head.proj_w, base.proj_w, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(head.proj_b, base.proj_b, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(head.prototypes, base.prototypes)
    assert math.isfinite(head.image_threshold) and math.isfinite(head.pixel_threshold)
    assert head.bank[0].shape[0] == 2 * G * G  # the bank holds the new references only
    # with no stage-2 steps the base calibration is kept unchanged too
    kept = fit_head(tiny_vit, new_refs, base_head=base, options=replace(fit_options, steps_stage2=0))
    for a, b in zip(kept.calib_w, base.calib_w, strict=True):
        assert torch.equal(a, b)


def test_a_tap_with_zero_weight_is_not_searched_and_the_map_is_unchanged(tiny_vit, make_refs, monkeypatch) -> None:
    """The default knn head drops the first and last taps; skipping their bank search must not move a score."""
    refs = make_refs(2)
    feats = tiny_vit.embed(refs)
    head = knn_head(tiny_vit, feats).with_options(tap_weights=(0.0, 1.0, 1.0, 0.0), smooth_sigma=0.0)
    query = tiny_vit.embed(make_refs(2, seed=5))
    calls = []
    import scorer.head as head_mod

    real = head_mod.nn_distance

    def counting(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(head_mod, "nn_distance", counting)
    fast = head.score_tokens(query)
    n_fast = len(calls)
    full = head.score_tokens(query, per_stage=True)  # every tap searched
    assert n_fast == 2 and len(calls) == 2 + 4
    torch.testing.assert_close(fast.maps, full.maps)
    torch.testing.assert_close(fast.image_scores, full.image_scores)


@pytest.mark.parametrize("chunk", [7, 4096])
def test_bank_search_in_blocks_is_the_exact_nearest_cosine(monkeypatch, chunk) -> None:
    """The CPU search tiles query and bank rows (cache-sized blocks); every tiling gives the nearest cosine."""
    from scorer import head as head_mod

    gen = torch.Generator().manual_seed(3)
    query = torch.randn(3, 50, 16, generator=gen)
    bank = F.normalize(torch.randn(61, 16, generator=gen), dim=-1)
    want = 1 - (F.normalize(query, dim=-1) @ bank.T).amax(-1)
    whole = head_mod.nn_distance(query, bank, chunk=chunk)
    monkeypatch.setattr(head_mod, "_CPU_BLOCK", 64)  # 64 // 7 = 9 query rows a block: ragged tiles both ways
    tiled = head_mod.nn_distance(query, bank, chunk=chunk)
    assert whole.shape == tiled.shape == (3, 50)
    assert torch.allclose(whole, want, atol=1e-6) and torch.allclose(tiled, want, atol=1e-6)
    low = head_mod.nn_distance(query, bank, chunk=chunk, dtype="bfloat16")
    assert (low - want).abs().max() < 2e-2
