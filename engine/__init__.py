"""The For-Value engine: model loading, samples, valuation, the serving loop.

Names are imported on first use, so that ``forvalue.engine.version`` and the light modules
(configuration, ranking) load without torch.
"""

from __future__ import annotations

if __name__ != "forvalue.engine":  # reached as `engine` through the repository root: kernels/toplevel.py
    from runpy import run_path

    run_path(f"{__path__[0]}/../kernels/toplevel.py")["yield_name"](__name__, __file__)
else:
    import importlib
    from typing import Any

    from .version import __version__

    _EXPORTS = {
        "AsyncEngine": "async_engine", "EngineClosed": "async_engine", "EngineOverloaded": "async_engine",
        "ScoreHandle": "async_engine",
        "ValuationConfig": "config",
        "ModelError": "model", "ValuationModel": "model", "load_model": "model",
        "EngineStats": "outputs", "ReferenceInfo": "outputs", "ScoreResult": "outputs",
        "TokenValues": "outputs",
        "Covariance": "precondition", "CovarianceMismatch": "precondition",
        "Reference": "reference", "ReferenceMismatch": "reference",
        "EncodedSample": "samples", "SampleError": "samples", "SampleList": "samples",
        "read_jsonl": "readers",
        "Valuator": "valuator",
    }

    __all__ = [*sorted(_EXPORTS), "__version__"]

    def __getattr__(name: str) -> Any:
        if name not in _EXPORTS:
            raise AttributeError(f"module 'forvalue.engine' has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
