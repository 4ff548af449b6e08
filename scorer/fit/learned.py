"""The learned heads' training: April-GAN projections (stage 1) and the CFF affine weights (stage 2).

Without a base head both stages are fitted from the references alone, with focal + dice on synthetic
anomalies pasted onto them (``scorer.synth``):

* stage 1: per-stage projections and, for vision-only backbones, a learned normal/anomalous prototype pair
  per stage (CLIP: the frozen text embeddings); April-GAN's per-stage focal + dice (spec A17);
* stage 2: projections and prototypes frozen, the CFF affine weights per stage from identity, with 0.6 focal +
  0.4 dice on the stage-mean map plus 0.1 x alignment on normal tokens (spec b.1, A3-A6).

With a base head (from ``train-base``) only stage 2 and the memory bank are fitted. The ``aprilgan`` head is
the stage-1 result with a raw-token memory bank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from inspection_core.errors import ConfigError, HeadError
from scorer.backbones.base import Backbone, BackboneOutput
from scorer.fit.heldout import mask_targets
from scorer.fit.options import LearnedOptions
from scorer.head import LearnedHead, ScoreOptions, build_bank
from scorer.losses import alignment_loss, dice_loss, focal_loss, two_channel_probs
from scorer.progress import Counter, Progress, ProgressEvent, no_progress, report_every
from scorer.synth import synthesize


def token_normal(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens whose patch holds no defect pixel (B, N) — the ones alignment may use."""
    pooled = F.adaptive_max_pool2d(masks[:, None], grid)[:, 0]
    return (pooled == 0).flatten(1)


class _Trainable(torch.nn.Module):
    def __init__(self, n: int, d: int, e: int, *, identity: bool, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        ws = []
        for _ in range(n):
            if identity and d == e:
                w = torch.eye(e)
            else:
                w = torch.empty(e, d)
                bound = 1 / math.sqrt(d)
                w.uniform_(-bound, bound, generator=g)
            ws.append(torch.nn.Parameter(w))
        self.w = torch.nn.ParameterList(ws)
        self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(e)) for _ in range(n)])


def _adam(params: Sequence[torch.nn.Parameter], lr: float, opts: LearnedOptions) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(opts.beta1, opts.beta2))


def _batches(
    stage: str, steps: int, n_train: int, batch_size: int, seed: int, progress: Progress
) -> Iterator[tuple[int, torch.Tensor]]:
    """A training loop's steps and batch indices (drawn with replacement, seeded), its start reported."""
    g = torch.Generator().manual_seed(seed)
    if steps:
        progress(ProgressEvent(stage, 0, steps))
    for step in range(steps):
        yield step, torch.randint(0, n_train, (min(batch_size, n_train),), generator=g)


