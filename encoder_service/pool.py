"""Encoder pools: what the gRPC worker calls to encode one image, batched dynamically underneath.

- `LocalEncoderPool`: one `Encoder` in this process, run in a worker thread (tests, small setups).
- `RayEncoderPool`: `num_actors` Ray actors, one GPU each where Ray sees GPUs (else one CPU each),
  restarted after a crash with the batch retried on the new actor; batches go to the least busy actor.

`open_pool(config)` picks one by `config.backend`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from cache.factory import StoreConfig
from cache.timed import StoreCall
from encoder_service.batcher import DynamicBatcher
from encoder_service.config import EncoderConfig
from encoder_service.encoder import EncodedBatch, EncodeOutcome, Encoder
from encoder_service.errors import EncoderUnavailableError

logger = logging.getLogger(__name__)


class EncoderPool:
    """Encode images through a dynamic batcher; subclasses say how a batch runs."""

    fingerprint: str
    latent_dim: int

    def __init__(self, config: EncoderConfig, max_inflight: int) -> None:
        self.config = config
        self.batcher = DynamicBatcher(
            self.run_batch, config.max_batch, config.max_wait_ms, config.max_queue, max_inflight
        )
        # Given the store calls the encoders made (timed in their own processes), batch by batch.
        self.on_store_calls: Callable[[list[StoreCall]], None] | None = None

    def _outcomes(self, batch: EncodedBatch) -> list[EncodeOutcome]:
        if self.on_store_calls is not None and batch.store_calls:
            self.on_store_calls(batch.store_calls)
        return batch.outcomes

    async def encode(self, image: bytes, source_uri: str = "") -> EncodeOutcome:
        """The outcome for one image; QueueFullError when too many wait, EncoderUnavailableError when no
        encoder answers in time, StoreUnavailableError when the store is down."""
        return await self.batcher.submit(image, source_uri)

    async def run_batch(self, images: Sequence[bytes], uris: Sequence[str]) -> list[EncodeOutcome]:
        raise NotImplementedError

    async def close(self) -> None:
        await self.batcher.close()


class LocalEncoderPool(EncoderPool):
    """One in-process `Encoder`; batches run one at a time in a worker thread (the loop stays free)."""

    def __init__(self, config: EncoderConfig, store: StoreConfig) -> None:
        super().__init__(config, max_inflight=1)
        self.encoder = Encoder(config, store)
        self.fingerprint, self.latent_dim = self.encoder.info()

    async def run_batch(self, images: Sequence[bytes], uris: Sequence[str]) -> list[EncodeOutcome]:
        return self._outcomes(await asyncio.to_thread(self.encoder.encode_batch, images, uris))

    async def close(self) -> None:
        await super().close()
        self.encoder.close()


def init_ray(address: str | None) -> None:
    """Join the Ray cluster at `address`, or a local one (started if none runs)."""
    import ray

    if ray.is_initialized():
        return
    if address is None and "RAY_AUTH_MODE" not in os.environ:
        # A local cluster of this process. Ray's servers listen on every interface (Ray 2.60 cannot bind
        # them to loopback alone) and its protocol runs pickled code, so Ray's own default for a local
        # cluster stands: token authentication, with a token it makes (~/.ray/auth_token) and hands to
        # its processes. Setting the mode here would come too late for this process's cached Ray config,
        # so it stays unset; only Ray's line announcing that default is kept off the console.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        address=address,
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )


def actor_resources(config: EncoderConfig) -> dict[str, float]:
    """`num_gpus=1` per actor where the cluster has GPUs (unless configured), else one CPU."""
    import ray

    gpus = config.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"num_gpus": gpus, "num_cpus": 0 if gpus else 1}


def actor_count(config: EncoderConfig) -> int:
    """`config.num_actors`, or for 0 one actor per GPU of the cluster, whatever share of it each reserves
    (one on a cluster without GPUs): `docker-compose up --scale encoder=8` gives 8 encoders, and at 0.5
    GPU each the worker's leave half of every GPU to an ingest job's, which gets 8 too."""
    if config.num_actors:
        return config.num_actors
    import ray

    return max(1, int(ray.cluster_resources().get("GPU", 0.0)))


class RayEncoderPool(EncoderPool):
    """`num_actors` Ray actors wrapping `Encoder`. Made by `start()` (async: actors load the model).

    An actor that dies is restarted by Ray (`max_restarts=-1`) and the batch it was running is retried
    on it (`max_task_retries`); a batch that no actor finishes within `batch_timeout_s` fails its
    waiters with `EncoderUnavailableError`. Errors raised inside `Encoder.encode` (a store outage)
    reach the caller as their own type.
    """

    def __init__(self, config: EncoderConfig, actors: list[Any], info: tuple[str, int]) -> None:
        super().__init__(config, max_inflight=len(actors))
        self.actors = actors
        self.busy = [0] * len(actors)
        self.fingerprint, self.latent_dim = info

    @classmethod
    async def start(cls, config: EncoderConfig, store: StoreConfig) -> RayEncoderPool:
        import ray

        init_ray(config.ray_address)
        remote = ray.remote(Encoder).options(
            **actor_resources(config),
            max_restarts=-1,  # a crashed actor comes back (the model loads again)
            max_task_retries=3,  # and the batch it was running is retried there
        )
        actors = [remote.remote(config, store) for _ in range(actor_count(config))]
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(a.info.remote() for a in actors)), config.batch_timeout_s
            )
        except (ray.exceptions.RayActorError, TimeoutError) as e:
            for actor in actors:
                ray.kill(actor)
            raise EncoderUnavailableError(
                f"{len(actors)} encoder actors ({actor_resources(config)} each) did not start within "
                f"{config.batch_timeout_s:.0f} s: {e!r}; check the cluster's free resources and the model "
                f"folder {config.model_dir}"
            ) from e
        if len(set(infos)) != 1:
            raise EncoderUnavailableError(f"encoder actors disagree on the model: {infos}")
        logger.info("%d Ray encoder actors ready", len(actors))
        return cls(config, actors, infos[0])

    async def run_batch(self, images: Sequence[bytes], uris: Sequence[str]) -> list[EncodeOutcome]:
        import ray

        n = min(range(len(self.actors)), key=self.busy.__getitem__)
        self.busy[n] += 1
        try:
            ref = self.actors[n].encode_batch.remote(list(images), list(uris))
            return self._outcomes(await asyncio.wait_for(ref, timeout=self.config.batch_timeout_s))
        except (ray.exceptions.RayActorError, TimeoutError) as e:
            raise EncoderUnavailableError(
                f"no encoder could finish a batch of {len(images)} images (limit "
                f"{self.config.batch_timeout_s:.0f} s, actor restarts and retries included): {e!r}; "
                "check the Ray cluster"
            ) from e
        except ray.exceptions.RayTaskError as e:
            # Encoder.encode raised (a store outage): hand on the error itself, with its own message,
            # not Ray's wrapper around the actor's stack trace
            if isinstance(e.cause, Exception):
                raise e.cause from e
            raise
        finally:
            self.busy[n] -= 1

    async def stats(self) -> list[dict[str, int]]:
        """`Encoder.stats()` of every actor (model work done, process id)."""
        return list(await asyncio.gather(*(a.stats.remote() for a in self.actors)))

    async def close(self) -> None:
        """Fail pending requests and kill the actors (their resources go back to the cluster)."""
        import ray

        await super().close()
        for actor in self.actors:
            ray.kill(actor)


async def open_pool(config: EncoderConfig, store: StoreConfig) -> EncoderPool:
    """The pool `config.backend` names, writing to `store`, ready to encode (models loaded); `close()` it
    when done."""
    if config.backend == "local":
        return await asyncio.to_thread(LocalEncoderPool, config, store)
    return await RayEncoderPool.start(config, store)
