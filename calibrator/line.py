"""The line calibrates the head: commissioning and operator feedback, online (docs/line-calibration.md).

A version fitted from a few photos ranks parts well but cuts badly. While it is *commissioning* its verdicts are
provisional; the line manager reads the results topic, collects the version's first ``--commissioning-frames``
OK results, reads those frames back from the frames topic (by the partition and offset each result names),
embeds them with the calibrator's backbone and calls :func:`scorer.commissioning.grow`: the quantile-anchored
threshold and a bank grown from the sure-good frames make a new version, activated and announced like ``ActivateHead``
(``--line-dry-run``: stored inactive, and the log says what would change). Feedback on the ``feedback`` topic is
checked (known frame, its product, no duplicate, no flood, frame still on the frames topic); after
``--feedback-refit-labels`` new labels and ``--feedback-min-interval-s`` since the last line version a candidate
is refitted and goes live only when :func:`scorer.commissioning.not_worse` says so on the labelled frames.

The evidence a line version came from (frames and live scores) is written into its manifest and what the line
learnt per product (labels, versions whose commissioning ended) into ``<store>/<product>/line.json``, so a
restarted calibrator continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from calibrator.line_config import DEFAULT_LINE, LineSettings, add_line_args, line_from
from calibrator.store import HeadStore, StoreError
from inspection_core.errors import ConfigError, HeadError, ImageError, InspectionError, cut
from inspection_core.ids import check_product_id
from inspection_core.kafka import KafkaConfig, LostLogRewind
from inspection_core.wire import WireError, decode
from inspection_pb.v1 import feedback_pb2, frames_pb2, results_pb2
from monitoring import metrics
from scorer.artifact import atomic_write_bytes, load_head
from scorer.backbones.base import Backbone, BackboneOutput, concat_outputs
from scorer.commissioning import (
    DEFECT,
    GOOD,
    UNKNOWN,
    LineEvidence,
    grow,
    judged_scores,
    not_worse,
    verdict_errors,
)
from scorer.head import Head
from scorer.images import check_size, decode_image

log = logging.getLogger(__name__)
STATE_FILE = "line.json"
MAX_LABELS = 2000  # labelled frames kept per product (oldest dropped)
FEEDBACK_GROUP = "cff-inspect-calibrator-line"
LABELS = {feedback_pb2.LABEL_GOOD: "good", feedback_pb2.LABEL_DEFECT: "defect", feedback_pb2.LABEL_UNSURE: "unsure"}
LABEL_CODES = {"good": GOOD, "defect": DEFECT, "unsure": UNKNOWN}


# -- what the store says -----------------------------------------------------------------------------------------


def read_state(store: HeadStore, product: str) -> dict:
    p = store.root / check_product_id(product) / STATE_FILE
    empty = {"finished": [], "labels": {}, "new_labels": 0, "last_line_time": 0.0}
    if not p.is_file():
        return empty
    try:
        return {**empty, **json.loads(p.read_text())}
    except (OSError, ValueError) as exc:
        raise StoreError(f"{p}: unreadable line state ({exc})") from None


def write_state(store: HeadStore, product: str, state: dict) -> None:
    p = store.root / check_product_id(product) / STATE_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, json.dumps(state, indent=1).encode())


def is_commissioning(store: HeadStore, product: str, manifest: dict) -> bool:
    """A version is commissioning when its fit marked it so and its commissioning has not ended."""
    meta = manifest.get("meta") or {}
    if not meta.get("commissioning"):
        return False
    try:
        return int(manifest.get("version") or 0) not in read_state(store, product)["finished"]
    except StoreError:
        return True


def manual_meta(meta: dict) -> dict:
    """A manual version's meta (SetThresholds): the line's record stays (feedback refits read its evidence), its
    status does not: an operator's threshold is not commissioning and not a candidate."""
    return {k: v for k, v in meta.items() if k not in ("commissioning", "line_status", "candidate_reason")}


