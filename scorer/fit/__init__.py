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
fitted. Thresholds come from a held-out set — references left out of the bank
(augmented views when K = 1) and synthetic anomalies of another seed than the
training ones — never from test data.

``knn`` (the default) trains nothing: its tap fusion is chosen on the held-out
set. The ``aprilgan`` head is the stage-1 result with a raw-token memory bank. A
``cff`` fit is guarded: it is kept only when it beats the training-free head on
the held-out set (``guard``), so calibration can never make a product worse
than training-free scoring on what the fit can measure.
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

from inspection_core.errors import ConfigError, HeadError, ImageError, cut, quoted
from inspection_core.names import METHODS
from scorer.backbones.base import Backbone, BackboneOutput, letterbox_box
from scorer.head import BANK_FEATURES, Head, ScoreOptions, build_bank, check_compatible, image_score, search_dtype
from scorer.losses import alignment_loss, dice_loss, focal_loss, two_channel_probs
from scorer.metrics import image_metrics
from scorer.progress import Counter, Progress, ProgressEvent, no_progress, report_every
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
    # Held-out synthetic anomalies (another seed than the training ones): thresholds, the knn tap choice and
    # the cff guard are measured on them and on held-out references, never on what a head was trained on.
    n_validation: int = 16
    # mid+first (the default): the inner taps (first and last tapped blocks dropped: PatchCore's mid-level
    # features), plus the first where a K >= 2 leave-one-out held-out set says it localises best of all
    # (choose_mid_plus_first; BENCHMARKS.md round 4); mid: the inner taps only; auto: taps chosen on the
    # held-out set; all: the plain mean of every tap (AnomalyDINO-style)
    knn_taps: str = "mid+first"
    # Extra views of each reference in the knn bank (VisionAD-style support augmentation): flips, quarter
    # turns, or both. "auto" = rot+flip for up to AUTO_VIEWS_UP_TO references (a few images miss the
    # orientations a part is seen in; +0.6..+2.5 image AUROC and +0.6..+2.2 pixel AP at K = 1, 2, 4 on both
    # datasets, BENCHMARKS.md), none from then on: the bank then holds real variation, and a frame's search
    # cost grows with the bank, so it never exceeds 6 * AUTO_VIEWS_UP_TO images. Products whose orientation is
    # itself a defect (a part mounted upside down) want "none".
    support_views: str = "auto"
    guard: bool = True  # cff: keep the training-free head when it does better on the held-out set
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
            raise ConfigError(f"bank_features must be one of {BANK_FEATURES}, got {quoted(self.bank_features)}")
        if not 0 < self.image_far < 0.5 or not 0 < self.pixel_far < 0.5:
            raise ConfigError("image_far and pixel_far must be in (0, 0.5)")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.batch_size < 1 or self.loss_resolution < 8:
            raise ConfigError("batch_size must be >= 1 and loss_resolution >= 8")
        if self.n_validation < 1:
            raise ConfigError(f"n_validation must be >= 1, got {self.n_validation}")
        if self.support_views not in SUPPORT_VIEWS:
            raise ConfigError(
                f"support_views must be one of {', '.join(SUPPORT_VIEWS)}, got {quoted(self.support_views)}"
            )
        if self.knn_taps not in KNN_TAPS:
            raise ConfigError(f"knn_taps must be one of {', '.join(KNN_TAPS)}, got {quoted(self.knn_taps)}")

    def with_steps(self, steps: int) -> FitOptions:
        return replace(self, steps_stage1=steps, steps_stage2=max(1, steps // 2))

    def with_strings(self, options: Mapping[str, str]) -> tuple[FitOptions, int]:
        """Apply ``name=value`` options from a request or a CLI; returns (options, seed).

        Only the options in ``STRING_OPTIONS`` are settable this way, each within its range, so a
        remote caller cannot ask for a fit that runs for hours or allocates without bound.
        """
        out, seed = self, 0
        for key, raw in options.items():
            if key in ("bank_features", "knn_taps", "support_views"):
                out = replace(out, **{key: str(raw)})  # validated by __post_init__, naming the choices
                continue
            if key in ("guard", "letterbox"):
                if str(raw).lower() not in ("true", "false", "1", "0"):
                    raise ConfigError(f"fit option {key}={quoted(raw)} must be true or false")
                on = str(raw).lower() in ("true", "1")
                out = replace(out, guard=on) if key == "guard" else replace(out, score=replace(out.score, letterbox=on))
                continue
            if key not in STRING_OPTIONS:
                known = ", ".join(
                    sorted([*STRING_OPTIONS, "bank_features", "guard", "knn_taps", "letterbox", "support_views"])
                )
                raise ConfigError(f"unknown fit option {quoted(key)}; known: {known}")
            kind, lo, hi = STRING_OPTIONS[key]
            try:
                value = kind(raw)
            except (TypeError, ValueError):
                what = "an integer" if kind is int else "a number"
                raise ConfigError(f"fit option {key}={quoted(raw)} is not {what}") from None
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ConfigError(f"fit option {key}={cut(str(raw))} is out of range [{lo}, {hi}]")
            if key == "seed":
                seed = int(value)
            elif key == "steps":
                out = out.with_steps(int(value))
            else:
                out = replace(out, **{key: value})
        return out, seed


KNN_TAPS = ("mid", "mid+first", "auto", "all")
SUPPORT_VIEWS = ("none", "flip", "rot", "rot+flip", "auto")
AUTO_VIEWS_UP_TO = 4
FIT_METHODS = METHODS
DEFAULT_METHOD = METHODS[0]  # knn: the best method in BENCHMARKS.md's deployment table; cff is guarded against it

# name -> (type, min, max) for options settable from strings (FitHead requests, `heads fit --option`).
STRING_OPTIONS: dict[str, tuple[type, float, float]] = {
    "steps": (int, 0, 5000),
    "steps_stage1": (int, 0, 5000),
    "steps_stage2": (int, 0, 5000),
    "n_synthetic": (int, 1, 256),
    "n_validation": (int, 1, 256),
    "lr_stage1": (float, 1e-7, 1.0),
    "lr_stage2": (float, 1e-7, 1.0),
    "lambda_align": (float, 0.0, 10.0),
    "loss_resolution": (int, 8, 512),
    "image_far": (float, 1e-6, 0.49),
    "pixel_far": (float, 1e-6, 0.49),
    "seed": (int, 0, 2**31 - 1),
}


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


def mask_targets(masks: Sequence[np.ndarray], size: int, *, letterbox: bool = False) -> torch.Tensor:
    """Masks at ``size``: squashed like the images, or (training targets of a letterboxed head) placed where
    the letterbox puts the image on the token grid."""
    out = np.zeros((len(masks), size, size), dtype=np.float32)
    for i, m in enumerate(masks):
        y0, x0, y1, x1 = letterbox_box(*m.shape[:2], size) if letterbox else (0, 0, size, size)
        im = Image.fromarray(m.astype(np.uint8) * 255).resize((x1 - x0, y1 - y0), Image.BILINEAR)
        out[i, y0:y1, x0:x1] = np.asarray(im) > 127
    return torch.from_numpy(out)


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
    g = torch.Generator().manual_seed(seed)
    every = report_every(steps)
    if steps:
        progress(ProgressEvent("stage1", 0, steps))
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
    opts: FitOptions,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    init: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor] | None] | None = None,
    progress: Progress = no_progress,
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
    every = report_every(steps)
    if steps:
        progress(ProgressEvent("stage2", 0, steps))
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
        if (step + 1) % every == 0 or step == steps - 1:
            progress(ProgressEvent("stage2", step + 1, steps, last))
    return [w.detach().clone() for w in calib.w], [b.detach().clone() for b in calib.b], last


