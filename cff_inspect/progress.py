"""Progress of ``heads fit``, ``eval`` and ``train-base`` on stderr.

The scorer reports :class:`~scorer.progress.ProgressEvent` s (the calibrator streams the same stages); this
draws them: tqdm bars with totals and ETA on a terminal, and where stderr is not one (CI, log files) plain
``stage done/total pct% elapsed ETA`` lines, at most one per stage every ``interval`` seconds plus its final
line, so a log never floods. ``--no-progress`` (``CFF_INSPECT_NO_PROGRESS``) silences both.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import IO, Any

from scorer.progress import ProgressEvent


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars or lines on stderr (env CFF_INSPECT_NO_PROGRESS=1)",
    )


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class _Run:
    """One run of a stage: from its first event until done reaches total (or the count starts over)."""

    total: int
    start: float
    last_line: float
    done: int = 0
    bar: Any = None
    extra: dict = field(default_factory=dict)


class ProgressRenderer:
    """A :data:`scorer.progress.Progress` sink that draws on ``stream`` (stderr by default).

    ``keep``: stages whose finished bar (or final line) stays; the others are transient, e.g. the fits inside
    an evaluation, shown only while they last (and, in plain lines, only if they last ``interval`` or more).
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        enabled: bool = True,
        tty: bool | None = None,
        interval: float = 2.0,
        keep: Collection[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        if tty is None:
            try:
                tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.interval = interval
        self.keep = keep
        self.clock = clock
        self._runs: dict[str, _Run] = {}
        self._unknown: dict[str, float] = {}
        self._exit = contextlib.ExitStack()

    # -- context: on a terminal, log records go through tqdm so they do not tear the bars -----------------
    def __enter__(self) -> ProgressRenderer:
        if self.enabled and self.tty:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._exit.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for run in self._runs.values():
            if run.bar is not None:
                run.bar.close()
        self._runs.clear()
        self._exit.close()

    def _kept(self, stage: str) -> bool:
        return self.keep is None or stage in self.keep

    # -- events -------------------------------------------------------------------------------------------
    def __call__(self, ev: ProgressEvent) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if ev.total <= 0:  # no count: a message (``selected: ...``), or a count of unknown length (throttled)
            if ev.detail:
                self._write(f"{ev.stage}: {ev.detail}")
            elif now - self._unknown.get(ev.stage, -math.inf) >= self.interval:
                self._write(f"{ev.stage} {ev.done}")
                self._unknown[ev.stage] = now
            return
        run = self._runs.get(ev.stage)
        if run is None or ev.done < run.done or ev.total != run.total:
            if run is not None and run.bar is not None:
                run.bar.close()
            run = self._runs[ev.stage] = _Run(total=ev.total, start=now, last_line=now)
        finished = ev.done >= ev.total
        if self.tty:
            self._draw(ev, run)
        elif (finished and self._kept(ev.stage)) or now - run.last_line >= self.interval:
            self._write(self.line(ev, now - run.start))
            run.last_line = now
        run.done = ev.done
        if finished:
            if run.bar is not None:
                run.bar.close()
            del self._runs[ev.stage]

    @staticmethod
    def line(ev: ProgressEvent, elapsed: float) -> str:
        """``stage1 40/100 40% elapsed 0:03 ETA 0:05 loss 0.1234 (detail)``."""
        pct = 100.0 * ev.done / ev.total
        eta = elapsed / ev.done * (ev.total - ev.done) if ev.done > 0 else math.inf
        out = f"{ev.stage} {ev.done}/{ev.total} {pct:3.0f}% elapsed {_clock(elapsed)} ETA {_clock(eta)}"
        if math.isfinite(ev.loss):
            out += f" loss {ev.loss:.4f}"
        return out + (f" ({ev.detail})" if ev.detail else "")

    def _draw(self, ev: ProgressEvent, run: _Run) -> None:
        if run.bar is None:
            from tqdm import tqdm

            run.bar = tqdm(
                total=ev.total, desc=ev.stage, file=self.stream, leave=self._kept(ev.stage), dynamic_ncols=True
            )
        post = {}
        if math.isfinite(ev.loss):
            post["loss"] = f"{ev.loss:.4f}"
        if ev.detail:
            post["at"] = ev.detail
        if post != run.extra:
            run.bar.set_postfix(post, refresh=False)
            run.extra = post
        run.bar.update(ev.done - run.bar.n)

    def _write(self, text: str) -> None:
        if self.tty:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)


def renderer(args: argparse.Namespace, *, keep: Collection[str] | None = None) -> ProgressRenderer:
    """The renderer a command draws with: stderr as it is now (tests capture it), off with ``--no-progress``."""
    enabled = not getattr(args, "no_progress", False)
    if getattr(args, "log_format", "text") == "json":  # every stderr line a JSON object: no bars, plain lines as JSON
        from inspection_core.logs import JsonLines

        return ProgressRenderer(JsonLines(), enabled=enabled, tty=False, keep=keep)  # type: ignore[arg-type]
    return ProgressRenderer(sys.stderr, enabled=enabled, keep=keep)


def from_fit_progress(msg: Any) -> ProgressEvent | None:  # noqa: ANN401 - calibrator_pb2.FitProgress
    """A calibrator FitProgress message as the event the local fit would report; None for the final one."""
    if msg.stage == "done" or msg.HasField("result"):
        return None
    loss = float(msg.loss) if msg.stage in ("stage1", "stage2") else math.nan
    return ProgressEvent(msg.stage, int(msg.step), int(msg.total_steps), loss, msg.detail)


__all__ = ["ProgressRenderer", "add_progress_arg", "from_fit_progress", "renderer"]
