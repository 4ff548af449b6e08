"""The layering contract (pyproject ``[tool.importlinter]``) holds, and breaks when a lower layer imports a
higher one; the processes that need no model start without torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("inspection_core", "inspection_pb", "scorer", "monitoring", "calibrator", "ingest", "workers", "benchmarks",
            "cff_inspect")  # fmt: skip


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    return subprocess.run(
        [*cmd, "--no-cache"], cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root)}, timeout=120
    )


def test_the_layering_contract_holds() -> None:
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """The packages' Python files and pyproject.toml in a temporary folder, to break on purpose."""
    for pkg in PACKAGES:
        for src in (ROOT / pkg).rglob("*.py"):
            dst = tmp_path / src.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(src.read_text())
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("module", "bad_import", "contract"),
    [
        ("inspection_core/ids.py", "import scorer.head", "layers"),  # the base importing the scorer
        ("scorer/data.py", "from workers import worker", "layers"),  # the scorer importing a service
        ("workers/codec.py", "import cff_inspect.cli", "layers"),  # a service importing the CLI
        ("benchmarks/pipeline.py", "from cff_inspect import run", "layers"),  # benchmarks importing the CLI
        ("calibrator/store.py", "import workers.heads", "layers"),  # the calibrator importing its client's user
        ("scorer/images.py", "import kafka", "knows nothing of Kafka"),
        ("monitoring/http.py", "import torch", "never load torch"),
        ("workers/config.py", "import workers.worker", "no import cycles"),
    ],
)
def test_an_import_against_the_layers_breaks_the_contract(
    tree_copy: Path, module: str, bad_import: str, contract: str
) -> None:
    path = tree_copy / module
    path.write_text(path.read_text() + f"\n{bad_import}  # noqa: E402, F401\n")
    r = lint_imports(tree_copy)
    assert r.returncode != 0, r.stdout
    broken = [line for line in r.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), r.stdout


@pytest.mark.parametrize(
    "code",
    [
        "import inspection_core.kafka, inspection_core.broker, inspection_core.env",
        "import scorer.errors, scorer.images, scorer.options",
        "import ingest.cameras, ingest.entry",
        "import monitoring.http, monitoring.prom, monitoring.dashboards",
        "import workers.entry, calibrator.entry",
        "from cff_inspect.cli import build_parser; build_parser()",
    ],
)
def test_these_imports_do_not_load_torch(code: str) -> None:
    check = f"{code}\nimport sys\nassert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    r = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_help_does_not_import_torch() -> None:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cff_inspect", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "usage: cff-inspect" in r.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "cff_inspect.cli" in imported and "torch" not in imported
    assert "matplotlib" not in imported  # plots import it when they draw


def test_evaluation_loads_matplotlib_only_to_plot() -> None:
    code = "import sys, scorer.evaluate, scorer.visualize, cff_inspect.commands\nassert 'matplotlib' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
