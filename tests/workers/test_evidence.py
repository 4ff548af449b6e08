"""The evidence archive over real HTTP: served while kept, 410 Gone (and counted) once the size cap removed it."""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from monitoring.http import MetricsServer
from workers.post import EvidenceArchive


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers["Content-Type"]


def _deleted() -> float:
    return REGISTRY.get_sample_value("inspection_worker_evidence_deleted_total") or 0.0


def test_evidence_urls_serve_until_the_cap_removes_them_then_answer_gone(tmp_path) -> None:
    rng = np.random.default_rng(0)
    ms = MetricsServer("worker", host="127.0.0.1", port=0)
    arch = EvidenceArchive(tmp_path / "ev", max_bytes=400_000, url_base=f"{ms.url}/evidence")
    ms.add_route("/evidence/", arch.http_get).start()
    try:
        before = _deleted()
        events = []
        for i in range(6):
            img = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)  # noise: ~100 kB as JPEG, more as PNG
            events.append(arch.save(f"cam/{i}", img, rng.random((200, 240)).astype(np.float32), 0.5, []))
        first, last = events[0], events[-1]
        stem5 = EvidenceArchive.file_stem("cam/5")
        assert stem5.startswith("cam_5-") and last.image_uri == f"{ms.url}/evidence/{stem5}.jpg"  # never a path
        code, body, ctype = _get(last.image_uri)
        assert code == 200 and ctype == "image/jpeg" and body[:2] == b"\xff\xd8"
        assert _get(last.overlay_uri)[0] == 200
        assert sum(p.stat().st_size for p in (tmp_path / "ev").iterdir()) <= 400_000
        removed = _deleted() - before
        assert removed >= 2 and not (tmp_path / "ev" / f"{EvidenceArchive.file_stem('cam/0')}.jpg").exists()
        code, body, _ = _get(first.image_uri)
        assert code == 410 and b"size cap" in body
        assert REGISTRY.get_sample_value("inspection_worker_evidence_bytes") == pytest.approx(
            sum(p.stat().st_size for p in (tmp_path / "ev").iterdir())
        )
        (tmp_path / "secret.jpg").write_bytes(b"\xff\xd8 outside the archive")
        for bad in (
            "..%2F..%2Fetc%2Fpasswd",
            "%2Fetc%2Fpasswd.jpg",
            "..%2Fsecret.jpg",
            "%2E%2E%2Fsecret.jpg",
            "..%5Csecret.jpg",
            f"{stem5}.txt",
            "never.jpg",
        ):
            assert _get(f"{ms.url}/evidence/{bad}")[0] == 404, bad
    finally:
        ms.stop()


def test_a_restarted_worker_keeps_and_caps_what_is_on_disk(tmp_path) -> None:
    d = tmp_path / "ev"
    d.mkdir()
    for i in range(4):
        (d / f"old{i}.jpg").write_bytes(b"\xff\xd8" + bytes(300_000))
        os.utime(d / f"old{i}.jpg", (1_700_000_000 + i, 1_700_000_000 + i))  # oldest first, whatever the clock
    arch = EvidenceArchive(d, max_bytes=700_000)
    assert arch.http_get("old3.jpg")[0] == 200
    arch.cap()
    assert sorted(p.name for p in d.iterdir()) == ["old2.jpg", "old3.jpg"]
    assert arch.http_get("old0.jpg")[0] == 410
    assert arch._uri(d / "old3.jpg").startswith("file://")  # no HTTP server: file paths as before


def test_distinct_frame_ids_never_share_a_file_and_unicode_ids_fetch(tmp_path) -> None:
    """``lot-7/part-1`` and ``lot-7_part-1`` once mapped to one file: the first defect's URL served the second
    frame's image. Unicode ids gave URLs the server refused."""
    ms = MetricsServer("worker", host="127.0.0.1", port=0)
    arch = EvidenceArchive(tmp_path / "ev", max_bytes=1 << 30, url_base=f"{ms.url}/evidence")
    ms.add_route("/evidence/", arch.http_get).start()
    ids = ["lot-7/part-1", "lot-7_part-1", "Prüfteil/Ölwanne №7 🚗", "..", ".hidden", "", "x" * 500]
    shades = {fid: 20 + 30 * i for i, fid in enumerate(ids)}  # each frame a flat image of its own grey level
    try:
        events = {}
        for fid, level in shades.items():
            img = np.full((32, 48, 3), level, dtype=np.uint8)
            events[fid] = arch.save(fid, img, np.zeros((32, 48), np.float32), 0.5, [])
        urls = [u for e in events.values() for u in (e.image_uri, e.overlay_uri)]
        assert len(set(urls)) == len(urls), urls
        for fid, e in events.items():
            assert e.image_uri.isascii() and " " not in e.image_uri
            code, body, ctype = _get(e.image_uri)
            assert code == 200 and ctype == "image/jpeg", (fid, code)
            grey = np.asarray(Image.open(io.BytesIO(body)))
            assert abs(float(grey.mean()) - shades[fid]) < 3, f"{fid!r} served another frame's image"
            assert _get(e.overlay_uri)[0] == 200
            name = unquote(urlsplit(e.image_uri).path.rsplit("/", 1)[1])
            assert (tmp_path / "ev" / name).is_file() and not name.startswith(".") and len(name) <= 160
        assert len(list((tmp_path / "ev").iterdir())) == 2 * len(ids)
        # the same id again (a redelivered frame) overwrites its own files, nobody else's
        again = arch.save(ids[0], np.full((32, 48, 3), 250, np.uint8), np.zeros((32, 48), np.float32), 0.5, [])
        assert again.image_uri == events[ids[0]].image_uri
        assert len(list((tmp_path / "ev").iterdir())) == 2 * len(ids)
        grey = np.asarray(Image.open(io.BytesIO(_get(events[ids[1]].image_uri)[1])))
        assert abs(float(grey.mean()) - shades[ids[1]]) < 3
    finally:
        ms.stop()
