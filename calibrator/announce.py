"""Head announcements on the compacted ``heads`` topic (key = product id).

The calibrator publishes one whenever a product's active head changes, re-announces every active head when it
starts and then every ``reannounce_s`` seconds, so a broker that lost its data (a restarted embedded one, a
topic deleted by mistake) is repopulated without a calibrator restart and a worker started afterwards finds its
heads. Workers skip an announcement whose artifact they already hold, so a repeat costs one small record per
product. The announcement carries the calibrator's *advertised* address, where workers on other machines
download the artifact, and — with a heads key — an HMAC signature header (:mod:`inspection_core.trust`).
"""

from __future__ import annotations

import logging
import threading

from calibrator.line import is_commissioning
from calibrator.store import HeadStore, StoreError, manifest_ref
from inspection_core.kafka import KafkaConfig, ensure_topics
from inspection_core.trust import HeadSigner
from inspection_core.wire import encode
from inspection_pb.v1 import common_pb2, heads_pb2

log = logging.getLogger(__name__)


class Announcer:
    """Announcements are rare (an activation, a start), so each send opens and closes its own producer:
    no client outlives the service or keeps reconnecting to a broker that has gone."""

    def __init__(self, kafka: KafkaConfig, advertised_address: str, signer: HeadSigner | None = None) -> None:
        self.kafka = kafka
        self.address = advertised_address
        self.signer = signer
        self._repeater: threading.Thread | None = None
        self._stop = threading.Event()

    def _send(self, announcements: list[heads_pb2.HeadAnnouncement], *, level: int = logging.INFO) -> None:
        producer = self.kafka.producer()
        try:
            for a in announcements:
                key = a.head.product_id.encode()
                value, headers = encode(a)  # protobuf always: the signature covers these exact bytes
                if self.signer is not None:
                    headers += self.signer.headers(key, value)
                producer.send(self.kafka.topic("heads"), key=key, value=value, headers=headers).get(30)
                log.log(
                    level,
                    "announced %s v%s (active=%s) at %s",
                    a.head.product_id,
                    a.head.version,
                    a.active,
                    self.address,
                )
        finally:
            producer.close(10)

    def announce(self, store: HeadStore, product: str) -> heads_pb2.HeadAnnouncement:
        a = self._announcement(store, product)
        self._send([a])
        return a

    def _announcement(self, store: HeadStore, product: str) -> heads_pb2.HeadAnnouncement:
        a = heads_pb2.HeadAnnouncement(calibrator_address=self.address)
        a.activated_time.GetCurrentTime()
        try:
            m = store.info(product)
        except StoreError:
            a.head.CopyFrom(common_pb2.HeadRef(product_id=product))
            a.active = False
        else:
            a.head.CopyFrom(manifest_ref(product, m))
            a.backbone = m["backbone"]
            a.weights_sha256 = m["weights_sha256"]
            a.image_threshold = m.get("image_threshold") or 0.0
            a.commissioning = is_commissioning(store, product, m)
            a.pixel_threshold = m.get("pixel_threshold") or 0.0
            a.active = True
        return a

    def announce_all(self, store: HeadStore) -> int:
        batch = [self._announcement(store, p) for p in store.products() if store.active(p)]
        if batch:
            self._send(batch, level=logging.DEBUG)
        return len(batch)

    def repeat_every(self, store: HeadStore, interval_s: float) -> None:
        """Re-announce every active head every ``interval_s`` seconds until :meth:`stop` (0 = never)."""
        if interval_s <= 0 or self._repeater is not None:
            return

        def loop() -> None:
            failing = False
            while not self._stop.wait(interval_s):
                try:
                    ensure_topics(self.kafka)  # a restarted broker may have lost the compacted topic itself
                    n = self.announce_all(store)
                except Exception as exc:  # noqa: BLE001 - broker down: try again next period, say so once
                    if not failing:
                        log.warning("re-announcing heads failed (%s); retrying every %.0fs", exc, interval_s)
                    failing = True
                    continue
                if failing:
                    log.info("heads topic reachable again: re-announced %d active heads", n)
                failing = False

        self._repeater = threading.Thread(target=loop, name="head-reannouncer", daemon=True)
        self._repeater.start()

    def stop(self) -> None:
        self._stop.set()
