"""Fitting a head from a product's K normal references (what the calibrator calls).

Without a base head both stages are fitted from the references alone, with focal
+ dice on synthetic anomalies pasted onto them (``scorer.synth``):

* stage 1: per-stage projections and, for vision-only backbones, a learned
  normal/anomalous prototype pair per stage (CLIP: the frozen text embeddings);
  April-GAN's per-stage focal + dice (spec A17);
* stage 2: projections and prototypes frozen, the CFF affine calibration per
  stage from identity, with 0.6 focal + 0.4 dice on the stage-mean map plus
  0.1 x alignment on normal tokens (spec b.1, A3-A6).

With a base head (from ``train-base``) only stage 2 and the memory bank are
fitted. Thresholds come from held-out references (leave-one-out; augmented views
when K = 1) and the synthetic anomalies, never from test data.

The ``aprilgan`` head is the stage-1 result with a raw-token memory bank, so one
fit yields both heads, compared on identical references.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from inspection_core.errors import ConfigError, HeadError, ImageError
from scorer.backbones.base import Backbone, BackboneOutput
from scorer.head import BANK_FEATURES, Head, ScoreOptions, build_bank, check_compatible
from scorer.losses import alignment_loss, dice_loss, focal_loss, two_channel_probs
from scorer.synth import synthesize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitOptions:
    """Fitting recipe; defaults follow the spec, step counts sized for a CPU minute."""

    proj_dim: int | None = None  # None: CLIP embed dim, or the token width for vision-only
    n_synthetic: int = 16
    steps_stage1: int = 100
    steps_stage2: int = 60
    batch_size: int = 8
    lr_stage1: float = 1e-3
    lr_stage2: float = 1e-3  # the paper's 1e-4 barely moves C_n in a few-step fit; train-base keeps 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_focal: float = 0.6
    lambda_dice: float = 0.4
    lambda_align: float = 0.1
    lambda_global: float = 0.1
    global_mode: str = "token"
    loss_resolution: int = 64
    bank_features: str = "calibrated"
    image_far: float = 0.01
    pixel_far: float = 0.001
    n_augment_k1: int = 4
    object_name: str = "object"
    score: ScoreOptions = ScoreOptions()
    # Fits run at this precision whatever the backbone scores at: a CFF head fitted on bf16 tokens lost up to
    # 2.7 image-AUROC points and moved its thresholds 15 %; fp32 fits scored in bf16 match fp32 (BENCHMARKS.md).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.n_synthetic < 1:
            raise ConfigError(f"n_synthetic must be >= 1, got {self.n_synthetic}")
        if self.steps_stage1 < 0 or self.steps_stage2 < 0:
            raise ConfigError("step counts must be >= 0")
        if self.bank_features not in BANK_FEATURES:
            raise ConfigError(f"bank_features must be one of {BANK_FEATURES}, got {self.bank_features!r}")
        if not 0 < self.image_far < 0.5 or not 0 < self.pixel_far < 0.5:
            raise ConfigError("image_far and pixel_far must be in (0, 0.5)")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.batch_size < 1 or self.loss_resolution < 8:
            raise ConfigError("batch_size must be >= 1 and loss_resolution >= 8")

    def with_steps(self, steps: int) -> FitOptions:
        return replace(self, steps_stage1=steps, steps_stage2=max(1, steps // 2))

    def with_strings(self, options: Mapping[str, str]) -> tuple[FitOptions, int]:
        """Apply ``name=value`` options from a request or a CLI; returns (options, seed).

        Only the options in ``STRING_OPTIONS`` are settable this way, each within its range, so a
        remote caller cannot ask for a fit that runs for hours or allocates without bound.
        """
        out, seed = self, 0
        for key, raw in options.items():
            if key == "bank_features":
                out = replace(out, bank_features=str(raw))  # validated by __post_init__, naming the choices
                continue
            if key not in STRING_OPTIONS:
                known = ", ".join(sorted([*STRING_OPTIONS, "bank_features"]))
                raise ConfigError(f"unknown fit option {key!r}; known: {known}")
            kind, lo, hi = STRING_OPTIONS[key]
            try:
                value = kind(raw)
            except (TypeError, ValueError):
                what = "an integer" if kind is int else "a number"
                raise ConfigError(f"fit option {key}={raw!r} is not {what}") from None
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ConfigError(f"fit option {key}={raw} is out of range [{lo}, {hi}]")
            if key == "seed":
                seed = int(value)
            elif key == "steps":
                out = out.with_steps(int(value))
            else:
                out = replace(out, **{key: value})
        return out, seed


# name -> (type, min, max) for options settable from strings (FitHead requests, `heads fit --option`).
STRING_OPTIONS: dict[str, tuple[type, float, float]] = {
    "steps": (int, 0, 5000),
    "steps_stage1": (int, 0, 5000),
    "steps_stage2": (int, 0, 5000),
    "n_synthetic": (int, 1, 256),
    "lr_stage1": (float, 1e-7, 1.0),
    "lr_stage2": (float, 1e-7, 1.0),
    "lambda_align": (float, 0.0, 10.0),
    "loss_resolution": (int, 8, 512),
    "image_far": (float, 1e-6, 0.49),
    "pixel_far": (float, 1e-6, 0.49),
    "seed": (int, 0, 2**31 - 1),
}


Progress = Callable[[str, int, float], None]


def _noop(stage: str, step: int, loss: float) -> None:
    pass


def check_references(references: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(references) == 0:
        raise ConfigError("at least one reference image is needed")
    out = []
    for i, r in enumerate(references):
        if not isinstance(r, np.ndarray) or r.ndim != 3 or r.shape[2] != 3 or r.dtype != np.uint8:
            raise ImageError(
                f"reference {i}: expected an H x W x 3 uint8 RGB array, got {getattr(r, 'shape', type(r))}"
            )
        out.append(r)
    return out


def _mask_targets(masks: Sequence[np.ndarray], size: int) -> torch.Tensor:
    out = np.zeros((len(masks), size, size), dtype=np.float32)
    for i, m in enumerate(masks):
        im = Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(im) > 127
    return torch.from_numpy(out)


def _token_normal(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
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


def _adam(params: Sequence[torch.nn.Parameter], lr: float, opts: FitOptions) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(opts.beta1, opts.beta2))


def train_stage1(
    tokens: Sequence[torch.Tensor],
    targets: torch.Tensor,
    normal_tok: torch.Tensor,
    grid: tuple[int, int],
    opts: FitOptions,
    *,
    text: torch.Tensor | None,
    steps: int,
    batch_size: int,
    seed: int,
    progress: Progress = _noop,
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
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, n_train, (min(batch_size, n_train),), generator=g)
        tgt = targets[idx]
        loss = torch.zeros(())
        for i in range(n_stages):
            f = F.normalize(F.linear(tokens[i][idx].float(), proj.w[i], proj.b[i]), dim=-1)
            p = F.normalize(protos[i], dim=0)
            logits = opts.score.temperature * (f @ p)
            diff = (logits[..., 1] - logits[..., 0]).view(-1, *grid)
            probs = two_channel_probs(diff, res)
            loss = loss + focal_loss(probs, tgt) + dice_loss(probs[:, 1], tgt)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step % 10 == 0 or step == steps - 1:
            progress("stage1", step, loss.item())
    proj_w = [w.detach().clone() for w in proj.w]
    proj_b = [b.detach().clone() for b in proj.b]
    return proj_w, proj_b, F.normalize(protos.detach(), dim=1)


def train_stage2(
    projected: Sequence[torch.Tensor],
    targets: torch.Tensor,
    normal_tok: torch.Tensor,
    grid: tuple[int, int],
    prototypes: torch.Tensor,
    opts: FitOptions,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    init: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor] | None] | None = None,
    progress: Progress = _noop,
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """CFF calibration: projections frozen, C_n from identity (or ``init``), total objective.

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
    g = torch.Generator().manual_seed(seed + 7)
    last = float("nan")
    for step in range(steps):
        idx = torch.randint(0, n_train, (min(batch_size, n_train),), generator=g)
        tgt = targets[idx]
        feats = [
            F.normalize(F.linear(projected[i][idx].float(), calib.w[i], calib.b[i]), dim=-1) for i in range(n_stages)
        ]
        probs_sum = None
        for i in range(n_stages):
            logits = opts.score.temperature * (feats[i] @ prototypes[i])
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
        if step % 10 == 0 or step == steps - 1:
            progress("stage2", step, last)
    return [w.detach().clone() for w in calib.w], [b.detach().clone() for b in calib.b], last


