"""``train-base``: a base head trained on auxiliary data with masks (cross-dataset protocol).

Stage 1 trains the projections (and prototypes for vision-only backbones), stage 2
the CFF affine weights, on the test split (with masks) of other datasets, as
April-GAN and CFF do. Backbone tokens are extracted once (optionally cached on
disk), so training a ViT-S head on CPU takes minutes. The result is a head with an
empty memory bank: fit it to a product's references before scoring.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inspection_core.errors import ConfigError, DatasetError
from scorer.backbones.base import Backbone
from scorer.data import discover
from scorer.features import FeatureCache
from scorer.fit import FitOptions, mask_targets, token_normal, train_stage1, train_stage2
from scorer.head import Head, LearnedHead
from scorer.images import load_mask
from scorer.progress import Counter, Progress, no_progress


@dataclass(frozen=True)
class TrainOptions:
    epochs_stage1: int = 3
    epochs_stage2: int = 3
    batch_stage1: int = 8
    batch_stage2: int = 16
    include_train_good: bool = False
    max_images: int | None = None
    seed: int = 42
    fit: FitOptions = field(default_factory=lambda: FitOptions(lr_stage2=1e-4, loss_resolution=112))

    def __post_init__(self) -> None:
        if self.epochs_stage1 < 0 or self.epochs_stage2 < 0:
            raise ConfigError("epochs must be >= 0")
        if self.batch_stage1 < 1 or self.batch_stage2 < 1:
            raise ConfigError("batch sizes must be >= 1")


def _collect(data: Sequence[str | Path], opts: TrainOptions) -> tuple[list[Path], list[Path | None]]:
    paths: list[Path] = []
    masks: list[Path | None] = []
    for d in data:
        for cat in discover(d):
            for s in cat.test:
                paths.append(s.path)
                masks.append(s.mask_path)
            if opts.include_train_good:
                paths.extend(cat.train)
                masks.extend([None] * len(cat.train))
    if not any(m is not None for m in masks):
        raise DatasetError("train-base needs defective images with masks; none found in " + ", ".join(map(str, data)))
    if opts.max_images is not None and len(paths) > opts.max_images:
        idx = np.random.default_rng(opts.seed).choice(len(paths), opts.max_images, replace=False)
        idx.sort()
        paths = [paths[i] for i in idx]
        masks = [masks[i] for i in idx]
    return paths, masks


def train_base(
    backbone: Backbone,
    data: Sequence[str | Path],
    options: TrainOptions | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: Progress = no_progress,
) -> Head:
    """A base head; ``progress`` gets stage ``features`` (auxiliary images embedded) then ``stage1`` and
    ``stage2`` (steps of their totals, with the loss)."""
    opts = options or TrainOptions()
    with backbone.precision_scope(opts.fit.precision):  # train on fp32 tokens unless asked otherwise
        return _train_base(backbone, data, opts, cache_dir=cache_dir, progress=progress)


def _train_base(
    backbone: Backbone,
    data: Sequence[str | Path],
    opts: TrainOptions,
    *,
    cache_dir: str | Path | None,
    progress: Progress,
) -> Head:
    fo = opts.fit
    t0 = time.perf_counter()
    paths, mask_paths = _collect(data, opts)
    features = Counter(progress, "features", len(paths), detail="auxiliary images")
    feats = FeatureCache(cache_dir).embed_paths(backbone, paths, progress=features.callback())
    t_feat = time.perf_counter() - t0
    masks = []
    from PIL import Image

    for p, m in zip(paths, mask_paths, strict=True):
        if m is None:
            with Image.open(p) as im:
                masks.append(np.zeros((im.height, im.width), dtype=bool))
        else:
            with Image.open(p) as im:
                size = (im.height, im.width)
            masks.append(load_mask(m, size))
    targets = mask_targets(masks, fo.loss_resolution)
    normal_tok = token_normal(targets, feats.grid)
    text = None
    if backbone.has_text:
        text = F.normalize(backbone.encode_text_prompts(fo.object_name).float().cpu(), dim=0)
    n = len(paths)
    steps1 = opts.epochs_stage1 * math.ceil(n / opts.batch_stage1)
    steps2 = opts.epochs_stage2 * math.ceil(n / opts.batch_stage2)
    torch.manual_seed(opts.seed)

    proj_w, proj_b, protos = train_stage1(
        feats.tokens,
        targets,
        normal_tok,
        feats.grid,
        fo.learned,
        temperature=fo.score.temperature,
        text=text,
        steps=steps1,
        batch_size=opts.batch_stage1,
        seed=opts.seed,
        progress=progress,
    )
    with torch.no_grad():
        projected = [
            torch.cat([F.linear(t[s : s + 64].float(), proj_w[i], proj_b[i]).half() for s in range(0, n, 64)])
            for i, t in enumerate(feats.tokens)
        ]
    del feats
    calib_w, calib_b, last = train_stage2(
        projected,
        targets,
        normal_tok,
        backbone.grid,
        protos,
        fo.learned,
        temperature=fo.score.temperature,
        steps=steps2,
        batch_size=opts.batch_stage2,
        seed=opts.seed,
        progress=progress,
    )
    e = proj_w[0].shape[0]
    bank_dim = {"raw": proj_w[0].shape[1]}.get(fo.bank_features, e)
    return LearnedHead(
        method="cff",
        backbone_spec=backbone.spec,
        weights_id=backbone.weights_id,
        taps=tuple(backbone.taps),
        image_size=backbone.image_size,
        grid=tuple(backbone.grid),  # type: ignore[arg-type]
        bank=[torch.zeros(0, bank_dim, dtype=torch.float16) for _ in backbone.taps],
        bank_features=fo.bank_features,
        proj_w=proj_w,
        proj_b=proj_b,
        calib_w=calib_w,
        calib_b=calib_b,
        prototypes=protos,
        options=fo.score,
        meta={
            "base": True,
            "train_data": [str(d) for d in data],
            "n_images": n,
            "n_defective": int(sum(m is not None for m in mask_paths)),
            "steps_stage1": steps1,
            "steps_stage2": steps2,
            "final_loss_stage2": last,
            "feature_seconds": t_feat,
            "train_seconds": time.perf_counter() - t0,
            "seed": opts.seed,
        },
        backbone=backbone,
    )