def train_stage1(
    tokens: Sequence[torch.Tensor],
    targets: torch.Tensor,
    normal_tok: torch.Tensor,
    grid: tuple[int, int],
    opts: LearnedOptions,
    *,
    temperature: float,
    text: torch.Tensor | None,
    steps: int,
    batch_size: int,
    seed: int,
    progress: Progress = no_progress,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Projection learning (April-GAN): per-stage focal + dice, summed over stages (A17).

    ``tokens`` are per stage (N_img, N_tok, D); ``targets`` (N_img, R, R) masks at
    the loss resolution. Vision-only backbones learn a normal/anomalous prototype
    pair per stage, initialised from the mean normal and anomalous directions;
    CLIP uses its frozen text matrix. Returns (proj_w, proj_b, prototypes).
    """
    n_stages, d = len(tokens), tokens[0].shape[-1]
    e = opts.proj_dim or (text.shape[0] if text is not None else d)
    if text is not None and e != text.shape[0]:
        raise ConfigError(f"proj_dim {e} must equal the CLIP embedding width {text.shape[0]}")
    res = targets.shape[-1]
    n_train = targets.shape[0]
    proj = _Trainable(n_stages, d, e, identity=True, seed=seed)
    with torch.no_grad():
        if text is not None:
            proto_init = text[None].repeat(n_stages, 1, 1)
        else:
            cols = []
            anom_tok = ~normal_tok
            for i in range(n_stages):
                sums_n = torch.zeros(e)
                sums_a = torch.zeros(e)
                for s in range(0, n_train, 32):
                    f = F.normalize(F.linear(tokens[i][s : s + 32].float(), proj.w[i], proj.b[i]), dim=-1)
                    sums_n += f[normal_tok[s : s + 32]].sum(0)
                    sums_a += f[anom_tok[s : s + 32]].sum(0)
                nrm = F.normalize(sums_n, dim=0)
                ab = F.normalize(sums_a, dim=0) if anom_tok.any() else -nrm
                cols.append(torch.stack([nrm, F.normalize(ab - nrm, dim=0)], 1))
            proto_init = torch.stack(cols)
    protos = torch.nn.Parameter(proto_init.clone(), requires_grad=text is None)
    params = list(proj.parameters()) + ([protos] if text is None else [])
    optim = _adam(params, opts.lr_stage1, opts)
    every = report_every(steps)
    for step, idx in _batches("stage1", steps, n_train, batch_size, seed, progress):
        tgt = targets[idx]
        loss = torch.zeros(())
        for i in range(n_stages):
            f = F.normalize(F.linear(tokens[i][idx].float(), proj.w[i], proj.b[i]), dim=-1)
            p = F.normalize(protos[i], dim=0)
            logits = temperature * (f @ p)
            diff = (logits[..., 1] - logits[..., 0]).view(-1, *grid)
            probs = two_channel_probs(diff, res)
            loss = loss + focal_loss(probs, tgt) + dice_loss(probs[:, 1], tgt)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if (step + 1) % every == 0 or step == steps - 1:
            progress(ProgressEvent("stage1", step + 1, steps, loss.item()))
    proj_w = [w.detach().clone() for w in proj.w]
    proj_b = [b.detach().clone() for b in proj.b]
    return proj_w, proj_b, F.normalize(protos.detach(), dim=1)


def train_stage2(
    projected: Sequence[torch.Tensor],
    targets: torch.Tensor,
    normal_tok: torch.Tensor,
    grid: tuple[int, int],
    prototypes: torch.Tensor,
    opts: LearnedOptions,
    *,
    temperature: float,
    steps: int,
    batch_size: int,
    seed: int,
    init: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor] | None] | None = None,
    progress: Progress = no_progress,
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """The CFF affine weights: projections frozen, C_n from identity (or ``init``), total objective.

    0.6 focal + 0.4 dice on the stage-mean map (A3) + 0.1 alignment on normal tokens (A4).
    Returns (calib_w, calib_b, final loss).
    """
    n_stages, e = len(projected), projected[0].shape[-1]
    res = targets.shape[-1]
    n_train = targets.shape[0]
    calib = _Trainable(n_stages, e, e, identity=True, seed=seed + 1)
    if init is not None and init[1] is not None:
        with torch.no_grad():
            for i in range(n_stages):
                calib.w[i].copy_(init[0][i].float())
                calib.b[i].copy_(init[1][i].float())
    optim = _adam(list(calib.parameters()), opts.lr_stage2, opts)
    last = float("nan")
    every = report_every(steps)
    for step, idx in _batches("stage2", steps, n_train, batch_size, seed + 7, progress):
        tgt = targets[idx]
        feats = [
            F.normalize(F.linear(projected[i][idx].float(), calib.w[i], calib.b[i]), dim=-1) for i in range(n_stages)
        ]
        probs_sum = None
        for i in range(n_stages):
            logits = temperature * (feats[i] @ prototypes[i])
            diff = (logits[..., 1] - logits[..., 0]).view(-1, *grid)
            probs = two_channel_probs(diff, res)
            probs_sum = probs if probs_sum is None else probs_sum + probs
        assert probs_sum is not None
        mean_map = probs_sum / n_stages
        l_align, _ = alignment_loss(
            feats, normal_tok[idx], lambda_global=opts.lambda_global, global_mode=opts.global_mode
        )
        loss = (
            opts.lambda_focal * focal_loss(mean_map, tgt)
            + opts.lambda_dice * dice_loss(mean_map[:, 1], tgt)
            + opts.lambda_align * l_align
        )
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        last = loss.item()
        if (step + 1) % every == 0 or step == steps - 1:
            progress(ProgressEvent("stage2", step + 1, steps, last))
    return [w.detach().clone() for w in calib.w], [b.detach().clone() for b in calib.b], last


def fit_learned(
    backbone: Backbone,
    refs: list[np.ndarray],
    ref_feats: BackboneOutput,
    base_head: LearnedHead | None,
    opts: LearnedOptions,
    score: ScoreOptions,
    seed: int,
    with_stage2: bool,
    progress: Progress,
) -> tuple[dict[str, LearnedHead], dict]:
    """Stage 1 (or the base head's projections) and, for cff, stage 2 on references + synthetic anomalies."""
    t_start = time.perf_counter()
    n_stages = len(backbone.taps)
    grid = ref_feats.grid
    res = opts.loss_resolution
    lb = score.letterbox
    synth = synthesize(refs, opts.n_synthetic, seed)
    synth_feats = backbone.embed(
        [x[0] for x in synth], letterbox=lb, progress=Counter(progress, "synthesis", len(synth)).callback()
    )
    tokens = [torch.cat([ref_feats.tokens[i].float(), synth_feats.tokens[i].float()]) for i in range(n_stages)]
    blank = [np.zeros(r.shape[:2], dtype=bool) for r in refs]
    targets = mask_targets(blank + [x[1] for x in synth], res, letterbox=lb)
    normal_tok = token_normal(targets, grid)

    text = None
    if backbone.has_text:
        text = F.normalize(backbone.encode_text_prompts(opts.object_name).float().cpu(), dim=0)  # (E, 2)
    if base_head is not None:
        assert base_head.proj_w is not None and base_head.proj_b is not None
        if base_head.prototypes is None:
            raise HeadError("the base head has no prototypes")
        proj_w = [w.float().clone() for w in base_head.proj_w]
        proj_b = [b.float().clone() for b in base_head.proj_b]
        prototypes = base_head.prototypes.float().clone()
        init_calib = (base_head.calib_w, base_head.calib_b) if base_head.calib_w is not None else None
    else:
        proj_w, proj_b, prototypes = train_stage1(
            tokens,
            targets,
            normal_tok,
            grid,
            opts,
            temperature=score.temperature,
            text=text,
            steps=opts.steps_stage1,
            batch_size=opts.batch_size,
            seed=seed,
            progress=progress,
        )
        init_calib = None
    t_stage1 = time.perf_counter() - t_start
    common = dict(
        backbone_spec=backbone.spec,
        weights_id=backbone.weights_id,
        taps=tuple(backbone.taps),
        image_size=backbone.image_size,
        grid=tuple(grid),
        options=replace(score, tap_weights=None),
        backbone=backbone,
        prototypes=prototypes,
        proj_w=proj_w,
        proj_b=proj_b,
    )
    heads: dict[str, LearnedHead] = {
        "aprilgan": LearnedHead(method="aprilgan", bank=build_bank(ref_feats.tokens), bank_features="raw", **common)  # type: ignore[arg-type]
    }
    last2 = math.nan
    if with_stage2:
        with torch.no_grad():
            projected = [F.linear(tokens[i], proj_w[i], proj_b[i]) for i in range(n_stages)]
        calib_w, calib_b, last2 = train_stage2(
            projected,
            targets,
            normal_tok,
            grid,
            prototypes,
            opts,
            temperature=score.temperature,
            steps=opts.steps_stage2,
            batch_size=opts.batch_size,
            seed=seed,
            init=init_calib,
            progress=progress,
        )
        cff_head = LearnedHead(
            method="cff",
            bank=[torch.empty(0)] * n_stages,
            bank_features=opts.bank_features,
            calib_w=calib_w,
            calib_b=calib_b,
            **common,
        )  # type: ignore[arg-type]
        heads["cff"] = replace(cff_head, bank=cff_head.bank_from(ref_feats.tokens))
    meta = {
        "stage1_seconds": t_stage1,
        "train_seconds": time.perf_counter() - t_start,
        "stage2_final_loss": last2,
        "shots": len(refs),
        "n_synthetic": opts.n_synthetic,
        "base_head": base_head is not None,
    }
    return heads, meta
