"""A worker's throughput and memory on a clean frame stream vs one with a hostile frame in every 100.

The hostile frames are the ones the worker must refuse cheaply (the tests build theirs here too): a JPEG scan
bomb, capture times outside the Timestamp range or far in the future, megabyte ids, tens of thousands of
attributes, and TIFF/PPM bytes labelled as PNG/JPEG. Both streams run in one process on one embedded broker
with the tiny random backbone the tests use, so the ratio is what one hostile frame in 100 costs.

    .venv/bin/python -m benchmarks.hostile_load --frames 400
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from inspection_pb.v1 import frames_pb2

HOSTILE_KINDS = (
    "scan_bomb",
    "far_future",
    "beyond_9999",
    "negative_time",
    "huge_camera_id",
    "huge_frame_id",
    "attributes",
    "tiff_as_png",
    "ppm_as_jpeg",
)


def jpeg_scan_bomb(side: int = 2048, scans: int = 2000) -> bytes:
    """A small progressive grayscale JPEG with ``scans`` extra AC scans, each one end-of-band run over every
    block: a few bytes a scan, and a full pass over the image's blocks for the decoder (seconds for thousands)."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, format="JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    eoi = data.rindex(b"\xff\xd9")
    # an AC Huffman table (class 1, id 1) of one 1-bit code for symbol 0xE0: an EOB run of 2^14 + 14 extra bits
    dht = b"\xff\xc4" + struct.pack(">H", 2 + 1 + 16 + 1) + bytes([0x11, 1] + [0] * 15 + [0xE0])
    sos = b"\xff\xda" + struct.pack(">H", 8) + bytes([1, 1, 0x01, 1, 63, 0x00])  # component 1, AC 1..63, Al 0
    blocks, bits = (side // 8) ** 2, ""
    while blocks >= 1 << 14:
        run = min(blocks, 32767)
        bits += "0" + format(run - (1 << 14), "014b")
        blocks -= run
    bits += "1" * (-len(bits) % 8)
    entropy = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00") if bits else b""
    return data[:eoi] + dht + (sos + entropy) * scans + b"\xff\xd9"


def encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def hostile_frame(kind: str, frame_id: str, now: float, good_png: bytes, product: str = "demo") -> frames_pb2.Frame:
    """A Frame of ``kind`` (one of HOSTILE_KINDS) that a worker must answer with one BAD_FRAME result."""
    f = frames_pb2.Frame(
        frame_id=frame_id, camera_id="cam-h", product_id=product, encoding=frames_pb2.ENCODING_PNG, image=good_png
    )
    f.capture_time.FromNanoseconds(int(now * 1e9))
    small = np.full((16, 16, 3), 90, np.uint8)
    if kind == "scan_bomb":
        f.encoding, f.image = frames_pb2.ENCODING_JPEG, jpeg_scan_bomb()
    elif kind == "far_future":
        f.capture_time.seconds = int(now) + 86_400
    elif kind == "beyond_9999":
        f.capture_time.seconds = 10**12
    elif kind == "negative_time":
        f.capture_time.seconds = -5
    elif kind == "huge_camera_id":
        f.camera_id = "c" * (1 << 20)
    elif kind == "huge_frame_id":
        f.frame_id = frame_id + "f" * (1 << 20)
    elif kind == "attributes":
        for i in range(70_000):
            f.attributes[f"key-{i:06d}"] = "v" * 250
    elif kind == "tiff_as_png":
        f.image = encoded(small, "TIFF")
    elif kind == "ppm_as_jpeg":
        f.encoding, f.image = frames_pb2.ENCODING_JPEG, encoded(small, "PPM")
    else:
        raise ValueError(f"unknown hostile frame kind {kind!r}")
    return f


def _frames(n: int, hostile_every: int | None, png: bytes) -> list[frames_pb2.Frame]:
    import time

    now = time.time()
    out = []
    for i in range(n):
        fid = f"f{i:06d}"
        if hostile_every and i % hostile_every == hostile_every // 2:
            kind = HOSTILE_KINDS[(i // hostile_every) % len(HOSTILE_KINDS)]
            out.append(hostile_frame(kind, fid, now, png))
            continue
        f = frames_pb2.Frame(
            frame_id=fid, camera_id=f"cam-{i % 4}", product_id="demo", encoding=frames_pb2.ENCODING_PNG, image=png
        )
        f.capture_time.FromNanoseconds(int(now * 1e9))
        out.append(f)
    return out


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:  # VmHWM: the process's peak resident set
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return kb / 1024


def run_stream(kafka_bootstrap: str, head: str, frames: list[frames_pb2.Frame], threads: int) -> dict:
    """Produce ``frames`` as a backlog, start a worker process on them, time it from its first result to its
    last (so start-up is left out), and read its peak RSS before stopping it."""
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from inspection_core.kafka import KafkaConfig, ensure_topics

    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=f"b{uuid.uuid4().hex[:6]}.", partitions=1)
    ensure_topics(kafka)
    prod = kafka.producer(max_request_size=24 << 20)
    for f in frames:
        prod.send(kafka.topic("frames"), key=b"k", value=f.SerializeToString())
    prod.flush()
    prod.close()
    cmd = [sys.executable, "-m", "cff_inspect", "worker", "--head", f"demo={head}", "--no-follow-heads"]
    cmd += ["--metrics-port", "0", "--device", "cpu", "--threads", str(threads), "--max-batch", "8"]
    cmd += ["--max-age-s", "3600", "--bootstrap-servers", kafka_bootstrap, "--topic-prefix", kafka.topic_prefix]
    cmd += ["--partitions", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    consumer = kafka.consumer(kafka.topic("results"), group_id=None)
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 600
    try:
        while len(seen) < len(frames) and time.monotonic() < deadline and proc.poll() is None:
            for recs in consumer.poll(timeout_ms=200).values():
                for m in recs:
                    seen.setdefault(str(m.offset), time.monotonic())
        rss = _peak_rss_mib(proc.pid) if proc.poll() is None else float("nan")
    finally:
        consumer.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    times = sorted(seen.values())
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {"results": len(seen), "frames": len(frames), "fps": (len(times) - 1) / span, "peak_rss_mib": rss}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import platform
    import tempfile
    from pathlib import Path

    from inspection_core.broker import EmbeddedBroker
    from scorer.artifact import save_head
    from scorer.backbones import load_backbone
    from scorer.fit import fit_head

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=900, help="frames per stream (default %(default)s)")
    p.add_argument("--hostile-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="the worker's torch threads")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    refs = [np.clip(120 + rng.normal(0, 6, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
    png = encoded(refs[0], "PNG")
    with tempfile.TemporaryDirectory() as tmp:
        head = Path(tmp) / "demo-v1.safetensors"
        save_head(fit_head(load_backbone("tiny-vit"), refs, method="knn"), head, product="demo", version=1)
        broker = EmbeddedBroker().start()
        try:
            clean = run_stream(broker.bootstrap, str(head), _frames(args.frames, None, png), args.threads)
            mixed = run_stream(broker.bootstrap, str(head), _frames(args.frames, args.hostile_every, png), args.threads)
        finally:
            broker.stop()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"host: {platform.node()} nproc={len(os.sched_getaffinity(0))} cpu={cpu!r} worker threads={args.threads}")
    print(f"{'stream':<28}{'results':>10}{'frames/s':>10}{'peak RSS MiB':>14}")
    for name, r in (("clean", clean), (f"1 hostile in {args.hostile_every}", mixed)):
        print(f"{name:<28}{r['results']:>5}/{r['frames']:<4}{r['fps']:>10.1f}{r['peak_rss_mib']:>14.0f}")
    print(
        f"ratio hostile/clean: frames/s {mixed['fps'] / clean['fps']:.2f}, peak RSS "
        f"{mixed['peak_rss_mib'] / clean['peak_rss_mib']:.2f}"
    )
    return 0 if clean["results"] == clean["frames"] and mixed["results"] == mixed["frames"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
