"""scorer.data: MVTec AD layout discovery and reproducible reference draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspection_core.errors import DatasetError
from scorer.data import discover, draw_references, load_category


def test_single_category_discovered(tmp_path: Path, make_category) -> None:
    cat_dir = make_category(tmp_path, "bottle", n_train=3, n_good=2, defects={"crack": 2, "hole": 1})
    cats = discover(cat_dir)
    assert len(cats) == 1
    c = cats[0]
    assert (c.dataset, c.name, c.key, c.root) == ("bottle", "bottle", "bottle", cat_dir)
    assert [p.name for p in c.train] == ["000.png", "001.png", "002.png"]
    assert all(p.parent == cat_dir / "train" / "good" for p in c.train)
    by_defect: dict[str, list] = {}
    for s in c.test:
        by_defect.setdefault(s.defect, []).append(s)
    assert sorted(by_defect) == ["crack", "good", "hole"]
    assert len(by_defect["crack"]) == 2 and len(by_defect["hole"]) == 1 and len(by_defect["good"]) == 2
    for s in by_defect["good"]:
        assert s.label == 0 and s.mask_path is None
    for s in by_defect["crack"] + by_defect["hole"]:
        assert s.label == 1
        assert s.mask_path == cat_dir / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"
        assert s.path.parent == cat_dir / "test" / s.defect


def test_mask_without_suffix_is_found(tmp_path: Path, make_category) -> None:
    cat_dir = make_category(tmp_path, "tile", defects={"crack": 1}, masks=False)
    gt = cat_dir / "ground_truth" / "crack"
    gt.mkdir(parents=True)
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(gt / "000.png")
    (c,) = discover(cat_dir)
    (bad,) = [s for s in c.test if s.label == 1]
    assert bad.mask_path == cat_dir / "ground_truth" / "crack" / "000.png"


def test_root_of_two_categories(tmp_path: Path, make_category) -> None:
    root = tmp_path / "mvtec"
    make_category(root, "screw", seed=1)
    make_category(root, "bottle", seed=2)
    (root / "not_a_category").mkdir()
    (root / "readme.txt").write_text("x")
    cats = discover(root)
    assert [c.name for c in cats] == ["bottle", "screw"]
    assert all(c.dataset == "mvtec" for c in cats)
    assert [c.key for c in cats] == ["mvtec/bottle", "mvtec/screw"]
    assert cats[0].root == root / "bottle"


def test_empty_train_good_names_folder(tmp_path: Path, make_category) -> None:
    cat_dir = make_category(tmp_path, "cable", n_train=0)
    with pytest.raises(DatasetError) as ei:
        discover(cat_dir)
    assert str(cat_dir / "train" / "good") in str(ei.value)


def test_missing_train_good_names_category(tmp_path: Path) -> None:
    (tmp_path / "odd" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train/good"):
        discover(tmp_path / "odd")


def test_defective_image_without_mask_names_image(tmp_path: Path, make_category) -> None:
    cat_dir = make_category(tmp_path, "pill", defects={"crack": 2})
    (cat_dir / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError) as ei:
        discover(cat_dir)
    assert str(cat_dir / "test" / "crack" / "001.png") in str(ei.value)


def test_need_test_false_and_not_a_directory(tmp_path: Path, make_category) -> None:
    cat_dir = make_category(tmp_path, "nut", defects={})
    (cat_dir / "test" / "good" / "000.png").unlink()
    (cat_dir / "test" / "good" / "001.png").unlink()
    with pytest.raises(DatasetError, match="no test images"):
        load_category(cat_dir)
    c = load_category(cat_dir, need_test=False)
    assert len(c.train) == 4 and c.test == ()
    with pytest.raises(DatasetError, match="not a directory"):
        discover(tmp_path / "missing")
    empty = tmp_path / "empty_root"
    empty.mkdir()
    with pytest.raises(DatasetError, match=str(empty)):
        discover(empty)


# -- reference draws --------------------------------------------------------------
TRAIN = tuple(Path(f"train/good/{i:03d}.png") for i in range(10))


def test_draw_random_is_deterministic_distinct_and_seed_dependent() -> None:
    a = draw_references(TRAIN, 4, seed=3)
    assert a == draw_references(list(TRAIN), 4, seed=3)
    assert len(a) == 4 and len(set(a)) == 4
    assert set(a) <= set(TRAIN)
    assert a == sorted(a)  # the draw is reported in file order
    draws = {tuple(draw_references(TRAIN, 4, seed=s)) for s in range(6)}
    assert len(draws) > 1
    assert sorted(draw_references(TRAIN, 10, seed=0)) == list(TRAIN)


def test_draw_too_many_mentions_both_numbers() -> None:
    with pytest.raises(DatasetError) as ei:
        draw_references(TRAIN[:3], 5, seed=0)
    assert "5" in str(ei.value) and "3" in str(ei.value)
    with pytest.raises(DatasetError):
        draw_references(TRAIN, 0, seed=0)
    with pytest.raises(DatasetError, match="mode"):
        draw_references(TRAIN, 2, seed=0, mode="bogus")


def test_draw_slice_mode() -> None:
    names = [p.name for p in draw_references(TRAIN, 3, seed=0, mode="slice")]
    assert names == ["000.png", "001.png", "002.png"]
    names = [p.name for p in draw_references(TRAIN, 3, seed=2, mode="slice")]
    assert names == ["006.png", "007.png", "008.png"]
    # wraps around, stays distinct
    wrap = draw_references(TRAIN, 4, seed=2, mode="slice")
    assert [p.name for p in wrap] == ["008.png", "009.png", "000.png", "001.png"]
    assert len(set(wrap)) == 4
