"""How a call fails as a whole, shared by the clients and the replica set."""

from __future__ import annotations

import grpc

# Refusals a caller may retry after a pause (the server drains, or is full).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class ServerError(RuntimeError):
    """A call the server (or the connection) failed as a whole."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> ServerError:
        return cls(error.code(), error.details() or "")
