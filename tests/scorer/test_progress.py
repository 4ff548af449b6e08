"""Fit, eval and train-base report structured progress with real totals (tiny random backbone)."""

from __future__ import annotations

import pytest

from scorer.demo import make_demo_dataset
from scorer.evaluate import EvalConfig, run_eval
from scorer.fit import FitOptions, fit_head
from scorer.progress import ProgressEvent
from scorer.train import TrainOptions, train_base

pytestmark = pytest.mark.usefixtures("single_thread")


def _by_stage(events: list[ProgressEvent]) -> dict[str, list[ProgressEvent]]:
    out: dict[str, list[ProgressEvent]] = {}
    for e in events:
        out.setdefault(e.stage, []).append(e)
    return out


def _counts_up_to_total(evs: list[ProgressEvent], total: int) -> None:
    assert {e.total for e in evs} == {total}, evs
    dones = [e.done for e in evs]
    assert dones == sorted(dones) and dones[0] == 0 and dones[-1] == total, dones


def test_fit_reports_every_stage_with_its_total(tiny_vit, make_refs) -> None:
    refs = make_refs(3)
    events: list[ProgressEvent] = []
    opts = FitOptions(steps_stage1=5, steps_stage2=3, n_synthetic=4, n_validation=4)
    fit_head(tiny_vit, refs, options=opts, method="cff", progress=events.append)
    st = _by_stage(events)
    order = list(dict.fromkeys(e.stage for e in events))
    assert order == ["features", "held-out", "views", "synthesis", "stage1", "stage2", "thresholds"], order
    _counts_up_to_total(st["features"], 3)  # the K references
    _counts_up_to_total(st["held-out"], 4)  # K >= 2: leave-one-out normals, plus n_validation anomalies
    _counts_up_to_total(st["views"], 3 * 5)  # the guard's knn bank: 2 flips + 3 quarter turns of each reference
    _counts_up_to_total(st["synthesis"], 4)
    _counts_up_to_total(st["stage1"], 5)
    _counts_up_to_total(st["stage2"], 3)
    _counts_up_to_total(st["thresholds"], 2)  # cff, and the training-free head its guard compares with
    assert all(e.loss == e.loss for e in st["stage1"][1:] + st["stage2"][1:])  # steps carry their loss (not NaN)


def test_long_stages_report_a_bounded_number_of_events(tiny_vit, make_refs) -> None:
    events: list[ProgressEvent] = []
    opts = FitOptions(steps_stage1=450, steps_stage2=1, n_synthetic=1, n_validation=1, batch_size=1)
    fit_head(tiny_vit, make_refs(1), options=opts, method="aprilgan", progress=events.append)
    stage1 = [e for e in events if e.stage == "stage1"]
    assert stage1[-1].done == 450 and len(stage1) <= 230  # ~200 events a stage at most, not one per step
    held = [(e.done, e.total) for e in events if e.stage == "held-out"]
    assert held == [(0, 5), (4, 5), (5, 5)]  # K = 1: 4 augmented views, then 1 synthetic anomaly


def test_eval_counts_test_features_and_runs(tiny_vit, tmp_path) -> None:
    demo = make_demo_dataset(tmp_path, n_train=4, n_good=3, n_bad=3)
    events: list[ProgressEvent] = []
    cfg = EvalConfig(shots=(1, 2), seeds=(0, 1), methods=("knn-mean", "knn"))
    run_eval(
        [demo],
        tiny_vit,
        cfg,
        fit_options=FitOptions(steps_stage1=3, steps_stage2=2, n_synthetic=2),
        progress=events.append,
    )
    st = _by_stage(events)
    _counts_up_to_total(st["features"], 6)  # the test images
    runs = st["runs"]
    _counts_up_to_total(runs, 2 * 2 * 2)  # methods x K x seeds
    assert [e.done for e in runs] == list(range(9))
    assert runs[-1].detail == "demo_texture knn K=2 seed=1"
    assert events[0].stage == "runs"  # the counter shows before anything slow starts
    assert "held-out" in st  # the knn fits inside report their own stages


def test_train_base_reports_features_and_steps(tiny_vit, tmp_path) -> None:
    aux = make_demo_dataset(tmp_path, n_train=2, n_good=2, n_bad=4, seed=3)
    events: list[ProgressEvent] = []
    head = train_base(tiny_vit, [aux], TrainOptions(epochs_stage1=2, epochs_stage2=1), progress=events.append)
    st = _by_stage(events)
    _counts_up_to_total(st["features"], head.meta["n_images"])
    _counts_up_to_total(st["stage1"], head.meta["steps_stage1"])
    _counts_up_to_total(st["stage2"], head.meta["steps_stage2"])
