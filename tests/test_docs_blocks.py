"""The docs' commands are tests: every shell and Python block in README.md, docs/*.md and deploy/README.md is either
run here (or by the test its marker names) as written, or carries a ``<!-- not-run: why -->`` marker.

The one substitution rule, also stated at the top of docs/operator.md: a block runs in a fresh folder holding tiny
generated stand-ins for the relative paths it names (``good_photos/``, ``known_good/``, ``new_images/``), and every
broker address in it (``kafka:9092``, ``localhost:9092``, ``127.0.0.1:9092``, and the default one, through
``CFF_INSPECT_BOOTSTRAP_SERVERS``) is the embedded test broker's; nothing else in the block changes.

Blocks that cannot run here still have each complete ``cff-inspect`` command line parsed by the real CLI parser
(a renamed or removed flag fails), and each Python block compiled.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka_support import poll_topic

from inspection_core.wire import encode
from inspection_pb.v1 import common_pb2, feedback_pb2, results_pb2

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md")
LANGS = ("bash", "sh", "console", "python")
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(not-run|run-by):\s*(.*?)\s*-->$")
ADDRESSES = ("kafka:9092", "localhost:9092", "127.0.0.1:9092")


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository root
    line: int  # the opening fence's line, 1-based
    lang: str
    text: str
    marker: tuple[str, str] | None  # ("not-run", why) or ("run-by", test path)

    @property
    def key(self) -> tuple[str, str]:
        """Where RUNNABLE finds it: its document and first line (stable when text above it moves)."""
        return self.doc, self.text.splitlines()[0].strip()

    def __str__(self) -> str:
        return f"{self.doc}:{self.line} ({self.lang})"


def extract(path: Path) -> list[Block]:
    """Every fenced block of ``path`` with its language (empty if untagged) and the marker just above it."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        assert j < len(lines), f"{path.relative_to(ROOT)}:{i + 1}: a fenced block is never closed"
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mm = MARKER.match(lines[k].strip()) if k >= 0 else None
        out.append(
            Block(
                str(path.relative_to(ROOT)),
                i + 1,
                m.group(1),
                "\n".join(lines[i + 1 : j]) + "\n",
                (mm.group(1), mm.group(2)) if mm else None,
            )
        )
        i = j + 1
    return out


ALL_BLOCKS = [b for p in DOCS for b in extract(p)]
BLOCKS = [b for b in ALL_BLOCKS if b.lang in LANGS]

# The blocks this module runs, each by the test named here.
RUNNABLE = {
    ("docs/line-calibration.md", "cff-inspect feedback cam-a-1042 good --who op-7 --bootstrap-servers kafka:9092"): (
        "test_feedback_block_labels_a_result_on_the_broker"
    ),
    (
        "docs/line-engineer.md",
        "cff-inspect heads fit --product bottle.top --refs good_photos/ --out bottle.top-v1.safetensors"
        "   # offline, no service",
    ): "test_offline_head_block_fits_scores_and_sets_thresholds",
}


def block(key: tuple[str, str]) -> Block:
    (b,) = [b for b in BLOCKS if b.key == key]
    return b


def substitute(text: str, bootstrap: str) -> str:
    """The one rule's text half: every documented broker address becomes the test broker's."""
    for a in ADDRESSES:
        text = text.replace(a, bootstrap)
    return text


