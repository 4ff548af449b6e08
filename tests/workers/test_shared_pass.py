"""A worker batch of several products costs one backbone pass, and every frame's result is what its product's head
gives scoring that product's frames alone (the path the worker took before batches were embedded once)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from inspection_core.kafka import KafkaConfig
from inspection_pb.v1 import frames_pb2, results_pb2
from scorer.fit import fit_head
from workers.config import ActiveHead, WorkerConfig, head_ref
from workers.worker import Worker

pytestmark = pytest.mark.usefixtures("single_thread")


def _record(product: str, seq: int, img: np.ndarray) -> SimpleNamespace:
    h, w = img.shape[:2]
    f = frames_pb2.Frame(frame_id=f"{product}-{seq}", camera_id=f"cam-{seq}", product_id=product, sequence=seq,
                         encoding=frames_pb2.ENCODING_RAW_RGB8, width=w, height=h, image=img.tobytes())  # fmt: skip
    f.capture_time.GetCurrentTime()
    return SimpleNamespace(key=f.camera_id.encode(), value=f.SerializeToString(), timestamp=0, topic="frames",
                           partition=seq % 2, offset=seq)  # fmt: skip


def _in_a_gap(maps: np.ndarray, q: float = 0.97) -> float:
    """A pixel threshold near the ``q`` quantile, midway in a gap between map values (regions must not hinge on
    float rounding)."""
    v = np.unique(maps.astype(np.float32))
    i = int(q * (len(v) - 1))
    j = i + int(np.argmax(np.diff(v[i : i + 200])))
    return float((v[j] + v[j + 1]) / 2)


def test_a_mixed_batch_is_one_pass_with_each_products_own_results(tiny_vit, references, fitted_heads, make_refs):
    knn = fit_head(tiny_vit, references, method="knn")
    heads = {
        "shallow": knn.with_options(tap_weights=(1.0, 1.0, 0.0, 0.0)),  # stops after tap 2
        "cff": fitted_heads["cff"],
        "aprilgan": fitted_heads["aprilgan"],
        "full": knn.with_options(tap_weights=None),
    }
    frames = make_refs(4, seed=3) + make_refs(4, (40, 72), seed=4)
    frames[1][8:20, 8:20] = 255
    frames[6][5:15, 30:50] = 0
    order = ["shallow", "cff", "aprilgan", "full"] * 2  # interleaved, as partitions hand them over
    by_product: dict[str, list[np.ndarray]] = {p: [] for p in heads}
    for p, img in zip(order, frames, strict=True):
        by_product[p].append(img)
    # thresholds that make some frames DEFECT with regions, and others OK
    for p, h in heads.items():
        alone = h.score(by_product[p])
        heads[p] = h.with_thresholds(image=float(alone.image_scores.min()) + 1e-4, pixel=_in_a_gap(alone.maps))
    want = {p: heads[p].score(imgs) for p, imgs in by_product.items()}  # each product on its own, as before

    w = Worker(KafkaConfig(bootstrap_servers="127.0.0.1:1"), WorkerConfig(worker_id="t", max_batch=8),
               {p: ActiveHead(h, head_ref(p, h, "ab")) for p, h in heads.items()})  # fmt: skip
    out = w.process([_record(p, i, img) for i, (p, img) in enumerate(zip(order, frames, strict=True))])

    assert w.counters["backbone_passes"] == 1 and w.counters["scored"] == 8
    assert len(out.results) == 8 and not out.dead_letters
    seen = {p: 0 for p in heads}
    for r in sorted(out.results, key=lambda r: r.sequence):
        assert r.status == results_pb2.STATUS_OK and r.timings.batch_size == 8
        s, k = want[r.product_id], seen[r.product_id]
        seen[r.product_id] += 1
        assert r.image_score == pytest.approx(float(s.image_scores[k]), abs=1e-5)
        assert r.verdict == (results_pb2.VERDICT_DEFECT if s.is_defect[k] else results_pb2.VERDICT_OK)
        assert [(g.x_min, g.y_min, g.x_max, g.y_max, g.area) for g in r.regions] == [
            (g.x_min, g.y_min, g.x_max, g.y_max, g.area) for g in s.regions[k]
        ]
    assert sum(int(s.is_defect.sum()) for s in want.values()) == len(out.defects) > 0
    assert any(r.verdict == results_pb2.VERDICT_OK for r in out.results)
