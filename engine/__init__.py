"""The For-Value engine: model loading, samples, valuation."""

from .model import ModelError, ValuationModel, load_model
from .reference import Reference, ReferenceMismatch
from .samples import EncodedSample, SampleError, SampleList, read_jsonl
from .valuator import TokenValues, Valuator
from .version import __version__

__all__ = [
    "EncodedSample",
    "ModelError",
    "Reference",
    "ReferenceMismatch",
    "SampleError",
    "SampleList",
    "TokenValues",
    "ValuationModel",
    "Valuator",
    "__version__",
    "load_model",
    "read_jsonl",
]
