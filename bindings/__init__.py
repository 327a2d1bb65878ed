"""The ways in: the ``forvalue`` CLI, the gRPC server and its Python clients."""

from .client import AsyncClient, Client, ReferenceInfo, Result, ServerError, TokenValues

__all__ = ["AsyncClient", "Client", "ReferenceInfo", "Result", "ServerError", "TokenValues"]
