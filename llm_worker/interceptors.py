"""The observing wrapper around every call of the API: a grpc.aio server interceptor.

`CallObserver` times each call of one service (unary and server-streaming alike), learns the status
code it ended with, and hands the finished `Call` to the metrics (`Metrics.observe_call`) and the
request log (`log_call`). Handlers stay free of both: what only they learn (an image id, the tokens of
an answer) they tell through `llm_worker.request_log.note`.

The status code of a call:
- returned normally: OK (or the code the handler set on its context);
- aborted (`context.abort`, how `llm_worker.handlers` reports every error): the code it aborted with;
- cancelled under it: DEADLINE_EXCEEDED when its deadline had passed, else CANCELLED (the client left);
- any other exception: UNKNOWN, the code grpc sends for it.
An aborted call is counted and logged as its handler unwinds, just after `abort` has sent the status, so
a client can see the code a moment before the call is counted.

`llm_worker.server.start` puts it first in the server's interceptor list: outermost, so it also sees
calls that an interceptor after it refuses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc

from llm_worker.metrics import Metrics
from llm_worker.request_log import Call, CallNote, log_call, log_request, open_note

Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Streaming = Callable[[Any, grpc.aio.ServicerContext], AsyncGenerator[Any, None]]


def status_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The code a call ended with (see the module docstring); `error` is what its handler raised."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):  # a stream closed early is cancelled too
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    code = context.code()  # set by abort() or set_code(); None when the handler set none
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class CallObserver(grpc.aio.ServerInterceptor):
    """Observe the calls of `service` ("onetoken.v1.OneToken"); other services' calls (health checks,
    reflection) pass untouched."""

    def __init__(self, service: str, metrics: Metrics) -> None:
        self.prefix = f"/{service}/"
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        path: str = handler_call_details.method  # type: ignore[attr-defined]  # "/onetoken.v1.OneToken/Ask"
        if handler is None or not path.startswith(self.prefix):
            return handler
        method = path.removeprefix(self.prefix)
        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary), **codecs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream), **codecs
            )
        return handler  # the API has no client-streaming methods

    def _unary(self, method: str, behavior: Unary) -> Unary:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, peer, note = self._begin(method, request, context)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as e:  # noted for its status code, and raised on unchanged
                error = e
                raise
            finally:
                self._end(method, context, error, started, peer, note)

        return observed

    def _streaming(self, method: str, behavior: Streaming) -> Streaming:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
            started, peer, note = self._begin(method, request, context)
            error: BaseException | None = None
            try:
                async with aclosing(behavior(request, context)) as messages:  # closed with this one
                    async for message in messages:
                        yield message
            except BaseException as e:  # as in _unary
                error = e
                raise
            finally:
                self._end(method, context, error, started, peer, note)

        return observed

    @staticmethod
    def _begin(method: str, request: Any, context: grpc.aio.ServicerContext) -> tuple[float, str, CallNote]:
        peer = context.peer()  # read now: a cancelled call no longer knows its peer
        log_request(method, peer, request)
        return time.perf_counter(), peer, open_note()

    def _end(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        error: BaseException | None,
        started: float,
        peer: str,
        note: CallNote,
    ) -> None:
        call = Call(method, status_code(context, error), time.perf_counter() - started, peer, note)
        self.metrics.observe_call(call)
        log_call(call)
