"""A rehearsal of docker-compose.yml without Docker (no image registry is reachable where the tests run):
every service's entrypoint + command with its compose environment, as local processes in network
namespaces named after the services (tests/e2e/compose.py says what stands in for what). Redis, the
Ray head, two encoder nodes with one (advertised) GPU each, the gRPC worker serving TLS with tokens from
./secrets, then the ingest job over ./corpus; the test then asks and searches through the published
port, over TLS with a token.

It needs root (namespaces, a bridge), `ip`, `unshare` and `redis-server`, and skips without them. There is
no fallback to plain local processes: the services' fixed ports (Redis 6379, Ray 6380, gRPC 50051) and
Ray's per-node ports would collide on one host with the machine's own Redis and other Ray clusters, and
rewriting them would no longer rehearse the compose file.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from htcvlm.record import image_id_of
from llm_worker.client import OneTokenClient
from llm_worker.security import new_token
from tests.cache.helpers import make_tls_certs, redis_unreachable
from tests.e2e.compose import PortForward, Service, ServiceNetwork, dockerfile_env, load_services
from tests.htcvlm.helpers import png_bytes

pytestmark = pytest.mark.slow

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the image has `onetoken` and `ray` on PATH; this venv stands in
SERVICES = ["redis", "ray-head", "encoder", "llm-worker", "ingest"]
CORPUS = 3


def require_tools() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        redis_unreachable("redis-server is not installed (Debian: apt-get install redis-server)")
    if os.geteuid() != 0:
        pytest.skip("the compose rehearsal needs root for network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("the compose rehearsal needs `ip` (Debian: apt-get install iproute2)")
    if shutil.which("unshare") is None:
        pytest.skip("the compose rehearsal needs `unshare` (Debian: apt-get install util-linux)")
    for tool in ("ray", "onetoken"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} is not in {BIN} (pip install -e '.[dev]')")


class Stack:
    """The services, started one by one in their namespaces; logs in `root/NAME.log`."""

    def __init__(self, root: Path, services: list[Service], network: ServiceNetwork) -> None:
        self.root = root
        self.services = {s.name: s for s in services}
        self.network = network
        self.procs: dict[str, subprocess.Popen] = {}
        self.image_env = dockerfile_env(ROOT / "Dockerfile")

    def env(self, name: str) -> dict[str, str]:
        """A container's environment: the image's ENV, the service's, a home of its own."""
        return {
            "PATH": f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.root / name),
            "PYTHONPATH": str(ROOT),  # this checkout's code, as the image's /app
            "LANG": "C.UTF-8",
            # Docker's embedded DNS server answers service names; here only /etc/hosts does, which
            # gRPC's default resolver (c-ares, in Ray's GCS clients) does not read: use the system's
            "GRPC_DNS_RESOLVER": "native",
            **self.image_env,
            **self.services[name].env,
        }

    def start(self, name: str, *extra: str) -> None:
        service = self.services[name]
        argv = [*service.argv, *extra]
        logger.info("%s: %s", name, argv)
        self.procs[name] = self.network.run(
            service, argv, self.env(name), self.log_path(name), self.root / name
        )

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def healthy(self, name: str) -> bool:
        """The service's compose health check, run in its namespace."""
        return self.network.check(self.services[name], self.env(name), self.root / name, timeout_s=20)

    def wait(self, what: str, done: Callable[[], bool], timeout_s: float) -> None:
        """Poll `done` until true; fail with every log's tail if it is not within `timeout_s`, or if a
        service exited early."""
        started = time.monotonic()
        while not done():
            exited = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            exited.pop("ingest", None)  # a job: its exit is checked by the caller
            if exited or time.monotonic() - started > timeout_s:
                tails = "\n".join(f"--- {n}.log\n{self.log(n)[-3000:]}" for n in self.procs)
                reason = f"exited {exited}" if exited else f"not within {timeout_s:.0f} s"
                pytest.fail(f"{what}: {reason}\n{tails}")
            time.sleep(1.0)
        logger.info("%s after %.1f s", what, time.monotonic() - started)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    require_tools()
    variables = {"RAY_AUTH_TOKEN": secrets.token_urlsafe(32)}  # compose refuses to start without it
    services = load_services(ROOT / "docker-compose.yml", variables, tmp_path, SERVICES)
    try:
        network = ServiceNetwork([s.name for s in services])
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make network namespaces here: {e.stderr.strip()}")
    try:
        yield Stack(tmp_path, services, network)
    finally:
        network.close()


def test_the_compose_stack_ingests_a_corpus_and_answers_over_tls_with_a_token(stack: Stack):
    volumes = stack.root / "volumes"
    certs = make_tls_certs(volumes / "secrets", names="DNS:llm-worker,DNS:localhost,IP:127.0.0.1")
    token, line = new_token("reader")
    (certs / "tokens.txt").write_text(line + "\n")
    images = [png_bytes(seed, size=64) for seed in range(CORPUS)]
    for n, image in enumerate(images):
        (volumes / "corpus" / f"scene-{n}.png").write_bytes(image)
    address = stack.network.addresses

    # The redis image's entrypoint adds --protected-mode no (no config file); /data is its WORKDIR.
    data = stack.services["redis"].mounts["/data"].target
    stack.start("redis", "--dir", str(data), "--protected-mode", "no")
    stack.wait("redis healthy", lambda: stack.healthy("redis"), 30)
    # One at a time, each once the one before has joined: an order compose may take too (it waits for
    # nothing but the start of a service's dependencies), and on a small shared machine nodes starting
    # side by side can miss Ray's 30 s limit for a new node to register. The worker also needs the
    # encoders in the cluster when it starts, or it counts fewer GPUs (see docs/DEPLOYMENT.md).
    for name in ("ray-head", "encoder-1", "encoder-2"):
        stack.start(name)
        stack.wait(f"{name} joined", lambda n=name: "Ray runtime started" in stack.log(n), 120)
    stack.start("llm-worker")
    stack.wait("llm-worker healthy (TLS health check)", lambda: stack.healthy("llm-worker"), 180)
    # --encoders 0: one encoder actor per GPU of the cluster, i.e. per encoder node
    assert "2 Ray encoder actors ready" in stack.log("llm-worker"), stack.log("llm-worker")[-3000:]

    stack.start("ingest")
    stack.wait("ingest finished", lambda: stack.procs["ingest"].poll() is not None, 180)
    assert stack.procs["ingest"].returncode == 0, stack.log("ingest")[-3000:]
    assert f"encoded {CORPUS}, already cached 0, failed 0" in stack.log("ingest")

    ids = [image_id_of(image) for image in images]
    published = PortForward((str(address["llm-worker"]), 50051))  # ports: "50051:50051"
    try:
        target = f"localhost:{published.port}"
        with OneTokenClient(target, tls_ca=str(certs / "ca.crt")) as anonymous:
            with pytest.raises(grpc.RpcError) as refused:
                anonymous.search(CORPUS, image_id=ids[0])
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with OneTokenClient(target, tls_ca=str(certs / "ca.crt"), token=token) as client:
            # the worker's index follows the change feed that ingest wrote (four times a second)
            stack.wait(
                "ingested images in the worker's Search",
                lambda: {h.image_id for h in client.search(CORPUS, image_id=ids[0]).hits} == set(ids),
                30,
            )
            reply = client.ask("What shape is the object on the left?", image_id=ids[1], max_new_tokens=8)
            assert reply.usage.completion_tokens > 0 and reply.answer
            assert reply.image_id == ids[1]
    finally:
        published.close()
