"""Shared fixtures: a tiny MVTec-layout dataset builder, the tiny-vit backbone,
small reference images and a (session-cached) fitted head pair; for the integration
tests a fresh embedded broker, worker processes and their graceful stop.

Fixtures that return heads are shared between tests: never mutate them, derive
variants with ``dataclasses.replace`` / ``Head.with_thresholds`` instead.
"""

from __future__ import annotations

import logging
import signal
import struct
import subprocess
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspection_core.broker import EmbeddedBroker
from inspection_core.kafka import KafkaConfig, ensure_topics
from scorer.backbones import Backbone, load_backbone

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """A CLI run in-process (``inspection_core.logs.configure``) replaces the root handlers with one on this test's
    captured stderr, which pytest closes afterwards: later tests would log "I/O operation on closed file"."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for h in list(root.handlers):  # pytest's own capture handlers are subclasses: it manages those itself
        if h not in before and type(h) is logging.StreamHandler:
            root.removeHandler(h)
    root.setLevel(level)


def _write_image(path: Path, rng: np.random.Generator, size_hw: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size_hw, 3), dtype=np.uint8)).save(path)


def _write_mask(path: Path, size_hw: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(size_hw, dtype=np.uint8)
    h, w = size_hw
    m[h // 4 : h // 2, w // 4 : w // 2] = 255
    Image.fromarray(m).save(path)


MakeCategory = Callable[..., Path]


@pytest.fixture
def make_category() -> MakeCategory:
    """``make_category(root, name, n_train=4, n_good=2, defects={"scratch": 2}, masks=True)`` -> category dir.

    Files follow MVTec AD: ``train/good/000.png``, ``test/<defect>/000.png`` and
    ``ground_truth/<defect>/000_mask.png``.
    """

    def build(
        root: Path,
        name: str = "widget",
        *,
        n_train: int = 4,
        n_good: int = 2,
        defects: Mapping[str, int] | None = None,
        masks: bool = True,
        size_hw: tuple[int, int] = (24, 32),
        seed: int = 0,
    ) -> Path:
        rng = np.random.default_rng(seed)
        cat = Path(root) / name
        (cat / "train" / "good").mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            _write_image(cat / "train" / "good" / f"{i:03d}.png", rng, size_hw)
        (cat / "test" / "good").mkdir(parents=True, exist_ok=True)
        for i in range(n_good):
            _write_image(cat / "test" / "good" / f"{i:03d}.png", rng, size_hw)
        for defect, n in (defects if defects is not None else {"scratch": 2}).items():
            for i in range(n):
                _write_image(cat / "test" / defect / f"{i:03d}.png", rng, size_hw)
                if masks:
                    _write_mask(cat / "ground_truth" / defect / f"{i:03d}_mask.png", size_hw)
        return cat

    return build


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run torch on one thread for the test, then restore the previous count.

    The tiny models gain nothing from intra-op threads, and when another process
    keeps the cores busy two spinning OpenMP threads make them 10-20x slower.
    Opt in per module with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_vit() -> Backbone:
    return load_backbone("tiny-vit")


@pytest.fixture(scope="session")
def tiny_vit_seed1() -> Backbone:
    return load_backbone("tiny-vit", seed=1)


def make_references(k: int, size_hw: tuple[int, int] = (64, 64), seed: int = 0) -> list[np.ndarray]:
    """Smooth gradient images with mild noise: look alike, so held-out scores are meaningful."""
    rng = np.random.default_rng(seed)
    h, w = size_hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (h + w) * 200], -1) + 20
    return [np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8) for _ in range(k)]


@pytest.fixture(scope="session")
def make_refs() -> Callable[..., list[np.ndarray]]:
    """The :func:`make_references` factory, for tests that need other references."""
    return make_references


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` (8-bit gray), with one row of data.

    A decompression bomb in miniature: only a decoder that trusts the header allocates the full image.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\0" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def png_bomb() -> Callable[[int, int], bytes]:
    """The :func:`png_claiming` factory: ``png_bomb(30000, 30000)`` -> bytes."""
    return png_claiming


@pytest.fixture(scope="session")
def references() -> list[np.ndarray]:
    return make_references(3)


@pytest.fixture(scope="session")
def fit_options():
    from scorer.fit import FitOptions

    # guard off: these fixtures test the calibrated head's mechanics; tests/scorer/test_guard.py tests the guard
    return FitOptions(steps_stage1=5, steps_stage2=3, n_synthetic=4, n_validation=4, guard=False)


@pytest.fixture(scope="session")
def fitted_heads(tiny_vit, references, fit_options) -> dict:
    """``{"aprilgan": Head, "cff": Head}`` fitted once on the three references (do not mutate)."""
    from scorer.fit import fit_heads_from_features

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see single_thread
    try:
        return fit_heads_from_features(tiny_vit, references, tiny_vit.embed(references), options=fit_options, seed=0)
    finally:
        torch.set_num_threads(before)


def _stop_gracefully(proc: subprocess.Popen, timeout: float = 30) -> bytes | str:
    """SIGTERM a service process, wait for it to drain, SIGKILL it if it does not; returns its output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="session")
def stop_gracefully() -> Callable[..., bytes | str]:
    """The :func:`_stop_gracefully` helper, for tests that run services as subprocesses."""
    return _stop_gracefully


StartBroker = Callable[..., KafkaConfig]


@pytest.fixture
def start_broker() -> Iterator[StartBroker]:
    """``start_broker(partitions=2, topic_prefix=None)`` -> the KafkaConfig of a new embedded broker with the
    system's topics (a random topic prefix unless given); every broker started is stopped after the test."""
    brokers: list[EmbeddedBroker] = []

    def start(partitions: int = 2, topic_prefix: str | None = None) -> KafkaConfig:
        b = EmbeddedBroker().start()
        brokers.append(b)
        prefix = topic_prefix or f"t{uuid.uuid4().hex[:6]}."
        cfg = KafkaConfig(bootstrap_servers=b.bootstrap, topic_prefix=prefix, partitions=partitions)
        ensure_topics(cfg)
        return cfg

    try:
        yield start
    finally:
        for b in brokers:
            b.stop()


StartWorker = Callable[..., subprocess.Popen]


@pytest.fixture
def start_worker() -> Iterator[StartWorker]:
    """``start_worker(kafka, *options)`` -> a ``cff-inspect worker`` process on ``kafka`` (CPU, one thread, no
    metrics port clash), output piped; any still running after the test is stopped gracefully. Without
    ``--heads-key-file`` (or ``--no-follow-heads``) it gets ``--allow-unsigned-heads``: a worker refuses to follow
    unsigned announcements otherwise (tests/workers/test_head_trust.py tests that)."""
    procs: list[subprocess.Popen] = []

    def start(kafka: KafkaConfig, *options: str) -> subprocess.Popen:
        if not {"--heads-key-file", "--no-follow-heads", "--allow-unsigned-heads"} & set(options):
            options = (*options, "--allow-unsigned-heads")
        cmd = [
            sys.executable,
            "-m",
            "cff_inspect",
            "worker",
            "--metrics-port",
            "0",
            "--bootstrap-servers",
            kafka.bootstrap_servers,
            "--topic-prefix",
            kafka.topic_prefix,
            "--partitions",
            str(kafka.partitions),
            "--device",
            "cpu",
            "--threads",
            "1",
            *options,
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:  # signal all first: they drain in parallel
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            _stop_gracefully(proc)