def fit_heads_from_features(
    backbone: Backbone,
    references: Sequence[np.ndarray],
    ref_feats: BackboneOutput,
    *,
    base_head: Head | None = None,
    options: FitOptions | None = None,
    seed: int = 0,
    progress: Progress = _noop,
) -> dict[str, Head]:
    """Fit once, return ``{"aprilgan": ..., "cff": ...}`` on the same references (at ``options.precision``)."""
    opts = options or FitOptions()
    with backbone.precision_scope(opts.precision):
        return _fit_heads(backbone, references, ref_feats, base_head, opts, seed, progress)


def _fit_heads(
    backbone: Backbone,
    references: Sequence[np.ndarray],
    ref_feats: BackboneOutput,
    base_head: Head | None,
    opts: FitOptions,
    seed: int,
    progress: Progress,
) -> dict[str, Head]:
    refs = check_references(references)
    t_start = time.perf_counter()
    if base_head is not None:
        check_compatible(base_head, backbone)
        if base_head.proj_w is None:
            raise HeadError("the base head has no projections (is it a knn head?)")
    n_stages = len(backbone.taps)
    grid = ref_feats.grid
    res = opts.loss_resolution

    # Training data: references (all normal) + synthetic anomalies on them.
    synth = synthesize(refs, opts.n_synthetic, seed)
    synth_imgs = [s[0] for s in synth]
    synth_masks = [s[1] for s in synth]
    synth_feats = backbone.embed(synth_imgs)
    tokens = [torch.cat([ref_feats.tokens[i].float(), synth_feats.tokens[i].float()]) for i in range(n_stages)]
    blank = [np.zeros(r.shape[:2], dtype=bool) for r in refs]
    targets = _mask_targets(blank + synth_masks, res)
    normal_tok = _token_normal(targets, grid)

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
            text=text,
            steps=opts.steps_stage1,
            batch_size=opts.batch_size,
            seed=seed,
            progress=progress,
        )
        init_calib = None
    t_stage1 = time.perf_counter() - t_start
    with torch.no_grad():
        projected = [F.linear(tokens[i], proj_w[i], proj_b[i]) for i in range(n_stages)]
    calib_w, calib_b, last2 = train_stage2(
        projected,
        targets,
        normal_tok,
        grid,
        prototypes,
        opts,
        steps=opts.steps_stage2,
        batch_size=opts.batch_size,
        seed=seed,
        init=init_calib,
        progress=progress,
    )
    t_fit = time.perf_counter() - t_start

    common = dict(
        backbone_spec=backbone.spec,
        weights_id=backbone.weights_id,
        taps=tuple(backbone.taps),
        image_size=backbone.image_size,
        grid=tuple(grid),
        options=opts.score,
        backbone=backbone,
        prototypes=prototypes,
        proj_w=proj_w,
        proj_b=proj_b,
    )
    heads: dict[str, Head] = {}
    april = Head(method="aprilgan", bank=build_bank(ref_feats.tokens), bank_features="raw", **common)  # type: ignore[arg-type]
    cff_head = Head(
        method="cff",
        bank=[torch.empty(0)] * n_stages,
        bank_features=opts.bank_features,
        calib_w=calib_w,
        calib_b=calib_b,
        **common,
    )  # type: ignore[arg-type]
    cff_head = replace(cff_head, bank=bank_for(cff_head, ref_feats.tokens))
    for name, h in (("aprilgan", april), ("cff", cff_head)):
        heads[name] = calibrate_thresholds(
            h,
            backbone,
            refs,
            ref_feats,
            synth_feats,
            synth_masks,
            opts,
            seed,
            meta={
                "fit_seconds": t_fit,
                "stage1_seconds": t_stage1,
                "stage2_final_loss": last2,
                "shots": len(refs),
                "n_synthetic": opts.n_synthetic,
                "base_head": base_head is not None,
            },
        )
    return heads


