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
  the encoders' own store writes are not timed here either (they happen in the actors);
- the worker's record store (`watch` wraps it in `MeteredStore`): `onetoken_store_operation_duration_seconds
  {op}` and `onetoken_store_errors_total{op,kind}`, for every call the worker makes (Ask, Search and
  GetImage reads, deletes, health probes, index refreshes) after start-up;
- read from the service when scraped (`ServiceCollector`): `onetoken_generated_tokens_total`,
  `onetoken_decode_batches_total` and `onetoken_decode_rows_total` (mean decode batch size: the ratio of
  their rates), `onetoken_decode_batch_size` and `onetoken_decode_queue_depth` (now), from the
  `DecodeScheduler`; `onetoken_encoder_queue_depth` from the batcher; `onetoken_index_images`; and the
  `seen_by="search"` part of `onetoken_corrupt_records_total` (Search hits dropped as damaged).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cache.keys import RecordKey
from cache.store import RecordStore
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
            "record store call latency by operation",
            ["op"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "onetoken_store_errors",
            "record store calls that raised, by operation and error type",
            ["op", "kind"],
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

    def watch(self, service: OneTokenService) -> None:
        """Meter a service before it serves: its store calls, its encoder batches, and its state when
        scraped."""
        service.store = MeteredStore(service.store, self)
        batcher = service.encoders.batcher
        batcher.run_batch = self.observe_batches(batcher.run_batch)
        self.registry.register(ServiceCollector(service, self))


class MeteredStore(RecordStore):
    """The store it wraps, each call timed by operation and its errors counted by type; the contract is
    the wrapped store's (`cache.store`)."""

    def __init__(self, inner: RecordStore, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    @contextmanager
    def _measure(self, op: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except Exception as e:
            self.metrics.store_errors.labels(op, type(e).__name__).inc()
            raise
        finally:
            self.metrics.store_seconds.labels(op).observe(time.perf_counter() - started)

    def put(self, key: RecordKey, blob: bytes) -> None:
        with self._measure("put"):
            self.inner.put(key, blob)

    def get(self, key: RecordKey) -> bytes | None:
        with self._measure("get"):
            return self.inner.get(key)

    def contains(self, key: RecordKey) -> bool:
        with self._measure("contains"):
            return self.inner.contains(key)

    def delete(self, key: RecordKey) -> bool:
        with self._measure("delete"):
            return self.inner.delete(key)

    def put_many(self, items: Sequence[tuple[RecordKey, bytes]]) -> None:
        with self._measure("put_many"):
            self.inner.put_many(items)

    def get_many(self, keys: Sequence[RecordKey]) -> list[bytes | None]:
        with self._measure("get_many"):
            return self.inner.get_many(keys)

    def iter_ids(self, fingerprint: str) -> Iterator[str]:
        with self._measure("iter_ids"):  # from the first id to the last (or until the caller stops)
            yield from self.inner.iter_ids(fingerprint)

    def count(self, fingerprint: str) -> int:
        with self._measure("count"):
            return self.inner.count(fingerprint)

    def close(self) -> None:
        self.inner.close()


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
        yield GaugeMetricFamily(
            "onetoken_index_images", "images in the vector index", value=len(self.service.index)
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
