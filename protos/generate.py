"""Regenerate the checked-in Python stubs of the gRPC API from `onetoken/v1/onetoken.proto`.

    .venv/bin/python protos/generate.py

The stubs live beside the .proto so `protos/` maps to the import package `onetoken` (see pyproject.toml);
tests/llm_worker/test_protos.py fails when they drift from the .proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTO = "onetoken/v1/onetoken.proto"


def generate(out: Path) -> None:
    args = [
        "grpc_tools.protoc",
        f"-I{HERE}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(HERE / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
