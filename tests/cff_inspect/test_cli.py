"""The cff-inspect console script: real subcommands on a tiny backbone and a synthetic product."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cff_inspect.cli import main
from cff_inspect.commands import output_stem, score_paths
from scorer.artifact import load_head
from scorer.demo import make_demo_dataset


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
    rep = json.loads(out.read_text(), parse_constant=_refuse)  # strict JSON
    assert [r["shots"] for r in rep["records"]] == [1, 2]
    assert "| demo_texture | demo_texture | knn | 1 |" in capsys.readouterr().out
    assert all(len(p["image_scores"]) == 6 for r in rep["records"] for p in r["per_seed"])
    assert rep["plots"] == ["r_demo_texture_curves.png", "r_demo_texture_k_vs_metric.png"]
    for name in rep["plots"]:
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        assert Image.open(png).size[0] > 800


def _refuse(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_plots(demo, tmp_path, monkeypatch, how: str) -> None:
    argv = ["eval", "--data", str(demo), "--backbone", "tiny-vit", "--shots", "1", "--seeds", "0"]
    argv += ["--method", "knn-mean", "--out", str(tmp_path / "r.json")]
    if how == "flag":
        argv.append("--no-plots")
    else:
        monkeypatch.setenv("CFF_INSPECT_NO_PLOTS", "1")
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert "plots" not in json.loads((tmp_path / "r.json").read_text())


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
    bad = json.loads((out / f"{output_stem(imgs / 'broken.png')}.json").read_text())
    assert bad["status"] == "BAD_IMAGE" and "broken.png" in bad["error"]
    good = json.loads((out / f"{output_stem(imgs / '000.png')}.json").read_text())
    assert good["status"] == "OK" and good["image_threshold"] == pytest.approx(0.5)
    assert good["normalized_score"] == pytest.approx(good["image_score"] / 0.5, rel=1e-5)
    assert good["verdict"] == ("DEFECT" if good["image_score"] >= 0.5 else "OK")
    overlay = np.asarray(Image.open(good["overlay"]))
    assert overlay.shape == (192, 192, 3)
    for r in good["regions"]:
        assert 0 <= r["x_min"] < r["x_max"] <= 192 and 0 <= r["y_min"] < r["y_max"] <= 192


def test_score_outputs_of_same_named_inputs_do_not_collide(demo, tiny_vit, references, tmp_path) -> None:
    from scorer.head import knn_head

    head = knn_head(tiny_vit, tiny_vit.embed(references)).with_thresholds(image=0.5, pixel=0.5)
    src = sorted((demo / "test" / "scratch").glob("*.png"))
    paths = []
    for folder, img in (("a", src[0]), ("b", src[1])):  # two different images, both called img.png
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "img.png")
        paths[-1].write_bytes(img.read_bytes())
    out = tmp_path / "out"
    recs = score_paths(head, paths, out)
    assert len({r["overlay"] for r in recs}) == 2
    assert len(list(out.glob("*.json"))) == 2 and len(list(out.glob("*_overlay.png"))) == 2
    for p, r in zip(paths, recs, strict=True):
        assert json.loads((out / f"{output_stem(p)}.json").read_text())["image"] == str(p)
        assert r["overlay"] == str(out / f"{output_stem(p)}_overlay.png") and output_stem(p).startswith("img-")
    assert output_stem(paths[0]) == output_stem(tmp_path / "a" / ".." / "a" / "img.png")  # stable per file
    a, b = (np.asarray(Image.open(r["overlay"])) for r in recs)
    assert not np.array_equal(a, b)  # neither overwrote the other


def test_invalid_product_id(demo, capsys) -> None:
    assert (
        main(
            ["heads", "fit", "--product", "Bad Name", "--refs", str(demo / "train" / "good"), "--backbone", "tiny-vit"]
        )
        == 2
    )
    assert "invalid product id 'Bad Name'" in capsys.readouterr().err


def test_bench_scorer_reports_side_by_side_ratios(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "scorer", "--backbone", "tiny-vit", "--device", "cpu", "--batch-sizes", "1", "4",
            "--shots", "1", "--precision", "fp32", "bf16", "--repeats", "2", "--reference-images", "2",
            "--frame-size", "48", "64", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rep = json.loads(out.read_text())
    (bb,) = rep["backbones"]
    assert bb["model_gflops_per_image"] > 0
    grid = {(p, b) for p in ("fp32", "bf16") for b in (1, 4)}
    assert {(r["precision"], r["batch"]) for r in bb["backbone_rows"]} == grid
    assert {h["method"] for h in bb["heads"]} == {"knn", "cff"}
    for h in bb["heads"]:
        assert h["speedup_vs_reference"] == pytest.approx(h["best"]["images_per_s"] / h["reference_images_per_s"])
        assert all(r["latency_p99_ms"] >= r["latency_p50_ms"] > 0 for r in h["rows"])
    assert "speed-up x" in capsys.readouterr().out
    assert main(["bench", "scorer", "--backbone", "tiny-vit", "--precision", "int4"]) == 2


def test_worker_without_heads_is_refused(capsys) -> None:
    assert main(["worker"]) == 2
    assert "--head PRODUCT=PATH" in capsys.readouterr().err


@pytest.mark.integration
def test_bench_pipeline_sweeps_batch_and_wait(tmp_path) -> None:
    out = tmp_path / "p.json"
    argv = ["bench", "pipeline", "--backbone", "tiny-vit", "--method", "knn", "--frames", "12",
            "--sweep-batch", "1", "4", "--sweep-wait", "5", "--offered-fps", "40", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rep = json.loads(out.read_text())
    assert [(r["max_batch"], r["max_wait_ms"]) for r in rep["curve"]] == [(1, 5), (4, 5)]
    assert all(r["results"] == 12 for r in rep["curve"])  # every frame scored once in each configuration
    assert rep["curve"][0]["mean_batch"] == pytest.approx(1.0)
    m = rep["metrics"]
    assert m["pipeline_over_bare"] == pytest.approx(m["pipeline_fps"] / m["bare_scorer_fps"])
    assert all(r["latency_p99_s"] >= r["latency_p50_s"] > 0 for r in rep["curve"])


def test_set_threshold_from_known_good_images(demo, tmp_path, capsys) -> None:
    # one reference: the fit's threshold rests on views of that image alone; known-good frames of the line fix it
    ref = tmp_path / "ref"
    ref.mkdir()
    first = sorted((demo / "train" / "good").glob("*.png"))[0]
    (ref / first.name).write_bytes(first.read_bytes())
    art = tmp_path / "gear-v1.safetensors"
    fit = ["heads", "fit", "--product", "gear", "--refs", str(ref), "--backbone", "tiny-vit", "--out", str(art)]
    assert main(fit) == 0
    capsys.readouterr()
    good = demo / "test" / "good"
    art2 = tmp_path / "gear-v2.safetensors"
    assert main(["heads", "set-threshold", "--head", str(art), "--good", str(good), "--out", str(art2)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["version"] == 2
    summary = json.loads(err.strip().splitlines()[-1])
    head = load_head(art2)
    # the fit's own rule on these scores: never below the highest good score, so none of them is flagged
    assert head.image_threshold == pytest.approx(summary["image_threshold"])
    assert head.image_threshold >= summary["good_score_max"]
    assert head.meta["threshold_from_good"]["n"] == summary["good_images"] == len(list(good.glob("*.png")))
    assert head.pixel_threshold == pytest.approx(load_head(art).pixel_threshold)  # only the image cut moves
    # bad input names the problem, and nothing is written
    art3 = tmp_path / "gear-v3.safetensors"
    for argv, msg in (
        (["--good", str(good), "--image-threshold", "0.3"], "give it or --image-threshold"),
        (["--good", str(sorted(good.glob("*.png"))[0])], "at least 2 known-good images"),
        (["--good", str(tmp_path / "nowhere")], "no such file or folder"),
        (["--image-threshold", "0.3", "--image-far", "0.05"], "apply with --good"),
        (["--image-threshold", "0.3", "--threads", "1"], "--threads: no backbone runs here"),
    ):
        assert main(["heads", "set-threshold", "--head", str(art), "--out", str(art3), *argv]) == 2, argv
        assert msg in capsys.readouterr().err, argv
        assert not art3.exists()