def fit_heads_from_features(
    backbone: Backbone,
    references: Sequence[np.ndarray],
    ref_feats: BackboneOutput,
    *,
    base_head: Head | None = None,
    options: FitOptions | None = None,
    seed: int = 0,
    methods: Sequence[str] = ("aprilgan", "cff"),
    progress: Progress = no_progress,
) -> dict[str, Head]:
    """Fit once and return the asked heads (``knn``, ``aprilgan``, ``cff``) on the same references.

    Only what is asked is built and thresholded: ``aprilgan`` alone skips stage 2, ``knn`` alone trains
    nothing. A guarded ``cff`` may come back as the training-free head (its meta says why).
    """
    opts = options or FitOptions()
    for m in methods:
        if m not in FIT_METHODS:
            raise ConfigError(f"unknown method {m!r}; known: {', '.join(FIT_METHODS)}")
    if base_head is not None and not {"aprilgan", "cff"} & set(methods):
        # beside a learned head knn may come too (the base head serves the learned one; knn is its guard's
        # reference), but a base head for knn alone is a mistake worth naming
        raise ConfigError("method knn is training-free and takes no base head")
    with backbone.precision_scope(opts.precision):
        return _fit_heads(backbone, references, ref_feats, base_head, opts, seed, tuple(methods), progress)


@dataclass
class HeldOut:
    """Validation data no head is fitted on: held-out normals and synthetic anomalies of another seed.

    Each normal (and, for K >= 2, each anomaly) is scored against a bank without the reference it came
    from, so a training-free bank cannot win by matching an image with itself.
    """

    normals: BackboneOutput
    normal_src: list[int | None]
    anomalies: BackboneOutput
    anomaly_src: list[int | None]
    masks: np.ndarray  # (n, map, map) bool, as the maps cover the source
    how: str


