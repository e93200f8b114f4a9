"""A small synchronous client of the OneToken API, for the CLI, the demo and the benchmarks.

Any gRPC client works (the .proto is in protos/, reflection is on); this one only saves boilerplate.
Errors arrive as `grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from onetoken.v1 import onetoken_pb2 as pb
from onetoken.v1 import onetoken_pb2_grpc as pb_grpc


class OneTokenClient:
    """`tls_ca`: talk TLS, trusting this CA's PEM (with `cert`/`key` too: mutual TLS); `token`: sent as
    `authorization: Bearer <token>` on every call."""

    def __init__(
        self,
        address: str,
        max_message_mb: int = 64,
        timeout_s: float | None = 60.0,
        *,
        tls_ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token: str | None = None,
    ) -> None:
        limit = max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes(),
                private_key=Path(key).read_bytes() if key else None,
                certificate_chain=Path(cert).read_bytes() if cert else None,
            )
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.OneTokenStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def encode(self, image: bytes, source_uri: str = "") -> pb.EncodeImageResponse:
        return self.stub.EncodeImage(
            pb.EncodeImageRequest(image=image, source_uri=source_uri),
            timeout=self.timeout_s,
            metadata=self.metadata,
        )

    @staticmethod
    def options(
        max_new_tokens: int = 0, temperature: float = 0.0, top_p: float = 0.0, seed: int | None = None
    ) -> pb.GenerationOptions:
        options = pb.GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        if seed is not None:
            options.seed = seed
        return options

    @staticmethod
    def ask_request(
        question: str,
        image_id: str | None = None,
        image: bytes | None = None,
        images: Sequence[str | bytes] = (),
        **options: Any,
    ) -> pb.AskRequest:
        """`images`: several images in one context, in order, each an image id (str) or image bytes."""
        request = pb.AskRequest(question=question, options=OneTokenClient.options(**options))
        if image is not None:
            request.image_bytes = image
        elif image_id is not None:
            request.image_id = image_id
        for ref in images:
            entry = request.images.add()
            if isinstance(ref, bytes):
                entry.image_bytes = ref
            else:
                entry.image_id = ref
        return request

    def ask_search(
        self,
        question: str,
        k: int = 8,
        image_id: str | None = None,
        image: bytes | None = None,
        latent: list[float] | None = None,
        **options: Any,
    ) -> pb.AskSearchResponse:
        """A Search by image id, image bytes or latent, then `question` over its (up to) k hits."""
        request = pb.AskSearchRequest(
            search=self.search_request(k, image_id, image, latent),
            question=question,
            options=self.options(**options),
        )
        return self.stub.AskSearch(request, timeout=self.timeout_s, metadata=self.metadata)

    def ask(self, question: str, **kwargs: object) -> pb.AskResponse:
        return self.stub.Ask(
            self.ask_request(question, **kwargs), timeout=self.timeout_s, metadata=self.metadata
        )  # type: ignore[arg-type]

    def ask_stream(self, question: str, **kwargs: object) -> Iterator[pb.AskStreamResponse]:
        return self.stub.AskStream(
            self.ask_request(question, **kwargs), timeout=self.timeout_s, metadata=self.metadata
        )  # type: ignore[arg-type]

    def search(
        self,
        k: int = 5,
        image_id: str | None = None,
        image: bytes | None = None,
        latent: list[float] | None = None,
    ) -> pb.SearchResponse:
        request = self.search_request(k, image_id, image, latent)
        return self.stub.Search(request, timeout=self.timeout_s, metadata=self.metadata)

    @staticmethod
    def search_request(
        k: int, image_id: str | None, image: bytes | None, latent: list[float] | None
    ) -> pb.SearchRequest:
        request = pb.SearchRequest(k=k)
        if image is not None:
            request.image_bytes = image
        elif latent is not None:
            request.latent.values.extend(latent)
        elif image_id is not None:
            request.image_id = image_id
        return request

    def get_image(self, image_id: str) -> pb.ImageInfo:
        return self.stub.GetImage(
            pb.GetImageRequest(image_id=image_id), timeout=self.timeout_s, metadata=self.metadata
        )

    def delete_image(self, image_id: str) -> pb.DeleteImageResponse:
        return self.stub.DeleteImage(
            pb.DeleteImageRequest(image_id=image_id), timeout=self.timeout_s, metadata=self.metadata
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> OneTokenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
