"""gRPC handlers: request messages in, response messages out, and the one place errors become codes.

Every domain error maps to one status code with a message that says what to do; anything unexpected is
logged and returned as INTERNAL. No error ends the server. What a call learns that its request line and
metrics report (the image id, the tokens generated) is told with `note`; timing, codes and counting are
the interceptor's (`llm_worker.interceptors`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from cache.errors import (
    CorruptRecordError,
    FingerprintMismatchError,
    NotIndexedError,
    StoreFullError,
    StoreUnavailableError,
)
from encoder_service.errors import EncoderUnavailableError, QueueFullError
from htcvlm.errors import InvalidImageError, InvalidQuestionError, PlacementError, RecordMismatchError
from htcvlm.generation import GenerationOptions
from llm_worker.errors import (
    DecodeQueueFullError,
    DecoderUnavailableError,
    ImageNotFoundError,
    InvalidRequestError,
)
from llm_worker.request_log import note
from llm_worker.service import AskCall, ImageRef, OneTokenService, SearchHit, Timings
from onetoken.v1 import onetoken_pb2 as pb
from onetoken.v1 import onetoken_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Most specific first: ImageTooLargeError is an InvalidImageError, NotIndexedError a KeyError.
STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidQuestionError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ImageNotFoundError, grpc.StatusCode.NOT_FOUND),
    (NotIndexedError, grpc.StatusCode.NOT_FOUND),
    (RecordMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (PlacementError, grpc.StatusCode.FAILED_PRECONDITION),  # this model cannot hold several images
    (FingerprintMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (CorruptRecordError, grpc.StatusCode.DATA_LOSS),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DecodeQueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (EncoderUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DecoderUnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return None


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    code = status_of(exc)
    if code is None:
        logger.exception("%s failed unexpectedly", method)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error in {method}: {exc}; see the server log"
        )
    message = str(exc)
    if code is grpc.StatusCode.DATA_LOSS:
        message += "; encode the image again to replace the damaged record"
    await context.abort(code, message)


async def _guard(context: grpc.aio.ServicerContext, method: str, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except Exception as exc:  # every error leaves as a status code, none ends the server
        await _abort(context, exc, method)
        raise AssertionError("unreachable: abort raises") from exc


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def _timings(t: Timings) -> pb.Timings:
    return pb.Timings(queue_ms=t.queue_ms, encode_ms=t.encode_ms, decode_ms=t.decode_ms, total_ms=t.total_ms)


def _hit(hit: SearchHit) -> pb.SearchHit:
    return pb.SearchHit(image_id=hit.image_id, score=hit.score, source_uri=hit.source_uri)


def _image_ref(ref: pb.ImageRef) -> ImageRef:
    which = ref.WhichOneof("image")
    if which is None:
        raise InvalidRequestError("an entry of images names no image: set its image_id or image_bytes")
    return ImageRef(
        image_id=ref.image_id or None, image_bytes=ref.image_bytes if which == "image_bytes" else None
    )


class OneTokenServicer(pb_grpc.OneTokenServicer):
    def __init__(self, service: OneTokenService) -> None:
        self.service = service

    async def EncodeImage(self, request: pb.EncodeImageRequest, context: Any) -> pb.EncodeImageResponse:
        async def run() -> pb.EncodeImageResponse:
            encoded = await self.service.encode(request.image, request.source_uri)
            note(image_id=encoded.image_id)
            return pb.EncodeImageResponse(
                image_id=encoded.image_id, cached=encoded.cached, latent_dim=len(encoded.latent)
            )

        return await _guard(context, "EncodeImage", run)

    def _options(self, o: pb.GenerationOptions) -> GenerationOptions:
        return self.service.generation_options(
            o.max_new_tokens, o.temperature, o.top_p, o.seed if o.HasField("seed") else None
        )

    async def _start_ask(self, request: pb.AskRequest) -> AskCall:
        options = self._options(request.options)
        which = request.WhichOneof("image")
        images = [_image_ref(ref) for ref in request.images]
        if which is None and not images:
            raise InvalidRequestError("set image_id or image_bytes, or list the images")
        first = images[0].image_id if images else request.image_id
        note(image_id=first or "")  # known before the call can fail ("" when asked by bytes)
        call = await self.service.ask(
            request.question,
            options,
            image_id=request.image_id if which == "image_id" else None,
            image_bytes=request.image_bytes if which == "image_bytes" else None,
            images=images,
        )
        note(image_id=call.image_id)
        return call

    async def _answer(self, call: AskCall) -> pb.AskResponse:
        answer = await call.answer()
        note(tokens=len(answer.token_ids), first_token_s=_seconds(call.timings.first_token_ms))
        return pb.AskResponse(
            image_id=call.image_id,
            image_ids=call.image_ids,
            answer=answer.text,
            finish_reason=answer.finish_reason,
            usage=pb.Usage(prompt_tokens=answer.prompt_tokens, completion_tokens=len(answer.token_ids)),
            timings=_timings(call.timings),
            token_ids=answer.token_ids,
        )

    async def Ask(self, request: pb.AskRequest, context: Any) -> pb.AskResponse:
        async def run() -> pb.AskResponse:
            return await self._answer(await self._start_ask(request))

        return await _guard(context, "Ask", run)

    async def AskSearch(self, request: pb.AskSearchRequest, context: Any) -> pb.AskSearchResponse:
        async def run() -> pb.AskSearchResponse:
            search = request.search
            which = search.WhichOneof("query")
            note(image_id=search.image_id)
            call, hits = await self.service.ask_search(
                request.question,
                self._options(request.options),
                search.k,
                image_id=search.image_id if which == "image_id" else None,
                image_bytes=search.image_bytes if which == "image_bytes" else None,
                latent=list(search.latent.values) if which == "latent" else None,
            )
            return pb.AskSearchResponse(answer=await self._answer(call), hits=[_hit(h) for h in hits])

        return await _guard(context, "AskSearch", run)

    async def AskStream(self, request: pb.AskRequest, context: Any) -> AsyncIterator[pb.AskStreamResponse]:
        try:
            call = await self._start_ask(request)
            generated, last = 0, None
            async for event in call.events():
                generated += event.finished != "eos"  # the EOS token is not part of the answer
                note(tokens=generated, first_token_s=_seconds(call.timings.first_token_ms))
                message = pb.AskStreamResponse(
                    text=event.text, token_id=event.token_id, image_id=call.image_id
                )
                if not event.finished:
                    yield message
                    continue
                message.finish_reason = event.finished
                message.image_ids.extend(call.image_ids)
                message.usage.CopyFrom(
                    pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=generated)
                )
                last = message
            if last is not None:  # held back until the call ends, so it carries the complete timings
                last.timings.CopyFrom(_timings(call.timings))
                yield last
        except Exception as exc:  # as in _guard
            await _abort(context, exc, "AskStream")

    async def Search(self, request: pb.SearchRequest, context: Any) -> pb.SearchResponse:
        async def run() -> pb.SearchResponse:
            which = request.WhichOneof("query")
            note(image_id=request.image_id)
            hits = await self.service.search(
                request.k,
                image_id=request.image_id if which == "image_id" else None,
                image_bytes=request.image_bytes if which == "image_bytes" else None,
                latent=list(request.latent.values) if which == "latent" else None,
            )
            return pb.SearchResponse(hits=[_hit(h) for h in hits])

        return await _guard(context, "Search", run)

    async def GetImage(self, request: pb.GetImageRequest, context: Any) -> pb.ImageInfo:
        async def run() -> pb.ImageInfo:
            note(image_id=request.image_id)
            info = await self.service.get_image(request.image_id)
            return pb.ImageInfo(
                image_id=info.image_id,
                model_fingerprint=info.fingerprint,
                source_uri=info.source_uri,
                created_at=info.created_at,
                voco_position=info.voco_position,
                n_voco=info.n_voco,
                latent_dim=info.latent_dim,
                kv_bytes=info.kv_bytes,
                indexed=info.indexed,
            )

        return await _guard(context, "GetImage", run)

    async def DeleteImage(self, request: pb.DeleteImageRequest, context: Any) -> pb.DeleteImageResponse:
        async def run() -> pb.DeleteImageResponse:
            note(image_id=request.image_id)
            return pb.DeleteImageResponse(deleted=await self.service.delete_image(request.image_id))

        return await _guard(context, "DeleteImage", run)
