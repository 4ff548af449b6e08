"""The fit's held-out set, the knn tap choice, the cff guard and fitting only what was asked for."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from scorer.errors import ConfigError
from scorer.fit import DEFAULT_METHOD, FitOptions, fit_head, fit_heads_from_features, guard

FAST = FitOptions(steps_stage1=5, steps_stage2=3, n_synthetic=4, n_validation=6)


def test_default_method_is_the_training_free_head_on_mid_level_taps(tiny_vit, references) -> None:
    head = fit_head(tiny_vit, references, options=FAST)
    assert DEFAULT_METHOD == "knn" and head.method == "knn" and head.proj_w is None
    assert FitOptions().knn_taps == "mid+first" and "first_added" in head.meta["tap_choice"]
    assert head.options.tap_weights in ((0.0, 1.0, 1.0, 0.0), (1.0, 1.0, 1.0, 0.0))
    q = head.meta["fit_metrics"]["held_out_quality"]
    assert 0 <= q["image_auroc"] <= 1 and 0 <= q["pixel_ap"] <= 1


def test_auto_taps_follow_the_held_out_rule(tiny_vit, references) -> None:
    head = fit_head(tiny_vit, references, options=replace(FAST, knn_taps="auto"))
    choice = head.meta["tap_choice"]
    w = np.array(head.options.tap_weights)
    assert set(w.tolist()) <= {0.0, 1.0} and w.sum() >= 1
    aps = np.array([t["pixel_ap"] for t in choice["per_tap"]])
    assert (aps[w == 1] >= 0.5 * aps.max() - 1e-9).all() and (aps[w == 0] < 0.5 * aps.max()).all()


def test_mid_plus_first_adds_the_first_tap_only_where_it_localises_best(tiny_vit, references, monkeypatch) -> None:
    from scorer.fit import knn as fit_mod

    head = fit_head(tiny_vit, references, options=replace(FAST, knn_taps="mid+first"))
    choice = head.meta["tap_choice"]
    aps = np.array([t["pixel_ap"] for t in choice["per_tap"]])
    assert len(aps) == 3  # the last tap is neither judged nor searched
    assert choice["first_added"] == bool(aps[0] >= aps[1:3].max())
    assert head.options.tap_weights == (float(choice["first_added"]), 1.0, 1.0, 0.0)
    # both outcomes, with the held-out APs made to say so
    for made, want in (([0.9, 0.5, 0.6], 1.0), ([0.59, 0.5, 0.6], 0.0)):
        fake = [{"pixel_ap": a, "image_auroc": 0.5, "score": a} for a in made]
        monkeypatch.setattr(fit_mod, "_held_out_per_tap", lambda *a, fake=fake, made=made: (fake, np.array(made), None))
        h = fit_head(tiny_vit, references, options=replace(FAST, knn_taps="mid+first", support_views="none"))
        assert h.options.tap_weights == (want, 1.0, 1.0, 0.0)
    # one reference: the prior stands, no held-out judgement at all
    monkeypatch.setattr(fit_mod, "_held_out_per_tap", lambda *a: pytest.fail("judged taps at K = 1"))
    one = fit_head(tiny_vit, references[:1], options=replace(FAST, knn_taps="mid+first"))
    assert one.options.tap_weights == (0.0, 1.0, 1.0, 0.0) and "K = 1" in one.meta["tap_choice"]["rule"]


def test_knn_taps_all_is_the_plain_mean(tiny_vit, references) -> None:
    head = fit_head(tiny_vit, references, options=replace(FAST, knn_taps="all"))
    assert head.options.tap_weights is None and "tap_choice" not in head.meta


def test_guard_keeps_the_training_free_head_when_calibration_hurts(tiny_vit, references) -> None:
    # a learning rate of 1 for 40 steps wrecks the calibration: the held-out set must show it
    hurt = replace(FAST, lr_stage1=1.0, lr_stage2=1.0, steps_stage1=40, steps_stage2=40)
    unguarded = fit_head(tiny_vit, references, options=replace(hurt, guard=False), method="cff")
    head = fit_head(tiny_vit, references, options=hurt, method="cff")
    g = head.meta["guard"]
    assert g["requested"] == "cff" and g["chosen"] == "knn" and head.method == "knn", g
    assert g["cff"]["score"] <= g["knn"]["score"]
    assert g["cff"] == unguarded.meta["fit_metrics"]["held_out_quality"]
    assert "does not beat" in g["reason"]
    assert head.options.tap_weights is not None  # the full training-free head, thresholds included
    assert math.isfinite(head.image_threshold) and math.isfinite(head.pixel_threshold)


def test_guard_rule_keeps_cff_only_when_it_is_better(fitted_heads) -> None:
    cff = fitted_heads["cff"]

    def with_score(h, score: float):  # noqa: ANN001, ANN202
        fm = {**h.meta["fit_metrics"], "held_out_quality": {"image_auroc": score, "pixel_ap": score, "score": score}}
        return replace(h, meta={**h.meta, "fit_metrics": fm})

    knn = replace(
        cff, method="knn", proj_w=None, proj_b=None, calib_w=None, calib_b=None, prototypes=None, bank_features="raw"
    )
    assert guard(with_score(cff, 0.9), with_score(knn, 0.8)).method == "cff"
    assert guard(with_score(cff, 0.8), with_score(knn, 0.8)).method == "knn"  # a tie keeps the training-free head
    assert guard(with_score(cff, 0.7), with_score(knn, 0.8)).meta["guard"]["chosen"] == "knn"


def test_a_fit_builds_only_the_methods_asked_for(tiny_vit, references) -> None:
    feats = tiny_vit.embed(references)
    only = fit_heads_from_features(tiny_vit, references, feats, options=FAST, methods=("aprilgan",))
    assert set(only) == {"aprilgan"}
    assert math.isnan(only["aprilgan"].meta["stage2_final_loss"])  # stage 2 never ran
    knn = fit_heads_from_features(tiny_vit, references, feats, options=FAST, methods=("knn",))
    assert set(knn) == {"knn"} and "stage1_seconds" not in knn["knn"].meta  # nothing trained
    with pytest.raises(ConfigError, match="unknown method 'patchcore'"):
        fit_heads_from_features(tiny_vit, references, feats, options=FAST, methods=("patchcore",))


def test_fit_option_strings_for_the_new_options() -> None:
    opts, _ = FitOptions().with_strings({"guard": "false", "knn_taps": "all", "letterbox": "true", "n_validation": "8"})
    assert not opts.guard and opts.knn_taps == "all" and opts.score.letterbox and opts.n_validation == 8
    with pytest.raises(ConfigError, match="guard='maybe' must be true or false"):
        FitOptions().with_strings({"guard": "maybe"})
    with pytest.raises(ConfigError, match="knn_taps must be one of mid, mid\\+first, auto, all"):
        FitOptions().with_strings({"knn_taps": "some"})


def test_one_reference_fit_warns_that_its_image_threshold_is_a_guess(tiny_vit, references, caplog) -> None:
    # measured: thresholds from views of a single reference flagged most good test images (BENCHMARKS.md)
    with caplog.at_level("WARNING", logger="scorer.fit"):
        fit_head(tiny_vit, references[:1], options=FAST)
    assert any("one reference" in r.getMessage() and "set-threshold" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="scorer.fit"):
        fit_head(tiny_vit, references[:2], options=FAST)
    assert not any("one reference" in r.getMessage() for r in caplog.records)


def test_image_threshold_rule_is_shared_by_the_fit_and_known_good_frames(tiny_vit, references) -> None:
    from statistics import NormalDist

    from scorer.fit import image_threshold_from_normals, threshold_from_good

    z = NormalDist().inv_cdf(0.99)
    assert image_threshold_from_normals([0.1, 0.1, 0.1], 0.01) == pytest.approx(0.1 + z * 0.005)  # sd floor: 5 %
    assert image_threshold_from_normals([0.1, 0.3], 0.01) == pytest.approx(0.2 + z * 0.1)
    assert image_threshold_from_normals([0.1, 0.1, 0.1, 0.1, 0.9], 0.4) == pytest.approx(0.9)  # never below the max
    with pytest.raises(ConfigError, match="finite scores"):
        image_threshold_from_normals([0.1, float("nan")], 0.01)
    with pytest.raises(ConfigError, match="image_far"):
        image_threshold_from_normals([0.1, 0.2], 0.7)
    head = fit_head(tiny_vit, references[:1], options=FAST)
    fm = head.meta["fit_metrics"]
    assert head.image_threshold == pytest.approx(image_threshold_from_normals(fm["normal_scores"], 0.01))
    good = threshold_from_good(head, references[1:], image_far=0.01)
    scores = head.score(references[1:]).image_scores
    assert good.image_threshold == pytest.approx(image_threshold_from_normals(scores, 0.01))
    assert good.pixel_threshold == head.pixel_threshold and good.meta["threshold_from_good"]["n"] == 2
    with pytest.raises(ConfigError, match="at least 2 known-good images"):
        threshold_from_good(head, references[:1])