def held_out_set(
    backbone: Backbone,
    refs: Sequence[np.ndarray],
    ref_feats: BackboneOutput,
    opts: FitOptions,
    seed: int,
    progress: Progress = no_progress,
    depth: int | None = None,
) -> HeldOut:
    """The held-out set; its embedding is reported as stage ``held-out`` (images done / total).

    ``depth``: the taps the heads to be thresholded read (``Backbone.run``); the others are zeros.
    """
    lb = opts.score.letterbox
    k = len(refs)
    n_views = 0 if k >= 2 else max(1, opts.n_augment_k1)
    total = n_views + opts.n_validation

    def part(offset: int) -> Callable[[int, int], None]:
        def cb(done: int, _: int) -> None:
            if done or not offset:  # the second embedding's start is the first one's end
                progress(ProgressEvent("held-out", offset + done, total))

        return cb

    # Nothing is trained on the held-out set: it is embedded at the precision the head will score frames at
    # (the backbone's own; bf16 on GPUs and bf16 CPUs, 1.8x faster here), so the thresholds are set on the
    # scores production sees. The references themselves stay at the fit's precision.
    with backbone.precision_scope(backbone.precision):
        if k >= 2:
            normals, normal_src, how = ref_feats, list(range(k)), "leave-one-out"
        else:
            rng = np.random.default_rng(seed + 101)
            views = [_augment(refs[0], rng) for _ in range(n_views)]
            normals = backbone.embed(views, letterbox=lb, progress=part(0), depth=depth)
            normal_src, how = [None] * len(views), "augmented views"
        synth = synthesize(refs, opts.n_validation, seed + 7919)
        anomalies = backbone.embed([x[0] for x in synth], letterbox=lb, progress=part(n_views), depth=depth)
    masks = mask_targets([x[1] for x in synth], opts.score.map_size).numpy() > 0.5
    src: list[int | None] = [x[2] if k >= 2 else None for x in synth]
    return HeldOut(normals, normal_src, anomalies, src, masks, how)


def _bank_without(head: Head, ref_feats: BackboneOutput, j: int | None) -> Head:
    """The head with reference ``j`` (and every view of it: bank image ``i`` comes from ``i % K``) left out."""
    if j is None:
        return head
    k = int(head.meta.get("bank_sources", len(ref_feats)))
    n_img = len(ref_feats)
    keep = [i for i in range(n_img) if i % k != j]
    n_tok = ref_feats.tokens[0].shape[1]
    if all(b.shape[0] == n_img * n_tok for b in head.bank):
        # the bank holds ref_feats' images in order, n_tok rows each: drop rows, nothing to recompute
        rows = torch.zeros(n_img, n_tok, dtype=torch.bool)
        rows[keep] = True
        return replace(head, bank=[b[rows.flatten()] for b in head.bank])
    sub = [t[keep] for t in ref_feats.tokens]
    return replace(head, bank=bank_for(head, sub) if head.bank_features != "raw" else build_bank(sub))


@dataclass(frozen=True)
class HeldOutSearch:
    """The held-out set searched once, tap by tap, against a head's leave-one-out banks.

    The search is most of a fit's thresholding; with it the tap judgement and the thresholds of the chosen
    fusion read the same per-tap grids instead of searching again (the fused maps are the same bits: the
    same grids, batched the same way, fused and blurred by the same code).
    """

    taps: tuple[int, ...]  # the taps searched; the others' grids are zeros
    bank_rows: tuple[int, ...]  # the bank it was searched against (rows per tap), to refuse another head's
    normals: torch.Tensor  # (n, S, gh, gw) float32
    anomalies: torch.Tensor

    def serves(self, head: Head) -> bool:
        return set(head.weighted_taps()) <= set(self.taps) and self.bank_rows == tuple(b.shape[0] for b in head.bank)


def _by_source(src: Sequence[int | None]) -> list[tuple[int | None, list[int]]]:
    """Query indices grouped by the reference they came from (None first), each group scored on one bank."""
    return [
        (j, [i for i in range(len(src)) if src[i] == j]) for j in sorted(set(src), key=lambda x: -1 if x is None else x)
    ]


def _for_search(head: Head) -> Head:
    """The bank is searched in the dtype a worker on this machine would use (``search_dtype``), so thresholds
    are set on the scores production sees."""
    if (dtype := search_dtype(head)) != head.options.bank_dtype:
        head = head.with_options(bank_dtype=dtype)  # a copy only where it differs: the head's device cache stays
    return head


