"""Structured progress of the scorer's long runs (fit, eval, train-base).

The scorer only says what it is doing and how far along it is; drawing bars with an ETA (the CLI) or
streaming the events to a remote caller (the calibrator) is done above it, so this module stays pure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of ``stage`` (total 0: unknown); ``loss`` NaN where the stage has none."""

    stage: str
    done: int
    total: int
    loss: float = math.nan
    detail: str = ""


Progress = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """The default sink: nothing is reported."""


def report_every(total: int, *, events: int = 200) -> int:
    """Steps between two events of a ``total``-step loop: at most ~``events`` per stage (a gRPC message each)."""
    return max(1, total // events)


class Counter:
    """A done/total count reported as one stage, e.g. eval's runs over every category, method, K and seed.

    ``detail`` labels every event of the count unless a step gives its own.
    """

    def __init__(self, progress: Progress, stage: str, total: int, *, detail: str = "") -> None:
        self.progress, self.stage, self.total, self.detail, self.done = progress, stage, total, detail, 0

    def start(self) -> None:
        self.progress(ProgressEvent(self.stage, self.done, self.total, detail=self.detail))

    def step(self, n: int = 1, *, detail: str | None = None, loss: float = math.nan) -> None:
        self.done += n
        self.progress(ProgressEvent(self.stage, self.done, self.total, loss, self.detail if detail is None else detail))

    def callback(self) -> Callable[[int, int], None]:
        """``(done, total)`` callback (``Backbone.embed``, ``FeatureCache.embed_paths``) feeding this stage."""

        def cb(done: int, total: int) -> None:
            self.done, self.total = done, total
            self.progress(ProgressEvent(self.stage, done, total, detail=self.detail))

        return cb


__all__ = ["Counter", "Progress", "ProgressEvent", "no_progress", "report_every"]
