"""The metrics endpoint of a real server: after a known sequence of calls over gRPC, what an HTTP scrape
says equals those calls; with metrics off, no port is opened.

Each test starts a server of its own (a fresh registry), so every count is exact.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cache.keys import RecordKey
from llm_worker.client import OneTokenClient
from tests.conftest import QUESTION
from tests.e2e.conftest import ServerThread, worker_config
from tests.htcvlm.helpers import png_bytes as png
from tests.polling import poll_until

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def scrape(port: int) -> Samples:
    """Every sample the endpoint serves: {sample name: {labels: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def by(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """One sample's values keyed by the given labels' values (a histogram's le bucket left out)."""
    return {
        tuple(dict(key)[label] for label in labels): value
        for key, value in samples.get(name, {}).items()
        if "le" not in dict(key)
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][frozenset(labels.items())]


def calls_counted(server: ServerThread) -> float:
    """RPCs counted so far. An aborted call's status can reach the client a moment before the
    interceptor counts it, so tests wait for this to reach the calls they made."""
    return sum(scrape(server.running.metrics_port).get("onetoken_rpcs_total", {}).values())


def listening_ports() -> set[int]:
    """TCP ports this process listens on: its sockets' inodes, looked up in /proc/net/tcp and tcp6."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed since listed
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            columns = line.split()
            if columns[3] == "0A" and columns[9] in inodes:  # 0A: LISTEN
                ports.add(int(columns[1].rsplit(":", 1)[1], 16))
    return ports


def start_server(model_dir: Path, tmp_path: Path, metrics_port: int | None) -> ServerThread:
    config = worker_config(
        model_dir, str(tmp_path / "records"), tmp_path / "index", "metrics", metrics_port=metrics_port
    )
    return ServerThread(config)


@pytest.fixture
def observed(model_dir: Path, tmp_path: Path) -> Iterator[ServerThread]:
    """A fresh server over the embedded store, its metrics on a free port."""
    server = start_server(model_dir, tmp_path, metrics_port=0)
    yield server
    server.stop()


def failed_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_a_scrape_counts_exactly_the_calls_made(observed: ServerThread):
    with OneTokenClient(observed.address, timeout_s=60) as client:
        first, again = client.encode(png(1)), client.encode(png(1))
        assert not first.cached and again.cached
        image_id = first.image_id
        asked = client.ask(QUESTION, image_id=image_id, max_new_tokens=4)
        streamed = list(client.ask_stream(QUESTION, image_id=image_id, max_new_tokens=3))
        assert client.search(1, image_id=image_id).hits[0].image_id == image_id
        assert failed_code(lambda: client.search(0, image_id=image_id)) == grpc.StatusCode.INVALID_ARGUMENT
        assert failed_code(lambda: client.ask(QUESTION, image_id="0" * 64)) == grpc.StatusCode.NOT_FOUND
    poll_until(lambda: observed.service.scheduler.active == 0)
    poll_until(lambda: calls_counted(observed) == 7)
    m = scrape(observed.running.metrics_port)

    assert by(m, "onetoken_rpcs_total", "method", "code") == {
        ("EncodeImage", "OK"): 2,
        ("Ask", "OK"): 1,
        ("Ask", "NOT_FOUND"): 1,
        ("AskStream", "OK"): 1,
        ("Search", "OK"): 1,
        ("Search", "INVALID_ARGUMENT"): 1,
    }
    calls = {"EncodeImage": 2, "Ask": 2, "AskStream": 1, "Search": 2}
    assert by(m, "onetoken_rpc_duration_seconds_count", "method") == {(k,): n for k, n in calls.items()}
    for method, n in calls.items():
        assert value(m, "onetoken_rpc_duration_seconds_bucket", method=method, le="+Inf") == n
        assert value(m, "onetoken_rpc_duration_seconds_sum", method=method) > 0

    # the two answered questions: their first tokens, and every token they returned
    assert value(m, "onetoken_time_to_first_token_seconds_count") == 2
    ask_seconds = value(m, "onetoken_rpc_duration_seconds_sum", method="Ask")
    stream_seconds = value(m, "onetoken_rpc_duration_seconds_sum", method="AskStream")
    assert 0 < value(m, "onetoken_time_to_first_token_seconds_sum") < ask_seconds + stream_seconds
    returned = asked.usage.completion_tokens + streamed[-1].usage.completion_tokens
    assert returned == 7 and value(m, "onetoken_generated_tokens_total") == returned
    batches, rows = value(m, "onetoken_decode_batches_total"), value(m, "onetoken_decode_rows_total")
    assert 0 < batches <= rows
    assert value(m, "onetoken_decode_batch_size") == 0 and value(m, "onetoken_decode_queue_depth") == 0

    # one image compressed, one found cached, each in a batch of one
    assert by(m, "onetoken_encoder_images_total", "outcome") == {("encoded",): 1, ("cached",): 1}
    assert value(m, "onetoken_encoder_batch_size_count") == 2
    assert value(m, "onetoken_encoder_batch_size_sum") == 2
    assert value(m, "onetoken_encoder_batch_duration_seconds_count") == 2
    assert by(m, "onetoken_encoder_batch_errors_total", "kind") == {}
    assert value(m, "onetoken_encoder_queue_depth") == 0

    # the worker's store reads: Ask, AskStream, the unknown id's Ask, and Search (its query and its hits)
    assert value(m, "onetoken_store_operation_duration_seconds_count", op="get_many", caller="worker") == 5
    # the encoder's, timed where it ran: a cache check per batch, one write of the new record
    encoder_ops = by(m, "onetoken_store_operation_duration_seconds_count", "caller", "op")
    assert {op: n for (caller, op), n in encoder_ops.items() if caller == "encoder"} == {
        "get_many": 2,
        "put_many": 1,
    }
    assert by(m, "onetoken_store_errors_total", "op", "kind") == {}
    assert value(m, "onetoken_index_images") == len(observed.service.index) == 1
    assert by(m, "onetoken_corrupt_records_total", "seen_by") == {("request",): 0, ("search",): 0}


def test_damaged_records_are_counted_where_they_are_seen(observed: ServerThread):
    service = observed.service
    with OneTokenClient(observed.address, timeout_s=60) as client:
        ids = [client.encode(png(20 + i)).image_id for i in range(2)]
        key = RecordKey(service.fingerprint, ids[1])
        service.store.put(key, b"\xff" * 8 + service.store.get(key)[8:])  # a damaged header
        assert failed_code(lambda: client.ask(QUESTION, image_id=ids[1])) == grpc.StatusCode.DATA_LOSS
        hits = client.search(2, image_id=ids[0]).hits
        assert [h.image_id for h in hits] == [ids[0]]  # the damaged hit left out
    poll_until(lambda: calls_counted(observed) == 4)
    m = scrape(observed.running.metrics_port)
    assert by(m, "onetoken_corrupt_records_total", "seen_by") == {("request",): 1, ("search",): 1}
    assert value(m, "onetoken_rpcs_total", method="Ask", code="DATA_LOSS") == 1
    # the test's own put and get went through the metered store too
    assert value(m, "onetoken_store_operation_duration_seconds_count", op="put", caller="worker") == 1


def test_index_syncs_and_the_feed_lag_are_measured(observed: ServerThread):
    """Records another process stores show as feed lag until the index follows; the follow is timed and
    its changes counted."""
    from encoder_service.encoder import Encoder

    service = observed.service
    other = Encoder(service.config.encoder, service.config.store)
    try:
        other.encode([png(30 + i) for i in range(3)])
    finally:
        other.close()
    assert value(scrape(observed.running.metrics_port), "onetoken_index_feed_lag") == 3
    assert observed.call(service.follow_index()).added == 3
    m = scrape(observed.running.metrics_port)
    assert value(m, "onetoken_index_feed_lag") == 0 and value(m, "onetoken_index_images") == 3
    assert value(m, "onetoken_index_sync_duration_seconds_count", kind="follow") == 1
    assert by(m, "onetoken_index_changes_total", "op") == {("added",): 3, ("removed",): 0}


def test_metrics_off_opens_no_port_and_on_opens_one_that_closes_with_the_server(
    model_dir: Path, tmp_path: Path
):
    before = listening_ports()
    off = start_server(model_dir, tmp_path / "off", metrics_port=None)
    try:
        assert off.running.metrics_port is None
        assert listening_ports() - before == {off.running.port}  # gRPC's alone
    finally:
        off.stop()
    on = start_server(model_dir, tmp_path / "on", metrics_port=0)
    try:
        port = on.running.metrics_port
        assert port and listening_ports() - before == {on.running.port, port}
        assert "onetoken_index_images" in scrape(port)
    finally:
        on.stop()
    assert port not in listening_ports()
