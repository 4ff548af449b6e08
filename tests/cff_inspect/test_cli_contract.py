"""The CLI keeps its word: no option is accepted and then dropped, destructive calls are explicit, and bad values
are one-line errors with exit 2 (usage) — before anything runs."""

from __future__ import annotations

import pytest

from cff_inspect.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "--image-size", "224"],  # a worker's input size is its heads'
        ["score", "--head", "h.safetensors", "--image-size", "224", "x.png"],
        ["heads", "rollback", "--product", "widget", "--version", "3"],  # rollback always goes to the previous
        ["heads", "delete", "--product", "widget"],  # deleting needs a version: never the active one by default
    ],
)
def test_options_that_would_be_ignored_or_surprising_are_refused(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "required" in err


def test_remote_fit_refuses_local_backbone_options(tmp_path, capsys) -> None:
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(img)
    rc = main(["heads", "fit", "--product", "widget", "--refs", str(img), "--device", "cuda", "--threads", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--device, --threads: no backbone runs here" in err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ingest", "--camera", "c=w@/tmp,fps=abc"], "--camera c: fps must be a number, got 'abc'"),
        (["ingest", "--camera", "c=w@/tmp,fps=0"], "camera c: fps must be a number in (0, 1000], got 0.0"),
        (["heads", "delete", "--product", "widget", "--version", "0"], "--version must be >= 1, got 0"),
        (["ingest", "--camera", "c=w@/tmp", "--topic-setting", "frames.partitions=0"], "partitions must be >= 1"),
    ],
)
def test_bad_values_are_one_line_errors(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
