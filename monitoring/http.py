"""``/metrics``, ``/healthz`` and ``/readyz`` for every process, on one small HTTP server.

``/healthz`` answers 200 while the process can serve HTTP at all (alive). ``/readyz``
runs the process's readiness checks (broker reachable, head loaded, ...) and answers
200 or 503 with a JSON body naming each check, so an orchestrator's log says *why* a
worker is not taking traffic. GPU gauges are refreshed on every scrape.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from inspection_core.errors import ConfigError
from monitoring import metrics

log = logging.getLogger(__name__)
Check = Callable[[], tuple[bool, str]]
Route = Callable[[str], tuple[int, bytes, str]]  # rest of the path -> (status, body, content type)
ALL_INTERFACES = ("0.0.0.0", "", "::", "[::]")  # wildcard binds: reachable from the network, not only this host


def update_gpu_metrics() -> None:
    """GPU memory (always, via torch) and utilisation (where NVML answers) — only if torch is already in use."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    for i in range(torch.cuda.device_count()):
        dev = f"cuda:{i}"
        metrics.GPU_MEMORY.labels(device=dev).set(torch.cuda.memory_allocated(i))
        try:
            metrics.GPU_UTILIZATION.labels(device=dev).set(torch.cuda.utilization(i) / 100.0)
        except Exception:  # noqa: BLE001 - pynvml missing or NVML refused: memory is still reported
            pass


def broker_check(bootstrap_servers: str, *, cache_s: float = 5.0, timeout_s: float = 1.0) -> Check:
    """Ready when a TCP connection to one bootstrap server opens (cached for ``cache_s``)."""
    servers = [s.strip() for s in bootstrap_servers.split(",") if s.strip()]
    state = {"t": 0.0, "result": (False, "not checked yet")}
    lock = threading.Lock()

    def check() -> tuple[bool, str]:
        with lock:
            if time.monotonic() - state["t"] < cache_s:
                return state["result"]
            result: tuple[bool, str] = (False, f"no bootstrap server of {bootstrap_servers} accepts connections")
            for s in servers:
                host, _, port = s.rpartition(":")
                try:
                    with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
                        result = (True, f"{s} reachable")
                        break
                except (OSError, ValueError):
                    continue
            state.update(t=time.monotonic(), result=result)
            return result

    return check


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes every 15 s are not news
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            update_gpu_metrics()
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(
                200, json.dumps({"status": "alive", "service": self.server.service}).encode(), "application/json"
            )
        elif path == "/readyz":
            ready, report = self.server.readiness()
            body = json.dumps({"ready": ready, "service": self.server.service, "checks": report}).encode()
            self._send(200 if ready else 503, body, "application/json")
        else:
            for prefix, fn in self.server.routes.items():
                if path.startswith(prefix):
                    try:
                        code, body, ctype = fn(unquote(path[len(prefix) :]))
                    except Exception as exc:  # noqa: BLE001 - one bad request must not kill the server thread
                        log.warning("GET %s failed: %s", path[:200], exc)
                        code, body, ctype = 500, b"internal error\n", "text/plain"
                    self._send(code, body, ctype)
                    return
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service = ""
    checks: dict[str, Check] = {}
    routes: dict[str, Route] = {}

    def readiness(self) -> tuple[bool, dict]:
        report, ready = {}, True
        for name, fn in self.checks.items():
            try:
                ok, detail = fn()
            except Exception as exc:  # noqa: BLE001 - a failing check is a not-ready answer, never a 500
                ok, detail = False, f"check failed: {exc}"
            report[name] = {"ok": bool(ok), "detail": detail}
            ready = ready and bool(ok)
        return ready, report


class MetricsServer:
    """One per process; ``cff-inspect run`` shares one among its components (``add_checks``)."""

    def __init__(self, service: str, *, host: str = "0.0.0.0", port: int = 0) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics port must be in 0..65535, got {port}")
        try:
            self._httpd = _Server((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        self._httpd.service = service
        self._httpd.checks = {}
        self._httpd.routes = {}
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        for s in service.split("+"):
            metrics.SERVICE_INFO.labels(service=s).set(1)

    def add_checks(self, **checks: Check) -> MetricsServer:
        self._httpd.checks.update(checks)
        return self

    def add_route(self, prefix: str, fn: Route) -> MetricsServer:
        """Serve ``GET <prefix><rest>`` with ``fn(rest)`` (the worker's evidence archive)."""
        self._httpd.routes[prefix] = fn
        return self

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics, /healthz and /readyz on %s", self.listening)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a server never started
            self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def all_interfaces(self) -> bool:
        return self.host in ALL_INTERFACES

    @property
    def url(self) -> str:
        """Where this host scrapes the server: a wildcard bind is reached on 127.0.0.1 (not what it exposes)."""
        host = "127.0.0.1" if self.all_interfaces else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def listening(self) -> str:
        """The address actually bound, for logs: says so when every interface (the network) can reach it."""
        host = self.host or "0.0.0.0"
        where = f"{f'[{host}]' if ':' in host else host}:{self.port}"
        return f"{where} (all interfaces; local {self.url})" if self.all_interfaces else where


def add_metrics_args(p: argparse.ArgumentParser, service: str) -> None:
    """``--metrics-port`` (the service's default port), ``--metrics-host``, ``--no-metrics``."""
    p.add_argument(
        "--metrics-port",
        type=int,
        default=metrics.DEFAULT_PORTS[service],
        help="serve /metrics, /healthz and /readyz here (0 = a free port; default %(default)s)",
    )
    p.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        help="address for /metrics (default %(default)s)",
    )
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics, /healthz, /readyz")


def start_metrics(
    args: argparse.Namespace, service: str, *, server: MetricsServer | None = None, **checks: Check
) -> MetricsServer | None:
    """The server the options of :func:`add_metrics_args` describe, started (None with ``--no-metrics``);
    ``server``: that one, bound earlier (where its address was needed before its checks existed)."""
    if args.no_metrics:
        return None
    m = server or MetricsServer(service, host=args.metrics_host, port=args.metrics_port)
    m.add_checks(**checks).start()
    print(f"{service}: metrics on {m.listening}: /metrics, /healthz and /readyz", file=sys.stderr, flush=True)
    return m
