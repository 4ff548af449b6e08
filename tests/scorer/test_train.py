"""train-base on a tiny auxiliary dataset, and the cross-dataset protocol that uses it."""

from __future__ import annotations

import pytest
import torch

from inspection_core.errors import ConfigError, DatasetError, HeadError
from scorer.artifact import load_head, save_head
from scorer.demo import make_demo_dataset
from scorer.evaluate import EvalConfig, run_eval
from scorer.fit import FitOptions, fit_head
from scorer.train import TrainOptions, train_base


@pytest.fixture(scope="module")
def aux(tmp_path_factory: pytest.TempPathFactory):
    return make_demo_dataset(tmp_path_factory.mktemp("aux"), n_train=4, n_good=4, n_bad=6, seed=3)


def test_train_base_then_fit_reuses_projections(aux, tiny_vit, tmp_path) -> None:
    base = train_base(tiny_vit, [aux], TrainOptions(epochs_stage1=2, epochs_stage2=1), cache_dir=tmp_path / "c")
    assert base.meta["base"] and base.meta["n_defective"] == 6
    assert all(b.shape[0] == 0 for b in base.bank)
    # a base head cannot score: it has no references yet
    with pytest.raises(HeadError, match="empty memory bank"):
        base.score([torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()])
    p = tmp_path / "base.safetensors"
    save_head(base, p)
    loaded = load_head(p, tiny_vit)
    for a, b in zip(loaded.proj_w, base.proj_w, strict=True):
        assert torch.equal(a, b)
    refs = [torch.full((40, 40, 3), 120, dtype=torch.uint8).numpy()] * 2
    head = fit_head(tiny_vit, refs, base_head=loaded, options=FitOptions(steps_stage2=2, n_synthetic=2, guard=False))
    for a, b in zip(head.proj_w, base.proj_w, strict=True):
        assert torch.equal(a, b)
    assert head.bank[0].shape[0] == 2 * 64


def test_cross_dataset_protocol_is_labelled(aux, tiny_vit, tmp_path) -> None:
    base = train_base(tiny_vit, [aux], TrainOptions(epochs_stage1=1, epochs_stage2=1))
    target = make_demo_dataset(tmp_path / "t", n_train=4, n_good=3, n_bad=3, seed=9)
    rep = run_eval(
        [target],
        tiny_vit,
        EvalConfig(shots=(1,), seeds=(0,), methods=("aprilgan", "cff")),
        base_head=base,
        base_head_path="base.safetensors",
        fit_options=FitOptions(steps_stage2=2, n_synthetic=2),
    )
    assert rep["protocol"] == "cross-dataset" and rep["base_head"] == "base.safetensors"
    assert len(rep["records"]) == 2
    # the cross-dataset cff row is guarded like `heads fit --base-head`: knn is fitted beside it as its reference
    (cff,) = [r for r in rep["records"] if r["method"] == "cff"]
    for run in cff["per_seed"]:
        assert run["guard"] is not None and run["guard"]["chosen"] in ("cff", "knn")
        assert set(run["guard"]) >= {"cff", "knn", "reason"}


def test_train_base_needs_masks(tmp_path, make_category, tiny_vit) -> None:
    cat = make_category(tmp_path, "nomask", defects={})
    with pytest.raises(DatasetError, match="needs defective images with masks"):
        train_base(tiny_vit, [cat])


def test_base_head_for_another_backbone_is_refused(aux, tiny_vit, tiny_vit_seed1) -> None:
    base = train_base(tiny_vit, [aux], TrainOptions(epochs_stage1=1, epochs_stage2=0))
    refs = [torch.full((40, 40, 3), 120, dtype=torch.uint8).numpy()]
    with pytest.raises(HeadError, match="weights"):
        fit_head(tiny_vit_seed1, refs, base_head=base)


def test_base_head_for_knn_alone_is_refused_but_guards_cff(aux, tiny_vit) -> None:
    base = train_base(tiny_vit, [aux], TrainOptions(epochs_stage1=1, epochs_stage2=1))
    refs = [torch.full((40, 40, 3), 120 + 5 * i, dtype=torch.uint8).numpy() for i in range(2)]
    with pytest.raises(ConfigError, match="knn is training-free and takes no base head"):
        fit_head(tiny_vit, refs, base_head=base, method="knn")
    # what `heads fit --base-head` deploys: the calibrated head behind its guard, knn its reference
    head = fit_head(tiny_vit, refs, base_head=base, options=FitOptions(steps_stage2=2, n_synthetic=2))
    assert head.meta["guard"]["requested"] == "cff" and head.meta["guard"]["chosen"] in ("cff", "knn")
