"""The For-Value engine: samples in (``inputs``), the resident model (``model``), the math of a
value (``valuation``), the engine core (``core``), and its two front ends: the offline
``Valuator`` (``valuator.py``) and the serving loop (``serving``).

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
        "AsyncEngine": "serving.async_engine", "EngineClosed": "serving.async_engine",
        "EngineOverloaded": "serving.async_engine", "ScoreHandle": "serving.answers",
        "ValuationConfig": "config",
        "ModelError": "model.loading", "ValuationModel": "model.loading", "load_model": "model.loading",
        "VllmOptions": "model.vllm_backbone",
        "EngineStats": "outputs", "ReferenceInfo": "outputs", "ScoreResult": "outputs",
        "TokenValues": "outputs", "Valuation": "outputs",
        "Covariance": "valuation.precondition", "CovarianceMismatch": "valuation.precondition",
        "Reference": "valuation.reference", "ReferenceMismatch": "valuation.reference",
        "EncodedSample": "inputs.samples", "SampleError": "inputs.samples", "SampleList": "inputs.samples",
        "read_jsonl": "inputs.readers",
        "Index": "index.index", "IndexValues": "index.results", "IndexMismatch": "index.store",
        "Valuator": "valuator",
    }

    __all__ = [*sorted(_EXPORTS), "__version__"]

    def __getattr__(name: str) -> Any:
        if name not in _EXPORTS:
            raise AttributeError(f"module 'forvalue.engine' has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
