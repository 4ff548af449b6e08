"""The per-product heads: a training-free knn head and the learned (April-GAN / CFF) heads.

They share one base, :class:`Head`, so that every method is compared on exactly the same references, maps
and image-score rule: the bank search, the tap fusion, the source-pixel maps, the image score and the
artifact's common fields. What differs lives in the two types:

* :class:`KnnHead`      a memory bank of raw tokens only (AnomalyDINO-style, training-free; the default);
* :class:`LearnedHead`  per-stage projections, a prototype map and a memory bank; ``aprilgan`` has only the
  projections, ``cff`` adds a per-stage affine map after them (the CFF affine weights, spec A9), with the
  bank on the features it compares in.

At inference the CFF affine map is folded into the projection (one affine map per stage), so CFF costs
nothing extra; the unfolded weights are kept because the ``projected`` bank option needs them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import torch
import torch.nn.functional as F

from inspection_core.errors import ConfigError, HeadError
from inspection_core.names import METHODS
from scorer.backbones.base import Backbone, BackboneOutput, image_hw

BANK_FEATURES = ("raw", "projected", "calibrated")


@dataclass(frozen=True)
class ScoreOptions:
    """How maps and image scores are formed; shared by every method."""

    map_size: int = 256
    smooth_sigma: float = 4.0  # Gaussian blur of the output map, in output pixels (0 = off)
    image_score: str = "topk"  # topk: mean of the top fraction of the fused map; max
    topk_fraction: float = 0.01
    temperature: float = 100.0
    proto_weight: float = 1.0  # weight of the prototype (text) map against the memory-bank map
    bank_chunk: int = 4096
    bank_dtype: str = "float32"  # bfloat16: ~3x faster search on CPUs with bf16 units, |error| <= ~1e-3
    # Aspect-preserving resize (scale to fit, pad, centre) instead of squashing; maps are cropped back to the
    # image, so they, the image score and the regions only ever cover the source. Fixed at fit time.
    letterbox: bool = False
    # Fusion weights of the taps' maps (None: knn averages, the learned heads sum, as April-GAN does). The
    # knn fit chooses them on held-out references and synthetic anomalies, never on test data.
    tap_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.tap_weights is not None:
            w = tuple(float(x) for x in self.tap_weights)
            if not w or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise ConfigError(f"tap_weights must be non-negative with a positive sum, got {self.tap_weights}")
            object.__setattr__(self, "tap_weights", w)  # a list from a JSON manifest becomes a tuple
        if self.map_size < 8:
            raise ConfigError(f"map_size must be >= 8, got {self.map_size}")
        if self.image_score not in ("topk", "max"):
            raise ConfigError(f"image_score must be 'topk' or 'max', got {self.image_score!r}")
        if not 0 < self.topk_fraction <= 1:
            raise ConfigError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if self.smooth_sigma < 0:
            raise ConfigError(f"smooth_sigma must be >= 0, got {self.smooth_sigma}")
        if self.bank_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"bank_dtype must be float32, bfloat16 or float16, got {self.bank_dtype!r}")


@dataclass
class TokenScores:
    """Scores of a batch computed from backbone tokens."""

    image_scores: torch.Tensor  # (B,)
    maps: torch.Tensor  # (B, map_size, map_size) float32, fused
    stage_maps: torch.Tensor | None = None  # (B, S, map_size, map_size) when asked for


class _HeadType(type):
    """``Head(method, ...)``, the form manifests and older callers use, builds the type the method names."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        # also ``replace(head, method="knn", proj_w=None, ...)``: a head whose method changes changes type
        if cls is Head or ("method" in kwargs and head_type(kwargs["method"]) is not cls):
            return head_for_method(*args, **kwargs)
        return super().__call__(*args, **kwargs)


