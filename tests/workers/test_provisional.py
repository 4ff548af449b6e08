"""A commissioning head version's verdicts are provisional, and every scored frame names where it is on the frames
topic: records consumed from a real broker, scored by the worker's own batch path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from kafka_support import poll_records
from PIL import Image

from inspection_pb.v1 import frames_pb2, results_pb2
from scorer.fit import fit_head
from workers.config import ActiveHead, WorkerConfig, head_ref
from workers.worker import Worker

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("provisional", [True, False])
def test_results_and_defects_carry_frame_ref_and_the_commissioning_mark(
    provisional, start_broker, tiny_vit, make_refs
) -> None:
    kafka = start_broker(partitions=2)
    head = fit_head(tiny_vit, make_refs(3), method="knn").with_thresholds(image=1e-9)  # every frame a defect
    prod = kafka.producer()
    for i, img in enumerate(make_refs(3, seed=5)):
        f = frames_pb2.Frame(frame_id=f"p-{i}", camera_id=f"cam-{i}", product_id="widget", sequence=i,
                             encoding=frames_pb2.ENCODING_PNG, image=_png(img))  # fmt: skip
        f.capture_time.GetCurrentTime()
        prod.send(kafka.topic("frames"), key=f.camera_id.encode(), value=f.SerializeToString())
    prod.flush()
    prod.close(5)
    c = kafka.consumer(kafka.topic("frames"), group_id=None)
    try:
        records = poll_records(c, until=lambda got: len(got) >= 3, timeout=20)
    finally:
        c.close()
    w = Worker(kafka, WorkerConfig(worker_id="t"), {"widget": ActiveHead(head, head_ref("widget", head), provisional)})
    out = w.process(records)
    where = {
        r.value and frames_pb2.Frame.FromString(r.value).frame_id: (r.topic, r.partition, r.offset) for r in records
    }
    assert len(out.results) == 3 and len(out.defects) == 3
    for msg in [*out.results, *out.defects]:
        assert msg.provisional is provisional
        assert (msg.frame_ref.topic, msg.frame_ref.partition, msg.frame_ref.offset) == where[msg.frame_id]
    assert all(r.status == results_pb2.STATUS_OK for r in out.results)
