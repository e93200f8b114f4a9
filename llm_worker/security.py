"""Who may call what: bearer tokens with roles, checked by a server interceptor, and TLS credentials.

- Tokens are never kept in plain text: the server holds `(role, sha256(token))` pairs, from a file of
  `ROLE SHA256` lines (`#` comments allowed) or the ONETOKEN_TOKENS variable in the same form (lines or
  `;`-separated). `onetoken token new --role reader` prints a fresh token and its line.
- A call carries `authorization: Bearer <token>` metadata. Its token's digest is compared with every
  known digest in constant time (`hmac.compare_digest`), so the comparison leaks nothing about how close
  a guess was. Tokens are never logged.
- Roles nest: `reader` (Ask, AskStream, Search, AskSearch, GetImage) < `writer` (+ EncodeImage) < `admin`
  (+ DeleteImage). No token or an unknown one: UNAUTHENTICATED; a known one without the role:
  PERMISSION_DENIED. Health checking and reflection stay open, so probes and stock tools work.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import grpc

logger = logging.getLogger(__name__)

Role = Literal["reader", "writer", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)  # in order: each role can do everything the ones before can

SERVICE = "/onetoken.v1.OneToken/"
NEEDS: dict[str, Role] = {
    SERVICE + "Ask": "reader",
    SERVICE + "AskStream": "reader",
    SERVICE + "Search": "reader",
    SERVICE + "AskSearch": "reader",
    SERVICE + "GetImage": "reader",
    SERVICE + "EncodeImage": "writer",
    SERVICE + "DeleteImage": "admin",
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")  # fmt: skip


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(role: Role) -> tuple[str, str]:
    """A fresh random token and the line that grants it `role` (the only form the server keeps)."""
    token = secrets.token_urlsafe(32)
    return token, f"{role} {digest(token)}"


@dataclass(frozen=True)
class TokenTable:
    """Known token digests and their roles."""

    entries: tuple[tuple[Role, str], ...]

    @classmethod
    def parse(cls, text: str, source: str = "tokens") -> TokenTable:
        """`ROLE SHA256` per line (or `;`-separated); ValueError naming the bad line otherwise."""
        entries: list[tuple[Role, str]] = []
        for n, raw in enumerate(text.replace(";", "\n").splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0] not in ROLES or len(parts[1]) != 64:
                raise ValueError(
                    f"{source} line {n} is not 'ROLE SHA256' with ROLE one of {ROLES} and the token's "
                    "SHA-256 hex (make one with `onetoken token new --role reader`)"
                )
            try:
                int(parts[1], 16)
            except ValueError:
                raise ValueError(f"{source} line {n}: {parts[1][:8]}… is not a SHA-256 hex digest") from None
            entries.append((parts[0], parts[1].lower()))  # type: ignore[arg-type]
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: str | None, inline: str | None) -> TokenTable:
        """The tokens of a file and of an inline text (ONETOKEN_TOKENS), together."""
        tables = [cls.parse(Path(path).read_text(), path)] if path else []
        tables += [cls.parse(inline, "ONETOKEN_TOKENS")] if inline else []
        return cls(tuple(e for t in tables for e in t.entries))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def role_of(self, token: str) -> Role | None:
        """The highest role granted to `token`, or None; every digest is compared, in constant time."""
        presented = digest(token)
        best: Role | None = None
        for role, known in self.entries:
            if hmac.compare_digest(presented, known) and (
                best is None or ROLES.index(role) > ROLES.index(best)
            ):
                best = role
        return best


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose bearer token lacks the role the method needs (see the module docstring)."""

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        token = bearer_token(details.invocation_metadata)
        role = self.tokens.role_of(token) if token else None
        needed = NEEDS.get(method, "admin")  # a method this table does not know needs the most
        if role is None:
            why = "no bearer token" if token is None else "an unknown token"
            code, message = (
                grpc.StatusCode.UNAUTHENTICATED,
                (
                    f"{method} needs a token with role {needed}; the call had {why} "
                    "(send 'authorization: Bearer <token>')"
                ),
            )
        elif ROLES.index(role) < ROLES.index(needed):
            code, message = (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs role {needed}; the token is {role}",
            )
        else:
            return await continuation(details)
        logger.info("refused %s: %s", method, code.name)
        return _refusal(await continuation(details), code, message)


def _refusal(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only aborts with `code`."""

    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def abort_stream(request: object, context: grpc.aio.ServicerContext):
        await context.abort(code, message)
        yield  # unreachable: makes this an async generator, as a server-streaming handler is

    if handler is not None and handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            abort_stream, handler.request_deserializer, handler.response_serializer
        )
    deserializer = handler.request_deserializer if handler is not None else None
    serializer = handler.response_serializer if handler is not None else None
    return grpc.unary_unary_rpc_method_handler(abort, deserializer, serializer)


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS with this certificate and key; with `client_ca`, mutual TLS (a client needs a certificate that
    CA signed)."""
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(client_ca).read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or 0.0.0.0-style wildcards parse above
