"""`cff-inspect bench line`: a category replayed as a line, every mode reported on the frames after commissioning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.line_replay import MODES, oracle_recall, stream_order
from cff_inspect.cli import main
from scorer.data import load_category
from scorer.demo import make_demo_dataset


def test_stream_keeps_references_out_and_about_a_tenth_defective(tmp_path: Path) -> None:
    cat = load_category(make_demo_dataset(tmp_path, n_train=30, n_good=20, n_bad=6))
    refs = list(cat.train[:2])
    paths, labels = stream_order(cat, refs, seed=0)
    assert not set(refs) & set(paths)
    assert len(paths) == 28 + 20 + 5 and labels.sum() == 5  # 48 good -> round(48 / 9) defective
    again, _ = stream_order(cat, refs, seed=0)
    other, _ = stream_order(cat, refs, seed=1)
    assert again == paths and other != paths


def test_oracle_recall_keeps_to_the_false_alarm_budget() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.5, 0.95, 0.8])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    assert oracle_recall(scores, labels, 0.0) == 1 / 3  # above the 0.9 good frame: only 0.95
    assert oracle_recall(scores, labels, 0.25) == 1.0  # one good frame may be flagged


def test_bench_line_reports_every_mode_after_commissioning(tmp_path: Path) -> None:
    data = make_demo_dataset(tmp_path / "data", n_train=40, n_good=20, n_bad=8)
    out = tmp_path / "line.json"
    rc = main(
        [
            "bench",
            "line",
            "--data",
            str(data),
            "--backbone",
            "tiny-vit",
            "--shots",
            "1",
            "--seeds",
            "0",
            "--commissioning",
            "30",
            "--labels",
            "4",
            "--refit-every",
            "2",
            "--timing-frames",
            "2",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    rep = json.loads(out.read_text())
    (run,) = rep["runs"]
    assert run["stream_frames"] == 39 + 20 + 7
    assert run["commissioning_frames"] == 30 and run["frames_after"] == 36
    assert set(run["modes"]) == set(MODES)
    for m in MODES:
        for f in ("far_after", "recall_after", "oracle_recall_after", "auroc_after"):
            assert f in run["modes"][m]
        assert 0 <= run["modes"][m]["far_after"] <= 1
    fb = run["modes"]["feedback"]
    assert fb["labels_used"] <= 4
    com = run["modes"]["commissioning"]
    assert all(g <= f * 1.5 + 1 for g, f in zip(com["bank_rows"], com["fitted_bank_rows"], strict=True))
    assert run["cost"]["static"] > 0 and run["cost"]["grown"] > 0
    assert "| demo_texture | 1 | feedback |" in rep["table"]
