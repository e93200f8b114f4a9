"""The worker's Prometheus metrics: one registry per server (never the global default, so that one process
can run several servers, as the tests do), served over HTTP by `serve --metrics-port`.

Where each metric comes from; every one is counted in the gRPC worker's process:

- the RPC interceptor (`llm_worker.interceptors.CallObserver`, through `observe_call`):
  `onetoken_rpcs_total{method,code}`, `onetoken_rpc_duration_seconds{method}`,
  `onetoken_time_to_first_token_seconds` (Ask and AskStream, from the handlers' note), and the
  `seen_by="request"` part of `onetoken_corrupt_records_total` (calls that ended DATA_LOSS, the code of
  `CorruptRecordError` and of nothing else);
- the encoder pool's batches (`watch` wraps the `run_batch` its `DynamicBatcher` calls): what each
  batch's outcomes say the encoders did, so the Ray actors' work reaches this endpoint without one of
  their own: `onetoken_encoder_batch_size`, `onetoken_encoder_batch_duration_seconds`,
  `onetoken_encoder_images_total{outcome}` (encoded: model work; cached: already stored, no model work;
  failed: not a usable image; images/s is its rate) and `onetoken_encoder_batch_errors_total{kind}`.
  Images that `onetoken ingest` encodes on Ray Data never pass through the worker and are not counted;
- the record store: `onetoken_store_operation_duration_seconds{op,caller}` and
  `onetoken_store_errors_total{op,kind,caller}`. caller="worker": every call the worker makes (Ask,
  Search and GetImage reads, deletes, health probes, the change feed) after start-up, through the
  `cache.timed.TimedStore` that `watch` wraps its store in; caller="encoder": the encoders' calls
  (cache checks, record writes), timed in their own processes (Ray actors included) and handed back
  with each batch;
- the index (`on_index_sync`): `onetoken_index_sync_duration_seconds{kind}` (kind="follow": one read of
  the change feed; "rebuild": the index rebuilt from the store after it fell behind a trimmed feed) and
  `onetoken_index_changes_total{op}` (records the feed added to or removed from the index);
- read from the service when scraped (`ServiceCollector`): `onetoken_generated_tokens_total`,
  `onetoken_decode_batches_total` and `onetoken_decode_rows_total` (mean decode batch size: the ratio of
  their rates), `onetoken_decode_batch_size` and `onetoken_decode_queue_depth` (now), from the
  `DecodeScheduler`; `onetoken_encoder_queue_depth` from the batcher; `onetoken_index_images`;
  `onetoken_index_feed_lag` (changes in the store's feed that the index has not applied; one feed
  read per scrape); and the `seen_by="search"` part of `onetoken_corrupt_records_total` (Search hits
  dropped as damaged).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cache.store import RecordStore
from cache.sync import Followed
from cache.timed import StoreCall, TimedStore
from encoder_service.batcher import RunBatch
from encoder_service.encoder import EncodeOutcome
from llm_worker.request_log import Call
from llm_worker.service import OneTokenService

logger = logging.getLogger(__name__)

# Bucket upper bounds, in seconds or images.
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric of one server, in a registry of its own (`registry`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "onetoken_rpcs", "RPCs finished, by method and status code", ["method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "onetoken_rpc_duration_seconds",
            "RPC latency by method",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.first_token_seconds = Histogram(
            "onetoken_time_to_first_token_seconds",
            "Ask and AskStream: from the call's start to its first token",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        self.encoder_batch_size = Histogram(
            "onetoken_encoder_batch_size", "images per encoder batch", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.encoder_batch_seconds = Histogram(
            "onetoken_encoder_batch_duration_seconds",
            "encoder batch latency",
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.encoder_images = Counter(
            "onetoken_encoder_images",
            "images through the encoders by outcome: encoded, cached (no model work) or failed",
            ["outcome"],
            registry=r,
        )
        self.encoder_batch_errors = Counter(
            "onetoken_encoder_batch_errors",
            "encoder batches that failed, by error type",
            ["kind"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "onetoken_store_operation_duration_seconds",
            "record store call latency by operation and caller (worker or encoder)",
            ["op", "caller"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "onetoken_store_errors",
            "record store calls that raised, by operation, error type and caller",
            ["op", "kind", "caller"],
            registry=r,
        )
        self.index_sync_seconds = Histogram(
            "onetoken_index_sync_duration_seconds",
            "index syncs with the store: follow (one change feed read) or rebuild",
            ["kind"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.index_changes = Counter(
            "onetoken_index_changes",
            "records the change feed added to or removed from the index",
            ["op"],
            registry=r,
        )
        self.data_loss_calls = 0  # RPCs that ended DATA_LOSS: a record failed its checksum

    def observe_call(self, call: Call) -> None:
        """Count one finished RPC (the interceptor calls this)."""
        self.rpcs.labels(call.method, call.code.name).inc()
        self.rpc_seconds.labels(call.method).observe(call.seconds)
        if call.note.first_token_s is not None:
            self.first_token_seconds.observe(call.note.first_token_s)
        if call.code is grpc.StatusCode.DATA_LOSS:
            self.data_loss_calls += 1

    def observe_batches(self, run_batch: RunBatch) -> RunBatch:
        """`run_batch` timed, with each batch's size and outcomes counted."""

        async def observed(images: Sequence[bytes], uris: Sequence[str]) -> list[EncodeOutcome]:
            started = time.perf_counter()
            try:
                outcomes = await run_batch(images, uris)
            except Exception as e:
                self.encoder_batch_errors.labels(type(e).__name__).inc()
                raise
            finally:
                self.encoder_batch_seconds.observe(time.perf_counter() - started)
                self.encoder_batch_size.observe(len(images))
            for outcome in outcomes:
                self.encoder_images.labels(outcome.status).inc()
            return outcomes

        return observed

    def observe_store_call(self, call: StoreCall, caller: str) -> None:
        self.store_seconds.labels(call.op, caller).observe(call.seconds)
        if call.error is not None:
            self.store_errors.labels(call.op, call.error, caller).inc()

    def observe_encoder_store_calls(self, calls: list[StoreCall]) -> None:
        for call in calls:
            self.observe_store_call(call, "encoder")

    def observe_index_sync(self, kind: str, seconds: float, followed: Followed) -> None:
        self.index_sync_seconds.labels(kind).observe(seconds)
        self.index_changes.labels("added").inc(followed.added)
        self.index_changes.labels("removed").inc(followed.removed)

    def timed(self, store: RecordStore, caller: str) -> TimedStore:
        """`store` with every call timed into these metrics under `caller`."""
        return TimedStore(store, lambda call: self.observe_store_call(call, caller))

    def watch(self, service: OneTokenService) -> None:
        """Meter a service before it serves: its and its encoders' store calls, its encoder batches, its
        index syncs, and its state when scraped."""
        service.store = self.timed(service.store, caller="worker")
        service.encoders.on_store_calls = self.observe_encoder_store_calls
        service.on_index_sync = self.observe_index_sync
        batcher = service.encoders.batcher
        batcher.run_batch = self.observe_batches(batcher.run_batch)
        self.registry.register(ServiceCollector(service, self))


