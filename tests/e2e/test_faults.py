"""Failure paths through the real server: the store going down (UNAVAILABLE, then back), a full decode
queue (RESOURCE_EXHAUSTED), a record evicted from the store (NOT_FOUND that says to resend), and the
health service following the decoding loop and the store down and back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cache.keys import RecordKey
from htcvlm.generation import RowState
from llm_worker.client import OneTokenClient
from tests.cache.helpers import RedisServer
from tests.conftest import QUESTION
from tests.htcvlm.helpers import png_bytes as png
from tests.polling import poll_until

from .conftest import ServerThread, worker_config


def test_store_outage_is_unavailable_and_the_server_recovers(model_dir: Path, tmp_path: Path):
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    private = RedisServer(redis_dir)
    private.start()
    config = worker_config(model_dir, private.url, tmp_path / "index", "onetoken")
    config = replace(config, store=replace(config.store, retry_s=1.0))
    server = ServerThread(config)
    try:
        with OneTokenClient(server.address) as client:
            image_id = client.encode(png(1)).image_id
            before = client.ask(QUESTION, image_id=image_id, max_new_tokens=4)
            private.stop()  # graceful: the AOF is flushed
            with pytest.raises(grpc.RpcError) as err:
                client.ask(QUESTION, image_id=image_id, max_new_tokens=4)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "is the store running?" in err.value.details()
            private.start()  # same port and directory: the record comes back from the AOF
            after = client.ask(QUESTION, image_id=image_id, max_new_tokens=4)
            assert list(after.token_ids) == list(before.token_ids)
    finally:
        server.stop()
        private.kill()


def test_full_decode_queue_is_resource_exhausted(model_dir: Path, tmp_path: Path, monkeypatch):
    """One Ask decoding (held at its first token), one waiting: the next is refused at once."""
    gate = threading.Event()
    original = RowState.advance

    def held(self, row, token, tokenizer):
        gate.wait(30)
        return original(self, row, token, tokenizer)

    monkeypatch.setattr(RowState, "advance", held)
    config = worker_config(
        model_dir,
        str(tmp_path / "db"),
        tmp_path / "index",
        "onetoken",
        max_decode_batch=1,
        max_pending_asks=1,
    )
    server = ServerThread(config)
    scheduler = server.service.scheduler
    codes: list[grpc.StatusCode] = []
    try:
        with OneTokenClient(server.address) as client:
            image_id = client.encode(png(2)).image_id

            def ask() -> None:
                with OneTokenClient(server.address) as c:
                    c.ask(QUESTION, image_id=image_id, max_new_tokens=4)
                    codes.append(grpc.StatusCode.OK)

            threads = [threading.Thread(target=ask) for _ in range(2)]
            threads[0].start()
            poll_until(lambda: scheduler.active == 1)  # decoding, held
            threads[1].start()
            poll_until(lambda: scheduler.pending == 1)  # the one waiting place is taken
            with pytest.raises(grpc.RpcError) as err:
                client.ask(QUESTION, image_id=image_id, max_new_tokens=4)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "backoff" in err.value.details()
            gate.set()
            for t in threads:
                t.join(60)
            assert codes == [grpc.StatusCode.OK] * 2
            assert client.ask(QUESTION, image_id=image_id, max_new_tokens=2).usage.completion_tokens == 2
    finally:
        gate.set()
        server.stop()


def test_an_evicted_record_asks_for_the_bytes_again(model_dir: Path, tmp_path: Path):
    config = worker_config(model_dir, str(tmp_path / "db"), tmp_path / "index", "onetoken")
    server = ServerThread(config)
    try:
        with OneTokenClient(server.address) as client:
            image_id = client.encode(png(3)).image_id
            # what an LRU eviction does: the record leaves the store, the index still knows the image
            server.service.store.delete(RecordKey(server.service.fingerprint, image_id))
            with pytest.raises(grpc.RpcError) as err:
                client.ask(QUESTION, image_id=image_id)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "evicted" in err.value.details()
            reply = client.ask(QUESTION, image=png(3), max_new_tokens=3)  # the bytes re-encode it
            assert reply.image_id == image_id and reply.usage.completion_tokens == 3
            assert client.encode(png(3)).cached  # stored again
    finally:
        server.stop()


class HealthWatch:
    """The statuses the standard health service streams for one service name, collected in a thread."""

    def __init__(self, address: str, service: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.calls = health_pb2_grpc.HealthStub(self.channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=120
        )
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        try:
            for reply in self.calls:
                self.seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError:
            pass  # cancelled by close()

    def wait_for(self, *statuses: str, timeout_s: float = 30.0) -> None:
        """Until the statuses seen so far end with `statuses`, in that order."""
        deadline = time.monotonic() + timeout_s
        while self.seen[-len(statuses) :] != list(statuses):
            assert time.monotonic() < deadline, f"health went {self.seen}, waiting for {statuses}"
            time.sleep(0.02)

    def close(self) -> None:
        self.calls.cancel()
        self.channel.close()


@contextmanager
def watching(server: ServerThread) -> Iterator[list[HealthWatch]]:
    """Health watches of "" and the API, each seen SERVING first; closed, and the server stopped, after."""
    watches = [HealthWatch(server.address, name) for name in ("", "onetoken.v1.OneToken")]
    try:
        for watch in watches:
            watch.wait_for("SERVING")
        yield watches
    finally:
        for watch in watches:
            watch.close()
        server.stop()


def test_health_is_not_serving_while_the_decoding_loop_is_down(model_dir: Path, tmp_path: Path):
    config = worker_config(
        model_dir, str(tmp_path / "db"), tmp_path / "index", "onetoken", health_check_s=0.2
    )
    server = ServerThread(config)
    with watching(server) as watches:
        server.service.scheduler.stop()  # what a dying loop looks like from outside
        for watch in watches:  # reported, restarted, then healthy again
            watch.wait_for("SERVING", "NOT_SERVING", "SERVING")
        with OneTokenClient(server.address) as client:
            assert client.ask(QUESTION, image=png(4), max_new_tokens=2).usage.completion_tokens == 2


def test_health_follows_the_store_down_and_back(model_dir: Path, tmp_path: Path):
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    private = RedisServer(redis_dir)
    private.start()
    config = worker_config(model_dir, private.url, tmp_path / "index", "onetoken", health_check_s=0.2)
    config = replace(config, store=replace(config.store, retry_s=0.5))
    try:
        with watching(ServerThread(config)) as watches:
            private.stop()
            for watch in watches:
                watch.wait_for("SERVING", "NOT_SERVING")
            private.start()
            for watch in watches:
                watch.wait_for("SERVING", "NOT_SERVING", "SERVING")
            with OneTokenClient(watches[0].address) as client:
                assert client.ask(QUESTION, image=png(5), max_new_tokens=2).usage.completion_tokens == 2
    finally:
        private.kill()
