"""End-to-end pipeline throughput beside the bare scorer, same machine, model and run.

    cff-inspect bench pipeline [--backbone dinov2-vits14] [--frames 64] [--max-batch 8]

1. bare scorer: ``Head.score`` on the decoded demo images in batches of max-batch;
2. pipeline: frames (JPEG) published to the embedded broker as fast as possible, one
   worker in this process, results read back; frames/s from the first result to the
   last, latency = result time - capture time.
Prints both and their ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def run(args: argparse.Namespace) -> dict:
    from cff_inspect.broker import EmbeddedBroker
    from cff_inspect.demo import make_demo_dataset
    from cff_inspect.kafka import KafkaConfig, ensure_topics
    from cff_inspect.services import quiet_kafka
    from inspection_pb.v1 import frames_pb2, results_pb2
    from scorer.backbones import load_backbone
    from scorer.fit import FitOptions, fit_head
    from scorer.images import load_image
    from workers.worker import ActiveHead, Worker, WorkerConfig, head_ref

    quiet_kafka()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="cff-bench-"))
    cat = make_demo_dataset(tmp, n_train=4, n_good=12, n_bad=4)
    bb = load_backbone(args.backbone, device=args.device)
    refs = [load_image(p) for p in sorted((cat / "train" / "good").glob("*.png"))]
    head = fit_head(bb, refs, method=args.method, options=FitOptions(steps_stage1=5, steps_stage2=5, n_synthetic=2))
    imgs = [load_image(p) for p in sorted((cat / "test").rglob("*.png"))]
    frames_img = [imgs[i % len(imgs)] for i in range(args.frames)]

    # 1. bare scorer
    head.score(frames_img[: args.max_batch], batch_size=args.max_batch)  # warm-up
    t0 = time.perf_counter()
    head.score(frames_img, batch_size=args.max_batch)
    bare_fps = args.frames / (time.perf_counter() - t0)

    # 2. pipeline
    jpegs = []
    for im in frames_img:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    with EmbeddedBroker() as b:
        kafka = KafkaConfig(bootstrap_servers=b.bootstrap, topic_prefix=f"b{uuid.uuid4().hex[:6]}.", partitions=4)
        ensure_topics(kafka)
        worker = Worker(
            kafka,
            WorkerConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms),
            {"demo": ActiveHead(head, head_ref("demo", head, "", 1))},
        )
        ready = threading.Event()
        wt = threading.Thread(target=worker.run, kwargs={"ready": ready}, daemon=True)
        wt.start()
        ready.wait(30)
        consumer = kafka.consumer(kafka.topic("results"), group_id=None)
        # warm the group: one frame through before timing
        prod = kafka.producer()

        def frame(i: int, data: bytes) -> bytes:
            f = frames_pb2.Frame(
                frame_id=f"f{i}-{uuid.uuid4().hex[:6]}",
                camera_id=f"cam-{i % 4}",
                product_id="demo",
                sequence=i,
                encoding=frames_pb2.ENCODING_JPEG,
                image=data,
            )
            f.capture_time.GetCurrentTime()
            return f.SerializeToString()

        prod.send(kafka.topic("frames"), key=b"cam-0", value=frame(10**6, jpegs[0])).get(30)
        got = 0
        while got < 1:
            got += sum(len(v) for v in consumer.poll(timeout_ms=500).values())
        lat: list[float] = []
        t_start = time.perf_counter()
        for i, data in enumerate(jpegs):
            prod.send(kafka.topic("frames"), key=f"cam-{i % 4}".encode(), value=frame(i, data))
        prod.flush()
        deadline = time.monotonic() + 600
        while len(lat) < args.frames and time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=500).values():
                for m in msgs:
                    r = results_pb2.InspectionResult.FromString(m.value)
                    lat.append((r.result_time.ToNanoseconds() - r.capture_time.ToNanoseconds()) / 1e9)
        elapsed = time.perf_counter() - t_start
        worker.stop_event.set()
        wt.join(30)
        consumer.close()
        prod.close()
    pipe_fps = len(lat) / elapsed
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "backbone": bb.spec,
        "image_size": bb.image_size,
        "method": args.method,
        "frames": args.frames,
        "max_batch": args.max_batch,
        "bare_scorer_fps": bare_fps,
        "pipeline_fps": pipe_fps,
        "pipeline_over_bare": pipe_fps / bare_fps,
        "latency_p50_s": float(np.percentile(lat, 50)) if lat else None,
        "latency_p99_s": float(np.percentile(lat, 99)) if lat else None,
        "results": len(lat),
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="dinov2-vits14")
    p.add_argument("--method", choices=("cff", "aprilgan", "knn"), default="cff")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the figures here")


def main(args: argparse.Namespace) -> int:
    res = run(args)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0
