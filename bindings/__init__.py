"""The ways in: the ``forvalue`` CLI, the gRPC server and its Python clients."""

if __name__ != "forvalue.bindings":  # reached as `bindings` through the repository root: kernels/toplevel.py
    from runpy import run_path

    run_path(f"{__path__[0]}/../kernels/toplevel.py")["yield_name"](__name__, __file__)
else:
    from typing import Any

    __all__ = ["AsyncClient", "Client", "QueryAnswer", "ReferenceInfo", "Result", "ServerError",
               "TokenValues"]

    def __getattr__(name: str) -> Any:
        # The clients import grpc: load them when asked for, so that the CLI starts without it.
        if name in __all__:
            from . import client

            return getattr(client, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