def line_info(info, store: HeadStore, product: str, manifest: dict) -> None:  # noqa: ANN001 - a HeadInfo
    """The line's fields of a HeadInfo: commissioning, line status and a candidate's reason."""
    meta = manifest.get("meta") or {}
    info.commissioning = is_commissioning(store, product, manifest)
    info.line_status = str(meta.get("line_status") or "")
    info.candidate_reason = str(meta.get("candidate_reason") or "")


# -- frames back from the frames topic ---------------------------------------------------------------------------


class Seen(NamedTuple):
    """One OK result as the line keeps it."""

    frame_id: str
    product: str
    version: int
    score: float
    defect: bool
    provisional: bool
    ref: tuple[str, int, int]  # frames topic, partition, offset


def frame_image(frame: frames_pb2.Frame) -> np.ndarray:
    """A Frame's image as RGB uint8 (ImageError naming the frame)."""
    name = f"frame {cut(frame.frame_id)}"
    if frame.encoding == frames_pb2.ENCODING_RAW_RGB8:
        check_size(frame.width, frame.height, name=name)
        if len(frame.image) != frame.width * frame.height * 3 or not frame.width:
            raise ImageError(f"{name}: {len(frame.image)} bytes of raw RGB are not {frame.width} x {frame.height} x 3")
        return np.frombuffer(frame.image, np.uint8).reshape(frame.height, frame.width, 3).copy()
    return decode_image(frame.image, name=name)


