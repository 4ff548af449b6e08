"""Generate ``inspection_pb/`` from ``proto/``: ``python proto/generate.py [OUT_ROOT]``.

The generated modules are committed; ``tests/proto/test_generated.py`` fails when
they are stale. Package ``inspection_pb`` avoids the ``proto`` name that the
proto-plus library takes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent


def generate(out_root: Path) -> list[Path]:
    protos = sorted(HERE.glob("inspection_pb/v1/*.proto"))
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for pkg in (out_root / "inspection_pb", out_root / "inspection_pb" / "v1"):
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from proto/ by proto/generate.py; do not edit."""\n')
    return sorted((out_root / "inspection_pb").rglob("*.py*"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent
    for p in generate(out):
        print(p)