def search_held_out(head: Head, ref_feats: BackboneOutput, held: HeldOut, taps: Sequence[int]) -> HeldOutSearch:
    """Per-tap grids of the held-out normals and anomalies, each against the bank without its source."""
    head = _for_search(head)

    def grids(queries: BackboneOutput, src: Sequence[int | None]) -> torch.Tensor:
        out = torch.zeros(len(queries), head.n_stages, *head.grid)
        for j, idx in _by_source(src):
            out[idx] = _bank_without(head, ref_feats, j).search_features(queries.select(idx), taps=taps)
        return out

    return HeldOutSearch(
        tuple(taps),
        tuple(b.shape[0] for b in head.bank),
        grids(held.normals, held.normal_src),
        grids(held.anomalies, held.anomaly_src),
    )


def held_out_scores(
    head: Head,
    ref_feats: BackboneOutput,
    queries: BackboneOutput,
    src: Sequence[int | None],
    *,
    per_stage: bool = False,
    grids: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scores, maps (and stage maps) of ``queries``, each against the bank without its source reference.

    ``grids``: the queries' ``HeldOutSearch`` grids, which stand for the search.
    """
    head = _for_search(head)
    n = len(queries)
    scores = np.zeros(n, np.float32)
    maps = np.zeros((n, head.options.map_size, head.options.map_size), np.float32)
    stages = None
    with torch.inference_mode():
        for j, idx in _by_source(src):
            if grids is None:
                sc, mp, st = _bank_without(head, ref_feats, j).score_features(queries.select(idx), per_stage=per_stage)
            else:
                sc, mp, st = head.score_features(queries.select(idx), per_stage=per_stage, grids=grids[idx])
            scores[idx], maps[idx] = sc, mp
            if st is not None:
                if stages is None:
                    stages = np.zeros((n, *st.shape[1:]), np.float16)
                stages[idx] = st
    return scores, maps, stages


def _ranking(normal: np.ndarray, anomalous: np.ndarray, a_maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Held-out image AUROC (normals vs anomalies) and pixel AP (on the anomalies); ``score`` is their mean."""
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    i_auroc = image_metrics(np.r_[normal, anomalous], labels)["i_auroc"]
    p_ap = image_metrics(a_maps.astype(np.float32).ravel(), masks.ravel())["i_ap"] if masks.any() else math.nan
    vals = [v for v in (i_auroc, p_ap) if math.isfinite(v)]
    return {"image_auroc": float(i_auroc), "pixel_ap": float(p_ap), "score": float(np.mean(vals)) if vals else 0.0}


def _held_out_per_tap(
    head: Head, ref_feats: BackboneOutput, held: HeldOut, taps: Sequence[int]
) -> tuple[list[dict], np.ndarray, HeldOutSearch]:
    """Each of ``taps``' held-out ranking alone (``_ranking``), its pixel APs (0 where undefined), and the
    search they came from (for the thresholds of whichever fusion is chosen)."""
    plain = head.with_options(tap_weights=None)
    search = search_held_out(plain, ref_feats, held, taps)
    _, _, n_st = held_out_scores(plain, ref_feats, held.normals, held.normal_src, per_stage=True, grids=search.normals)
    _, _, a_st = held_out_scores(
        plain, ref_feats, held.anomalies, held.anomaly_src, per_stage=True, grids=search.anomalies
    )
    assert n_st is not None and a_st is not None
    per_tap = []
    for s in taps:
        ns = image_score(torch.from_numpy(n_st[:, s].astype(np.float32)), head.options).numpy()
        an = image_score(torch.from_numpy(a_st[:, s].astype(np.float32)), head.options).numpy()
        per_tap.append(_ranking(ns, an, a_st[:, s], held.masks))
    aps = np.array([0.0 if not math.isfinite(t["pixel_ap"]) else t["pixel_ap"] for t in per_tap])
    return per_tap, aps, search


def choose_knn_taps(
    head: Head, ref_feats: BackboneOutput, held: HeldOut
) -> tuple[tuple[float, ...], dict, HeldOutSearch]:
    """Fusion weights of a knn head from the held-out set alone.

    A tap whose map localises the held-out synthetic anomalies at less than half the best tap's pixel AP is
    dropped (on the encoder here: the last block, a saliency-tuned, semantic layer); the others are averaged.
    """
    per_tap, aps, search = _held_out_per_tap(head, ref_feats, held, range(len(head.taps)))
    keep = aps >= 0.5 * aps.max() if aps.max() > 0 else np.ones(len(aps), bool)
    weights = tuple(float(x) for x in keep.astype(np.float32))
    record = {
        "rule": "taps with held-out pixel AP >= 0.5 x the best, averaged",
        "taps": list(head.taps),
        "per_tap": per_tap,
        "weights": list(weights),
    }
    return weights, record, search


def mid_taps(n: int) -> tuple[float, ...]:
    """The mid-level taps: every tap but the first and the last, averaged."""
    return tuple(0.0 if i in (0, n - 1) else 1.0 for i in range(n))


def choose_mid_plus_first(
    head: Head, ref_feats: BackboneOutput, held: HeldOut, n_refs: int
) -> tuple[tuple[float, ...], dict, HeldOutSearch | None]:
    """The mid-level taps, plus the first tap only where the held-out set says it localises best of all.

    The mid-level taps are the prior (PatchCore's argument, and the best rule measured on real defects); the
    held-out set may overrule it in one direction only, and only where it can be trusted: with K >= 2 each
    reference is scored against a bank without itself, and the first tap is added when its pixel AP on the
    synthetic anomalies is at least every mid-level tap's. With K = 1 the held-out normals are augmented copies
    of the one reference, which flatter the first block (measured: the held-out choice lost 3-6 image AUROC at
    K = 1 on both shared datasets), so the prior stands.
    """
    n = len(head.taps)
    weights = mid_taps(n)
    if n_refs < 2:
        rule = "mid-level taps (K = 1: no leave-one-out held-out set to judge the first tap)"
        return weights, {"rule": rule}, None
    # the last tap is never chosen (nor embedded, when only this head is fitted), so it is not searched either
    per_tap, aps, search = _held_out_per_tap(head, ref_feats, held, range(n - 1))
    first = bool(aps[0] > 0 and aps[0] >= aps[1 : n - 1].max())
    if first:
        weights = (1.0, *weights[1:])
    rule = "mid-level taps, plus the first where its held-out pixel AP is at least every mid-level tap's"
    return (
        weights,
        {
            "rule": rule,
            "taps": list(head.taps),
            "per_tap": per_tap,
            "first_added": first,
            "weights": list(weights),
        },
        search,
    )


def _fit_knn(
    backbone: Backbone, ref_feats: BackboneOutput, held: HeldOut, opts: FitOptions, *, n_refs: int, views: str
) -> tuple[Head, dict | None, HeldOutSearch | None]:
    """``ref_feats`` holds the references, then each view of them in the same order (``n_refs`` sources).

    Also the held-out search the tap choice made, if it made one, for the thresholds to reuse.
    """
    from scorer.head import knn_head

    head = knn_head(backbone, ref_feats, replace(opts.score, tap_weights=None))
    head.meta.update(shots=n_refs, bank_sources=n_refs, support_views=views, bank_images=len(ref_feats))
    n = len(backbone.taps)
    if opts.knn_taps == "all" or n < 3:
        return head, None, None
    if opts.knn_taps == "mid":
        return head.with_options(tap_weights=mid_taps(n)), {"rule": "mid-level taps (first and last dropped)"}, None
    if opts.knn_taps == "mid+first":
        weights, record, search = choose_mid_plus_first(head, ref_feats, held, n_refs)
    else:
        weights, record, search = choose_knn_taps(head, ref_feats, held)
    return head.with_options(tap_weights=weights), record, search


def _fit_heads(
    backbone: Backbone,
    references: Sequence[np.ndarray],
    ref_feats: BackboneOutput,
    base_head: Head | None,
    opts: FitOptions,
    seed: int,
    methods: tuple[str, ...],
    progress: Progress,
) -> dict[str, Head]:
    refs = check_references(references)
    t_start = time.perf_counter()
    if base_head is not None:
        check_compatible(base_head, backbone)
        if base_head.proj_w is None:
            raise HeadError("the base head has no projections (is it a knn head?)")
    n_taps = len(backbone.taps)
    # Only a knn head on the mid-level taps (or mid+first) is fitted: nothing reads the last tap, so the held-out
    # set and the support views skip its blocks (a quarter of DINOv2's); the views' rows of that tap's bank are zeros,
    # never nearest, so were the tap weighted later it would search the references alone.
    depth = n_taps - 1 if methods == ("knn",) and opts.knn_taps in ("mid", "mid+first") and n_taps >= 3 else None
    held = held_out_set(backbone, refs, ref_feats, opts, seed, progress, depth=depth)
    if len(refs) == 1:
        # measured (BENCHMARKS.md, the verdict at the fitted threshold): views of the one reference score like
        # it, other good parts do not, and such thresholds flagged most good test images on both datasets
        log.warning(
            "one reference: the image threshold comes from views of that image alone, which cannot show how other "
            "good parts differ; expect false alarms until you fit with 2 or more references or set the threshold "
            "from known-good frames (heads set-threshold --good)"
        )
    heads: dict[str, Head] = {}
    knn: Head | None = None
    knn_record: dict | None = None
    knn_search: HeldOutSearch | None = None
    knn_feats = ref_feats
    if "knn" in methods or ("cff" in methods and opts.guard):
        kind = views_for(opts.support_views, len(refs))
        if kind != "none":
            per_ref = [support_views(r, kind, backbone.image_size, opts.score.letterbox) for r in refs]
            extra = [v for same_view in zip(*per_ref, strict=True) for v in same_view]  # view-major: i % K = ref
            views_done = Counter(progress, "views", len(extra), detail=kind).callback()
            # like the held-out set, at the precision frames are scored at (bf16 here: 1.4x faster; the bank is
            # searched in bf16 anyway); the references themselves stay at the fit's precision
            with backbone.precision_scope(backbone.precision):
                extra_feats = backbone.embed(extra, letterbox=opts.score.letterbox, progress=views_done, depth=depth)
            knn_feats = concat_outputs([ref_feats, extra_feats])
        knn, knn_record, knn_search = _fit_knn(backbone, knn_feats, held, opts, n_refs=len(refs), views=kind)
        knn.meta["view_taps"] = depth or n_taps  # taps of the views' bank rows; later ones are zero rows
    learned: dict[str, Head] = {}
    meta: dict = {"shots": len(refs), "base_head": base_head is not None}
    if "aprilgan" in methods or "cff" in methods:
        learned, meta = _fit_learned(backbone, refs, ref_feats, base_head, opts, seed, "cff" in methods, progress)
    # every head asked for, and the guard's training-free reference, is thresholded on the held-out set
    thresholds = Counter(progress, "thresholds", (knn is not None) + sum(name in methods for name in learned))
    thresholds.start()
    if knn is not None:
        knn = calibrate_thresholds(knn, knn_feats, held, opts, meta={"shots": len(refs)}, search=knn_search)
        thresholds.step(detail="knn")
        if knn_record is not None:
            knn.meta["tap_choice"] = knn_record
        if "knn" in methods:
            heads["knn"] = knn
    for name, h in learned.items():
        if name in methods:
            heads[name] = calibrate_thresholds(h, ref_feats, held, opts, meta=meta)
            thresholds.step(detail=name)
    if "cff" in heads and knn is not None:
        heads["cff"] = guard(heads["cff"], knn)
    total = time.perf_counter() - t_start
    for h in heads.values():
        h.meta["fit_seconds"] = total  # the whole fit, held-out set included, for every head it returns
    return heads


def guard(calibrated: Head, training_free: Head) -> Head:
    """Keep the calibrated head only where it beats the training-free one on the held-out set.

    Both were measured on the same held-out normals and synthetic anomalies (``fit_metrics.held_out_quality``:
    mean of image AUROC and pixel AP); a tie keeps the training-free head, which has nothing to overfit.
    """
    qc = calibrated.meta["fit_metrics"]["held_out_quality"]
    qk = training_free.meta["fit_metrics"]["held_out_quality"]
    keep = qc["score"] > qk["score"]
    chosen = calibrated if keep else training_free
    why = f"held-out score {qc['score']:.3f} (cff) vs {qk['score']:.3f} (training-free knn): " + (
        "the calibrated head is better" if keep else "calibration does not beat the training-free head"
    )
    out = replace(chosen, meta={**chosen.meta})
    out.meta["guard"] = {"requested": "cff", "chosen": chosen.method, "reason": why, "cff": qc, "knn": qk}
    log.info("guard: %s", why)
    return out


def _fit_learned(
    backbone: Backbone,
    refs: list[np.ndarray],
    ref_feats: BackboneOutput,
    base_head: Head | None,
    opts: FitOptions,
    seed: int,
    with_stage2: bool,
    progress: Progress,
) -> tuple[dict[str, Head], dict]:
    """Stage 1 (or the base head's projections) and, for cff, stage 2 on references + synthetic anomalies."""
    t_start = time.perf_counter()
    n_stages = len(backbone.taps)
    grid = ref_feats.grid
    res = opts.loss_resolution
    lb = opts.score.letterbox
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
        options=replace(opts.score, tap_weights=None),
        backbone=backbone,
        prototypes=prototypes,
        proj_w=proj_w,
        proj_b=proj_b,
    )
    heads: dict[str, Head] = {
        "aprilgan": Head(method="aprilgan", bank=build_bank(ref_feats.tokens), bank_features="raw", **common)  # type: ignore[arg-type]
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
            steps=opts.steps_stage2,
            batch_size=opts.batch_size,
            seed=seed,
            init=init_calib,
            progress=progress,
        )
        cff_head = Head(
            method="cff",
            bank=[torch.empty(0)] * n_stages,
            bank_features=opts.bank_features,
            calib_w=calib_w,
            calib_b=calib_b,
            **common,
        )  # type: ignore[arg-type]
        heads["cff"] = replace(cff_head, bank=bank_for(cff_head, ref_feats.tokens))
    meta = {
        "stage1_seconds": t_stage1,
        "train_seconds": time.perf_counter() - t_start,
        "stage2_final_loss": last2,
        "shots": len(refs),
        "n_synthetic": opts.n_synthetic,
        "base_head": base_head is not None,
    }
    return heads, meta


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
    method: str | None = None,
    base_head: Head | None = None,
    options: FitOptions | None = None,
    seed: int = 0,
    progress: Progress = no_progress,
) -> Head:
    method = method or ("cff" if base_head is not None else DEFAULT_METHOD)
    return fit_heads_from_features(
        backbone,
        references,
        ref_feats,
        base_head=base_head,
        options=options,
        seed=seed,
        methods=(method,),
        progress=progress,
    )[method]


