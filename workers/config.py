"""What a worker runs with: its frozen settings and the heads it scores with."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING

from inspection_core.errors import ConfigError
from inspection_core.ids import head_id
from inspection_core.names import MAX_PIXELS, MAX_SIDE
from inspection_pb.v1 import common_pb2

if TYPE_CHECKING:
    from scorer.head import Head

DEVICE_DECODE = ("auto", "always", "never")
BANK_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class WorkerConfig:
    group_id: str = "cff-inspect-workers"
    max_batch: int = 8
    max_wait_ms: int = 50
    max_age_s: float = 60.0  # older frames get STALE instead of being scored
    # Clock skew allowed between a camera and this worker: a frame dated further ahead is BAD_FRAME (else a
    # wrong or hostile clock would never turn STALE).
    max_future_s: float = 300.0
    # Decode bounds a header cannot show: a JPEG's scan count (each scan is a pass over every block; progressive
    # JPEGs have ~10), and the seconds one image may take to decode. max_batch x decode_budget_s is added to the
    # consumer's poll interval, so a batch of slow frames cannot get the worker thrown out of its group.
    max_jpeg_scans: int = 256
    decode_budget_s: float = 2.0
    max_pixels: int = MAX_PIXELS  # decompression-bomb guard
    max_side: int = MAX_SIDE
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    heatmap_in_result: bool = False
    evidence_dir: str | None = None
    evidence_max_bytes: int = 1 << 30
    # Where defect events point for evidence: a base URL (the worker's own HTTP server by default, set by the
    # entry point once it is bound), or None for file:// paths on this host.
    evidence_url: str | None = None
    # JPEG decode with torchvision on the scoring device: "auto" = when the head's backbone is on a GPU
    # (decode and resize then never leave it), "always" (also on the CPU), "never" (PIL).
    device_decode: str = "auto"
    # Memory-bank search dtype: "auto" = bfloat16 when the head's backbone scores in bf16 (a GPU, or a CPU
    # with bf16 units: scores within ~0.2 % of fp32, ~3x faster search, see BENCHMARKS.md), otherwise what
    # the head was saved with (scorer.head.search_dtype).
    bank_dtype: str = "auto"
    publish_timeout_s: float = 30.0  # how long a batch's results may wait for the broker's acknowledgement
    # A dead letter keeps at most this much of the bad record: far below any broker's message limit, and
    # enough to see what was sent.
    dlq_max_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_age_s <= 0:
            raise ConfigError(f"max_age_s must be > 0, got {self.max_age_s}")
        if not 0 <= self.max_future_s <= 86_400:
            raise ConfigError(f"max_future_s must be in 0..86400 seconds, got {self.max_future_s}")
        if not 1 <= self.max_jpeg_scans <= 100_000:
            raise ConfigError(f"max_jpeg_scans must be in 1..100000, got {self.max_jpeg_scans}")
        if not 0 < self.decode_budget_s <= 60:
            raise ConfigError(f"decode_budget_s must be in (0, 60] seconds, got {self.decode_budget_s}")
        if self.max_pixels < 1 or self.max_side < 1:
            raise ConfigError(f"max_pixels and max_side must be >= 1, got {self.max_pixels} and {self.max_side}")
        if self.bank_dtype not in BANK_DTYPES:
            raise ConfigError(f"bank_dtype must be auto, float32, bfloat16 or float16, got {self.bank_dtype!r}")
        if self.device_decode not in DEVICE_DECODE:
            raise ConfigError(f"device_decode must be auto, always or never, got {self.device_decode!r}")
        if not 1024 <= self.dlq_max_bytes <= 8 << 20:
            raise ConfigError(f"dlq_max_bytes must be in 1 KiB..8 MiB, got {self.dlq_max_bytes}")
        if self.evidence_max_bytes < 1 << 20:
            raise ConfigError(f"evidence_max_bytes must be >= 1 MiB, got {self.evidence_max_bytes}")
        if self.evidence_url is not None and not self.evidence_url.startswith(("http://", "https://")):
            raise ConfigError(f"evidence URL {self.evidence_url[:80]!r} must start with http:// or https://")
        if self.publish_timeout_s <= 0:
            raise ConfigError(f"publish_timeout_s must be > 0, got {self.publish_timeout_s}")

    @property
    def max_poll_interval_ms(self) -> int:
        """The consumer's poll interval: the usual 30 s for scoring and publishing, plus a full batch's decode
        budget (a batch of frames that each use it must not cost the worker its partitions)."""
        return int(1000 * (30 + self.max_batch * self.decode_budget_s))


@dataclass(frozen=True)
class WorkerOption:
    """A :class:`WorkerConfig` field as a command-line option: ``max_wait_ms`` is ``--max-wait-ms`` and so the
    variable ``CFF_INSPECT_MAX_WAIT_MS`` (``inspection_core.env.bind_env``). Its default is the field's, so every
    command that offers it (``worker``, ``run``, ``bench pipeline``) has the same one."""

    name: str
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self) -> object:
        """The field's default; None for one made per process (``worker_id``), which the config then makes."""
        f = _FIELDS[self.name]
        return None if f.default is MISSING else f.default

    def add_to(self, p: argparse.ArgumentParser) -> None:
        d = self.default
        if isinstance(d, bool):
            p.add_argument(self.flag, action="store_true", default=d, help=self.help)
            return
        shown = "" if d is None else " (default %(default)s)"
        kind = str if d is None else type(d)
        p.add_argument(self.flag, type=kind, default=d, choices=self.choices, help=self.help + shown)


