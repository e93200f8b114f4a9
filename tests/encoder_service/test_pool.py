"""Encoder pools as the gRPC server uses them: in-process, and Ray actors on the session's local cluster
(two CPUs: one encoder actor per test, killed at the end)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cache.errors import StoreUnavailableError
from cache.factory import StoreConfig
from encoder_service.errors import EncoderUnavailableError
from encoder_service.pool import LocalEncoderPool, RayEncoderPool, actor_count, actor_resources, open_pool
from htcvlm.checkpoint import load_pretrained
from htcvlm.record import image_id_of
from tests.cache.helpers import RedisServer, redis_unreachable
from tests.encoder_service.helpers import encoder_config, png

pytestmark = pytest.mark.anyio


async def test_local_pool_batches_concurrent_requests(model_dir: Path, tmp_path: Path) -> None:
    config = encoder_config(model_dir, backend="local", max_batch=4, max_wait_ms=20)
    pool = await open_pool(config, StoreConfig(str(tmp_path / "store")))
    try:
        assert isinstance(pool, LocalEncoderPool)
        assert pool.fingerprint == load_pretrained(model_dir).fingerprint()
        images = [png(n) for n in range(6)] + [png(0), b"junk"]
        outcomes = await asyncio.gather(*(pool.encode(b, f"uri-{n}") for n, b in enumerate(images)))
        assert [o.status for o in outcomes] == ["encoded"] * 7 + ["failed"]
        assert outcomes[0] is outcomes[6]  # the duplicate shared the computation
        assert all(size <= 4 for size in pool.batcher.batch_sizes) and sum(pool.batcher.batch_sizes) == 7
        assert pool.encoder.images_compressed == 6
        again = await asyncio.gather(*(pool.encode(b) for b in images[:6]))
        assert {o.status for o in again} == {"cached"} and pool.encoder.images_compressed == 6
    finally:
        await pool.close()


def test_actor_resources_follow_the_cluster(model_dir: Path, ray_cluster: None) -> None:
    """The test cluster has no GPU: CPU actors. A configured GPU share is used as given."""
    config = encoder_config(model_dir)
    assert actor_resources(config) == {"num_gpus": 0.0, "num_cpus": 1}
    assert actor_resources(encoder_config(model_dir, num_gpus_per_actor=0.5)) == {
        "num_gpus": 0.5,
        "num_cpus": 0,
    }


def test_zero_actors_means_one_per_gpu_of_the_cluster(model_dir: Path, monkeypatch) -> None:
    """--encoders 0 follows the cluster, so `--scale encoder=8` (one GPU each) gives 8 encoder actors."""
    import ray

    gpus = {"GPU": 0.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, **gpus})
    assert actor_count(encoder_config(model_dir, num_actors=0)) == 1  # no GPUs: one CPU actor
    gpus["GPU"] = 8.0
    assert actor_count(encoder_config(model_dir, num_actors=0)) == 8
    # half a GPU each: still one per GPU, the other half left to another job's encoders (ingest)
    assert actor_count(encoder_config(model_dir, num_actors=0, num_gpus_per_actor=0.5)) == 8
    assert actor_count(encoder_config(model_dir, num_actors=3)) == 3  # a number given is kept
    with pytest.raises(ValueError, match="num_actors must be >= 0"):
        encoder_config(model_dir, num_actors=-1)


async def test_ray_pool_encodes_and_serves_cached_images(
    model_dir: Path, tmp_path: Path, ray_cluster: None
) -> None:
    config = encoder_config(model_dir, num_actors=1, max_batch=8)
    pool = await open_pool(config, StoreConfig(str(tmp_path / "store")))
    try:
        assert isinstance(pool, RayEncoderPool)
        assert pool.fingerprint == load_pretrained(model_dir).fingerprint()
        images = [png(20 + n) for n in range(5)]
        outcomes = await asyncio.gather(*(pool.encode(b) for b in [*images, b"\x89PNG broken"]))
        assert [o.status for o in outcomes] == ["encoded"] * 5 + ["failed"]
        assert [o.image_id for o in outcomes[:5]] == [image_id_of(b) for b in images]
        assert all(o.latent is not None and o.latent.shape == (pool.latent_dim,) for o in outcomes[:5])
        again = await asyncio.gather(*(pool.encode(b) for b in images))
        assert {o.status for o in again} == {"cached"}
        (stats,) = await pool.stats()
        assert stats["images_compressed"] == 5 and stats["pid"] != os.getpid()  # model work in the actor
    finally:
        await pool.close()


async def test_killed_actor_is_restarted_and_the_batch_retried(
    model_dir: Path, tmp_path: Path, ray_cluster: None
) -> None:
    import ray

    config = encoder_config(model_dir, num_actors=1, max_batch=8, max_wait_ms=1)
    pool = await open_pool(config, StoreConfig(str(tmp_path / "store")))
    try:
        assert isinstance(pool, RayEncoderPool)
        (before,) = await pool.stats()
        images = [png(40 + n) for n in range(8)]
        waiters = [asyncio.create_task(pool.encode(b)) for b in images]
        while not pool.batcher.batch_sizes:  # the batch has been sent to the actor ...
            await asyncio.sleep(0.001)
        ray.kill(pool.actors[0], no_restart=False)  # ... which dies before it can answer
        outcomes = await asyncio.wait_for(asyncio.gather(*waiters), 120)
        # the retry ran on the restarted actor (or found what the dead one had already stored)
        assert {o.status for o in outcomes} <= {"encoded", "cached"}
        assert [o.image_id for o in outcomes] == [image_id_of(b) for b in images]
        (after,) = await pool.stats()
        assert after["pid"] != before["pid"]  # a new process: the actor really was restarted
        assert (await pool.encode(png(99))).status == "encoded"  # and it keeps serving
        ray.kill(pool.actors[0], no_restart=True)  # gone for good: the waiter learns it, no hang
        with pytest.raises(EncoderUnavailableError, match="no encoder could finish a batch of 1 images"):
            await pool.encode(png(100))
    finally:
        await pool.close()


async def test_store_outage_reaches_the_caller_as_itself_and_the_pool_recovers(
    model_dir: Path, tmp_path: Path, ray_cluster: None
) -> None:
    """A private redis-server (never the shared one) killed under a Ray pool: the caller gets
    StoreUnavailableError with the store's own message (the handler maps it to UNAVAILABLE), not a Ray
    wrapper or EncoderUnavailableError; once Redis is back (from its AOF), the same pool serves again."""
    if shutil.which("redis-server") is None:
        redis_unreachable("redis-server is not installed, so no private server can be started")
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    config = encoder_config(model_dir, num_actors=1, max_wait_ms=1)
    pool = await open_pool(config, StoreConfig(server.url, retry_s=0.5))
    try:
        assert (await pool.encode(png(60))).status == "encoded"
        server.kill()
        with pytest.raises(StoreUnavailableError) as caught:
            await pool.encode(png(61))
        assert "ray::" not in str(caught.value) and not isinstance(caught.value, EncoderUnavailableError)
        server.start()
        assert (await pool.encode(png(60))).status == "cached"
        assert (await pool.encode(png(61))).status == "encoded"
    finally:
        await pool.close()
        server.kill()


LOCAL_RAY = """
import os, subprocess, sys
from encoder_service.pool import init_ray
import ray
init_ray(None)
address = ray.get_runtime_context().gcs_address
print("mode:", os.environ.get("RAY_AUTH_MODE"))
# a process without the token, as anything else that reaches the ports would be, is refused
intruder = subprocess.run(
    [sys.executable, "-c", f"import ray; ray.init(address={address!r})"],
    env={**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": "/nonexistent"},
    capture_output=True, text=True, timeout=60,
)
refused = "InvalidAuthToken" in intruder.stderr or "Unauthenticated" in intruder.stderr
print("intruder:", intruder.returncode, refused)
ray.shutdown()
"""


def test_the_local_ray_that_onetoken_starts_refuses_callers_without_its_token(tmp_path: Path) -> None:
    """Ray 2.60 cannot bind a local cluster to loopback alone, so its token authentication stays on."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", LOCAL_RAY], env=env, capture_output=True, text=True, timeout=180
    )
    assert "mode: token" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "intruder: 1 True" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "Token authentication is enabled" not in done.stderr  # Ray's announcement stays off the console
