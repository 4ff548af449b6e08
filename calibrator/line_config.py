"""Line calibration options (:mod:`calibrator.line`): one frozen declaration, a flag and a ``CFF_INSPECT_<FLAG>``
variable per field. Kept free of torch, like :mod:`calibrator.config`, so the command line builds without it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from inspection_core.errors import ConfigError

if TYPE_CHECKING:
    from scorer.commissioning import LineOptions


@dataclass(frozen=True)
class LineSettings:
    """How the line calibrates heads; one flag (and ``CFF_INSPECT_<FLAG>`` variable) per field."""

    commissioning_frames: int = 200
    feedback_refit_labels: int = 5
    feedback_min_interval_s: float = 60.0
    line_growth: float | None = None  # None: scorer.commissioning.LineOptions.growth
    line_dry_run: bool = False
    feedback_max_per_minute: int = 60
    line_recent_results: int = 5000
    line_fetch_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if self.commissioning_frames != 0 and not 5 <= self.commissioning_frames <= 10_000:
            raise ConfigError(f"--commissioning-frames must be 0 (off) or in 5..10000, got {self.commissioning_frames}")
        if self.feedback_refit_labels < 1:
            raise ConfigError(f"--feedback-refit-labels must be >= 1, got {self.feedback_refit_labels}")
        if not self.feedback_min_interval_s >= 0:
            raise ConfigError(f"--feedback-min-interval-s must be >= 0, got {self.feedback_min_interval_s}")
        if self.feedback_max_per_minute < 1:
            raise ConfigError(f"--feedback-max-per-minute must be >= 1, got {self.feedback_max_per_minute}")
        if self.line_recent_results < 10:
            raise ConfigError(f"--line-recent-results must be >= 10, got {self.line_recent_results}")
        if not self.line_fetch_timeout_s > 0:
            raise ConfigError(f"--line-fetch-timeout-s must be > 0, got {self.line_fetch_timeout_s}")
        if self.line_growth is not None:
            self.options()  # the scorer's own check of the growth

    @property
    def enabled(self) -> bool:
        return self.commissioning_frames > 0

    def options(self) -> LineOptions:
        """The scorer's options; fewer commissioning frames than its default minimum lower the minimum."""
        from scorer.commissioning import LineOptions

        n = self.commissioning_frames or LineOptions.min_frames
        growth = LineOptions.growth if self.line_growth is None else self.line_growth
        return LineOptions(growth=growth, min_frames=max(5, min(LineOptions.min_frames, n)))


DEFAULT_LINE = LineSettings()
_HELP = {
    "commissioning_frames": "OK frames a newly fitted head version scores provisionally before the line sets its "
    "threshold and grows its bank (0 = off; default %(default)s)",
    "feedback_refit_labels": "new operator labels that trigger a refitted candidate (default %(default)s)",
    "feedback_min_interval_s": "seconds between line versions at least (default %(default)s)",
    "line_growth": "bank rows a line version may add per tap, as a fraction of the fitted bank (default: the "
    "scorer's, scorer.commissioning.LineOptions.growth)",
    "line_dry_run": "store line versions inactive and log what would change, never activate them",
    "feedback_max_per_minute": "feedback records accepted per product and minute; more are refused as a flood "
    "(default %(default)s)",
    "line_recent_results": "recent results kept per product, where feedback finds its frame (default %(default)s)",
    "line_fetch_timeout_s": "seconds to read frames back from the frames topic (default %(default)s)",
}


def add_line_args(p: argparse.ArgumentParser) -> None:
    for f in fields(LineSettings):
        flag = f"--{f.name.replace('_', '-')}"
        default = getattr(DEFAULT_LINE, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=default, help=_HELP[f.name])
        else:
            p.add_argument(flag, type=int if isinstance(default, int) else float, default=default, help=_HELP[f.name])


def line_from(args: argparse.Namespace) -> LineSettings:
    return LineSettings(**{f.name: getattr(args, f.name) for f in fields(LineSettings)})