def bank_for(head: Head, ref_tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Memory bank in the feature space the head compares in."""
    with torch.no_grad():
        calibrated, projected = head.stage_features([t.float() for t in ref_tokens], fold=True)
        return build_bank(head.bank_view(ref_tokens, calibrated, projected))


def fit_head_from_features(
    backbone: Backbone,
    references: Sequence[np.ndarray],
    ref_feats: BackboneOutput,
    *,
    method: str = "cff",
    base_head: Head | None = None,
    options: FitOptions | None = None,
    seed: int = 0,
    progress: Progress = _noop,
) -> Head:
    if method not in ("cff", "aprilgan"):
        raise ConfigError(f"fit supports methods cff and aprilgan, got {method!r}")
    return fit_heads_from_features(
        backbone, references, ref_feats, base_head=base_head, options=options, seed=seed, progress=progress
    )[method]


def fit_head(
    backbone: Backbone,
    references: Sequence[np.ndarray],
    *,
    base_head: Head | None = None,
    options: FitOptions | None = None,
    method: str = "cff",
    seed: int = 0,
    progress: Progress = _noop,
) -> Head:
    """The scorer API: a head for a new product from its K normal reference images."""
    refs = check_references(references)
    opts = options or FitOptions()
    with backbone.precision_scope(opts.precision):
        if method == "knn":
            from scorer.head import knn_head

            if base_head is not None:
                raise ConfigError("method knn is training-free and takes no base head")
            feats = backbone.embed(refs)
            head = knn_head(backbone, feats, opts.score)
            return calibrate_thresholds(head, backbone, refs, feats, None, None, opts, seed, meta={"shots": len(refs)})
        feats = backbone.embed(refs)
        return fit_head_from_features(
            backbone, refs, feats, method=method, base_head=base_head, options=opts, seed=seed, progress=progress
        )


def _loo_scores(head: Head, ref_feats: BackboneOutput) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out: each reference scored against a bank of the others."""
    k = ref_feats.tokens[0].shape[0]
    scores, maps = [], []
    for j in range(k):
        keep = [i for i in range(k) if i != j]
        sub = [t[keep] for t in ref_feats.tokens]
        h = replace(head, bank=bank_for(head, sub) if head.bank_features != "raw" else build_bank(sub))
        one = BackboneOutput([t[j : j + 1].float() for t in ref_feats.tokens], ref_feats.grid)
        r = h.score_tokens(one)
        scores.append(r.image_scores.numpy())
        maps.append(r.maps.numpy())
    return np.concatenate(scores), np.concatenate(maps)


def _augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mild view of a normal image: small crop-and-resize and brightness change."""
    h, w = img.shape[:2]
    s = rng.uniform(0.9, 1.0)
    ch, cw = max(2, int(h * s)), max(2, int(w * s))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(img[y : y + ch, x : x + cw]).resize((w, h), Image.BILINEAR)
    f = np.asarray(crop).astype(np.float32) * rng.uniform(0.95, 1.05)
    return np.clip(f, 0, 255).astype(np.uint8)


def calibrate_thresholds(
    head: Head,
    backbone: Backbone,
    refs: Sequence[np.ndarray],
    ref_feats: BackboneOutput,
    synth_feats: BackboneOutput | None,
    synth_masks: Sequence[np.ndarray] | None,
    opts: FitOptions,
    seed: int,
    *,
    meta: dict | None = None,
) -> Head:
    """Image and pixel thresholds from held-out normals and synthetic anomalies.

    Image: ``max(max normal, mean + z * std)`` of the held-out normal scores, z for
    the target false-alarm rate (std floored at 5 % of the mean, since K is tiny).
    Pixel: the F1-best threshold on the synthetic anomalies, but never below the
    (1 - pixel_far) quantile of held-out normal pixels.
    """
    with torch.inference_mode():
        if len(refs) >= 2:
            n_scores, n_maps = _loo_scores(head, ref_feats)
            held_out = "leave-one-out"
        else:
            rng = np.random.default_rng(seed + 101)
            views = [_augment(refs[0], rng) for _ in range(max(1, opts.n_augment_k1))]
            n_scores, n_maps, _ = head.score_features(backbone.embed(views))
            held_out = "augmented views"
        z = NormalDist().inv_cdf(1 - opts.image_far)
        mu, sd = float(n_scores.mean()), float(n_scores.std())
        sd = max(sd, 0.05 * abs(mu))
        image_t = max(float(n_scores.max()), mu + z * sd)
        normal_q = float(np.quantile(n_maps.astype(np.float32), 1 - opts.pixel_far))
        fit_metrics: dict = {
            "held_out": held_out,
            "normal_scores": [float(s) for s in n_scores],
            "normal_pixel_quantile": normal_q,
        }
        pixel_t = normal_q
        if synth_feats is not None and synth_masks is not None:
            a_scores, a_maps, _ = head.score_features(synth_feats)
            tgt = _mask_targets(synth_masks, head.options.map_size).numpy() > 0.5
            flat, lab = a_maps.ravel(), tgt.ravel()
            qs = np.quantile(flat, np.linspace(0.5, 0.9995, 120))
            best_f1, best_t = -1.0, normal_q
            for t in qs:
                pred = flat >= t
                tp = float((pred & lab).sum())
                f1 = 2 * tp / max(1.0, float(pred.sum()) + float(lab.sum()))
                if f1 > best_f1:
                    best_f1, best_t = f1, float(t)
            pixel_t = max(normal_q, best_t)
            pred = flat >= pixel_t
            tp = float((pred & lab).sum())
            fit_metrics.update(
                {
                    "synthetic_detection_rate": float((a_scores >= image_t).mean()),
                    "synthetic_pixel_f1_at_threshold": 2 * tp / max(1.0, float(pred.sum()) + float(lab.sum())),
                    "synthetic_pixel_f1_best": best_f1,
                }
            )
        fit_metrics["normal_false_alarm_rate"] = float((n_scores >= image_t).mean())
    out = head.with_thresholds(image=image_t, pixel=pixel_t)
    out.meta = {**head.meta, **(meta or {}), "fit_metrics": fit_metrics}
    return out
