"""Start a local Prometheus with the project's rules, scraping given targets (``run --prometheus``, tests).

The project's ``prometheus/prometheus.yml`` is the template: its global settings and rule
files are kept (rule paths made absolute), its scrape jobs replaced by the targets given.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from inspection_core.errors import ConfigError

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "prometheus" / "prometheus.yml"


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


def render_config(jobs: dict[str, list[str]], *, scrape_interval: str = "15s") -> dict:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["global"]["scrape_interval"] = scrape_interval
    cfg["global"]["evaluation_interval"] = scrape_interval
    cfg["rule_files"] = [str((CONFIG.parent / r).resolve()) for r in cfg.get("rule_files", [])]
    cfg["scrape_configs"] = [{"job_name": j, "static_configs": [{"targets": t}]} for j, t in jobs.items()]
    return cfg


class Prometheus:
    """A Prometheus child process on 127.0.0.1 with its own data folder; stopped on exit."""

    def __init__(
        self,
        jobs: dict[str, list[str]],
        data_dir: str | Path,
        *,
        port: int = 9090,
        scrape_interval: str = "15s",
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_prometheus()
        if self.binary is None:
            raise ConfigError("prometheus is not installed (Debian/Ubuntu: apt-get install -y prometheus)")
        self.dir = Path(data_dir)
        self.port = port
        self.jobs = jobs
        self.scrape_interval = scrape_interval
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Prometheus:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.dir / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(render_config(self.jobs, scrape_interval=self.scrape_interval)))
        self._log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={cfg_path}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.dir / "prometheus.log").read_text(errors="replace")[-2000:]
                raise ConfigError(f"prometheus exited with {self.proc.returncode}: {tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise ConfigError(f"prometheus did not become ready on {self.url} within {timeout:.0f}s")

    def api(self, path: str, **params: str) -> dict:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise ConfigError(f"prometheus {path} {params}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
