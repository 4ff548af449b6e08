"""The headline numbers in README.md and BENCHMARKS.md are the ones the stored summary generates, and every
benchmark writes the common result format."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import headline, report


@pytest.mark.parametrize("doc", headline.DOCS, ids=lambda p: p.name)
def test_the_headline_block_is_what_the_summary_generates(doc) -> None:
    text = doc.read_text()
    block = headline.render(json.loads(headline.SUMMARY.read_text()))
    assert headline.replace_block(text, block, doc.name) == text, "stale: run python -m benchmarks.headline"


def test_check_fails_on_a_hand_edited_number(tmp_path, monkeypatch) -> None:
    doc = tmp_path / "DOC.md"
    summary = json.loads(headline.SUMMARY.read_text())
    doc.write_text("intro\n" + headline.render(summary) + "\nafter\n")
    monkeypatch.setattr(headline, "DOCS", (doc,))
    assert headline.main(["--check"]) == 0
    doc.write_text(doc.read_text().replace("84.3 ± 4.2", "94.3 ± 4.2"))
    assert headline.main(["--check"]) == 1
    assert headline.main([]) == 0  # rewrites the block, keeps what is around it
    assert doc.read_text().startswith("intro\n") and doc.read_text().endswith("\nafter\n")
    assert headline.main(["--check"]) == 0


def test_a_file_without_markers_is_named() -> None:
    with pytest.raises(SystemExit, match="NOTES.md: no headline markers"):
        headline.replace_block("no block here", "x", "NOTES.md")


def test_a_run_is_appended_as_one_line_in_the_common_format(tmp_path) -> None:
    out = tmp_path / "runs" / "bench.jsonl"
    args = argparse.Namespace(func=print, out=str(out), frames=8, backbone="tiny-vit")
    for fps in (1.0, 2.0):
        rec = report.record("bench.x", report.machine_facts(), report.params_of(args), {"fps": fps})
        report.write(rec, out)
    first, second = report.read(out)
    assert {"name", "created", "machine", "params", "metrics"} <= first.keys()
    assert {"cpu", "nproc", "torch", "torch_threads"} <= first["machine"].keys()
    assert first["params"] == {"frames": 8, "backbone": "tiny-vit"}  # no dispatch function, no output path
    assert [first["metrics"]["fps"], second["metrics"]["fps"]] == [1.0, 2.0]
