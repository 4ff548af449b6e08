"""Workers learn heads from the compacted ``heads`` topic and download them over gRPC.

Each announcement names the product's active head version, its sha256 and the
calibrator address. The worker downloads the artifact, verifies the sha256 and
that it was built for this worker's backbone, and swaps it in between batches; a
head for another backbone is ignored with a log line and a counter.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
from pathlib import Path

from calibrator.client import CalibratorClient, CalibratorError
from calibrator.security import ClientSecurity
from inspection_core.errors import HeadError
from inspection_core.kafka import KafkaConfig
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
    def __init__(
        self, kafka: KafkaConfig, worker: Worker, backbone: Backbone, security: ClientSecurity | None = None
    ) -> None:
        super().__init__(name="head-follower", daemon=True)
        self.security = security
        self.kafka = kafka
        self.worker = worker
        self.backbone = backbone
        self.stop = worker.stop_event
        self.dir = Path(tempfile.mkdtemp(prefix="cff-heads-"))

    def apply(self, a: heads_pb2.HeadAnnouncement) -> None:
        product = a.head.product_id
        if not a.active:
            self.worker.remove_head(product)
            return
        if a.backbone != self.backbone.spec:
            self.worker.counters["heads_ignored_backbone"] += 1
            metrics.HEADS_REFUSED.labels(reason="backbone").inc()
            log.info(
                "ignoring head %s: built for %s, this worker serves %s", a.head.head_id, a.backbone, self.backbone.spec
            )
            return
        current = self.worker.heads.get(product)
        if current is not None and current.ref.sha256 == a.head.sha256:
            return
        try:
            data = download(a.calibrator_address, product, a.head.version, self.security)
        except CalibratorError:
            metrics.HEADS_REFUSED.labels(reason="download").inc()
            raise
        sha = hashlib.sha256(data).hexdigest()
        if sha != a.head.sha256:
            self.worker.counters["heads_bad_sha256"] += 1
            metrics.HEADS_REFUSED.labels(reason="sha256").inc()
            raise HeadError(
                f"head {a.head.head_id} from {a.calibrator_address}: sha256 {sha[:12]} != announced "
                f"{a.head.sha256[:12]}"
            )
        path = self.dir / f"{a.head.head_id}.safetensors"
        path.write_bytes(data)
        try:
            head = load_head(path, self.backbone)  # checks backbone, weights, taps, size
        except HeadError:
            metrics.HEADS_REFUSED.labels(reason="invalid").inc()
            raise
        self.worker.set_head(product, ActiveHead(head, a.head))
        self.worker.counters["heads_applied"] += 1
        log.info("worker %s now scores %s with %s", self.worker.cfg.worker_id, product, a.head.head_id)

    def run(self) -> None:
        c = self.kafka.consumer(self.kafka.topic("heads"), group_id=None)
        try:
            while not self.stop.is_set():
                for msgs in c.poll(timeout_ms=500).values():
                    for m in msgs:
                        try:
                            self.apply(heads_pb2.HeadAnnouncement.FromString(m.value))
                        except (HeadError, CalibratorError, ValueError) as exc:
                            log.warning("head announcement not applied: %s", exc)
        finally:
            c.close()
