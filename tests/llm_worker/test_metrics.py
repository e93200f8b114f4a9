"""Timed stores against real stores: the wrapped store's answers unchanged, every call timed by operation
and caller, errors counted by type; encoder calls handed back in batches; and registries that never share
a metric."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cache.errors import StoreUnavailableError
from cache.factory import StoreConfig, open_store
from cache.timed import StoreCall, StoreCalls, TimedStore
from llm_worker.metrics import Metrics
from tests.cache.helpers import FINGERPRINT, free_port, key_of


def samples(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    """The values of one sample name by their label values (histogram buckets left out)."""
    text = generate_latest(metrics.registry).decode()
    return {
        tuple(v for k, v in sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and "le" not in s.labels
    }


def test_the_wrapper_answers_as_the_store_and_times_each_operation(tmp_path: Path):
    metrics = Metrics()
    with metrics.timed(open_store(StoreConfig(str(tmp_path / "records"))), "worker") as store:
        store.put(key_of(1), b"one")
        store.put_many([(key_of(2), b"two"), (key_of(3), b"three")])
        assert store.get(key_of(1)) == b"one" and store.get(key_of(9)) is None
        assert store.get_many([key_of(2), key_of(9), key_of(3)]) == [b"two", None, b"three"]
        assert store.contains(key_of(2)) and store.delete(key_of(2)) and not store.delete(key_of(2))
        assert sorted(store.iter_ids(FINGERPRINT)) == sorted(key_of(i).image_id for i in (1, 3))
        assert store.count(FINGERPRINT) == 2
        assert len(store.read_feed(FINGERPRINT, store.feed_position("nothing-yet")).changes) == 4
    assert samples(metrics, "onetoken_store_operation_duration_seconds_count") == {
        ("worker", op): n
        for op, n in [
            ("put", 1),
            ("put_many", 1),
            ("get", 2),
            ("get_many", 1),
            ("contains", 1),
            ("delete", 2),
            ("iter_ids", 1),
            ("count", 1),
            ("feed_position", 1),
            ("read_feed", 1),
        ]
    }
    assert samples(metrics, "onetoken_store_errors_total") == {}


def test_an_unreachable_store_is_counted_as_an_error_of_its_kind():
    metrics = Metrics()
    nobody = f"redis://127.0.0.1:{free_port()}/0"  # a port nothing listens on
    with metrics.timed(open_store(StoreConfig(nobody, retry_s=0)), "worker") as store:
        for _ in range(2):
            with pytest.raises(StoreUnavailableError):
                store.get(key_of(1))
        with pytest.raises(StoreUnavailableError):
            list(store.iter_ids(FINGERPRINT))
    assert samples(metrics, "onetoken_store_errors_total") == {
        ("worker", "StoreUnavailableError", "get"): 2,
        ("worker", "StoreUnavailableError", "iter_ids"): 1,
    }
    assert samples(metrics, "onetoken_store_operation_duration_seconds_count") == {
        ("worker", "get"): 2,
        ("worker", "iter_ids"): 1,
    }


def test_calls_kept_for_later_are_handed_over_once_and_counted_as_the_encoders(tmp_path: Path):
    kept = StoreCalls()
    with TimedStore(open_store(StoreConfig(str(tmp_path / "records"))), kept) as store:
        store.put(key_of(1), b"one")
        ids = store.iter_ids(FINGERPRINT)
        next(ids)
        ids.close()  # a caller that stops early is not an error
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    with TimedStore(open_store(StoreConfig(nobody, retry_s=0)), kept) as down:
        with pytest.raises(StoreUnavailableError):
            down.get_many([key_of(1)])
    calls = kept.take()
    assert [(c.op, c.error) for c in calls] == [
        ("put", None),
        ("iter_ids", None),
        ("get_many", "StoreUnavailableError"),
    ]
    assert kept.take() == []
    metrics = Metrics()
    metrics.observe_encoder_store_calls([*calls, StoreCall("put_many", 0.01, None)])
    assert samples(metrics, "onetoken_store_operation_duration_seconds_count") == {
        ("encoder", "put"): 1,
        ("encoder", "iter_ids"): 1,
        ("encoder", "get_many"): 1,
        ("encoder", "put_many"): 1,
    }
    assert samples(metrics, "onetoken_store_errors_total") == {
        ("encoder", "StoreUnavailableError", "get_many"): 1
    }


def test_each_server_has_a_registry_of_its_own():
    first, second = Metrics(), Metrics()  # the default registry would refuse the second set of names
    first.store_errors.labels("get", "StoreUnavailableError", "worker").inc()
    assert samples(first, "onetoken_store_errors_total") == {("worker", "StoreUnavailableError", "get"): 1}
    assert samples(second, "onetoken_store_errors_total") == {}
