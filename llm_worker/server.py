"""The gRPC server: OneToken's API plus standard health checking and server reflection.

`start(config)` returns a running server (tests bind port 0 and read the chosen port back);
`serve(config)` runs one until SIGINT/SIGTERM. Reflection lets stock tools list and call the API:
`grpcurl -plaintext localhost:50051 list`.

Every call of the API passes the interceptors in `start`'s one list, outermost first: the observer
(`llm_worker.interceptors`: metrics and the request log) and any wrapper added after it. Metrics are
served at http://HOST:METRICS_PORT/metrics when `config.metrics_port` is set (`llm_worker.metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llm_worker.config import WorkerConfig
from llm_worker.handlers import OneTokenServicer
from llm_worker.interceptors import CallObserver
from llm_worker.metrics import Metrics, MetricsEndpoint
from llm_worker.request_log import configure_logging
from llm_worker.security import AuthInterceptor, server_credentials
from llm_worker.service import OneTokenService
from onetoken.v1 import onetoken_pb2 as pb
from onetoken.v1 import onetoken_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OneToken"].full_name  # "onetoken.v1.OneToken"


@dataclass
class RunningServer:
    server: grpc.aio.Server
    service: OneTokenService
    health: health.aio.HealthServicer
    port: int
    watcher: asyncio.Task[None]
    metrics: Metrics
    endpoint: MetricsEndpoint | None  # None: metrics are kept but not served (metrics_port None)

    @property
    def address(self) -> str:
        return f"{self.service.config.host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics are served on (the bound one when configured 0), None when off."""
        return None if self.endpoint is None else self.endpoint.port

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls, let running ones finish for `grace` seconds, then release everything."""
        self.watcher.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.endpoint is not None:
            self.endpoint.close()
        await self.service.close()


async def watch_health(service: OneTokenService, servicer: health.aio.HealthServicer) -> None:
    """Keep the health service true: NOT_SERVING (for "" and the API) while the decoding loop is down or
    the store fails its retries, SERVING again once both work, so a probe restarts only a worker that
    cannot answer."""
    serving = True
    while True:
        await asyncio.sleep(service.config.health_check_s)
        try:
            problem = await service.health()
        except Exception as e:  # a failing check is itself a reason not to serve; the next one retries
            problem = f"the health check failed: {e}"
        if (problem is None) == serving:
            continue
        serving = problem is None
        if serving:
            logger.warning("healthy again: SERVING")
        else:
            logger.error("NOT_SERVING: %s", problem)
        statuses = health_pb2.HealthCheckResponse
        for name in ("", SERVICE_NAME):
            await servicer.set(name, statuses.SERVING if serving else statuses.NOT_SERVING)


async def start(config: WorkerConfig, service: OneTokenService | None = None) -> RunningServer:
    service = service or await OneTokenService.open(config)
    metrics = Metrics()
    metrics.watch(service)
    limit = config.max_message_mb * 1024 * 1024
    # wrappers around every call, outermost first: the observer sees every call, refused ones included
    interceptors: list[grpc.aio.ServerInterceptor] = [CallObserver(SERVICE_NAME, metrics)]
    if config.tokens:
        interceptors.append(AuthInterceptor(config.tokens))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    pb_grpc.add_OneTokenServicer_to_server(OneTokenServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    if config.tls_cert and config.tls_key:
        credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        port = server.add_secure_port(config.address, credentials)
    else:
        port = server.add_insecure_port(config.address)
    if port == 0:
        await service.close()
        raise OSError(f"cannot bind {config.address}")
    endpoint = None
    if config.metrics_port is not None:
        try:
            endpoint = MetricsEndpoint(metrics, config.host, config.metrics_port)
        except OSError as e:
            await service.close()
            raise OSError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {e}") from e
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    watcher = asyncio.get_running_loop().create_task(watch_health(service, health_servicer))
    tls = "mutual TLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext"
    auth = f"{len(config.tokens.entries)} tokens" if config.tokens else "no authentication"
    logger.info("OneToken serving on %s:%d (%s, %s)", config.host, port, tls, auth)
    running = RunningServer(server, service, health_servicer, port, watcher, metrics, endpoint)
    if running.metrics_port is not None:
        logger.info("metrics at http://%s:%d/metrics", config.host, running.metrics_port)
    return running


async def serve(config: WorkerConfig, ready: asyncio.Event | None = None) -> None:
    """Run a server until SIGINT or SIGTERM, then shut it down gracefully. Logging is this process's:
    request lines shown and `config.log_format` applied (`request_log.configure_logging`)."""
    configure_logging(config.log_format)
    running = await start(config)
    print(f"OneToken listening on {config.host}:{running.port}", flush=True)
    if running.metrics_port is not None:
        print(f"metrics at http://{config.host}:{running.metrics_port}/metrics", flush=True)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down")
    await running.stop()
