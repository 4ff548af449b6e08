"""Evaluation protocol on a synthetic MVTec-layout product (tiny backbone, real code paths)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from inspection_core.errors import ConfigError
from scorer.demo import make_demo_dataset
from scorer.evaluate import METRIC_KEYS, EvalConfig, markdown_table, run_eval, write_report
from scorer.fit import FitOptions
from scorer.metrics import image_metrics


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=6, n_good=6, n_bad=6)


def _cfg(**kw) -> EvalConfig:
    base = dict(shots=(1, 2), seeds=(0, 1), methods=("knn",))
    base.update(kw)
    return EvalConfig(**base)


def test_report_schema_and_reference_logging(demo, tiny_vit, tmp_path) -> None:
    rep = run_eval(
        [demo],
        tiny_vit,
        _cfg(methods=("knn", "cff")),
        fit_options=FitOptions(steps_stage1=3, steps_stage2=2, n_synthetic=2),
    )
    assert rep["protocol"] == "deployment"
    recs = rep["records"]
    assert {(r["method"], r["shots"]) for r in recs} == {(m, k) for m in ("knn", "cff") for k in (1, 2)}
    for r in recs:
        assert set(r["mean"]) == set(METRIC_KEYS) == set(r["std"])
        for k in METRIC_KEYS:
            assert 0.0 <= r["mean"][k] <= 1.0 and r["std"][k] >= 0.0
        assert [p["seed"] for p in r["per_seed"]] == [0, 1]
        for p in r["per_seed"]:
            assert len(p["references"]) == r["shots"] == len(set(p["references"]))
            assert all("/train/good/" in ref for ref in p["references"])
            # the verdict at the head's own threshold, as a worker would flag these very images
            sc = np.array([x["score"] for x in p["image_scores"]])
            y = np.array([x["label"] for x in p["image_scores"]]).astype(bool)
            flagged = sc >= p["image_threshold"]
            assert p["metrics"]["v_far"] == pytest.approx(flagged[~y].mean())
            assert p["metrics"]["v_recall"] == pytest.approx(flagged[y].mean())
    # cff and knn are evaluated on the same references for the same (K, seed)
    by = {(r["method"], r["shots"]): r for r in recs}
    for k in (1, 2):
        assert [p["references"] for p in by[("knn", k)]["per_seed"]] == [
            p["references"] for p in by[("cff", k)]["per_seed"]
        ]
    out = tmp_path / "r.json"
    write_report(rep, out)
    assert json.loads(out.read_text())["records"][0]["dataset"] == "demo_texture"
    table = markdown_table(rep)
    assert table.count("\n") == 1 + len(recs)


def test_knn_finds_the_demo_defects(demo, tiny_vit) -> None:
    """Dark blobs on a periodic texture: even a near-linear random backbone must rank them."""
    rep = run_eval([demo], tiny_vit, _cfg(shots=(2,), seeds=(0,)))
    m = rep["records"][0]["mean"]
    assert m["i_auroc"] >= 0.9, m
    assert m["p_auroc"] >= 0.9, m


def test_per_stage_figures(demo, tiny_vit) -> None:
    rep = run_eval([demo], tiny_vit, _cfg(shots=(1,), seeds=(0,), per_stage=True))
    st = rep["records"][0]["stages"]
    assert list(st) == [str(t) for t in tiny_vit.taps]
    assert all(not math.isnan(v["mean"]["p_auroc"]) for v in st.values())


def test_max_test_is_stratified(demo, tiny_vit) -> None:
    rep = run_eval([demo], tiny_vit, _cfg(shots=(1,), seeds=(0,), max_test=4))
    r = rep["records"][0]
    assert r["n_test"] == 4 and 1 <= r["n_defective"] <= 3


def test_bad_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown method"):
        EvalConfig(methods=("patchcore",))
    with pytest.raises(ConfigError, match="shots"):
        EvalConfig(shots=(0,))


def test_too_many_shots_names_the_numbers(demo, tiny_vit) -> None:
    from inspection_core.errors import DatasetError

    with pytest.raises(DatasetError, match="asked for 99 references but only 6"):
        run_eval([demo], tiny_vit, _cfg(shots=(99,), seeds=(0,)))


def test_feature_cache_reuse_gives_identical_metrics(demo, tiny_vit, tmp_path) -> None:
    cfg = _cfg(shots=(1,), seeds=(0,), cache_dir=str(tmp_path / "cache"))
    a = run_eval([demo], tiny_vit, cfg)
    n_files = len(list((tmp_path / "cache").glob("*.safetensors")))
    assert n_files >= 12
    b = run_eval([demo], tiny_vit, cfg)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == n_files
    assert np.allclose(
        [a["records"][0]["mean"][k] for k in METRIC_KEYS], [b["records"][0]["mean"][k] for k in METRIC_KEYS], atol=1e-6
    )


def _strict_loads(text: str) -> dict:
    """json.loads that refuses the NaN / Infinity constants Python's json writes by default."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_report_keeps_every_test_image_score(demo, tiny_vit) -> None:
    rep = run_eval([demo], tiny_vit, _cfg(methods=("knn-mean",), shots=(1,), seeds=(0, 1)))
    (rec,) = rep["records"]
    on_disk = sorted(p.relative_to(demo).as_posix() for p in (demo / "test").rglob("*.png"))
    assert rec["n_test"] == len(on_disk) == 12 and rec["data_root"] == str(demo)
    for p in rec["per_seed"]:
        rows = p["image_scores"]
        assert len(rows) == rec["n_test"]
        assert sorted(r["image"] for r in rows) == on_disk  # relative to the --data folder
        for r in rows:
            assert r["label"] == (0 if r["image"].startswith("test/good/") else 1)
            assert r["defect"] == r["image"].split("/")[1]
        # the scores are the ones the metrics came from
        m = image_metrics(np.array([r["score"] for r in rows]), np.array([r["label"] for r in rows]))
        assert m["i_auroc"] == pytest.approx(p["metrics"]["i_auroc"])
    assert rec["per_seed"][0]["image_scores"] != rec["per_seed"][1]["image_scores"]  # other references, other scores


