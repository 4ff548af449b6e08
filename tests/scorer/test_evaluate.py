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
