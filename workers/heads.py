"""Workers learn heads from the compacted ``heads`` topic and download them over gRPC.

Each announcement names the product's active head version, its sha256 and the
calibrator address. The worker checks the announcement's signature and that the
address is one it trusts (:mod:`inspection_core.trust`), downloads the artifact,
verifies the sha256 and that it was built for this worker's backbone, and swaps it
in between batches; a head for another backbone is ignored with a log line and a
counter. Nothing from an announcement becomes a path: the temporary artifact file is
named from the checked product id and version, in a folder deleted once the head is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
from pathlib import Path

from google.protobuf.message import DecodeError

from calibrator.client import CalibratorClient, CalibratorError
from calibrator.security import ClientSecurity
from inspection_core.errors import ConfigError, HeadError, InspectionError
from inspection_core.ids import check_product_id, head_id
from inspection_core.kafka import KafkaConfig, LostLogRewind
from inspection_core.trust import HeadTrust, TrustError
from inspection_pb.v1 import heads_pb2
from monitoring import metrics
from scorer.artifact import load_head
from scorer.backbones.base import Backbone
from workers.config import ActiveHead
from workers.worker import Worker

log = logging.getLogger(__name__)


def download(address: str, product: str, version: int, security: ClientSecurity | None = None) -> bytes:
    with CalibratorClient(address, security) as c:
        return c.download(product, version)


class HeadFollower(threading.Thread):
    """Applies announcements from the heads topic that pass :class:`HeadTrust` (signature, time, pinned address).

    Without a key the trust must say ``allow_unsigned`` (``--allow-unsigned-heads``), or construction fails.
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        worker: Worker,
        backbone: Backbone,
        security: ClientSecurity | None = None,
        trust: HeadTrust | None = None,
    ) -> None:
        super().__init__(name="head-follower", daemon=True)
        self.security = security
        self.trust = trust or HeadTrust()
        self.trust.require_key(f"worker {worker.cfg.worker_id}")  # secure by default: no key, no follower
        self.kafka = kafka
        self.worker = worker
        self.backbone = backbone
        self.stop = worker.stop_event
        # product -> announcement time of the last one applied; never later than the clock allows (check_time)
        self._seen: dict[str, float] = {}
        if not self.trust.signed:
            log.warning(
                "--allow-unsigned-heads: head announcements are not authenticated: anyone who can write %s can "
                "change this worker's heads; give the calibrator and the workers the same --heads-key-file",
                kafka.topic("heads"),
            )

    def _refuse(self, reason: str, counter: str, message: str) -> None:
        self.worker.counters[counter] += 1
        metrics.HEADS_REFUSED.labels(reason=reason).inc()
        raise HeadError(message)

    def receive(self, key: bytes | None, value: bytes, headers: list | None = None) -> None:
        """One record of the heads topic: verified, parsed, checked and applied (raises what it refuses)."""
        try:
            self.trust.check_signature(key, value, headers)
        except TrustError as exc:
            self._refuse("signature", "heads_bad_signature", f"head announcement for {_short(key)}: {exc}")
        try:
            a = heads_pb2.HeadAnnouncement.FromString(value)
        except DecodeError:
            self._refuse("invalid", "heads_unparseable", f"record {_short(key)} is not a HeadAnnouncement")
        if key is not None and key != a.head.product_id.encode():
            self._refuse(
                "invalid", "heads_key_mismatch", f"record key {_short(key)} does not match its product in the value"
            )
        self.apply(a)

    def apply(self, a: heads_pb2.HeadAnnouncement) -> None:
        try:
            product = check_product_id(a.head.product_id)
        except ConfigError as exc:
            self._refuse("invalid", "heads_bad_id", f"head announcement refused: {exc}")
        t = a.activated_time.seconds + a.activated_time.nanos / 1e9
        try:
            self.trust.check_time(t)
        except TrustError as exc:
            self._refuse("replay", "heads_future_time", f"head announcement for {product} v{a.head.version}: {exc}")
        if t < self._seen.get(product, float("-inf")):
            self._refuse(
                "replay",
                "heads_replayed",
                f"head announcement for {product} v{a.head.version} is older than the one already applied",
            )
        if not a.active:
            self._seen[product] = t
            self.worker.remove_head(product)
            return
        if a.head.version < 1 or a.head.head_id != head_id(product, a.head.version):
            self._refuse(
                "invalid",
                "heads_bad_id",
                f"head announcement for {product}: head id {a.head.head_id[:80]!r} is not "
                f"{head_id(product, max(1, a.head.version))!r}",
            )
        if a.backbone != self.backbone.spec:
            self.worker.counters["heads_ignored_backbone"] += 1
            metrics.HEADS_REFUSED.labels(reason="backbone").inc()
            log.info(
                "ignoring head %s: built for %s, this worker serves %s", a.head.head_id, a.backbone, self.backbone.spec
            )
            return
        try:
            address = self.trust.check_address(a.calibrator_address)
        except TrustError as exc:
            self._refuse("address", "heads_untrusted_address", f"head {a.head.head_id}: {exc}")
        current = self.worker.heads.get(product)
        if current is not None and current.ref.sha256 == a.head.sha256:
            self._seen[product] = t
            if current.provisional != a.commissioning:  # the same version left (or entered) commissioning
                self.worker.set_head(product, ActiveHead(current.head, current.ref, a.commissioning))
            return
        try:
            data = download(address, product, a.head.version, self.security)
        except CalibratorError:
            metrics.HEADS_REFUSED.labels(reason="download").inc()
            raise
        sha = hashlib.sha256(data).hexdigest()
        if sha != a.head.sha256:
            self._refuse(
                "sha256",
                "heads_bad_sha256",
                f"head {a.head.head_id} from {address}: sha256 {sha[:12]} != announced {a.head.sha256[:12]}",
            )
        # The file name comes from the checked product id and version, never from the announced head id; the
        # folder lives only while the artifact is loaded (the head is in memory afterwards).
        with tempfile.TemporaryDirectory(prefix="cff-heads-") as tmp:
            path = Path(tmp) / f"{head_id(product, a.head.version)}.safetensors"
            path.write_bytes(data)
            try:
                head = load_head(path, self.backbone)  # checks backbone, weights, taps, size
            except HeadError:
                metrics.HEADS_REFUSED.labels(reason="invalid").inc()
                raise
        self.worker.set_head(product, ActiveHead(head, a.head, a.commissioning))
        self._seen[product] = t
        self.worker.counters["heads_applied"] += 1
        log.info("worker %s now scores %s with %s", self.worker.cfg.worker_id, product, a.head.head_id)

    def run(self) -> None:
        c = self.kafka.consumer(self.kafka.topic("heads"), group_id=None)
        rewind = LostLogRewind(f"head follower of worker {self.worker.cfg.worker_id}")
        try:
            while not self.stop.is_set():
                polled = c.poll(timeout_ms=500)
                rewind.check(c)
                for msgs in polled.values():
                    for m in msgs:
                        try:
                            self.receive(m.key, m.value, m.headers)
                        except (InspectionError, CalibratorError, ValueError) as exc:
                            log.warning("head announcement not applied: %s", exc)
        finally:
            c.close()


def _short(key: bytes | None) -> str:
    if key is None:
        return "(no key)"
    text = key[:64].decode(errors="replace")
    return repr(text) + (f"... ({len(key)} bytes)" if len(key) > 64 else "")
