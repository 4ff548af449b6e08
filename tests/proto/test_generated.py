"""The committed ``inspection_pb`` modules must match what ``proto/generate.py`` makes now."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "proto"))


def test_generated_code_is_current(tmp_path: Path) -> None:
    from generate import generate

    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in generate(tmp_path)}
    committed = {
        p.relative_to(ROOT): p.read_bytes()
        for p in [*(ROOT / "inspection_pb").rglob("*.py*"), *(ROOT / "inspection_pb").rglob("*.binpb")]
        if "__pycache__" not in p.parts
    }
    assert set(fresh) == set(committed), "run: python proto/generate.py"
    stale = [str(k) for k in fresh if fresh[k] != committed[k]]
    assert not stale, f"stale generated code {stale}; run: python proto/generate.py"


def test_contracts_round_trip() -> None:
    from inspection_pb.v1 import frames_pb2, heads_pb2, results_pb2

    f = frames_pb2.Frame(
        frame_id="f1",
        camera_id="cam",
        product_id="bottle.top",
        sequence=7,
        encoding=frames_pb2.ENCODING_JPEG,
        image=b"\xff\xd8",
        width=2,
        height=1,
    )
    assert frames_pb2.Frame.FromString(f.SerializeToString()) == f
    r = results_pb2.InspectionResult(frame_id="f1", status=results_pb2.STATUS_NO_HEAD, reason="no head")
    assert results_pb2.InspectionResult.FromString(r.SerializeToString()).status == results_pb2.STATUS_NO_HEAD
    a = heads_pb2.HeadAnnouncement(backbone="dinov2-vits14", active=True)
    a.head.product_id = "bottle.top"
    assert heads_pb2.HeadAnnouncement.FromString(a.SerializeToString()).head.product_id == "bottle.top"
