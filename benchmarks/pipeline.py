"""End-to-end pipeline throughput beside the bare scorer, same machine, model and run.

    cff-inspect bench pipeline [--backbone dinov2-vits14] [--frames 64] [--max-batch 8] [--out results.jsonl]

1. bare scorer: ``Head.score`` on the decoded demo images in batches of max-batch;
2. pipeline: frames (JPEG) published to the embedded broker as fast as possible, one
   worker in this process, results read back; frames/s from the first result to the
   last, latency = result time - capture time.
Prints both and their ratio; ``--out`` appends the run as one JSON line (``benchmarks.report``).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import report
from inspection_core.names import METHODS
from workers.config import add_worker_args


def run(args: argparse.Namespace) -> dict:
    import torch

    from inspection_core.broker import EmbeddedBroker
    from inspection_core.kafka import quiet_kafka
    from scorer.backbones import load_backbone
    from scorer.demo import make_demo_dataset
    from scorer.fit import FitOptions, fit_head
    from scorer.images import load_image

    quiet_kafka()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="cff-bench-"))
    cat = make_demo_dataset(tmp, n_train=4, n_good=12, n_bad=4)
    bb = load_backbone(args.backbone, device=args.device)
    from scorer.backbones.base import auto_precision

    prec = args.precision if args.precision != "auto" else auto_precision(bb.device)
    bb.set_precision(prec)
    refs = [load_image(p) for p in sorted((cat / "train" / "good").glob("*.png"))]
    head = fit_head(bb, refs, method=args.method, options=FitOptions(steps_stage1=5, steps_stage2=5, n_synthetic=2))
    imgs = [load_image(p) for p in sorted((cat / "test").rglob("*.png"))]
    frames_img = [imgs[i % len(imgs)] for i in range(args.frames)]

    # 1. bare scorer
    head.score(frames_img[: args.max_batch], batch_size=args.max_batch)  # warm-up
    t0 = time.perf_counter()
    head.score(frames_img, batch_size=args.max_batch)
    bare_fps = args.frames / (time.perf_counter() - t0)

    # 2. pipeline, once per (max batch, max wait) of the sweep, offered as a burst or paced at --offered-fps
    jpegs = []
    for im in frames_img:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    curve = []
    with EmbeddedBroker() as b:
        for mb in args.sweep_batch or [args.max_batch]:
            for mw in args.sweep_wait or [args.max_wait_ms]:
                r = _pipeline_once(b.bootstrap, head, jpegs, mb, mw, args.offered_fps)
                r["pipeline_over_bare"] = r["pipeline_fps"] / bare_fps
                curve.append(r)
                print(
                    f"max_batch {mb:3d} max_wait {mw:4d} ms: {r['pipeline_fps']:8.2f} frames/s "
                    f"({r['pipeline_over_bare']:.2f} x bare)  latency p50 {r['latency_p50_s'] * 1000:.0f} ms "
                    f"p99 {r['latency_p99_s'] * 1000:.0f} ms  mean batch {r['mean_batch']:.1f}",
                    flush=True,
                )
    best = max(curve, key=lambda r: r["pipeline_fps"])
    params = report.params_of(args) | {
        "backbone": bb.spec,
        "image_size": bb.image_size,
        "precision": bb.precision,
        "offered_fps": args.offered_fps or "burst",
        "bare_batch": args.max_batch,
    }
    metrics = {
        "bare_scorer_fps": bare_fps,
        "pipeline_fps": best["pipeline_fps"],
        "pipeline_over_bare": best["pipeline_over_bare"],
        "latency_p50_s": best["latency_p50_s"],
        "latency_p99_s": best["latency_p99_s"],
        "results": best["results"],
        "best_max_batch": best["max_batch"],
        "best_max_wait_ms": best["max_wait_ms"],
    }
    return report.record("bench.pipeline", report.machine_facts(bb.device), params, metrics, curve=curve)


def _pipeline_once(bootstrap: str, head, jpegs: list[bytes], max_batch: int, max_wait_ms: int, offered_fps: float):  # noqa: ANN001, ANN202
    from inspection_core.kafka import KafkaConfig, ensure_topics
    from inspection_pb.v1 import frames_pb2, results_pb2
    from workers.worker import ActiveHead, Worker, WorkerConfig, head_ref

    kafka = KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=f"b{uuid.uuid4().hex[:6]}.", partitions=4)
    ensure_topics(kafka)
    worker = Worker(
        kafka,
        WorkerConfig(max_batch=max_batch, max_wait_ms=max_wait_ms),
        {"demo": ActiveHead(head, head_ref("demo", head, "", 1))},
    )
    ready = threading.Event()
    wt = threading.Thread(target=worker.run, kwargs={"ready": ready}, daemon=True)
    wt.start()
    ready.wait(30)
    consumer = kafka.consumer(kafka.topic("results"), group_id=None)
    prod = kafka.producer()

    def frame(i: int, data: bytes) -> bytes:
        f = frames_pb2.Frame(
            frame_id=f"f{i}-{uuid.uuid4().hex[:6]}",
            camera_id=f"cam-{i % 8}",
            product_id="demo",
            sequence=i,
            encoding=frames_pb2.ENCODING_JPEG,
            image=data,
        )
        f.capture_time.GetCurrentTime()
        return f.SerializeToString()

    # warm the group: one frame through before timing
    prod.send(kafka.topic("frames"), key=b"cam-0", value=frame(10**6, jpegs[0])).get(30)
    got = 0
    while got < 1:
        got += sum(len(v) for v in consumer.poll(timeout_ms=500).values())
    batches0, frames0 = worker.counters["batches"], worker.counters["frames"]
    lat: list[float] = []

    def drain(timeout_ms: int) -> None:
        for msgs in consumer.poll(timeout_ms=timeout_ms).values():
            for m in msgs:
                r = results_pb2.InspectionResult.FromString(m.value)
                lat.append((r.result_time.ToNanoseconds() - r.capture_time.ToNanoseconds()) / 1e9)

    t_start = time.perf_counter()
    for i, data in enumerate(jpegs):
        if offered_fps:
            due = t_start + i / offered_fps
            while time.perf_counter() < due:
                time.sleep(min(0.002, max(0.0, due - time.perf_counter())))
        prod.send(kafka.topic("frames"), key=f"cam-{i % 8}".encode(), value=frame(i, data))
        if offered_fps:
            prod.flush()
    prod.flush()
    deadline = time.monotonic() + 600
    while len(lat) < len(jpegs) and time.monotonic() < deadline:
        drain(200)
    elapsed = time.perf_counter() - t_start
    worker.stop_event.set()
    wt.join(30)
    consumer.close()
    prod.close()
    nb = worker.counters["batches"] - batches0
    return {
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "pipeline_fps": len(lat) / elapsed,
        "latency_p50_s": float(np.percentile(lat, 50)) if lat else float("nan"),
        "latency_p95_s": float(np.percentile(lat, 95)) if lat else float("nan"),
        "latency_p99_s": float(np.percentile(lat, 99)) if lat else float("nan"),
        "mean_batch": (worker.counters["frames"] - frames0) / nb if nb else 0.0,
        "results": len(lat),
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="dinov2-vits14")
    p.add_argument("--method", choices=METHODS, default=METHODS[0])
    p.add_argument("--frames", type=int, default=64)
    add_worker_args(p, ("max_batch", "max_wait_ms"))  # the worker's, with its defaults (and the bare batch)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | fp16 | auto (bf16 on a GPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--offered-fps", type=float, default=0.0, help="pace the frames (0 = one burst)")
    p.add_argument("--sweep-batch", type=int, nargs="+", default=None, help="max batch sizes to sweep")
    p.add_argument("--sweep-wait", type=int, nargs="+", default=None, help="max waits (ms) to sweep")
    p.add_argument("--out", "--json", dest="out", default=None, help="append the run here as one JSON line")


def main(args: argparse.Namespace) -> int:
    rec = run(args)
    print(json.dumps(rec, indent=2))
    report.write(rec, args.out)
    return 0
