"""Scoring worker: a Kafka consumer-group member with dynamic micro-batching.

Stage 2 of three (pre-processing in :mod:`workers.codec`, post-processing in :mod:`workers.post`): the
consume / batch / score / publish / commit loop. Every parseable Frame yields exactly one InspectionResult
(OK, NO_HEAD, BAD_FRAME or STALE); bytes that do not parse as a Frame and undecodable images go to the
dead-letter topic with the reason in headers (cut to ``dlq_max_bytes``, the original size in a header, so a
huge bad record can never block its partition). Offsets are committed only after the broker acknowledged
the batch's results (at-least-once; results carry the frame id so consumers can drop duplicates). A batch
is formed across partitions up to ``max_batch`` frames or ``max_wait_ms`` after its first frame.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from inspection_core.errors import KafkaError, cut
from inspection_core.kafka import KafkaConfig, LostLogRewind, Reconnector, assignment_shortfall, fetched_positions
from inspection_core.names import DeadLetterReason
from inspection_core.wire import CONTENT_TYPE, encode
from inspection_pb.v1 import frames_pb2, results_pb2
from monitoring import metrics
from scorer.head import score_batch, search_dtype
from workers.codec import (
    Admitted,
    BadFrame,
    DeadLetter,
    Refused,
    admit,
    decode_batch,
    publishable,
    ts_seconds,
)
from workers.config import ActiveHead, WorkerConfig, head_ref
from workers.post import (
    EvidenceArchive,
    FrameScore,
    Timing,
    defect_event,
    frame_ref,
    mark_line,
    new_result,
    per_frame,
    scored_result,
)

log = logging.getLogger(__name__)

__all__ = ["ActiveHead", "BadFrame", "Outputs", "Worker", "WorkerConfig", "head_ref"]


@dataclass(frozen=True)
class Taken:
    """An admitted frame and the record it came in (its place on the frames topic, its dead letter should a
    deferred decode fail), with how long the record waited in Kafka."""

    record: object  # kafka ConsumerRecord
    admitted: Admitted
    queue_wait_s: float


# what each kind of refusal counts as (the status of its result; None: not a Frame, dead-lettered only)
_REFUSAL_COUNTERS = {
    None: "dlq_unparseable",
    results_pb2.STATUS_BAD_FRAME: "bad_frame",
    results_pb2.STATUS_STALE: "stale",
    results_pb2.STATUS_NO_HEAD: "no_head",
}

# a lone leader short of partitions rejoins at once the first time, then at most this often (metadata may lag)
REJOIN_BACKOFF_S = 10.0


class Outputs(NamedTuple):
    """What one batch of records becomes."""

    results: list[results_pb2.InspectionResult]
    defects: list[results_pb2.DefectEvent]
    dead_letters: list[DeadLetter]


def _assignment_log(worker_id: str, consumer, on_shortfall: Callable[[str], None]):  # noqa: ANN001, ANN202
    """Logs each rebalance's outcome: which frames partitions this worker reads, of how many the topic has, and
    whether this worker made the assignment (the group leader) is what an operator asks first. A lone leader that
    received less than every partition says why to ``on_shortfall`` (``assignment_shortfall``)."""
    from kafka import ConsumerRebalanceListener

    class AssignmentLog(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked) -> None:  # noqa: ANN001 - a set of TopicPartition
            pass

        def on_partitions_assigned(self, assigned) -> None:  # noqa: ANN001
            parts = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "no partition"
            topics = sorted(consumer.subscription() or ())
            known = {t: len(consumer.partitions_for_topic(t) or ()) for t in topics}
            leader = getattr(getattr(consumer, "_coordinator", None), "_is_leader", None)
            log.info(
                "worker %s now reads %s (topic partitions %s; %s)",
                worker_id,
                parts,
                ", ".join(f"{t}: {n}" for t, n in known.items()) or "unknown",
                "assigned by this worker as group leader" if leader else "assigned by another member",
            )
            if (why := assignment_shortfall(consumer, assigned)) is not None:
                on_shortfall(why)

    return AssignmentLog()


class Worker:
    def __init__(
        self,
        kafka: KafkaConfig,
        cfg: WorkerConfig,
        heads: dict[str, ActiveHead] | None = None,
        *,
        stop_event: threading.Event | None = None,
    ) -> None:
        """``stop_event`` ends :meth:`run` (and its reconnection waits); ``cff-inspect run`` shares one among its
        parts."""
        self.kafka = kafka
        self.cfg = cfg
        self.heads: dict[str, ActiveHead] = {p: self._prepared(a) for p, a in (heads or {}).items()}
        self._lock = threading.Lock()
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self._rejoin_at: float | None = None  # when to ask the group for a new assignment (a lone leader's shortfall)
        self._rejoined = False
        self.counters: dict[str, int] = defaultdict(int)
        self.evidence = (
            EvidenceArchive(cfg.evidence_dir, cfg.evidence_max_bytes, cfg.evidence_url) if cfg.evidence_dir else None
        )
        self.consumer = None
        self.producer = None
        self.last_poll_ok: float | None = None  # monotonic time of the last poll that reached the broker
        self._reconnector = Reconnector(kafka, f"worker {cfg.worker_id}", self.stop_event, metrics.PUBLISH_FAILURES.inc)
        self._lag_t = 0.0
        self._rewind = LostLogRewind(f"worker {cfg.worker_id}")
        self._lag_partitions: set[int] = set()
        metrics.init_zero_series(worker=True)
        for product, active in self.heads.items():
            metrics.set_active_head(product, active.ref.version)

    # -- heads ------------------------------------------------------------------
    def set_head(self, product: str, active: ActiveHead) -> None:
        """Swap takes effect between batches (the batch loop reads the dict once per batch)."""
        active = self._prepared(active)
        with self._lock:
            self.heads[product] = active
        metrics.set_active_head(product, active.ref.version)
        metrics.HEAD_SWAPS.labels(product=product).inc()

    def _prepared(self, active: ActiveHead) -> ActiveHead:
        want = self.cfg.bank_dtype
        if want == "auto":
            want = search_dtype(active.head)
        if want == active.head.options.bank_dtype:
            return active
        return ActiveHead(active.head.with_options(bank_dtype=want), active.ref, active.provisional)

    def remove_head(self, product: str) -> None:
        with self._lock:
            self.heads.pop(product, None)
        metrics.set_active_head(product, None)

    # -- processing -------------------------------------------------------------
    def _decode_device(self, active: ActiveHead) -> torch.device | None:
        bb = active.head.backbone
        if bb is None or self.cfg.device_decode == "never":
            return None
        dev = bb.device
        return dev if self.cfg.device_decode == "always" or dev.type == "cuda" else None

    def process(self, records: list) -> Outputs:  # noqa: ANN001 - kafka ConsumerRecords
        """Records -> results, defect events and dead letters; pure except for scoring.

        Each record is admitted or refused by the codec in one call; the admitted frames' deferred JPEGs are
        decoded together, and the batch is scored together (one backbone pass, each product's head reading its
        own frames' tokens), one result per frame.
        """
        out = Outputs([], [], [])
        with self._lock:
            heads = dict(self.heads)
        devices = {product: self._decode_device(active) for product, active in heads.items()}
        now = time.time()
        taken: list[Taken] = []
        for rec in records:
            t_take = time.time()
            got = admit(rec.value, getattr(rec, "headers", None), self.cfg, now, devices)
            if isinstance(got, Refused):
                self._refuse(rec, got, out)
                continue
            queue_wait = max(0.0, t_take - rec.timestamp / 1000.0) if rec.timestamp and rec.timestamp > 0 else 0.0
            taken.append(Taken(rec, got, queue_wait))
        to_score: dict[str, list[Taken]] = defaultdict(list)
        for t, got in zip(taken, decode_batch([t.admitted for t in taken]), strict=True):
            if isinstance(got, Refused):
                self._refuse(t.record, got, out)
            else:
                to_score[got.frame.product_id].append(replace(t, admitted=got))
        self._score(heads, to_score, out)
        return out

    def _result(self, frame: frames_pb2.Frame, status: int, reason: str = "") -> results_pb2.InspectionResult:
        return new_result(frame, status, self.cfg.worker_id, reason)

    def _refuse(self, rec, refused: Refused, out: Outputs) -> None:  # noqa: ANN001 - kafka ConsumerRecord
        """A refused record's result (unless it is not a Frame) and dead letter (if it gets one)."""
        if refused.status is not None:
            assert refused.frame is not None
            out.results.append(self._result(refused.frame, refused.status, refused.reason))
        if refused.dead_letter is not None:
            dl = DeadLetter(rec.key, rec.value or b"", refused.dead_letter, refused.reason, refused.content_type)
            out.dead_letters.append(dl)
        self.counters[_REFUSAL_COUNTERS[refused.status]] += 1

    def _score(self, heads: dict[str, ActiveHead], to_score: dict[str, list[Taken]], out: Outputs) -> None:
        """The batch's frames scored together, then each frame's result, defect event and evidence.

        Every head of a worker runs on the one backbone, so the batch costs one forward pass (per resize mode
        its heads use), not one per product: each product's head scores its own frames' tokens of that pass.
        """
        n = sum(len(items) for items in to_score.values())
        if n == 0:
            return
        groups = [(heads[p].head, [it.admitted.image.pixels for it in items]) for p, items in to_score.items()]
        t0 = time.perf_counter()
        batch = score_batch(groups, batch_size=self.cfg.max_batch)
        inf_s = (time.perf_counter() - t0) / n
        self.counters["backbone_passes"] += batch.passes
        log.debug(
            "worker %s: %d frames of %d products in %d backbone passes (%.1f ms)",
            self.cfg.worker_id,
            n,
            len(to_score),
            batch.passes,
            inf_s * n * 1000,
        )
        for (product, items), scores in zip(to_score.items(), batch.scores, strict=True):
            for it, score in zip(items, per_frame(scores), strict=True):
                timing = Timing(it.admitted.decode_s, inf_s, it.queue_wait_s, n)
                self._scored(it, score, heads[product], timing, out)

    def _scored(self, it: Taken, score: FrameScore, active: ActiveHead, timing: Timing, out: Outputs) -> None:
        """One scored frame's result and, for a DEFECT verdict, its defect event with evidence."""
        a, ref = it.admitted, frame_ref(it.record)
        r = scored_result(
            a.frame,
            score,
            active,
            timing,
            worker_id=self.cfg.worker_id,
            heatmap=self.cfg.heatmap_in_result,
            hw=a.image.hw,
        )
        mark_line(r, active, ref)
        out.results.append(r)
        self.counters["scored"] += 1
        if r.verdict != results_pb2.VERDICT_DEFECT:
            return
        self.counters["defects"] += 1
        d = defect_event(a.frame, r)
        mark_line(d, active, ref)
        if self.evidence is not None:
            ev = self.evidence.save(
                a.frame.frame_id, a.image.rgb(), score.amap, active.head.pixel_threshold, score.regions
            )
            d.evidence.CopyFrom(ev)
        out.defects.append(d)

    # -- Kafka loop ------------------------------------------------------------------
    def _collect(self) -> list:
        """Up to max_batch records, waiting at most max_wait_ms after the first one."""
        assert self.consumer is not None
        batch: list = []
        first: float | None = None
        while len(batch) < self.cfg.max_batch and not self.stop_event.is_set():
            if first is None:
                timeout = 200
            else:
                timeout = int(max(0.0, self.cfg.max_wait_ms - (time.monotonic() - first) * 1000))
            self._rejoin_if_short()
            polled = self.consumer.poll(timeout_ms=timeout, max_records=self.cfg.max_batch - len(batch))
            self.last_poll_ok = time.monotonic()
            for recs in polled.values():
                batch.extend(recs)
            if batch and first is None:
                first = time.monotonic()
            if first is not None and (time.monotonic() - first) * 1000 >= self.cfg.max_wait_ms:
                break
            if first is None and not polled:
                break
        return batch

    def _records(self, out: Outputs) -> list[tuple[str, bytes | None, bytes, list]]:
        """(topic, key, value, headers) of a batch, each in its topic's encoding with a ``content-type`` header;
        a dead letter larger than ``dlq_max_bytes`` is cut there."""
        t = self.kafka.topics
        recs: list[tuple[str, bytes | None, bytes, list]] = []
        r_enc, d_enc = self.kafka.encoding("results"), self.kafka.encoding("defects")
        for i, r in enumerate(out.results):
            try:
                recs.append((t["results"], r.camera_id.encode(), *encode(r, r_enc)))
            except Exception as exc:  # noqa: BLE001 - one record must never stop the loop (it would fail on every restart)
                self._unencodable("results", r.frame_id, exc)
                r = out.results[i] = self._stripped(r, exc)
                recs.append((t["results"], r.camera_id.encode(), *encode(r, r_enc)))
        for d in out.defects:
            try:
                recs.append((t["defects"], d.product_id.encode(), *encode(d, d_enc)))
            except Exception as exc:  # noqa: BLE001 - as above; the frame's result says DEFECT all the same
                self._unencodable("defects", d.frame_id, exc)
        for dl in out.dead_letters:
            headers = [
                (CONTENT_TYPE, dl.content_type),
                ("reason", dl.detail.encode()[:1000]),
                ("reason-code", DeadLetterReason(dl.reason).value.encode()),
                ("worker", self.cfg.worker_id.encode()),
            ]
            value = dl.value
            if len(value) > self.cfg.dlq_max_bytes:
                headers.append(("truncated-from-bytes", str(len(value)).encode()))
                value = value[: self.cfg.dlq_max_bytes]
                self.counters["dlq_truncated"] += 1
            recs.append((t["frames.dlq"], dl.key[:1000] if dl.key else dl.key, value, headers))
        return recs

    def _stripped(self, r: results_pb2.InspectionResult, exc: Exception) -> results_pb2.InspectionResult:
        """A BAD_FRAME result with only the fields that always encode, for a result that did not."""
        safe = publishable(frames_pb2.Frame(frame_id=r.frame_id, camera_id=r.camera_id, product_id=r.product_id))
        safe.ClearField("capture_time")
        reason = f"the result could not be encoded ({type(exc).__name__}: {str(exc)[:200]})"
        return self._result(safe, results_pb2.STATUS_BAD_FRAME, reason)

    def _unencodable(self, topic: str, frame_id: str, exc: Exception) -> None:
        self.counters["unencodable"] += 1
        metrics.RECORDS_DROPPED.labels(topic=topic, reason="unencodable").inc()
        log.error(
            "worker %s: the %s record of frame %s could not be encoded (%s: %s); %s",
            self.cfg.worker_id,
            topic,
            cut(frame_id),
            type(exc).__name__,
            str(exc)[:200],
            "a BAD_FRAME result without its fields is published instead" if topic == "results" else "skipped",
        )

    def _publish(self, out: Outputs) -> None:
        """Send a batch's records and wait for the broker's acknowledgement of each.

        A record the broker (or the client) refuses as too large is counted and skipped, never retried: a
        retry would fail the same way and the partition would be stuck on it forever. Any other failure
        raises, so the batch is published again and not committed.
        """
        from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

        too_large = (MessageSizeTooLargeError, RecordListTooLargeError)
        assert self.producer is not None
        futures = []
        t0 = time.perf_counter()
        for topic, key, value, headers in self._records(out):
            try:
                futures.append((topic, len(value), self.producer.send(topic, key=key, value=value, headers=headers)))
            except too_large as exc:
                self._dropped(topic, len(value), exc)
        self.producer.flush(self.cfg.publish_timeout_s)
        sent = 0
        for topic, size, f in futures:
            try:
                f.get(timeout=self.cfg.publish_timeout_s)  # raises if the broker did not acknowledge
                sent += 1
            except too_large as exc:
                self._dropped(topic, size, exc)
        self.counters["published"] += sent
        self.last_publish_s = time.perf_counter() - t0
        self._observe(out, self.last_publish_s)

    def _dropped(self, topic: str, size: int, exc: Exception) -> None:
        self.counters["records_too_large"] += 1
        short = next((k for k, v in self.kafka.topics.items() if v == topic), "other")
        metrics.RECORDS_DROPPED.labels(topic=short, reason="too_large").inc()
        log.error(
            "worker %s: a %d-byte record for %s was refused as too large and skipped: %s",
            self.cfg.worker_id,
            size,
            topic,
            exc,
        )

    def _observe(self, out: Outputs, publish_s: float) -> None:
        """Metrics for an acknowledged batch: what was published is what is counted."""
        now = time.time()
        for r in out.results:
            cam, prod = metrics.bounded("camera", r.camera_id), metrics.bounded("product", r.product_id)
            status = metrics.status_label(results_pb2.Status.Name(r.status))
            metrics.FRAMES_SCORED.labels(camera=cam, product=prod, status=status).inc()
            if r.status != results_pb2.STATUS_OK:
                continue
            if r.HasField("capture_time"):
                e2e = now - ts_seconds(r.capture_time)
                metrics.E2E_LATENCY.labels(camera=cam, product=prod).observe(max(0.0, e2e))
            metrics.STAGE_LATENCY.labels(stage="queue_wait").observe(r.timings.queue_wait_s)
            metrics.STAGE_LATENCY.labels(stage="decode").observe(r.timings.decode_s)
            metrics.STAGE_LATENCY.labels(stage="inference").observe(r.timings.inference_s)
            metrics.STAGE_LATENCY.labels(stage="publish").observe(publish_s)
            if r.image_threshold > 0 and np.isfinite(r.image_threshold):
                metrics.ANOMALY_SCORE.labels(product=prod).observe(r.normalized_score)
        for d in out.defects:
            metrics.DEFECTS.labels(product=metrics.bounded("product", d.product_id)).inc()
        for dl in out.dead_letters:
            metrics.DEAD_LETTERED.labels(reason=DeadLetterReason(dl.reason).value).inc()

    def _update_lag(self, force: bool = False) -> None:
        """Lag per assigned partition from the fetch high-water mark (Tansu's end_offsets is not reliable)."""
        if self.consumer is None or (not force and time.monotonic() - self._lag_t < 2.0):
            return
        self._lag_t = time.monotonic()
        current: set[int] = set()
        for tp, hw, pos in fetched_positions(self.consumer):
            metrics.CONSUMER_LAG.labels(partition=str(tp.partition)).set(max(0, hw - pos))
            current.add(tp.partition)
        for p in self._lag_partitions - current:  # revoked by a rebalance: not ours to report
            try:
                metrics.CONSUMER_LAG.remove(str(p))
            except KeyError:
                pass
        self._lag_partitions = current

    def _commit(self, records: list) -> None:
        """Commit past the highest offset of each partition in the batch (after its results were acknowledged)."""
        from kafka import OffsetAndMetadata, TopicPartition

        assert self.consumer is not None
        offsets: dict = {}
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            if tp not in offsets or rec.offset + 1 > offsets[tp].offset:
                offsets[tp] = OffsetAndMetadata(rec.offset + 1, "", -1)
        self.consumer.commit(offsets)

    def _publish_until_acknowledged(self, out: Outputs) -> bool:
        """True once the broker took the batch; False if the worker was stopped first (nothing committed)."""
        from kafka.errors import KafkaError as ClientError

        rc = self._reconnector
        while not self.stop_event.is_set():
            try:
                if self.producer is None:
                    self.producer = rc.producer()
                self._publish(out)
            except (ClientError, KafkaError) as exc:
                producer, self.producer = self.producer, None
                if not rc.failed(exc, producer):
                    return False
                continue
            rc.succeeded()
            return True
        return False

    @property
    def publish_error(self) -> str | None:
        """Why the last publish failed, while it keeps failing (readiness)."""
        return self._reconnector.error

    def _shortfall(self, why: str) -> None:
        log.warning("worker %s: %s; rejoining the group", self.cfg.worker_id, why)
        self._rejoin_at = time.monotonic() + (REJOIN_BACKOFF_S if self._rejoined else 0.0)

    def _rejoin_if_short(self) -> None:
        """Asks for a new assignment (outside the rebalance callback, which the join would otherwise undo)."""
        if self._rejoin_at is not None and time.monotonic() >= self._rejoin_at:
            self._rejoin_at, self._rejoined = None, True
            coordinator = getattr(self.consumer, "_coordinator", None)
            if coordinator is not None:
                coordinator.request_rejoin()

    def run(self, *, ready: threading.Event | None = None) -> None:
        """Consume, score, publish and commit until ``stop_event``.

        A batch the broker does not acknowledge is kept and published again with a fresh producer (backoff up
        to 30 s; readiness says why meanwhile), and committed only once acknowledged: a broker restart costs
        latency, never a frame, and never the worker. A failed commit is logged and retried with the next
        batch's offsets (at-least-once: its frames may be scored twice after a rebalance).
        """
        from kafka.errors import KafkaError as ClientError

        self.consumer = self.kafka.consumer(
            group_id=self.cfg.group_id, max_poll_interval_ms=self.cfg.max_poll_interval_ms
        )
        self.consumer.subscribe(
            [self.kafka.topics["frames"]],
            listener=_assignment_log(self.cfg.worker_id, self.consumer, self._shortfall),
        )
        self.producer = self.kafka.producer()
        log.info(
            "worker %s joined group %s with heads for %s",
            self.cfg.worker_id,
            self.cfg.group_id,
            ", ".join(sorted(self.heads)) or "no product",
        )
        if ready is not None:
            ready.set()
        try:
            while not self.stop_event.is_set():
                records = self._collect()
                self._update_lag(force=bool(records))  # local figures: cheap after every batch
                self._rewind.check(self.consumer)  # local too; one stuck partition must not wait behind busy ones
                if not records:
                    continue
                metrics.BATCH_SIZE.observe(len(records))
                if not self._publish_until_acknowledged(self.process(records)):
                    break
                try:
                    self._commit(records)
                except ClientError as exc:
                    metrics.COMMIT_FAILURES.inc()
                    log.warning(
                        "worker %s: committing offsets failed (%s); the next batch commits past them",
                        self.cfg.worker_id,
                        exc,
                    )
                self.counters["batches"] += 1
                self.counters["frames"] += len(records)
        finally:
            log.info("worker %s stopping: %s", self.cfg.worker_id, dict(self.counters))
            try:
                if self.producer is not None:
                    self.producer.flush(min(10.0, self.cfg.publish_timeout_s))
                    self.producer.close(min(10.0, self.cfg.publish_timeout_s))
            except ClientError as exc:  # the broker is gone: closing must not hide why the loop ended
                log.warning("worker %s: closing the producer failed: %s", self.cfg.worker_id, exc)
            finally:
                self.consumer.close()
