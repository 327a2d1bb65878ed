"""Bearer-token authentication: where ``forvalue serve`` and ``forvalue stream`` find the token,
and the server interceptor that refuses calls without it."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

TOKEN_VARIABLE = "FORVALUE_TOKEN"


def read_token(token_file: Path | None) -> str | None:
    """The token in ``token_file``, else in $FORVALUE_TOKEN, else None (no authentication).
    An empty token is refused: it would authenticate nothing."""
    token = os.environ.get(TOKEN_VARIABLE)
    if token_file is not None:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    if token is not None and not token:
        raise ValueError("the bearer token is empty")
    return token


class BearerToken(grpc.aio.ServerInterceptor):
    """Every call must carry ``authorization: Bearer TOKEN`` (compared in constant time);
    ``counters["unauthenticated"]`` counts the refusals."""

    def __init__(self, token: str, counters: dict[str, int]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._counters = counters

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        offered = str(metadata.get("authorization", "")).encode()
        if handler is None or hmac.compare_digest(offered, self._expected):
            return handler
        self._counters["unauthenticated"] += 1
        return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only aborts (read nothing, run nothing)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}
    return make[handler.request_streaming, handler.response_streaming](
        refuse, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
