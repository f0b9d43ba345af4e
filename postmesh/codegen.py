"""Generates the Python protobuf and gRPC modules (with mypy stubs) from proto/ into postmesh/.

`make gen` runs it; the output is never committed, so it cannot drift from the protos.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
BIN_DIR = Path(sys.executable).parent


def generate() -> int:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={BIN_DIR / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN_DIR / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        *protos,
    ]
    status = protoc.main(args)
    if status != 0:
        return int(status)
    # Generated packages become regular packages so mypy and setuptools see them.
    for proto in protos:
        package_dir = ROOT / Path(proto).parent
        while package_dir != ROOT / "postmesh":
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent
    return 0


if __name__ == "__main__":
    sys.exit(generate())