_FIELDS = {f.name: f for f in fields(WorkerConfig)}

# Every worker option, declared once: its flag, variable and default come from here and WorkerConfig.
WORKER_OPTIONS = (
    WorkerOption("group_id", "consumer group of the workers that share the frames topic"),
    WorkerOption("worker_id", "this worker's name in results, dead letters and logs (default HOST-PID)"),
    WorkerOption("max_batch", "a batch closes at this many frames"),
    WorkerOption("max_wait_ms", "a batch closes this long after its first frame at the latest"),
    WorkerOption("max_age_s", "frames older than this get a STALE result instead of being scored"),
    WorkerOption("max_future_s", "clock skew allowed: frames dated further ahead get BAD_FRAME"),
    WorkerOption("max_jpeg_scans", "JPEGs with more scans (progressive ones have ~10) are refused before decoding"),
    WorkerOption("decode_budget_s", "an image taking longer to decode is stopped and refused"),
    WorkerOption("max_pixels", "frames with more pixels are refused (decompression-bomb guard)"),
    WorkerOption("max_side", "frames with a longer side are refused"),
    WorkerOption("evidence_dir", "archive defect JPEGs and overlays here"),
    WorkerOption(
        "evidence_max_bytes",
        "size cap of the evidence archive; the oldest files go first, counted in "
        "inspection_worker_evidence_deleted_total",
    ),
    WorkerOption(
        "evidence_url",
        "base URL defect events give for evidence (default: this worker's metrics server, "
        "http://HOST:METRICS_PORT/evidence; file:// paths with --no-metrics)",
    ),
    WorkerOption("heatmap_in_result", "attach an 8-bit PNG heatmap to each result"),
    WorkerOption(
        "device_decode", "decode JPEGs with torchvision on the scoring device (auto: when it is a GPU)", DEVICE_DECODE
    ),
    WorkerOption(
        "bank_dtype",
        "memory-bank search dtype (auto: bfloat16 where the backbone scores in bf16, i.e. a GPU or a CPU with "
        "bf16 units; else the head's own)",
        BANK_DTYPES,
    ),
    WorkerOption("publish_timeout_s", "how long a batch's results may wait for the broker's acknowledgement"),
    WorkerOption("dlq_max_bytes", "a dead letter keeps at most this much of the bad record"),
)
_BY_NAME = {o.name: o for o in WORKER_OPTIONS}


def add_worker_args(p: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """The flags of ``names`` (every worker option by default), as :data:`WORKER_OPTIONS` declares them."""
    for name in names if names is not None else _BY_NAME:
        _BY_NAME[name].add_to(p)


def config_from(args: argparse.Namespace, names: Sequence[str] | None = None, **given: object) -> WorkerConfig:
    """The config of the options :func:`add_worker_args` added for ``names``, and the values ``given`` (settings a
    command decides itself); an option left at None keeps the field's default."""
    values = {n: getattr(args, n) for n in (names if names is not None else _BY_NAME)}
    return WorkerConfig(**{n: v for n, v in values.items() if v is not None}, **given)  # type: ignore[arg-type]


@dataclass
class ActiveHead:
    """A head in service and the reference every result it scores carries."""

    head: Head
    ref: common_pb2.HeadRef
    # the version is commissioning (its announcement or manifest says so): every verdict it gives is provisional
    provisional: bool = False


def head_ref(product: str, head: Head, sha256: str = "", version: int | None = None) -> common_pb2.HeadRef:
    v = int(version if version is not None else (head.meta.get("version") or 1))
    return common_pb2.HeadRef(product_id=product, head_id=head_id(product, v), version=v, sha256=sha256)
