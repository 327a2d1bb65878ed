"""The For-Value engine: model loading, samples, valuation, the serving loop."""

from .async_engine import AsyncEngine, EngineClosed, EngineOverloaded, ReferenceInfo, ScoreResult
from .model import ModelError, ValuationModel, load_model
from .reference import Reference, ReferenceMismatch
from .samples import EncodedSample, SampleError, SampleList, read_jsonl
from .valuator import TokenValues, Valuator
from .version import __version__

__all__ = [
    "AsyncEngine",
    "EncodedSample",
    "EngineClosed",
    "EngineOverloaded",
    "ModelError",
    "Reference",
    "ReferenceInfo",
    "ReferenceMismatch",
    "SampleError",
    "SampleList",
    "ScoreResult",
    "TokenValues",
    "ValuationModel",
    "Valuator",
    "__version__",
    "load_model",
    "read_jsonl",
]
