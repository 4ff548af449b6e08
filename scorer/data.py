"""MVTec AD folder layout: discovery, test samples with masks, reference draws.

``<category>/train/good/*`` are normal references, ``<category>/test/<defect>/*``
test images and ``<category>/ground_truth/<defect>/<stem>_mask.png`` their masks.
A path given by the user is either one category or a root whose subfolders are
categories.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inspection_core.errors import DatasetError
from scorer.images import IMAGE_SUFFIXES, list_images


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 defective
    defect: str
    mask_path: Path | None


@dataclass(frozen=True)
class Category:
    dataset: str
    name: str
    root: Path
    train: tuple[Path, ...]
    test: tuple[Sample, ...]

    @property
    def key(self) -> str:
        return self.name if self.dataset == self.name else f"{self.dataset}/{self.name}"


def _is_category(p: Path) -> bool:
    return (p / "train").is_dir() or (p / "test").is_dir()


def _mask_for(root: Path, defect: str, img: Path) -> Path | None:
    gt = root / "ground_truth" / defect
    for cand in (f"{img.stem}_mask", img.stem):
        for suf in (".png", img.suffix, *IMAGE_SUFFIXES):
            p = gt / f"{cand}{suf}"
            if p.is_file():
                return p
    return None


def load_category(root: str | Path, dataset: str | None = None, *, need_test: bool = True) -> Category:
    r = Path(root)
    good = r / "train" / "good"
    if not good.is_dir():
        raise DatasetError(f"{r}: no train/good folder (MVTec AD layout expected)")
    train = tuple(list_images(good))
    if not train:
        raise DatasetError(f"{good}: no images in train/good")
    tests: list[Sample] = []
    test_dir = r / "test"
    if need_test:
        if not test_dir.is_dir():
            raise DatasetError(f"{r}: no test folder")
        for d in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            for img in list_images(d):
                if d.name == "good":
                    tests.append(Sample(img, 0, "good", None))
                    continue
                mask = _mask_for(r, d.name, img)
                if mask is None:
                    raise DatasetError(f"{img}: defective test image has no mask under {r / 'ground_truth' / d.name}")
                tests.append(Sample(img, 1, d.name, mask))
        if not tests:
            raise DatasetError(f"{test_dir}: no test images")
    return Category(dataset or r.name, r.name, r, train, tuple(tests))


def discover(path: str | Path, *, need_test: bool = True) -> list[Category]:
    """A category folder, or a root whose subfolders are categories."""
    p = Path(path)
    if not p.is_dir():
        raise DatasetError(f"{p}: not a directory")
    if _is_category(p):
        return [load_category(p, need_test=need_test)]
    cats = [
        load_category(sub, dataset=p.name, need_test=need_test)
        for sub in sorted(q for q in p.iterdir() if q.is_dir() and _is_category(q))
    ]
    if not cats:
        raise DatasetError(f"{p}: neither a category (train/, test/) nor a root of categories")
    return cats


def draw_references(train: tuple[Path, ...] | list[Path], shots: int, seed: int, *, mode: str = "random") -> list[Path]:
    """K distinct normal references, reproducible from ``seed``.

    ``random``: a seeded draw without replacement from the sorted list (default);
    ``slice``: AnomalyDINO's deterministic slice ``[seed*K, (seed+1)*K)``.
    """
    n = len(train)
    if shots < 1:
        raise DatasetError(f"shots must be >= 1, got {shots}")
    if shots > n:
        raise DatasetError(f"asked for {shots} references but only {n} normal images are available")
    if mode == "random":
        idx = np.random.default_rng(seed).choice(n, size=shots, replace=False)
        return [train[i] for i in sorted(idx.tolist())]
    if mode == "slice":
        start = (seed * shots) % n
        return [train[(start + i) % n] for i in range(shots)]
    raise DatasetError(f"unknown reference sampling mode {mode!r} (random, slice)")
