"""The cff-inspect console script: real subcommands on a tiny backbone and a synthetic product."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cff_inspect.cli import main
from cff_inspect.demo import make_demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=5, n_good=3, n_bad=3)


def test_eval_writes_report_and_table(demo, tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    rc = main(
        [
            "eval",
            "--data",
            str(demo),
            "--backbone",
            "tiny-vit",
            "--shots",
            "1",
            "2",
            "--seeds",
            "0",
            "--method",
            "knn",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rep = json.loads(out.read_text())
    assert [r["shots"] for r in rep["records"]] == [1, 2]
    assert "| demo_texture | demo_texture | knn | 1 |" in capsys.readouterr().out


def test_options_from_environment(demo, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CFF_INSPECT_BACKBONE", "tiny-vit")
    monkeypatch.setenv("CFF_INSPECT_SHOTS", "1")
    monkeypatch.setenv("CFF_INSPECT_SEEDS", "3")
    out = tmp_path / "r.json"
    assert main(["eval", "--data", str(demo), "--method", "knn", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["backbone"] == "tiny-vit" and rep["records"][0]["seeds"] == [3]


def test_errors_are_one_line_and_exit_2(tmp_path, capsys) -> None:
    assert main(["eval", "--data", str(tmp_path / "nope"), "--backbone", "tiny-vit"]) == 2
    err = capsys.readouterr().err
    assert "nope: not a directory" in err and "Traceback" not in err
    assert main(["eval", "--data", str(tmp_path), "--backbone", "resnet"]) == 2
    assert "unknown backbone spec 'resnet'" in capsys.readouterr().err


def test_heads_fit_inspect_threshold_and_score(demo, tmp_path, capsys) -> None:
    art = tmp_path / "widget-v1.safetensors"
    rc = main(
        [
            "heads",
            "fit",
            "--product",
            "widget.top",
            "--refs",
            str(demo / "train" / "good"),
            "--backbone",
            "tiny-vit",
            "--steps",
            "4",
            "--out",
            str(art),
        ]
    )
    assert rc == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["shots"] == 5 and fit["image_threshold"] > 0
    assert main(["heads", "inspect", str(art)]) == 0
    man = json.loads(capsys.readouterr().out)
    assert man["product"] == "widget.top" and man["version"] == 1 and len(man["reference_sha256"]) == 5
    assert man["sha256"] == fit["sha256"]

    art2 = tmp_path / "widget-v2.safetensors"
    assert main(["heads", "set-threshold", "--head", str(art), "--image-threshold", "0.5", "--out", str(art2)]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sorted((demo / "test" / "scratch").glob("*.png"))[:2]:
        (imgs / p.name).write_bytes(p.read_bytes())
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "scores"
    rc = main(["score", "--head", str(art2), str(imgs), "--out", str(out)])
    assert rc == 1  # one unreadable file; the others are still scored
    bad = json.loads((out / "broken.json").read_text())
    assert bad["status"] == "BAD_IMAGE" and "broken.png" in bad["error"]
    good = json.loads((out / "000.json").read_text())
    assert good["status"] == "OK" and good["image_threshold"] == pytest.approx(0.5)
    assert good["normalized_score"] == pytest.approx(good["image_score"] / 0.5, rel=1e-5)
    assert good["verdict"] == ("DEFECT" if good["image_score"] >= 0.5 else "OK")
    overlay = np.asarray(Image.open(out / "000_overlay.png"))
    assert overlay.shape == (192, 192, 3)
    for r in good["regions"]:
        assert 0 <= r["x_min"] < r["x_max"] <= 192 and 0 <= r["y_min"] < r["y_max"] <= 192


def test_invalid_product_id(demo, capsys) -> None:
    assert (
        main(
            ["heads", "fit", "--product", "Bad Name", "--refs", str(demo / "train" / "good"), "--backbone", "tiny-vit"]
        )
        == 2
    )
    assert "invalid product id 'Bad Name'" in capsys.readouterr().err


def test_pending_subcommands_say_so(capsys) -> None:
    assert main(["bench", "scorer"]) == 2
    assert "issue 6" in capsys.readouterr().err


def test_worker_without_heads_is_refused(capsys) -> None:
    assert main(["worker"]) == 2
    assert "--head PRODUCT=PATH" in capsys.readouterr().err