class FrameFetcher:
    """Reads frames back by partition and offset (assign + seek, no group): what retention removed is missing."""

    def __init__(self, kafka: KafkaConfig, timeout_s: float) -> None:
        self.kafka = kafka
        self.timeout_s = timeout_s

    def fetch(self, wanted: dict[str, tuple[str, int, int]]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """frame id -> (topic, partition, offset)  =>  (frame id -> image, frame id -> why it is missing)."""
        from kafka import TopicPartition

        images: dict[str, np.ndarray] = {}
        missing: dict[str, str] = {}
        frames_topic = self.kafka.topic("frames")
        by_tp: dict = defaultdict(dict)
        for fid, (topic, part, off) in wanted.items():
            if topic != frames_topic or part < 0 or off < 0:
                missing[fid] = f"its frame reference {topic}[{part}]@{off} is not on {frames_topic}"
                continue
            by_tp[TopicPartition(topic, part)][off] = fid
        if not by_tp:
            return images, missing
        c = self.kafka.consumer(group_id=None, auto_offset_reset="earliest", max_partition_fetch_bytes=16 << 20)
        try:
            c.assign(list(by_tp))
            for tp, offs in by_tp.items():
                c.seek(tp, min(offs))
            pending = {tp: set(offs) for tp, offs in by_tp.items()}
            deadline = time.monotonic() + self.timeout_s
            while any(pending.values()) and time.monotonic() < deadline:
                for tp, recs in c.poll(timeout_ms=300).items():
                    want = pending.get(tp, set())
                    for rec in recs:
                        for gone in [o for o in want if o < rec.offset]:  # read past it: retention removed it
                            missing[by_tp[tp][gone]] = "no longer on the frames topic (retention)"
                            want.discard(gone)
                        if rec.offset in want:
                            want.discard(rec.offset)
                            fid = by_tp[tp][rec.offset]
                            try:
                                frame = decode(rec.value or b"", frames_pb2.Frame, rec.headers)
                                if frame.frame_id != fid:
                                    raise ImageError(f"the record there is frame {cut(frame.frame_id)}")
                                images[fid] = frame_image(frame)
                            except (WireError, ImageError, ConfigError) as exc:
                                missing[fid] = f"unreadable ({exc})"
                    if not want:
                        c.pause(tp)
            for tp, offs in pending.items():
                for o in offs:
                    missing[by_tp[tp][o]] = f"not read back from {tp.topic}[{tp.partition}]@{o} in {self.timeout_s:g} s"
        finally:
            c.close()
        return images, missing


def embed(head: Head, images: list[np.ndarray]) -> BackboneOutput:
    """Tokens as the worker's search sees them (the head's depth and letterbox), kept in fp16 on the CPU."""
    assert head.backbone is not None
    with torch.inference_mode():
        out = head.backbone.embed(images, letterbox=head.options.letterbox, depth=head.depth)
    return BackboneOutput([t.half() for t in out.tokens], out.grid, None, out.content)


# -- the manager -------------------------------------------------------------------------------------------------


class LineManager:
    """Consumes results and feedback, and turns them into line versions of the products' heads."""

    def __init__(
        self,
        store: HeadStore,
        backbone: Backbone,
        kafka: KafkaConfig,
        settings: LineSettings,
        announce: Callable[[str], None] = lambda product: None,
    ) -> None:
        self.store = store
        self.backbone = backbone
        self.kafka = kafka
        self.settings = settings
        self.opts = settings.options()
        self.announce = announce
        self.fetcher = FrameFetcher(kafka, settings.line_fetch_timeout_s)
        self._lock = threading.RLock()  # one line change at a time (gRPC FinishCommissioning vs the consumer)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._collected: dict[tuple[str, int], OrderedDict[str, Seen]] = {}
        self._recent: dict[str, OrderedDict[str, Seen]] = {}
        self._feats: OrderedDict[tuple[str, str], BackboneOutput] = OrderedDict()  # (weights, frame id) -> tokens
        self._flood: dict[str, deque] = defaultdict(deque)
        self._active: dict[str, tuple[float, int, bool]] = {}  # product -> (checked at, version, commissioning)
        self.caught_up = threading.Event()  # the results topic was read to its end once (feedback waits for it)
        self.counters: dict[str, int] = defaultdict(int)
        for reason in FEEDBACK_REFUSALS:
            metrics.FEEDBACK_REFUSED.labels(reason=reason).inc(0)

    # -- fitted versions -----------------------------------------------------------------------------------------
    def mark_fitted(self, head: Head) -> None:
        """A fitted version starts in commissioning (its manifest says so; announcements repeat it)."""
        if self.settings.enabled:
            head.meta["commissioning"] = {"target": self.settings.commissioning_frames}

    def _active_version(self, product: str) -> tuple[int, bool]:
        """(active version or 0, commissioning), looked up at most once a second."""
        now = time.monotonic()
        got = self._active.get(product)
        if got is not None and now - got[0] < 1.0:
            return got[1], got[2]
        try:
            m = self.store.info(product)
            v, com = int(m["version"]), is_commissioning(self.store, product, m)
        except (StoreError, ConfigError):
            v, com = 0, False
        self._active[product] = (now, v, com)
        if com:
            metrics.COMMISSIONING_TARGET.labels(product=product).set(self.settings.commissioning_frames)
        return v, com

    def _forget_active(self, product: str) -> None:
        self._active.pop(product, None)

    # -- results -------------------------------------------------------------------------------------------------
    def on_result(self, r: results_pb2.InspectionResult) -> None:
        if r.status != results_pb2.STATUS_OK or not r.HasField("frame_ref") or not r.head.version:
            return
        try:
            product = check_product_id(r.product_id)
        except ConfigError:
            return
        ref = (r.frame_ref.topic, int(r.frame_ref.partition), int(r.frame_ref.offset))
        seen = Seen(
            r.frame_id, product, int(r.head.version), float(r.image_score), r.verdict == results_pb2.VERDICT_DEFECT,
            r.provisional, ref,
        )  # fmt: skip
        recent = self._recent.setdefault(product, OrderedDict())
        recent[r.frame_id] = seen
        recent.move_to_end(r.frame_id)
        while len(recent) > self.settings.line_recent_results:
            recent.popitem(last=False)
        if not self.settings.enabled or not r.provisional:
            return
        version, com = self._active_version(product)
        if not com or version != seen.version:
            return
        got = self._collected.setdefault((product, version), OrderedDict())
        if r.frame_id in got or len(got) >= self.settings.commissioning_frames:
            return
        got[r.frame_id] = seen
        metrics.COMMISSIONING_FRAMES.labels(product=product).set(len(got))
        if len(got) >= self.settings.commissioning_frames and self.caught_up.is_set():
            self._try(lambda: self.commission(product, version), f"commissioning {product} v{version}")

    def _try(self, fn: Callable[[], object], what: str) -> None:
        try:
            fn()
        except (InspectionError, ValueError, RuntimeError) as exc:
            log.warning("%s failed: %s", what, exc)

    # -- commissioning -------------------------------------------------------------------------------------------
    def finish(self, product: str, version: int = 0) -> int:
        """FinishCommissioning: the line version from what was collected so far."""
        product = check_product_id(product)
        self._forget_active(product)
        active, com = self._active_version(product)
        if not active:
            raise StoreError(f"product {product!r} has no active head")
        if version and version != active:
            raise HeadError(f"{product} v{version} is not the active version (v{active} is): only it commissions")
        if not com:
            raise HeadError(f"{product} v{active} is not commissioning")
        return self.commission(product, active, min_frames=5)  # an operator's call: the scorer's floor

    def commission(self, product: str, version: int, *, min_frames: int | None = None) -> int:
        """The line version of a commissioning version, from its collected frames; returns the version stored."""
        with self._lock:
            self._forget_active(product)
            active, com = self._active_version(product)
            if active != version or not com:
                raise HeadError(f"{product} v{version} is no longer the commissioning version")
            got = list(self._collected.get((product, version), {}).values())
            opts = self.opts if min_frames is None else replace(self.opts, min_frames=min_frames)
            if len(got) < opts.min_frames:
                raise HeadError(
                    f"{product} v{version}: {len(got)} commissioning frames collected, at least "
                    f"{opts.min_frames} are needed to set a threshold"
                )
            head = load_head(self.store.path(product, version), self.backbone)
            state = read_state(self.store, product)
            evidence = [[s.frame_id, *s.ref, s.score] for s in got]
            ev, ids = self._evidence(head, product, evidence, state["labels"])
            new, rec = grow(head, ev, opts)
            rec["evidence"] = [e for e in evidence if e[0] in set(ids)]
            rec["commissioned_from"] = version
            state = read_state(self.store, product)
            state["finished"] = sorted(set(state["finished"]) | {version})
            out = self._store(product, head, new, rec, "commissioned", state, labelled=None)
            self._collected.pop((product, version), None)
            metrics.COMMISSIONING_FRAMES.labels(product=product).set(0)
            return out

    def _evidence(
        self, head: Head, product: str, evidence: list[list], labels: dict, extra: list[str] | None = None
    ) -> tuple[LineEvidence, list[str]]:
        """LineEvidence of the commissioning frames (``evidence`` rows: id, topic, partition, offset, live score)
        and the labelled frames ``extra``; frames no longer on the frames topic are skipped and counted."""
        rows = {e[0]: e for e in evidence}
        extra = [f for f in extra or [] if f not in rows]
        refs = {e[0]: (e[1], int(e[2]), int(e[3])) for e in evidence}
        for fid in extra:
            refs[fid] = tuple(labels[fid]["ref"])  # type: ignore[assignment]
        feats, missing = self._features(head, refs)
        if missing:
            metrics.LINE_FRAMES_LOST.labels(product=product).inc(len(missing))
            for fid, why in list(missing.items())[:5]:
                log.warning("%s: frame %s skipped: %s", product, cut(fid), why)
            log.warning("%s: %d of %d frames could not be read back", product, len(missing), len(refs))
        ids = [f for f in [*rows, *extra] if f in feats]
        if not ids:
            raise HeadError(f"{product}: none of the {len(refs)} frames could be read back from the frames topic")
        lab = np.array([LABEL_CODES[labels[f]["label"]] if f in labels else UNKNOWN for f in ids])
        live = np.array([float(rows[f][4]) if f in rows else float(labels[f]["score"]) for f in ids])
        com = np.array([f in rows for f in ids])
        out = concat_outputs([feats[f] for f in ids])
        out = BackboneOutput([t.half() for t in out.tokens], out.grid, None, out.content)
        return LineEvidence(out, live, lab, com, frame_ids=ids), ids

    def _features(self, head: Head, refs: dict[str, tuple[str, int, int]]) -> tuple[dict, dict[str, str]]:
        key = head.weights_id
        feats = {f: self._feats[(key, f)] for f in refs if (key, f) in self._feats}
        todo = {f: r for f, r in refs.items() if f not in feats}
        missing: dict[str, str] = {}
        if todo:
            images, missing = self.fetcher.fetch(todo)
            names = list(images)
            for s in range(0, len(names), 32):
                chunk = names[s : s + 32]
                out = embed(head, [images[f] for f in chunk])
                for j, f in enumerate(chunk):
                    feats[f] = out.select([j])
                    self._feats[(key, f)] = feats[f]
            limit = 2 * self.settings.commissioning_frames + MAX_LABELS
            while len(self._feats) > limit:
                self._feats.popitem(last=False)
        return feats, missing

    def _store(
        self,
        product: str,
        live: Head,
        new: Head,
        rec: dict,
        kind: str,
        state: dict,
        *,
        labelled: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    ) -> int:
        """Store a line version: activated (and announced), or a candidate with its reason."""
        meta = {k: v for k, v in new.meta.items() if k not in ("commissioning", "created", "path", "candidate_reason")}
        meta["line"] = rec
        status, reason, activate = kind, "", True
        if labelled is not None:
            cand_s, live_s, lab = labelled
            cand_e = verdict_errors(cand_s, lab, new.image_threshold)
            live_e = verdict_errors(live_s, lab, live.image_threshold)
            ok, why = not_worse(cand_e, live_e)
            rec["no_harm"] = {"candidate": cand_e, "live": live_e, "activated": ok, "why": why}
            if not ok:
                status, reason, activate = "candidate", why, False
        if self.settings.line_dry_run:
            status, activate = "dry-run", False
            reason = reason or "--line-dry-run: stored for review, not activated"
        meta["line_status"] = status
        if reason:
            meta["candidate_reason"] = reason
        new = replace(new, meta=meta)
        with self.store.lock(product):
            v = self.store.add(product, new, activate=activate)
        state["last_line_time"] = time.time()
        state["new_labels"] = 0
        write_state(self.store, product, state)
        self._forget_active(product)
        outcome = "activated" if activate else "dry_run" if self.settings.line_dry_run else "candidate"
        metrics.LINE_VERSIONS.labels(product=product, outcome=outcome).inc()
        rows = rec.get("bank_rows") or []
        change = (
            f"image threshold {live.image_threshold:.4g} -> {new.image_threshold:.4g}, bank rows "
            f"{[int(b.shape[0]) for b in live.bank]} -> {rows}"
        )
        if activate:
            metrics.LINE_BANK_ROWS.labels(product=product).set(sum(rows))
            log.info("%s v%d: line version (%s) from v%s activated: %s", product, v, kind, live.meta.get("version"),
                     change)  # fmt: skip
            self.announce(product)
        else:
            log.warning("%s v%d: line version (%s) stored, NOT activated (%s): %s", product, v, kind, reason, change)
        return v

    # -- feedback ------------------------------------------------------------------------------------------------
    def _refuse(self, reason: str, frame_id: str, why: str) -> None:
        self.counters[f"refused_{reason}"] += 1
        metrics.FEEDBACK_REFUSED.labels(reason=reason).inc()
        log.warning("feedback on frame %s refused (%s): %s", cut(frame_id), reason, why)

    def on_feedback(self, value: bytes, headers: list | None = None, now: float | None = None) -> bool:
        """One feedback record: checked, recorded, maybe a refit; False when refused (counted and logged)."""
        now = time.time() if now is None else now
        try:
            fb = decode(value, feedback_pb2.Feedback, headers)
        except WireError as exc:
            self._refuse("invalid", "?", str(exc))
            return False
        fid = fb.frame_id
        try:
            product = check_product_id(fb.product_id)
        except ConfigError as exc:
            self._refuse("invalid", fid, str(exc))
            return False
        metrics.FEEDBACK_RECEIVED.labels(product=metrics.bounded("product", product)).inc()
        if not fid or fb.label not in LABELS:
            self._refuse("invalid", fid, "no frame id, or no label (good, defect or unsure)")
            return False
        seen = self._recent.get(product, {}).get(fid)
        if seen is None:
            other = next((p for p, r in self._recent.items() if fid in r), None)
            if other is not None:
                self._refuse("wrong_product", fid, f"the frame was scored for {other}, not {product}")
            else:
                self._refuse("unknown_frame", fid, f"no recent result of {product} has this frame id")
            return False
        with self._lock:
            state = read_state(self.store, product)
            label = LABELS[fb.label]
            old = state["labels"].get(fid)
            if old is not None and old["label"] == label:
                self._refuse("duplicate", fid, f"already labelled {label}")
                return False
            window = self._flood[product]
            while window and now - window[0] > 60:
                window.popleft()
            if len(window) >= self.settings.feedback_max_per_minute:
                self._refuse("flood", fid, f"more than {self.settings.feedback_max_per_minute} labels a minute")
                return False
            _, missing = self.fetcher.fetch({fid: seen.ref})  # a label is only worth what its frame can teach
            if fid in missing:
                self._refuse("past_retention", fid, missing[fid])
                return False
            window.append(now)
            state["labels"][fid] = {
                "label": label,
                "who": cut(fb.who, 80) if fb.who else "",
                "time": now,
                "version": seen.version,
                "score": seen.score,
                "defect": seen.defect,
                "ref": list(seen.ref),
            }
            while len(state["labels"]) > MAX_LABELS:
                state["labels"].pop(next(iter(state["labels"])))
            if label != "unsure":
                state["new_labels"] = int(state["new_labels"]) + 1
            write_state(self.store, product, state)
            self.counters["feedback_accepted"] += 1
            log.info("feedback on %s frame %s: %s (by %s)", product, cut(fid), label, cut(fb.who or "?", 80))
            self._estimates(product, state)
        self.maybe_refit(product, now)
        return True

    def _estimates(self, product: str, state: dict) -> None:
        """False-alarm rate and recall of the labelled frames at the verdicts they got."""
        labs = list(state["labels"].values())
        good = [x for x in labs if x["label"] == "good"]
        bad = [x for x in labs if x["label"] == "defect"]
        if good:
            metrics.LINE_FALSE_ALARM_RATE.labels(product=product).set(sum(x["defect"] for x in good) / len(good))
        if bad:
            metrics.LINE_RECALL.labels(product=product).set(sum(x["defect"] for x in bad) / len(bad))

    def maybe_refit(self, product: str, now: float | None = None) -> int | None:
        now = time.time() if now is None else now
        state = read_state(self.store, product)
        if int(state["new_labels"]) < self.settings.feedback_refit_labels:
            return None
        if now - float(state["last_line_time"]) < self.settings.feedback_min_interval_s:
            return None
        try:
            return self.refit(product)
        except (InspectionError, ValueError, RuntimeError) as exc:
            log.warning("%s: refit from feedback failed: %s", product, exc)
            state = read_state(self.store, product)
            state["new_labels"], state["last_line_time"] = 0, now  # not again on every label
            write_state(self.store, product, state)
            return None

    def refit(self, product: str) -> int:
        """A candidate from the live version's commissioning evidence and every label; activated when not worse."""
        with self._lock:
            self._forget_active(product)
            active, com = self._active_version(product)
            if not active:
                raise StoreError(f"product {product!r} has no active head")
            if com:
                raise HeadError(f"{product} v{active} is still commissioning: labels wait for its line version")
            live = load_head(self.store.path(product, active), self.backbone)
            evidence = ((live.meta.get("line") or {}).get("evidence")) or []
            if not evidence:
                raise HeadError(f"{product} v{active} has no commissioning record to refit from")
            state = read_state(self.store, product)
            labels = {f: x for f, x in state["labels"].items() if x["label"] in ("good", "defect")}
            ev, ids = self._evidence(live, product, evidence, labels, extra=list(labels))
            # frames scored since commissioning ended (recent, non-provisional): the labels' false-alarm budget
            seen = sum(not r.provisional for r in self._recent.get(product, {}).values())
            new, rec = grow(live, ev, self.opts, frames_seen=seen)
            rec["evidence"] = [e for e in evidence if e[0] in set(ids)]
            rec["commissioned_from"] = (live.meta.get("line") or {}).get("commissioned_from")
            rec["labels"] = {lab: sum(x["label"] == lab for x in labels.values()) for lab in ("good", "defect")}
            sel = np.flatnonzero(ev.labels != UNKNOWN)
            sub = ev.feats.select(sel.tolist())
            cand_s = judged_scores(new, [ev.frame_ids[k] for k in sel], new.score_features(sub)[0])
            live_s = live.score_features(sub)[0]
            return self._store(product, live, new, rec, "feedback", state, labelled=(cand_s, live_s, ev.labels[sel]))

    # -- the consumer thread -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="line-manager", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        results = feedback = None
        while not self._stop.is_set():
            try:
                if results is None:
                    results = self.kafka.consumer(self.kafka.topic("results"), group_id=None)
                    results_rewind = LostLogRewind("line manager (results)")
                if feedback is None:
                    feedback = self.kafka.consumer(self.kafka.topic("feedback"), group_id=FEEDBACK_GROUP)
                    feedback_rewind = LostLogRewind("line manager (feedback)")
                self._poll(results, feedback, results_rewind, feedback_rewind)
            except Exception as exc:  # noqa: BLE001 - the broker went away: new clients after a pause
                log.warning("line manager: %s; reconnecting in 5 s", str(exc)[:300])
                for c in (results, feedback):
                    if c is not None:
                        try:
                            c.close()
                        except Exception:  # noqa: BLE001
                            pass
                results = feedback = None
                self._stop.wait(5.0)
        for c in (results, feedback):
            if c is not None:
                c.close()

    def _poll(self, results, feedback, results_rewind, feedback_rewind) -> None:  # noqa: ANN001
        polled = results.poll(timeout_ms=200, max_records=500)
        results_rewind.check(results)
        for recs in polled.values():
            for rec in recs:
                try:
                    self.on_result(decode(rec.value or b"", results_pb2.InspectionResult, rec.headers))
                except WireError:
                    continue
        if not polled and not self.caught_up.is_set():
            self.caught_up.set()  # the backlog is read: collections that are full may commission now
            for (product, version), got in list(self._collected.items()):
                if len(got) >= self.settings.commissioning_frames:
                    self._try(lambda p=product, v=version: self.commission(p, v), f"commissioning {product}")
        if not self.caught_up.is_set():
            return
        got = feedback.poll(timeout_ms=100, max_records=50)
        feedback_rewind.check(feedback)
        for recs in got.values():
            for rec in recs:
                self.on_feedback(rec.value or b"", rec.headers)
        if got:
            feedback.commit()
        for product in list(self._recent):
            state = read_state(self.store, product) if (self.store.root / product / STATE_FILE).is_file() else None
            if state and int(state["new_labels"]) >= self.settings.feedback_refit_labels:
                self.maybe_refit(product)


FEEDBACK_REFUSALS = ("invalid", "unknown_frame", "wrong_product", "duplicate", "flood", "past_retention")
__all__ = [
    "DEFAULT_LINE",
    "FEEDBACK_REFUSALS",
    "FrameFetcher",
    "LineManager",
    "LineSettings",
    "add_line_args",
    "is_commissioning",
    "line_from",
    "line_info",
    "manual_meta",
]
