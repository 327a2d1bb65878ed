"""The client SDK: synchronous and asynchronous clients of the server, and replicated calls.
It needs neither torch nor the engine."""

from ..wire import QueryAnswer, ReferenceInfo, Result, TokenValues
from .clients import AsyncClient, Client
from .errors import ServerError

__all__ = ["AsyncClient", "Client", "QueryAnswer", "ReferenceInfo", "Result", "ServerError", "TokenValues"]
