"""Helpers of the cache tests: records, keys, and private redis-server processes."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch

from cache.keys import RecordKey
from htcvlm.record import Record, image_id_of

FINGERPRINT = "test-model-v1"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

MakeRecord = Callable[..., Record]


def make_record(
    seed: int = 0,
    fingerprint: str = FINGERPRINT,
    shape: tuple[int, int, int, int] = (2, 2, 1, 16),
    d: int = 64,
    latent: torch.Tensor | None = None,
) -> Record:
    """A record of realistic small shape: (layers, kv heads, voco tokens, head_dim), latent of size d."""
    g = torch.Generator().manual_seed(seed)
    return Record(
        image_id=image_id_of(f"image-{seed}".encode()),
        fingerprint=fingerprint,
        latent=torch.randn(d, generator=g) if latent is None else latent,
        keys=torch.randn(shape, generator=g) * 3,  # post-RoPE keys reach a few units
        values=torch.randn(shape, generator=g),
        voco_position=580,
        source_uri=f"file:///corpus/{seed}.png",
        created_at=1_795_000_000.25 + seed,
    )


def key_of(seed: int, fingerprint: str = FINGERPRINT) -> RecordKey:
    """The key `make_record(seed, fingerprint)` is stored under."""
    return RecordKey(fingerprint, image_id_of(f"image-{seed}".encode()))


def redis_unreachable(reason: str) -> None:
    """Fail under ONETOKEN_REQUIRE_REDIS=1 (CI), otherwise skip with the reason shown."""
    if os.environ.get("ONETOKEN_REQUIRE_REDIS") == "1":
        pytest.fail(f"Redis is required (ONETOKEN_REQUIRE_REDIS=1) but {reason}")
    pytest.skip(f"Redis tests skipped: {reason} (set ONETOKEN_REQUIRE_REDIS=1 to make this a failure)")


def purge_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server with its own port and directory, started and stopped by a test."""

    def __init__(
        self, workdir: Path, *options: str, tls_dir: Path | None = None, port: int | None = None
    ) -> None:
        self.workdir = workdir
        self.port = free_port() if port is None else port
        self.options = options
        self.tls_dir = tls_dir  # ca.crt, server.crt, server.key: serve TLS only
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls_dir is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls_dir / 'ca.crt'}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        if self.tls_dir is None:
            args += ["--port", str(self.port)]
        else:
            t = self.tls_dir
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(t / "server.crt"), "--tls-key-file", str(t / "server.key")]
            args += ["--tls-ca-cert-file", str(t / "ca.crt")]
        args += ["--save", "", "--appendonly", "yes", *self.options]
        with open(self.workdir / "redis.log", "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()[-2000:]}")
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping()
                return
            except redis.AuthenticationError:
                return  # up, and protected by a password this probe does not know
            except redis.ConnectionError:  # not listening yet, or still loading its AOF
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start within 10 s")

    def stop(self) -> None:
        """Graceful: SIGTERM makes Redis flush its AOF and exit."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL, no flush."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


def make_tls_certs(directory: Path, names: str = "IP:127.0.0.1,DNS:localhost") -> Path:
    """A throwaway CA and a server certificate for `names` (subjectAltName entries), made with the openssl
    command."""
    if shutil.which("openssl") is None:
        redis_unreachable("openssl is not installed, so no TLS certificate can be made")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ("-newkey", "rsa:2048", "-nodes", "-days", "2")
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=onetoken-test-ca")
    run("req", *key[:3], "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "ext").write_text(f"subjectAltName={names}")
    sign = ("-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "ext")
    run("x509", "-req", "-in", "server.csr", *sign, "-out", "server.crt")
    return directory


def free_cluster_port() -> int:
    """A free port P for a cluster node: P + 10000 (its cluster bus) must be free too, so P <= 55535."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisClusterNodes:
    """A private Redis Cluster: `n` nodes on free ports (half primaries, each with one replica), made
    with `redis-cli --cluster create`, failing over within about a second of a primary dying."""

    def __init__(self, workdir: Path, n: int = 6) -> None:
        self.nodes = [RedisServer(workdir / f"node-{i}", port=free_cluster_port()) for i in range(n)]
        for node in self.nodes:
            node.workdir.mkdir(parents=True)
            node.options = (
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000", "--appendonly", "no",
                # a replica takes over however long ago it last heard from its primary
                "--cluster-replica-validity-factor", "0",
            )  # fmt: skip

    @property
    def url(self) -> str:
        """The store URL of the cluster, through its first node."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_until_ok()

    def wait_until_ok(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        alive = [n for n in self.nodes if n.proc is not None]
        while time.monotonic() < deadline:
            states = []
            for node in alive:
                try:
                    info = redis.Redis(port=node.port, socket_timeout=1).execute_command("CLUSTER INFO")
                except redis.ConnectionError:
                    states.append(False)
                    continue
                text = (
                    info.decode()
                    if isinstance(info, bytes)
                    else "\n".join(f"{k}:{v}" for k, v in info.items())
                )
                states.append("cluster_state:ok" in text)
            if all(states) and all(self._replica_synced(n) for n in alive):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    @staticmethod
    def _replica_synced(node: RedisServer) -> bool:
        """True for a primary, and for a replica whose link to its primary is up."""
        try:
            info = redis.Redis(port=node.port, socket_timeout=1).info("replication")
        except redis.ConnectionError:
            return False
        return info.get("role") == "master" or info.get("master_link_status") == "up"

    def primary_of(self, key: str) -> RedisServer:
        """The node that serves `key` now."""
        client = redis.Redis(port=self.nodes[0].port)
        slot = client.execute_command("CLUSTER KEYSLOT", key)
        for shard in client.execute_command("CLUSTER SLOTS"):
            if shard[0] <= slot <= shard[1]:
                port = shard[2][1]
                return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no node serves slot {slot}")

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()