class ServiceCollector(Collector):
    """What the service, its decode scheduler and encoder batcher keep count of, read when scraped."""

    def __init__(self, service: OneTokenService, metrics: Metrics) -> None:
        self.service = service
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        scheduler = self.service.scheduler
        yield CounterMetricFamily(
            "onetoken_generated_tokens",
            "tokens decoded for callers (EOS excluded)",
            value=scheduler.tokens_generated,
        )
        yield CounterMetricFamily(
            "onetoken_decode_batches",
            "decode turns: one token for every running question",
            value=scheduler.batches,
        )
        yield CounterMetricFamily(
            "onetoken_decode_rows", "questions decoded, summed over turns", value=scheduler.rows_decoded
        )
        yield GaugeMetricFamily(
            "onetoken_decode_batch_size", "questions being decoded now", value=scheduler.active
        )
        yield GaugeMetricFamily(
            "onetoken_decode_queue_depth", "questions waiting for a decode slot", value=scheduler.pending
        )
        yield GaugeMetricFamily(
            "onetoken_encoder_queue_depth",
            "distinct images queued or being encoded",
            value=self.service.encoders.batcher.pending,
        )
        index = self.service.index
        yield GaugeMetricFamily("onetoken_index_images", "images in the vector index", value=len(index))
        if index.feed is not None:
            try:
                head = self.service.store.feed_position(index.fingerprint)
            except Exception as e:  # a scrape must not fail with the store; the store metrics show it
                logger.info("index feed lag not measured: %s", e)
            else:
                yield GaugeMetricFamily(
                    "onetoken_index_feed_lag",
                    "changes in the store's feed not yet applied to the index",
                    value=max(0, head.seq - index.feed.seq),
                )
        corrupt = CounterMetricFamily(
            "onetoken_corrupt_records",
            "stored records that failed their checksum: a DATA_LOSS call, or a Search hit left out",
            labels=["seen_by"],
        )
        corrupt.add_metric(["request"], self.metrics.data_loss_calls)
        corrupt.add_metric(["search"], self.service.damaged_hits)
        yield corrupt


class MetricsEndpoint:
    """`metrics.registry` over HTTP at http://host:port/metrics (any path serves it), on a thread."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._httpd: WSGIServer
        self._httpd, self._thread = start_http_server(port, host.strip("[]"), metrics.registry)
        self.port: int = self._httpd.server_port  # the bound one when `port` is 0

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