@dataclass
class Head(metaclass=_HeadType):
    """What every fitted head has and does: a memory bank per tap, thresholds, score options, and the scoring
    plumbing (bank search, tap fusion, source maps, image scores). Tensors live on the CPU until used.

    The types differ only through the hooks below: the features the bank is searched with
    (``_search_inputs``), a per-tap term added to the search distance (``_stage_term``), how taps are
    fused when no weights are given (``_fuse_unweighted``), how many taps scoring reads (``depth``), how a
    bank is built (``bank_from``) and the artifact tensors (``artifact_tensors`` / ``from_tensors``).
    """

    backbone_spec: str
    weights_id: str
    taps: tuple[int, ...]
    image_size: int
    grid: tuple[int, int]
    bank: list[torch.Tensor]  # per stage (M, Dbank), L2-normalised
    image_threshold: float = float("nan")
    pixel_threshold: float = float("nan")
    options: ScoreOptions = field(default_factory=ScoreOptions)
    meta: dict = field(default_factory=dict)
    backbone: Backbone | None = field(default=None, repr=False, compare=False)
    # Inference tensors per (device, bank dtype): folded weights, bank, prototypes are copied to the
    # device once, not per batch (for K = 16 on ViT-L the banks alone are ~180 MB). New per replace().
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    if TYPE_CHECKING:
        method: str  # knn, aprilgan or cff: what manifests and metrics call the head
        bank_features: str

    def __post_init__(self) -> None:
        if len(self.bank) != len(self.taps):
            raise HeadError(f"head has {len(self.bank)} memory banks for {len(self.taps)} taps")
        tw = self.options.tap_weights
        if tw is not None and len(tw) != len(self.taps):
            raise HeadError(f"head has {len(tw)} tap weights for {len(self.taps)} taps")

    # -- what the types provide ------------------------------------------------
    def _search_inputs(self, tokens: Sequence[torch.Tensor], *, fold: bool) -> tuple[list[torch.Tensor], list]:
        """(per tap: what the bank is searched with, per tap: what ``_stage_term`` reads)."""
        raise NotImplementedError

    def _stage_term(self, feats: Sequence[torch.Tensor], i: int) -> torch.Tensor | None:
        """A map added to tap ``i``'s search distance, if the head has one."""
        return None

    def _fuse_unweighted(self, stacked: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _device_parts(self, device: torch.device) -> dict:
        """Tensors beyond the bank that scoring wants on ``device``."""
        return {}

    def bank_from(self, ref_tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The memory bank of reference tokens, in the feature space this head compares in."""
        raise NotImplementedError

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors an artifact stores, cloned: safetensors refuses tensors that share memory."""
        return {f"bank.{i}": b.detach().cpu().half().contiguous().clone() for i, b in enumerate(self.bank)}

    # -- features ------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return len(self.taps)

    @property
    def depth(self) -> int:
        """How many leading taps scoring reads (``Backbone.run`` skips the blocks past them)."""
        return self.n_stages

    def on_device(self, device: torch.device, bank_dtype: str | None = None) -> dict:
        """Bank (in ``bank_dtype``) and the type's other scoring tensors on ``device``, cached when not training."""
        bank_dtype = bank_dtype or self.options.bank_dtype
        key = (str(device), bank_dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        dt = getattr(torch, bank_dtype)
        out = {"bank": [b.to(device=device, dtype=dt) for b in self.bank], **self._device_parts(device)}
        if not torch.is_grad_enabled():
            self._cache[key] = out
        return out

    # -- maps ----------------------------------------------------------------
    def score_tokens(self, out: BackboneOutput, *, fold: bool = True, per_stage: bool = False) -> TokenScores:
        taps = range(self.n_stages) if per_stage else None
        return self.maps_from_grids(self.stage_grids(out, fold=fold, taps=taps), out.content, per_stage=per_stage)

    def stage_grids(self, out: BackboneOutput, *, fold: bool = True, taps: Sequence[int] | None = None) -> torch.Tensor:
        """(B, S, gh, gw) float32 per-tap anomaly grids: the bank search, the costly part of scoring.

        ``taps``: the taps to search (default: those the fusion weights); the others are zeros. Kept apart from
        ``maps_from_grids`` so a fit can search its held-out set once and fuse the taps several ways.
        """
        tokens = out.tokens
        if len(tokens) != self.n_stages:
            raise HeadError(f"backbone gave {len(tokens)} stages, head expects {self.n_stages}")
        if tuple(out.grid) != tuple(self.grid):
            raise HeadError(
                f"backbone grid {out.grid} differs from the head's {self.grid} "
                f"(image size {self.image_size}); use the head's backbone settings"
            )
        if any(bk.shape[0] == 0 for bk in self.bank):
            raise HeadError(
                "head has an empty memory bank (a base head from train-base?); fit it to a product's references first"
            )
        opts = self.options
        b = tokens[0].shape[0]
        gh, gw = self.grid
        search = set(self.weighted_taps() if taps is None else taps)
        queries, term_feats = self._search_inputs(tokens, fold=fold)
        bank = self.on_device(tokens[0].device)["bank"]
        grid_maps = []  # per stage (B, G, G) in "anomaly" units
        for i in range(self.n_stages):
            if i not in search:  # a tap the fusion ignores costs no bank search
                grid_maps.append(tokens[i].new_zeros(b, gh, gw, dtype=torch.float32))
                continue
            # one matmul per stage (chunked over bank rows) and top-1 where the tokens are
            stage = nn_distance(queries[i], bank[i], chunk=opts.bank_chunk, dtype=opts.bank_dtype)  # (B, N)
            term = self._stage_term(term_feats, i)
            if term is not None:
                stage = stage + term
            grid_maps.append(stage.view(b, gh, gw))
        return torch.stack(grid_maps, 1)  # (B, S, G, G)

    def weighted_taps(self) -> list[int]:
        """The taps whose maps the fusion reads (every tap unless some have weight 0)."""
        tw = self.options.tap_weights
        return [i for i in range(self.n_stages) if tw is None or tw[i] != 0]

    def fuse(self, stacked: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) per-tap maps -> (B, ...): the weighted mean, or the type's own rule without weights."""
        tw = self.options.tap_weights
        if tw is None:
            return self._fuse_unweighted(stacked)
        w = torch.tensor(tw, dtype=stacked.dtype, device=stacked.device)
        w = (w / w.sum()).view(1, -1, *([1] * (stacked.dim() - 2)))
        return (stacked * w).sum(1)

    def maps_from_grids(
        self, stacked: torch.Tensor, content: torch.Tensor | None, *, per_stage: bool = False
    ) -> TokenScores:
        """Fused source-pixel maps and image scores (and per-tap maps) from ``stage_grids``' output."""
        opts = self.options
        maps = to_source_maps(self.fuse(stacked)[:, None], opts.map_size, content)[:, 0]
        if opts.smooth_sigma > 0:
            maps = gaussian_blur(maps, opts.smooth_sigma)
        image_scores = image_score(maps, opts)
        stage_maps = None
        if per_stage:
            stage_maps = to_source_maps(stacked, opts.map_size, content)
            if opts.smooth_sigma > 0:
                stage_maps = gaussian_blur(stage_maps.flatten(0, 1), opts.smooth_sigma).view_as(stage_maps)
        return TokenScores(image_scores=image_scores, maps=maps, stage_maps=stage_maps)

    def score_features(
        self,
        feats: BackboneOutput,
        *,
        batch: int = 8,
        per_stage: bool = False,
        grids: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Precomputed tokens -> (image scores, float32 maps, float16 stage maps or None), in batches.

        ``grids``: ``search_features``' output for these tokens (same order), so nothing is searched again.
        """
        scores, maps, stages = [], [], []
        n = feats.tokens[0].shape[0]
        if grids is not None and grids.shape[0] != n:
            raise HeadError(f"{grids.shape[0]} searched grids for {n} images")
        with torch.inference_mode():
            for s in range(0, n, batch):
                sl = feats.select(slice(s, s + batch))
                if grids is None:
                    r = self.score_tokens(_as_float(sl), per_stage=per_stage)
                else:
                    r = self.maps_from_grids(grids[s : s + batch], sl.content, per_stage=per_stage)
                scores.append(r.image_scores.float().cpu().numpy())
                maps.append(r.maps.float().cpu().numpy())
                if per_stage and r.stage_maps is not None:
                    stages.append(r.stage_maps.cpu().numpy().astype(np.float16))
        return np.concatenate(scores), np.concatenate(maps), (np.concatenate(stages) if stages else None)

    def search_features(self, feats: BackboneOutput, *, taps: Sequence[int], batch: int = 8) -> torch.Tensor:
        """(n, S, gh, gw) per-tap grids of precomputed tokens, batched as ``score_features`` batches them."""
        out = []
        n = feats.tokens[0].shape[0]
        with torch.inference_mode():
            for s in range(0, n, batch):
                out.append(self.stage_grids(_as_float(feats.select(slice(s, s + batch))), taps=taps).cpu())
        return torch.cat(out)

    def score(self, images: Sequence[np.ndarray], *, batch_size: int = 8) -> Scores:
        """Image scores, normalised scores, verdicts, maps and regions for decoded RGB images (any size)."""
        if self.backbone is None:
            raise HeadError("head has no backbone attached; load it with load_head(path, backbone)")
        if len(images) == 0:
            size = self.options.map_size
            return Scores(np.zeros(0), np.zeros(0), np.zeros(0, bool), np.zeros((0, size, size), np.float16), [])
        scores, maps = [], []
        with torch.inference_mode():
            for s in range(0, len(images), batch_size):
                chunk = images[s : s + batch_size]
                # one forward pass, autocast per backbone.precision
                out = self.backbone.forward_images(chunk, letterbox=self.options.letterbox, depth=self.depth)
                r = self.score_tokens(out)
                scores.append(r.image_scores.float().cpu().numpy())
                maps.append(r.maps.float().cpu().numpy())
        sc = np.concatenate(scores)
        mp = np.concatenate(maps)
        thr = self.image_threshold
        norm = sc / thr if np.isfinite(thr) and thr > 0 else np.full_like(sc, np.nan)
        regions = [find_regions(mp[i], self.pixel_threshold, image_hw(images[i])) for i in range(len(images))]
        verdicts = (sc >= thr) if np.isfinite(thr) else np.zeros(len(sc), bool)
        return Scores(sc, norm, verdicts, mp.astype(np.float16), regions)

    # -- convenience ----------------------------------------------------------
    def with_options(self, **changes: object) -> Self:
        return replace(self, options=replace(self.options, **changes))

    def with_thresholds(self, image: float | None = None, pixel: float | None = None) -> Self:
        return replace(
            self,
            image_threshold=self.image_threshold if image is None else float(image),
            pixel_threshold=self.pixel_threshold if pixel is None else float(pixel),
        )


def _as_float(out: BackboneOutput) -> BackboneOutput:
    return BackboneOutput([t.float() for t in out.tokens], out.grid, out.global_embedding, out.content)


@dataclass
class KnnHead(Head):
    """Training-free: raw reference tokens in the bank, the taps' distance maps averaged (or weighted)."""

    method: ClassVar[str] = "knn"
    bank_features: ClassVar[str] = "raw"
    # none of the learned parts: code that reads them on any head sees None
    proj_w: ClassVar[None] = None
    proj_b: ClassVar[None] = None
    calib_w: ClassVar[None] = None
    calib_b: ClassVar[None] = None
    prototypes: ClassVar[None] = None

    @property
    def depth(self) -> int:
        """Scoring stops at the last weighted tap, so a backbone need not run the blocks past it (the default
        mid-level taps skip blocks 10-12 of 12)."""
        tw = self.options.tap_weights
        if tw is None:
            return self.n_stages
        return max(i for i, w in enumerate(tw) if w > 0) + 1

    def _search_inputs(self, tokens: Sequence[torch.Tensor], *, fold: bool) -> tuple[list[torch.Tensor], list]:
        return list(tokens), []

    def folded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise HeadError("a knn head has no projection to fold")

    def _fuse_unweighted(self, stacked: torch.Tensor) -> torch.Tensor:
        return stacked.mean(1)

    def bank_from(self, ref_tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return build_bank(ref_tokens)

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], *, method: str = "knn", bank_features: str = "raw", **common: Any
    ) -> KnnHead:
        if bank_features != "raw":
            raise HeadError(f"a knn head's bank holds raw tokens, not bank_features={bank_features!r}")
        return cls(bank=_tensor_group(tensors, "bank", len(common["taps"])) or [], **common)


LEARNED_METHODS = ("aprilgan", "cff")


@dataclass(kw_only=True)
class LearnedHead(Head):
    """Projections and a prototype map per tap, trained on synthetic anomalies; ``cff`` adds the CFF affine
    weights after the projections. The taps' maps are summed, as April-GAN does (unless weighted)."""

    method: str = "cff"  # aprilgan | cff: a label for manifests and metrics; scoring reads the tensors
    proj_w: list[torch.Tensor]  # per stage (E, D)
    proj_b: list[torch.Tensor]  # per stage (E,)
    prototypes: torch.Tensor | None = None  # (S, E, 2): normal, anomalous; unit columns
    calib_w: list[torch.Tensor] | None = None  # CFF affine weights per stage (E, E), identity at init
    calib_b: list[torch.Tensor] | None = None  # per stage (E,)
    bank_features: str = "raw"  # raw | projected | calibrated: the features the bank holds

    def __post_init__(self) -> None:
        if self.proj_w is None or self.proj_b is None:
            raise HeadError(f"a learned ({self.method}) head needs its projections")
        if self.method not in LEARNED_METHODS:
            raise ConfigError(f"a learned head is aprilgan or cff, not {self.method!r}")
        if self.bank_features not in BANK_FEATURES:
            raise ConfigError(f"bank_features must be one of {BANK_FEATURES}, got {self.bank_features!r}")
        super().__post_init__()

    def folded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Projection and CFF affine map composed into one affine map per stage."""
        out = []
        for i in range(self.n_stages):
            w, b = self.proj_w[i], self.proj_b[i]
            if self.calib_w is not None and self.calib_b is not None:
                cw, cb = self.calib_w[i], self.calib_b[i]
                w, b = cw @ w, cw @ b + cb
            out.append((w, b))
        return out

    def _device_parts(self, device: torch.device) -> dict:
        return {
            "folded": [(w.to(device).float(), b.to(device).float()) for w, b in self.folded()],
            "prototypes": self.prototypes.to(device).float() if self.prototypes is not None else None,
        }

    def stage_features(
        self, tokens: Sequence[torch.Tensor], *, fold: bool = True
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(features after the CFF affine map, projected features) per stage, before normalisation.

        With ``fold`` the first come from the folded weights and the projected list is empty unless the bank
        needs it. Without CFF affine weights both are the projected features.
        """
        dev = tokens[0].device
        need_proj = self.bank_features == "projected" or not fold
        projected = (
            [F.linear(t.float(), self.proj_w[i].to(dev), self.proj_b[i].to(dev)) for i, t in enumerate(tokens)]
            if need_proj
            else []
        )
        if fold:
            folded = self.on_device(dev)["folded"]
            calibrated = [F.linear(t.float(), w, b) for t, (w, b) in zip(tokens, folded, strict=True)]
        elif self.calib_w is not None and self.calib_b is not None:
            calibrated = [
                F.linear(p, self.calib_w[i].to(dev), self.calib_b[i].to(dev)) for i, p in enumerate(projected)
            ]
        else:
            calibrated = projected
        return calibrated, projected

    def bank_view(
        self, tokens: Sequence[torch.Tensor], calibrated: Sequence[torch.Tensor], projected: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        if self.bank_features == "raw":
            return list(tokens)
        if self.bank_features == "projected":
            return list(projected)
        return list(calibrated)

    def _search_inputs(self, tokens: Sequence[torch.Tensor], *, fold: bool) -> tuple[list[torch.Tensor], list]:
        calibrated, projected = self.stage_features(tokens, fold=fold)
        return self.bank_view(tokens, calibrated, projected), calibrated

    def _stage_term(self, feats: Sequence[torch.Tensor], i: int) -> torch.Tensor | None:
        if self.prototypes is None:
            return None
        return self.options.proto_weight * self._proto_map(feats[i], i)

    def _proto_map(self, feats: torch.Tensor, i: int) -> torch.Tensor:
        """Anomalous-class probability per token (softmax over the normal/anomalous pair)."""
        f = F.normalize(feats.float(), dim=-1)
        protos = self.on_device(f.device)["prototypes"]
        logits = self.options.temperature * (f @ protos[i])  # (B, N, 2)
        return torch.sigmoid(logits[..., 1] - logits[..., 0])

    def _fuse_unweighted(self, stacked: torch.Tensor) -> torch.Tensor:
        return stacked.sum(1)

    def bank_from(self, ref_tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            calibrated, projected = self.stage_features([t.float() for t in ref_tokens], fold=True)
            return build_bank(self.bank_view(ref_tokens, calibrated, projected))

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        # folded() returns the projection itself where there is no CFF affine map: hence every clone
        t = super().artifact_tensors()
        groups = {"proj_w": self.proj_w, "proj_b": self.proj_b}
        groups["folded_w"], groups["folded_b"] = (list(x) for x in zip(*self.folded(), strict=True))
        if self.calib_w is not None and self.calib_b is not None:
            groups["calib_w"], groups["calib_b"] = self.calib_w, self.calib_b
        for name, group in groups.items():
            for i, x in enumerate(group):
                t[f"{name}.{i}"] = x.detach().cpu().float().contiguous().clone()
        if self.prototypes is not None:
            t["prototypes"] = self.prototypes.detach().cpu().float().contiguous().clone()
        return t

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], *, method: str = "cff", bank_features: str = "raw", **common: Any
    ) -> LearnedHead:
        n = len(common["taps"])
        return cls(
            method=method,
            bank=_tensor_group(tensors, "bank", n) or [],
            bank_features=bank_features,
            proj_w=_tensor_group(tensors, "proj_w", n),  # type: ignore[arg-type]
            proj_b=_tensor_group(tensors, "proj_b", n),  # type: ignore[arg-type]
            calib_w=_tensor_group(tensors, "calib_w", n),
            calib_b=_tensor_group(tensors, "calib_b", n),
            prototypes=tensors.get("prototypes"),
            **common,
        )


def _tensor_group(tensors: Mapping[str, torch.Tensor], name: str, n: int) -> list[torch.Tensor] | None:
    """``name.0`` .. ``name.{n-1}``, or None where any is missing."""
    keys = [f"{name}.{i}" for i in range(n)]
    return [tensors[k] for k in keys] if all(k in tensors for k in keys) else None


def head_type(method: str) -> type[KnnHead] | type[LearnedHead]:
    """The head type a method string (a manifest's, a request's) names."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return KnnHead if method == "knn" else LearnedHead


def head_for_method(
    method: str,
    *args: Any,
    bank_features: str = "raw",
    proj_w: list[torch.Tensor] | None = None,
    proj_b: list[torch.Tensor] | None = None,
    calib_w: list[torch.Tensor] | None = None,
    calib_b: list[torch.Tensor] | None = None,
    prototypes: torch.Tensor | None = None,
    **common: Any,
) -> Head:
    """A head from a method string and the parts it has (``Head(method, ...)``); positional arguments after
    the method are the base fields, then ``bank_features``."""
    if len(args) > 6:
        bank_features, args = args[6], args[:6]
    cls = head_type(method)
    if bank_features not in BANK_FEATURES:
        raise ConfigError(f"bank_features must be one of {BANK_FEATURES}, got {bank_features!r}")
    if cls is KnnHead:
        if bank_features != "raw" or proj_w is not None:
            raise HeadError(f"bank_features={bank_features!r} needs projections; a knn head has none")
        return KnnHead(*args, **common)
    learned = dict(proj_w=proj_w, proj_b=proj_b, calib_w=calib_w, calib_b=calib_b, prototypes=prototypes)
    return LearnedHead(*args, method=method, bank_features=bank_features, **learned, **common)  # type: ignore[arg-type]


def check_compatible(head: Head, backbone: Backbone) -> None:
    """A head only works with the backbone (and weights, taps, size) it was built for."""
    problems = []
    if head.backbone_spec != backbone.spec:
        problems.append(f"backbone {head.backbone_spec!r} (this one is {backbone.spec!r})")
    if head.weights_id != backbone.weights_id:
        problems.append(f"weights {head.weights_id[:16]} (this backbone has {backbone.weights_id[:16]})")
    if tuple(head.taps) != tuple(backbone.taps):
        problems.append(f"taps {tuple(head.taps)} (this backbone taps {tuple(backbone.taps)})")
    if head.image_size != backbone.image_size:
        problems.append(f"image size {head.image_size} (this backbone runs at {backbone.image_size})")
    if problems:
        raise HeadError("head was built for " + "; ".join(problems))


def search_dtype(head: Head) -> str:
    """The bank-search dtype a head gets where nobody chose one: bfloat16 where its backbone scores in bf16.

    A backbone at bf16 (a GPU, or a CPU with bf16 units) already hands the search bf16 tokens, and bf16
    products are ~3x faster there (BENCHMARKS.md's tables were measured so); elsewhere the head's own
    (float32 unless it was saved otherwise). The fit sets thresholds with the dtype this gives on its machine.
    """
    bb = head.backbone
    if bb is not None and (bb.device.type == "cuda" or bb.precision == "bf16"):
        return "bfloat16"
    return head.options.bank_dtype


# On a CPU the similarity block (query rows x bank rows) is kept to 16 MiB of float32 so it stays in the last-level
# cache between the matmul that writes it and the max that reads it: on the 2-core EPYC (32 MiB L3) 2048 x 2048
# blocks searched 1.31x faster than whole 8-image batches against 4096-row bank chunks, with the same bits.
_CPU_BLOCK = 1 << 22
_CPU_BANK_STEP = 2048


def nn_distance(query: torch.Tensor, bank: torch.Tensor, *, chunk: int = 4096, dtype: str = "float32") -> torch.Tensor:
    """``1 - max cosine`` of every query token to the bank: (B, N, D) x (M, D) -> (B, N).

    The bank is stored L2-normalised; the query is normalised here. One matmul per
    block of query and bank rows keeps memory bounded for large K (``chunk``: at most this many bank rows).
    """
    dt = getattr(torch, dtype)
    b, n, d = query.shape
    q = F.normalize(query.float(), dim=-1).to(dt).reshape(b * n, d)
    bk = bank.to(q.device, dt)  # a no-op for a head's device cache, which holds the bank in the search dtype
    if q.is_cuda:
        rows = q.shape[0]
        if q.shape[0] * bk.shape[0] * q.element_size() <= 1 << 31:
            chunk = bk.shape[0]  # the whole bank in one matmul when the similarity block fits in 2 GiB
    else:
        chunk = max(1, min(chunk, _CPU_BANK_STEP))
        rows = max(1, _CPU_BLOCK // chunk)
    best = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    for r in range(0, q.shape[0], rows):
        qq, top = q[r : r + rows], None
        for s in range(0, bk.shape[0], chunk):
            m = (qq @ bk[s : s + chunk].T).amax(-1).float()  # (rows, m) -> (rows,)
            top = m if top is None else torch.maximum(top, m)
        assert top is not None
        best[r : r + rows] = top
    return (1.0 - best).view(b, n)


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, align_corners=True, as April-GAN upsamples its maps."""
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=True)


def to_source_maps(grids: torch.Tensor, size: int, content: torch.Tensor | None) -> torch.Tensor:
    """(B, C, G, G) token maps -> (B, C, size, size) maps of the source image.

    Squashed inputs cover the whole grid (April-GAN's upsampling: corners on the corner tokens' centres).
    Letterboxed ones are interpolated the same way between the first and last tokens whose centres lie on
    the image, so padding never reaches a map, an image score or a region, and map pixels scale to source
    pixels alike in both modes.
    """
    if content is None:
        return upsample(grids, size)
    b, _, gh, gw = grids.shape
    box = content.to(grids.device, torch.float32)
    t = torch.linspace(0, 1, size, device=grids.device)

    def axis(lo_frac: torch.Tensor, hi_frac: torch.Tensor, g: int) -> torch.Tensor:
        lo = torch.ceil(lo_frac * g - 0.5).clamp(0, g - 1)  # first token centre on the image
        hi = torch.floor(hi_frac * g - 0.5).clamp(0, g - 1)  # last one
        mid = ((lo + hi) / 2).round()
        lo, hi = torch.where(hi < lo, mid, lo), torch.where(hi < lo, mid, hi)
        u = lo[:, None] + t[None] * (hi - lo)[:, None]  # (B, size) in token units
        return u / max(g - 1, 1) * 2 - 1  # grid_sample coordinates with align_corners=True

    gy = axis(box[:, 0], box[:, 2], gh)[:, :, None].expand(b, size, size)
    gx = axis(box[:, 1], box[:, 3], gw)[:, None, :].expand(b, size, size)
    sample = torch.stack([gx, gy], -1)
    return F.grid_sample(grids.float(), sample, mode="bilinear", padding_mode="border", align_corners=True)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, reflect-padded, radius 4 sigma."""
    radius = max(1, int(math.ceil(4 * sigma)))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    k = k / k.sum()
    x = maps[:, None].float()
    pad_h = min(radius, x.shape[-2] - 1)
    pad_w = min(radius, x.shape[-1] - 1)
    kh = k[radius - pad_h : radius + pad_h + 1]
    kw = k[radius - pad_w : radius + pad_w + 1]
    x = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect")
    x = F.conv2d(x, (kw / kw.sum()).view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, pad_h, pad_h), mode="reflect")
    x = F.conv2d(x, (kh / kh.sum()).view(1, 1, -1, 1))
    return x[:, 0]


def image_score(maps: torch.Tensor, opts: ScoreOptions) -> torch.Tensor:
    flat = maps.flatten(1)
    if opts.image_score == "max":
        return flat.amax(1)
    k = max(1, int(round(flat.shape[1] * opts.topk_fraction)))
    return flat.topk(k, dim=1).values.mean(1)


def build_bank(tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per stage: all reference tokens (K*N, D), L2-normalised, float16 for storage."""
    return [F.normalize(t.float().flatten(0, -2), dim=-1).half() for t in tokens]


def knn_head(backbone: Backbone, ref_tokens: BackboneOutput, options: ScoreOptions | None = None) -> KnnHead:
    """Training-free nearest-patch head on the backbone's four taps."""
    return KnnHead(
        backbone_spec=backbone.spec,
        weights_id=backbone.weights_id,
        taps=tuple(backbone.taps),
        image_size=backbone.image_size,
        grid=tuple(ref_tokens.grid),  # type: ignore[arg-type]
        bank=build_bank(ref_tokens.tokens),
        options=options or ScoreOptions(),
        meta={"shots": int(ref_tokens.tokens[0].shape[0])},
        backbone=backbone,
    )


def as_numpy_maps(maps: torch.Tensor) -> np.ndarray:
    return maps.detach().float().cpu().numpy()


@dataclass(frozen=True)
class Region:
    """A connected defect region, in source-image pixel coordinates."""

    x_min: int
    y_min: int
    x_max: int
    y_max: int
    area: int  # pixels of the source image
    peak: float


@dataclass
class Scores:
    """Per-image results of :meth:`Head.score`; ``maps`` are float16 at the map size."""

    image_scores: np.ndarray
    normalized_scores: np.ndarray  # score / image_threshold (1.0 = on the threshold)
    is_defect: np.ndarray
    maps: np.ndarray
    regions: list[list[Region]]


def find_regions(amap: np.ndarray, threshold: float, src_hw: tuple[int, int], *, min_area: int = 1) -> list[Region]:
    """Connected components (8-connectivity) of ``amap >= threshold``, boxes scaled to the source."""
    from scipy import ndimage

    if not np.isfinite(threshold):
        return []
    mh, mw = amap.shape
    sh, sw = src_hw
    lab, n = ndimage.label(amap >= threshold, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    sy, sx = sh / mh, sw / mw
    out = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        comp = lab[sl] == k
        area = int(round(comp.sum() * sy * sx))
        if area < min_area:
            continue
        peak = float(amap[sl][comp].max())
        out.append(
            Region(
                x_min=int(math.floor(sl[1].start * sx)),
                y_min=int(math.floor(sl[0].start * sy)),
                x_max=min(sw, int(math.ceil(sl[1].stop * sx))),
                y_max=min(sh, int(math.ceil(sl[0].stop * sy))),
                area=area,
                peak=peak,
            )
        )
    out.sort(key=lambda r: -r.peak)
    return out


@dataclass
class BatchScores:
    """What :func:`score_batch` gives: each group's :class:`Scores`, in the groups' order, and how many backbone
    forward passes that took (what an operator compares with the number of products in a batch)."""

    scores: list[Scores]
    passes: int


def score_batch(
    groups: Sequence[tuple[Head, Sequence[np.ndarray | torch.Tensor]]], *, batch_size: int = 8
) -> BatchScores:
    """Several heads' images (a worker's batch: each product's head and its frames) scored with one backbone pass
    per ``batch_size`` images instead of one per head: the backbone dominates the cost of a frame, and every head
    of a worker shares it.

    Images share a pass when their heads share the backbone object and the resize (``options.letterbox``) and
    the images are of one kind (host arrays or device tensors); the pass runs to the deepest tap any of its heads
    reads (``Head.depth``; the blocks past a shallower head's last tap only cost time, its search never reads
    them). Each head then scores its own rows, so each group's :class:`Scores` equal ``head.score(images)``'s up
    to float rounding (only the other images in the forward pass differ).
    """
    for head, _ in groups:
        if head.backbone is None:
            raise HeadError("head has no backbone attached; load it with load_head(path, backbone)")
    # pass key -> (group, image) rows, in the order they came
    by_pass: dict[tuple[int, bool, bool], list[tuple[int, int]]] = {}
    for g, (head, images) in enumerate(groups):
        for i, img in enumerate(images):
            key = (id(head.backbone), head.options.letterbox, isinstance(img, torch.Tensor))
            by_pass.setdefault(key, []).append((g, i))
    # per group: (image indices, image scores, maps) of each pass that had some of its images
    parts: list[list[tuple[list[int], np.ndarray, np.ndarray]]] = [[] for _ in groups]
    passes = 0
    with torch.inference_mode():
        for rows in by_pass.values():
            for s in range(0, len(rows), batch_size):
                chunk = rows[s : s + batch_size]
                first = groups[chunk[0][0]][0]
                assert first.backbone is not None
                depth = max(groups[g][0].depth for g, _ in chunk)
                images = [groups[g][1][i] for g, i in chunk]
                out = first.backbone.forward_images(images, letterbox=first.options.letterbox, depth=depth)
                passes += 1
                positions: dict[int, list[int]] = {}
                for pos, (g, _) in enumerate(chunk):
                    positions.setdefault(g, []).append(pos)
                for g, pos in positions.items():
                    mine = out if len(pos) == len(chunk) else out.select(pos)
                    r = groups[g][0].score_tokens(mine)
                    idx = [chunk[p][1] for p in pos]
                    parts[g].append((idx, r.image_scores.float().cpu().numpy(), r.maps.float().cpu().numpy()))
    scores = [_group_scores(head, images, p) for (head, images), p in zip(groups, parts, strict=True)]
    return BatchScores(scores, passes)


def _group_scores(
    head: Head, images: Sequence[np.ndarray | torch.Tensor], parts: list[tuple[list[int], np.ndarray, np.ndarray]]
) -> Scores:
    """One head's rows of several passes put back in its images' order, then thresholded as ``Head.score`` does."""
    size = head.options.map_size
    sc = np.zeros(len(images), np.float32)
    mp = np.zeros((len(images), size, size), np.float32)
    for idx, s, m in parts:
        sc[idx], mp[idx] = s, m
    thr = head.image_threshold
    norm = sc / thr if np.isfinite(thr) and thr > 0 else np.full_like(sc, np.nan)
    regions = [find_regions(mp[i], head.pixel_threshold, image_hw(images[i])) for i in range(len(images))]
    verdicts = (sc >= thr) if np.isfinite(thr) else np.zeros(len(sc), bool)
    return Scores(sc, norm, verdicts, mp.astype(np.float16), regions)