def fit_head(
    backbone: Backbone,
    references: Sequence[np.ndarray],
    *,
    base_head: Head | None = None,
    options: FitOptions | None = None,
    method: str | None = None,
    seed: int = 0,
    progress: Progress = no_progress,
) -> Head:
    """The scorer API: a head for a new product from its K normal reference images.

    ``method`` defaults to the training-free ``knn`` head, or to ``cff`` when a base head is given.
    ``progress`` receives :class:`~scorer.progress.ProgressEvent` s, in order: ``features`` (references
    embedded, of K), ``held-out`` (images embedded), ``views`` (support views embedded, when the knn bank has
    them), ``synthesis`` (images embedded), ``stage1`` / ``stage2`` (steps, with the
    loss; learned methods only) and ``thresholds`` (heads thresholded).
    """
    refs = check_references(references)
    method = method or ("cff" if base_head is not None else DEFAULT_METHOD)
    if method not in FIT_METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(FIT_METHODS)}")
    opts = options or FitOptions()
    with backbone.precision_scope(opts.precision):
        # stage "features": the K references embedded (total K)
        feats = backbone.embed(
            refs, letterbox=opts.score.letterbox, progress=Counter(progress, "features", len(refs)).callback()
        )
        return fit_head_from_features(
            backbone, refs, feats, method=method, base_head=base_head, options=opts, seed=seed, progress=progress
        )


