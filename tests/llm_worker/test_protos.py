"""The checked-in gRPC stubs are what the .proto generates: regenerating changes nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / "protos" / "onetoken" / "v1"


def test_stubs_match_the_proto(tmp_path: Path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed (the dev extra has it)")
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    for name in ("onetoken_pb2.py", "onetoken_pb2.pyi", "onetoken_pb2_grpc.py"):
        fresh = (tmp_path / "onetoken" / "v1" / name).read_text()
        assert fresh == (STUBS / name).read_text(), f"{name} drifted: run `python protos/generate.py`"


def test_the_api_has_every_method():
    from onetoken.v1 import onetoken_pb2 as pb

    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["OneToken"].methods}
    assert methods == {"EncodeImage", "Ask", "AskStream", "Search", "AskSearch", "GetImage", "DeleteImage"}