def commands(b: Block) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments and ``$`` prompts (console) dropped."""
    text = b.text.replace("\\\n", " ")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if b.lang == "console":
        lines = [ln[2:] for ln in lines if ln.startswith("$ ")]
    return [ln for ln in lines if not ln.lstrip().startswith("#")]


def run_block(b: Block, cwd: Path, bootstrap: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``b`` run as written by bash (stop at the first failing command) in ``cwd``, under the one rule."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    text = b.text
    if bootstrap is not None:
        env["CFF_INSPECT_BOOTSTRAP_SERVERS"] = bootstrap
        text = substitute(text, bootstrap)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", text], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# --- every block is accounted for ---------------------------------------------------------------------------------


def test_blocks_are_found_in_every_document() -> None:
    assert {b.doc for b in BLOCKS} >= {"README.md", "docs/line-engineer.md", "deploy/README.md"}
    assert len(BLOCKS) >= 15


@pytest.mark.parametrize("b", BLOCKS, ids=str)
def test_every_block_is_run_or_says_why_not(b: Block) -> None:
    if b.key in RUNNABLE:
        assert b.marker is None, f"{b} is run by {RUNNABLE[b.key]} here, yet marked {b.marker}"
        assert callable(globals().get(RUNNABLE[b.key])), f"{b}: no test {RUNNABLE[b.key]} in this module"
        return
    assert b.marker is not None, (
        f"{b} is neither run by this module (RUNNABLE) nor marked; put <!-- not-run: the reason --> (or "
        "<!-- run-by: tests/the_test.py -->) on the line before it"
    )
    kind, what = b.marker
    if kind == "not-run":
        assert len(what.split()) >= 3, f"{b}: a not-run marker needs its reason, got {what!r}"
    else:
        test = ROOT / what
        assert test.is_file() and test.suffix == ".py", f"{b}: run-by names no test file: {what!r}"
        assert Path(b.doc).name in test.read_text(), f"{b}: {what} never reads {b.doc}, so it cannot run this block"


def test_runnable_set_names_existing_blocks() -> None:
    keys = [b.key for b in BLOCKS]
    for key in RUNNABLE:
        assert keys.count(key) == 1, f"RUNNABLE names {key}, which is {keys.count(key)} blocks in the docs"


def test_untagged_blocks_are_not_commands() -> None:
    """A command block cannot dodge this module by losing its language tag."""
    for b in ALL_BLOCKS:
        if b.lang not in LANGS:
            first = b.text.lstrip().split("\n", 1)[0]
            assert not re.match(r"(\$ |cff-inspect |make |pip |docker |kubectl |python )", first), f"{b}: tag it"


# --- what cannot run here is still checked ------------------------------------------------------------------------


def cli_lines() -> list[tuple[Block, str]]:
    """Every complete ``cff-inspect`` command of every block (synopses with ``[...]`` or ``a|b`` left out)."""
    out = []
    for b in BLOCKS:
        if b.lang == "python":
            continue
        for cmd in commands(b):
            argv = shlex.split(cmd, comments=True)
            if argv[:1] == ["cff-inspect"] and not any(c in cmd.split("#")[0] for c in "[|"):
                out.append((b, cmd))
    return out


def test_every_documented_cli_command_parses() -> None:
    from cff_inspect.cli import build_parser

    parser = build_parser()
    lines = cli_lines()
    assert len(lines) >= 25
    for b, cmd in lines:
        argv = shlex.split(cmd, comments=True)[1:]
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{b}: `{cmd.strip()}` is refused by the CLI (exit {e.code})")
        assert callable(args.func), f"{b}: `{cmd.strip()}` names no command"


@pytest.mark.parametrize("b", [b for b in BLOCKS if b.lang == "python"], ids=str)
def test_python_blocks_compile(b: Block) -> None:
    compile(b.text, str(b), "exec")


def test_feedback_json_example_is_a_feedback_record() -> None:
    """The label record as the line-calibration guide shows it parses as ``inspection.v1.Feedback``."""
    from google.protobuf import json_format

    text = (ROOT / "docs" / "line-calibration.md").read_text()
    example = re.search(r"```json\n(\{\"frameId\":\"cam-a-1042\",[^`]*\"label\":[^`]*)```", text, re.S)
    assert example, "the Feedback JSON example is gone from docs/line-calibration.md"
    fb = json_format.Parse(example.group(1), feedback_pb2.Feedback())
    assert (fb.label, fb.who, fb.head.version, fb.frame_ref.offset) == (feedback_pb2.LABEL_GOOD, "op-7", 2, 18231)


# --- the blocks run here --------------------------------------------------------------------------------------------

RUN = pytest.mark.integration


@RUN
def test_feedback_block_labels_a_result_on_the_broker(start_broker, tmp_path) -> None:
    key = next(k for k, t in RUNNABLE.items() if t == "test_feedback_block_labels_a_result_on_the_broker")
    kafka = start_broker(partitions=2, topic_prefix="inspection.")  # the documented (default) prefix
    result = results_pb2.InspectionResult(
        frame_id="cam-a-1042", product_id="widget", status=results_pb2.STATUS_OK, verdict=results_pb2.VERDICT_DEFECT,
        head=common_pb2.HeadRef(product_id="widget", head_id="widget-v2", version=2),
        frame_ref=common_pb2.FrameRef(topic="inspection.frames", partition=1, offset=18231),
    )  # fmt: skip
    value, headers = encode(result)
    producer = kafka.producer()
    try:
        producer.send(kafka.topic("results"), key=b"cam-a", value=value, headers=headers).get(30)
    finally:
        producer.close()

    proc = run_block(block(key), tmp_path, kafka.bootstrap_servers, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    recs = poll_topic(kafka, "feedback", until=lambda r: len(r) >= 2, timeout=30)
    labels = [feedback_pb2.Feedback.FromString(r.value) for r in recs]
    assert [(f.frame_id, f.label, f.product_id) for f in labels] == [
        ("cam-a-1042", feedback_pb2.LABEL_GOOD, "widget"),  # product read from the frame's result
        ("cam-a-1042", feedback_pb2.LABEL_DEFECT, "widget"),
    ]
    good, defect = labels
    assert (good.who, good.head.version, good.frame_ref.offset) == ("op-7", 2, 18231)  # copied from the result
    assert not defect.HasField("head")  # --product: no lookup, so no head to copy
    assert all(r.key == b"widget" for r in recs)


@RUN
def test_offline_head_block_fits_scores_and_sets_thresholds(tmp_path) -> None:
    from scorer.demo import make_demo_dataset

    key = next(k for k, t in RUNNABLE.items() if t == "test_offline_head_block_fits_scores_and_sets_thresholds")
    cat = make_demo_dataset(tmp_path / "data", n_train=2, n_good=2, n_bad=1)
    shutil.copytree(cat / "train" / "good", tmp_path / "good_photos")
    shutil.copytree(cat / "test" / "good", tmp_path / "known_good")
    (tmp_path / "new_images").mkdir()
    for p in [*sorted((cat / "test" / "good").glob("*.png"))[:1], *sorted((cat / "test" / "scratch").glob("*.png"))]:
        shutil.copy(p, tmp_path / "new_images" / f"{p.parent.name}-{p.name}")

    proc = run_block(block(key), tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert len(list((tmp_path / "results").glob("*.json"))) == 2  # one per new image
    manifest = json.loads(proc.stdout[proc.stdout.rindex("\n{\n") + 1 :])  # the last command's output
    assert (manifest["product"], manifest["version"], manifest["shots"]) == ("bottle.top", 3, 2)
    assert manifest["image_threshold"] != 0.42  # the last set-threshold, from known-good frames, won