def views_for(support: str, k: int) -> str:
    """The support views a fit with ``k`` references uses (``auto`` resolved)."""
    if support != "auto":
        return support
    return "rot+flip" if k <= AUTO_VIEWS_UP_TO else "none"


def support_views(img: np.ndarray, kind: str, size: int, letterbox: bool) -> list[np.ndarray]:
    """The extra bank views of one reference (itself excluded): its two flips and/or three quarter turns.

    A squashed input is turned after the square resize the backbone would do anyway, so a non-square part is
    turned, not stretched along the other axis; a letterboxed one keeps its aspect and is turned as it is.
    """
    if kind == "none":
        return []
    base = img if letterbox else np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    out: list[np.ndarray] = []
    if kind in ("flip", "rot+flip"):
        out += [base[:, ::-1], base[::-1]]
    if kind in ("rot", "rot+flip"):
        out += [np.rot90(base, q) for q in (1, 2, 3)]
    return [np.ascontiguousarray(v) for v in out]


def concat_outputs(outs: Sequence[BackboneOutput]) -> BackboneOutput:
    """Backbone outputs of several batches as one, in order."""
    content = None
    if any(o.content is not None for o in outs):
        full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        content = torch.cat([o.content if o.content is not None else full.expand(len(o), 4) for o in outs])
    glob = None if any(o.global_embedding is None for o in outs) else torch.cat([o.global_embedding for o in outs])
    return BackboneOutput(
        [torch.cat([o.tokens[s] for o in outs]) for s in range(len(outs[0].tokens))], outs[0].grid, glob, content
    )