def test_image_paths_are_relative_to_a_root_of_categories(tmp_path, tiny_vit, make_category) -> None:
    make_category(tmp_path / "root", "widget", n_train=2, n_good=2, defects={"dent": 2})
    rep = run_eval([tmp_path / "root"], tiny_vit, _cfg(methods=("knn-mean",), shots=(1,), seeds=(0,)))
    rows = rep["records"][0]["per_seed"][0]["image_scores"]
    assert {r["image"] for r in rows} == {f"widget/test/{d}/00{i}.png" for d in ("good", "dent") for i in (0, 1)}


@pytest.fixture(scope="module")
def blank_masks(tmp_path_factory: pytest.TempPathFactory):
    """The demo product with every defect mask emptied: all pixel metrics are undefined."""
    from PIL import Image

    root = make_demo_dataset(tmp_path_factory.mktemp("blank"), n_train=3, n_good=3, n_bad=3)
    for m in (root / "ground_truth").rglob("*.png"):
        Image.fromarray(np.zeros((192, 192), np.uint8)).save(m)
    return root


def test_written_report_is_strict_json_with_null_for_undefined(blank_masks, tiny_vit, tmp_path) -> None:
    rep = run_eval([blank_masks], tiny_vit, _cfg(methods=("knn-mean",), shots=(1,), seeds=(0,)))
    assert math.isnan(rep["records"][0]["mean"]["p_auroc"])  # in memory: nan, as the metrics return it
    out = tmp_path / "r.json"
    write_report(rep, out)
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    rec = _strict_loads(text)["records"][0]
    for k in ("p_auroc", "p_ap", "p_f1", "aupro"):
        assert rec["mean"][k] is None and rec["std"][k] is None and rec["per_seed"][0]["metrics"][k] is None
    assert 0.0 <= rec["mean"]["i_auroc"] <= 1.0
    assert "–" in markdown_table(_strict_loads(text))  # the table reads the written report too


def test_json_safe_converts_numpy_and_non_finite_values() -> None:
    from scorer.evaluate import json_safe

    got = json_safe({"a": np.float32(0.5), "b": [np.inf, -np.inf, np.nan], "c": (np.int64(3), np.bool_(True))})
    assert got == {"a": 0.5, "b": [None, None, None], "c": [3, True]}
    assert type(got["c"][0]) is int and type(got["c"][1]) is bool
    assert json_safe(np.array([1.0, np.nan])) == [1.0, None]


def _assert_png(path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()


def test_plots_are_written_beside_the_report(demo, tiny_vit, tmp_path) -> None:
    from scorer.plots import write_plots

    hists: dict = {}
    cfg = _cfg(methods=("knn-mean",), shots=(1, 2), seeds=(0, 1))
    rep = run_eval([demo], tiny_vit, cfg, pixel_histograms=hists)
    # one histogram per method, K and seed, keyed like the records
    assert set(hists) == {(str(demo), "demo_texture", "demo_texture", "knn-mean", k, s) for k in (1, 2) for s in (0, 1)}
    n_pixels = 12 * cfg.score.map_size**2
    assert all(int(h.normal.sum() + h.anomalous.sum()) == n_pixels for h in hists.values())
    out = tmp_path / "sub" / "report.json"
    pngs = write_plots(rep, out, hists)
    assert [p.name for p in pngs] == ["report_demo_texture_curves.png", "report_demo_texture_k_vs_metric.png"]
    for p in pngs:
        assert p.parent == out.parent
        _assert_png(p)


def test_plots_survive_undefined_pixel_metrics_and_missing_histograms(blank_masks, tiny_vit, tmp_path) -> None:
    from scorer.evaluate import json_safe
    from scorer.plots import write_plots

    hists: dict = {}
    rep = run_eval([blank_masks], tiny_vit, _cfg(methods=("knn-mean",), shots=(1,), seeds=(0,)), pixel_histograms=hists)
    for p in write_plots(rep, tmp_path / "a.json", hists):
        _assert_png(p)
    strict = _strict_loads(json.dumps(json_safe(rep)))
    for p in write_plots(strict, tmp_path / "b.json"):  # a report read back from disk, no histograms
        _assert_png(p)
