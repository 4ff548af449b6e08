"""What a fit is asked to do: each concern's own options, and ``FitOptions``, the request that holds them.

A request (the calibrator's ``FitHeader.options`` map, ``heads fit --option``) names options flat
(``knn_taps=all``, ``steps=50``); ``FitOptions`` takes and reads them so, and hands each part of the fit only
its own: :class:`KnnOptions` to the knn fit, :class:`LearnedOptions` to the April-GAN / CFF training,
:class:`HeldOutOptions` to the held-out set, :class:`ThresholdOptions` to the thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from inspection_core.errors import ConfigError, cut, quoted
from inspection_core.names import METHODS
from scorer.head import BANK_FEATURES, ScoreOptions

KNN_TAPS = ("mid", "mid+first", "auto", "all")
SUPPORT_VIEWS = ("none", "flip", "rot", "rot+flip", "auto")
AUTO_VIEWS_UP_TO = 4
FIT_METHODS = METHODS
DEFAULT_METHOD = METHODS[0]  # knn: the best method in BENCHMARKS.md's deployment table; cff is guarded against it
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class KnnOptions:
    """The training-free head: which taps it fuses and which extra views of the references its bank holds."""

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

    def __post_init__(self) -> None:
        if self.support_views not in SUPPORT_VIEWS:
            raise ConfigError(
                f"support_views must be one of {', '.join(SUPPORT_VIEWS)}, got {quoted(self.support_views)}"
            )
        if self.knn_taps not in KNN_TAPS:
            raise ConfigError(f"knn_taps must be one of {', '.join(KNN_TAPS)}, got {quoted(self.knn_taps)}")


@dataclass(frozen=True)
class LearnedOptions:
    """The learned heads' training recipe; defaults follow the spec, step counts sized for a CPU minute."""

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
    bank_features: str = "calibrated"  # the cff bank's features (aprilgan's are raw tokens)
    guard: bool = True  # cff: keep the training-free head when it does better on the held-out set
    object_name: str = "object"

    def __post_init__(self) -> None:
        if self.n_synthetic < 1:
            raise ConfigError(f"n_synthetic must be >= 1, got {self.n_synthetic}")
        if self.steps_stage1 < 0 or self.steps_stage2 < 0:
            raise ConfigError("step counts must be >= 0")
        if self.bank_features not in BANK_FEATURES:
            raise ConfigError(f"bank_features must be one of {BANK_FEATURES}, got {quoted(self.bank_features)}")
        if self.batch_size < 1 or self.loss_resolution < 8:
            raise ConfigError("batch_size must be >= 1 and loss_resolution >= 8")


@dataclass(frozen=True)
class HeldOutOptions:
    """The held-out set: synthetic anomalies of another seed than the training ones (thresholds, the knn tap
    choice and the cff guard are measured on them and on held-out references), and augmented views of the one
    reference where K = 1."""

    n_validation: int = 16
    n_augment_k1: int = 4

    def __post_init__(self) -> None:
        if self.n_validation < 1:
            raise ConfigError(f"n_validation must be >= 1, got {self.n_validation}")


@dataclass(frozen=True)
class ThresholdOptions:
    """Target false-alarm rates of the image and pixel thresholds."""

    image_far: float = 0.01
    pixel_far: float = 0.001

    def __post_init__(self) -> None:
        if not 0 < self.image_far < 0.5 or not 0 < self.pixel_far < 0.5:
            raise ConfigError("image_far and pixel_far must be in (0, 0.5)")


_PARTS: dict[str, type] = {
    "knn": KnnOptions,
    "learned": LearnedOptions,
    "held_out": HeldOutOptions,
    "thresholds": ThresholdOptions,
}
_OWNER = {f.name: part for part, cls in _PARTS.items() for f in fields(cls)}  # flat option name -> its part


@dataclass(frozen=True, init=False)
class FitOptions:
    """A fit request: each part's options, the score options the heads get, and the fit's precision.

    ``FitOptions(knn_taps="all", steps_stage1=5)`` and ``replace(opts, image_far=0.02)`` set options by their
    flat names, and ``opts.knn_taps`` reads them, as requests name them; each is declared once, in its part.
    """

    knn: KnnOptions = field(default_factory=KnnOptions)
    learned: LearnedOptions = field(default_factory=LearnedOptions)
    held_out: HeldOutOptions = field(default_factory=HeldOutOptions)
    thresholds: ThresholdOptions = field(default_factory=ThresholdOptions)
    score: ScoreOptions = field(default_factory=ScoreOptions)
    # Fits run at this precision whatever the backbone scores at: a CFF head fitted on bf16 tokens lost up to
    # 2.7 image-AUROC points and moved its thresholds 15 %; fp32 fits scored in bf16 match fp32 (BENCHMARKS.md).
    precision: str = "fp32"

    def __init__(
        self,
        knn: KnnOptions | None = None,
        learned: LearnedOptions | None = None,
        held_out: HeldOutOptions | None = None,
        thresholds: ThresholdOptions | None = None,
        score: ScoreOptions | None = None,
        precision: str = "fp32",
        **flat: Any,
    ) -> None:
        given = {"knn": knn, "learned": learned, "held_out": held_out, "thresholds": thresholds}
        changes: dict[str, dict[str, Any]] = {part: {} for part in _PARTS}
        for name, value in flat.items():
            if name not in _OWNER:
                raise ConfigError(f"unknown fit option {quoted(name)}; known: {', '.join(sorted(_OWNER))}")
            changes[_OWNER[name]][name] = value
        for part, cls in _PARTS.items():
            value = given[part] if given[part] is not None else cls()
            object.__setattr__(self, part, replace(value, **changes[part]) if changes[part] else value)
        object.__setattr__(self, "score", score if score is not None else ScoreOptions())
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        object.__setattr__(self, "precision", precision)

    def __getattr__(self, name: str) -> Any:
        """A part's option by its flat name (``opts.knn_taps``)."""
        part = _OWNER.get(name)
        if part is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(object.__getattribute__(self, part), name)

    def with_steps(self, steps: int) -> FitOptions:
        return replace(self, steps_stage1=steps, steps_stage2=max(1, steps // 2))

    def with_strings(self, options: Mapping[str, str]) -> tuple[FitOptions, int]:
        """Apply ``name=value`` options from a request or a CLI; returns (options, seed).

        Only the options in ``STRING_OPTIONS`` (and the choices and switches below) are settable this way, each
        within its range, so a remote caller cannot ask for a fit that runs for hours or allocates without bound.
        """
        out, seed = self, 0
        for key, raw in options.items():
            if key in CHOICE_OPTIONS:
                out = replace(out, **{key: str(raw)})  # validated by the part's __post_init__, naming the choices
                continue
            if key in SWITCH_OPTIONS:
                if str(raw).lower() not in ("true", "false", "1", "0"):
                    raise ConfigError(f"fit option {key}={quoted(raw)} must be true or false")
                on = str(raw).lower() in ("true", "1")
                out = replace(out, guard=on) if key == "guard" else replace(out, score=replace(out.score, letterbox=on))
                continue
            if key not in STRING_OPTIONS:
                known = ", ".join(sorted([*STRING_OPTIONS, *CHOICE_OPTIONS, *SWITCH_OPTIONS]))
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


CHOICE_OPTIONS = ("bank_features", "knn_taps", "support_views")  # settable from strings, one of their choices
SWITCH_OPTIONS = ("guard", "letterbox")  # settable from strings as true/false
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
