"""Head announcements on the compacted ``heads`` topic (key = product id).

The calibrator publishes one whenever a product's active head changes and
re-announces every active head when it starts, so a broker that lost its data
(the embedded one) is repopulated. The announcement carries the calibrator's
*advertised* address, where workers on other machines download the artifact.
"""

from __future__ import annotations

import logging

from calibrator.store import HeadStore, StoreError, manifest_ref
from inspection_core.kafka import KafkaConfig
from inspection_pb.v1 import common_pb2, heads_pb2

log = logging.getLogger(__name__)


class Announcer:
    """Announcements are rare (an activation, a start), so each send opens and closes its own producer:
    no client outlives the service or keeps reconnecting to a broker that has gone."""

    def __init__(self, kafka: KafkaConfig, advertised_address: str) -> None:
        self.kafka = kafka
        self.address = advertised_address

    def _send(self, announcements: list[heads_pb2.HeadAnnouncement]) -> None:
        producer = self.kafka.producer()
        try:
            for a in announcements:
                key = a.head.product_id.encode()
                producer.send(self.kafka.topic("heads"), key=key, value=a.SerializeToString()).get(30)
                log.info(
                    "announced %s v%s (active=%s) at %s", a.head.product_id, a.head.version, a.active, self.address
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
            a.pixel_threshold = m.get("pixel_threshold") or 0.0
            a.active = True
        return a

    def announce_all(self, store: HeadStore) -> int:
        batch = [self._announcement(store, p) for p in store.products() if store.active(p)]
        if batch:
            self._send(batch)
        return len(batch)