def _augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mild view of a normal image: small crop-and-resize and brightness change."""
    h, w = img.shape[:2]
    s = rng.uniform(0.9, 1.0)
    ch, cw = max(2, int(h * s)), max(2, int(w * s))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(img[y : y + ch, x : x + cw]).resize((w, h), Image.BILINEAR)
    f = np.asarray(crop).astype(np.float32) * rng.uniform(0.95, 1.05)
    return np.clip(f, 0, 255).astype(np.uint8)


def image_threshold_from_normals(scores: Sequence[float] | np.ndarray, image_far: float) -> float:
    """``max(max, mean + z * std)`` of good images' scores, z for the target false-alarm rate.

    The std is floored at 5 % of the mean, since there are few scores (the fit's held-out normals, or a line's
    known-good frames).
    """
    sc = np.asarray(scores, dtype=np.float64).ravel()
    if sc.size == 0 or not np.isfinite(sc).all():
        raise ConfigError(f"need finite scores of good images to set an image threshold, got {sc.tolist()[:8]}")
    if not 0 < image_far < 0.5:
        raise ConfigError(f"image_far must be in (0, 0.5), got {image_far}")
    z = NormalDist().inv_cdf(1 - image_far)
    mu = float(sc.mean())
    sd = max(float(sc.std()), 0.05 * abs(mu))
    return max(float(sc.max()), mu + z * sd)


MIN_GOOD_FRAMES = 2


def threshold_from_good(head: Head, images: Sequence[np.ndarray], *, image_far: float = 0.01) -> Head:
    """The head with its image threshold set from known-good images of the line instead of its held-out set.

    A fit sees only its references; with K <= 2 that cannot show how other good parts differ, and its threshold
    is off (BENCHMARKS.md: at K = 1 it flagged 64-99 % of good images). Known-good frames are that evidence. The
    pixel threshold is kept; the scores and the rule are recorded in ``meta["threshold_from_good"]``.
    """
    if len(images) < MIN_GOOD_FRAMES:
        raise ConfigError(f"need at least {MIN_GOOD_FRAMES} known-good images to see their spread, got {len(images)}")
    scores = head.score(list(images)).image_scores.astype(np.float64)
    t = image_threshold_from_normals(scores, image_far)
    out = head.with_thresholds(image=t)
    out.meta = {
        **head.meta,
        "threshold_from_good": {
            "n": len(scores),
            "image_far": image_far,
            "scores": [float(x) for x in scores],
            "previous_image_threshold": head.image_threshold,
            "rule": "max(max, mean + z * max(std, 0.05 * mean)) of the good images' scores",
        },
    }
    return out


def calibrate_thresholds(
    head: Head,
    ref_feats: BackboneOutput,
    held: HeldOut,
    opts: FitOptions,
    *,
    meta: dict | None = None,
    search: HeldOutSearch | None = None,
) -> Head:
    """Image and pixel thresholds, and the head's held-out quality, from the held-out set.

    Image: ``max(max normal, mean + z * std)`` of the held-out normal scores, z for the target false-alarm
    rate (std floored at 5 % of the mean, since K is tiny). Pixel: the F1-best threshold on the held-out
    synthetic anomalies, but never below the (1 - pixel_far) quantile of held-out normal pixels.
    """
    if search is not None and not search.serves(head):
        raise HeadError(
            f"the held-out search covers taps {search.taps} of banks of {search.bank_rows} rows; the head weights "
            f"taps {head.weighted_taps()} of banks of {tuple(b.shape[0] for b in head.bank)} rows"
        )
    n_grids, a_grids = (None, None) if search is None else (search.normals, search.anomalies)
    n_scores, n_maps, _ = held_out_scores(head, ref_feats, held.normals, held.normal_src, grids=n_grids)
    a_scores, a_maps, _ = held_out_scores(head, ref_feats, held.anomalies, held.anomaly_src, grids=a_grids)
    image_t = image_threshold_from_normals(n_scores, opts.image_far)
    normal_q = float(np.quantile(n_maps.astype(np.float32), 1 - opts.pixel_far))
    flat, lab = a_maps.ravel(), held.masks.ravel()
    # F1 at each candidate from one sort: pixels >= t are the tail of the sorted values from t's left index
    order = np.argsort(flat, kind="stable")
    sorted_vals = flat[order]
    lab_before = np.r_[0, np.cumsum(lab[order], dtype=np.int64)]  # positives among the i smallest
    qs = np.quantile(sorted_vals, np.linspace(0.5, 0.9995, 120))
    left = np.searchsorted(sorted_vals, qs, side="left")
    n_pos = float(lab_before[-1])
    tps = n_pos - lab_before[left]
    f1s = 2 * tps / np.maximum(1.0, (flat.size - left) + n_pos)
    best = int(np.argmax(f1s))  # the first of equal F1s, as a scan from the lowest candidate keeps
    best_f1, best_t = float(f1s[best]), float(qs[best])
    pixel_t = max(normal_q, best_t)
    pred = flat >= pixel_t
    tp = float((pred & lab).sum())
    fit_metrics: dict = {
        "held_out": held.how,
        "normal_scores": [float(x) for x in n_scores],
        "normal_pixel_quantile": normal_q,
        "synthetic_detection_rate": float((a_scores >= image_t).mean()),
        "synthetic_pixel_f1_at_threshold": 2 * tp / max(1.0, float(pred.sum()) + float(lab.sum())),
        "synthetic_pixel_f1_best": best_f1,
        "normal_false_alarm_rate": float((n_scores >= image_t).mean()),
        "search_dtype": search_dtype(head),
        "held_out_quality": _ranking(n_scores, a_scores, a_maps, held.masks),
    }
    out = head.with_thresholds(image=image_t, pixel=pixel_t)
    out.meta = {**head.meta, **(meta or {}), "fit_metrics": fit_metrics}
    return out
