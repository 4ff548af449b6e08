"""Generate ``inspection_pb/`` from ``proto/``: ``python proto/generate.py [OUT_ROOT]``.

The generated modules and the descriptor set (``inspection_pb/v1/inspection.binpb``) are
committed; ``tests/proto/test_generated.py`` fails when they are stale. Package ``inspection_pb``
avoids the ``proto`` name that the proto-plus library takes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
# Every message and its imports (google/protobuf/timestamp) in one FileDescriptorSet, for consumers in other
# languages and for tools (grpcurl, kcat, schema registries) that take descriptors rather than .proto files.
DESCRIPTOR_SET = "inspection.binpb"


def generate(out_root: Path) -> list[Path]:
    protos = sorted(HERE.glob("inspection_pb/v1/*.proto"))
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    desc = out_root / "inspection_pb" / "v1" / DESCRIPTOR_SET
    desc.parent.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", f"--descriptor_set_out={desc}", "--include_imports",
            "--include_source_info", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for pkg in (out_root / "inspection_pb", out_root / "inspection_pb" / "v1"):
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from proto/ by proto/generate.py; do not edit."""\n')
    return sorted([*(out_root / "inspection_pb").rglob("*.py*"), desc])


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent
    for p in generate(out):
        print(p)
