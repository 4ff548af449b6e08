"""Progress on stderr: tqdm bars with totals and ETA on a terminal, throttled plain lines elsewhere."""

from __future__ import annotations

import io
import re

import pytest

from cff_inspect.cli import main
from cff_inspect.progress import ProgressRenderer
from scorer.demo import make_demo_dataset
from scorer.progress import ProgressEvent


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_terminal_gets_a_bar_with_total_rate_and_eta() -> None:
    out = io.StringIO()
    with ProgressRenderer(out, tty=True) as draw:
        for step in range(0, 51, 10):
            draw(ProgressEvent("stage1", step, 50, loss=0.5))
    text = out.getvalue()
    assert "stage1" in text and "50/50" in text and "100%" in text, text
    assert "loss=0.5000" in text  # the loss rides along as the bar's postfix
    assert re.search(r"<\d\d:\d\d", text), text  # tqdm's remaining-time field


def test_plain_lines_are_throttled_and_end_with_the_final_count() -> None:
    out, clock = io.StringIO(), _Clock()
    draw = ProgressRenderer(out, tty=False, interval=2.0, clock=clock)
    for step in range(101):  # 100 steps over 10 s: one line per 2 s, plus the last
        clock.t = step * 0.1
        draw(ProgressEvent("stage2", step, 100))
    lines = out.getvalue().splitlines()
    assert 5 <= len(lines) <= 6, lines
    assert lines[-1] == "stage2 100/100 100% elapsed 0:10 ETA 0:00"
    assert re.fullmatch(r"stage2 20/100  20% elapsed 0:02 ETA 0:08", lines[0]), lines


def test_transient_stages_leave_no_line_when_short() -> None:
    out, clock = io.StringIO(), _Clock()
    draw = ProgressRenderer(out, tty=False, interval=2.0, keep=("runs",), clock=clock)
    draw(ProgressEvent("runs", 0, 2))
    draw(ProgressEvent("held-out", 0, 4))
    clock.t = 0.5
    draw(ProgressEvent("held-out", 4, 4))  # a fit inside an eval: short, so silent
    draw(ProgressEvent("runs", 1, 2, detail="demo knn K=1 seed=0"))
    draw(ProgressEvent("runs", 2, 2, detail="demo knn K=1 seed=1"))
    assert out.getvalue().splitlines() == ["runs 2/2 100% elapsed 0:00 ETA 0:00 (demo knn K=1 seed=1)"]


def test_messages_without_a_count_are_written_once() -> None:
    out = io.StringIO()
    draw = ProgressRenderer(out, tty=False)
    draw(ProgressEvent("selected", 0, 0, detail="knn: cff does not beat it"))
    assert out.getvalue() == "selected: knn: cff does not beat it\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=3, n_good=2, n_bad=2)


def _fit(demo, tmp_path, *extra: str) -> None:
    argv = ["heads", "fit", "--product", "gear", "--refs", str(demo / "train" / "good"), "--backbone", "tiny-vit",
            "--method", "cff", "--steps", "6", "--option", "guard=false",
            "--out", str(tmp_path / "h.safetensors")]  # fmt: skip
    assert main(argv + list(extra)) == 0


def test_an_offline_fit_shows_every_stage_with_its_total(demo, tmp_path, capsys) -> None:
    _fit(demo, tmp_path)
    err = capsys.readouterr().err
    for stage, total in (("features", 3), ("stage1", 6), ("stage2", 3), ("held-out", 16), ("thresholds", 1)):
        assert re.search(rf"^{stage} {total}/{total} 100% elapsed \d+:\d\d ETA 0:00", err, re.M), (stage, err)
    assert re.search(r"^stage1 6/6 100% .* loss \d+\.\d{4}$", err, re.M), err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_progress_silences_it(demo, tmp_path, capsys, monkeypatch, how: str) -> None:
    if how == "env":
        monkeypatch.setenv("CFF_INSPECT_NO_PROGRESS", "1")
        _fit(demo, tmp_path)
    else:
        _fit(demo, tmp_path, "--no-progress")
    err = capsys.readouterr().err
    assert "100%" not in err and "stage1" not in err, err


def test_eval_counts_its_runs(demo, tmp_path, capsys) -> None:
    argv = ["eval", "--data", str(demo), "--backbone", "tiny-vit", "--shots", "1", "2", "--seeds", "0",
            "--method", "knn", "--no-plots", "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert re.search(r"^features 4/4 100%", err, re.M), err  # the test images
    assert re.search(r"^runs 2/2 100% elapsed \S+ ETA 0:00 \(demo_texture knn K=2 seed=0\)$", err, re.M), err
