"""A validation-set reference: the sum of the samples' gradients ``G(b)`` and their count."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .version import __version__

NORMALIZATIONS = ("none", "mean", "cosine")


class ReferenceMismatch(ValueError):
    """A reference used with a model, tokenizer or normalisation it was not built with."""


@dataclass
class Reference:
    """``gradient_sum = sum_b G(b)`` (each ``G(b)`` normalised as ``normalize`` says) over
    ``count`` validation samples; scoring uses the mean ``Gbar = gradient_sum / count``.

    ``identity`` records what must match at scoring time (DESIGN.md section 1); ``info``
    records the rest (how the samples were labelled, errors skipped, ...).
    """

    gradient_sum: torch.Tensor
    count: int
    normalize: str
    identity: dict[str, str]
    info: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.count <= 0:
            raise ValueError("a reference needs at least one validation sample")

    def mean(self) -> torch.Tensor:
        return self.gradient_sum / self.count

    def check_compatible(self, identity: dict[str, str], normalize: str) -> None:
        """Raise ReferenceMismatch naming every field that differs."""
        diffs = [f"{key}: reference has {self.identity.get(key)!r}, scoring uses {value!r}"
                 for key, value in identity.items() if self.identity.get(key) != value
                 and key != "model_name"]
        if normalize != self.normalize:
            diffs.append(f"normalize: reference has {self.normalize!r}, scoring uses {normalize!r}")
        if diffs:
            raise ReferenceMismatch("this reference was built differently and cannot be used: "
                                    + "; ".join(diffs))

    def merge(self, other: Reference) -> Reference:
        """The reference of both validation sets (same model and normalisation required)."""
        other.check_compatible(self.identity, self.normalize)
        return Reference(self.gradient_sum + other.gradient_sum.to(self.gradient_sum),
                         self.count + other.count, self.normalize, dict(self.identity),
                         dict(self.info))

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file; identity, count and normalisation in its header."""
        metadata = {"format": "forvalue.reference/1", "count": str(self.count),
                    "normalize": self.normalize, "identity": json.dumps(self.identity),
                    "info": json.dumps(self.info)}
        tmp = f"{os.fspath(path)}.partial"
        save_file({"gradient_sum": self.gradient_sum.detach().cpu().contiguous()}, tmp, metadata)
        os.replace(tmp, path)  # never leave a half-written reference behind

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Reference:
        try:
            with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != "forvalue.reference/1":
                    raise ReferenceMismatch(f"{path} is not a forvalue reference file")
                gradient_sum = f.get_tensor("gradient_sum")
            identity = json.loads(metadata["identity"])
            count, normalize = int(metadata["count"]), metadata["normalize"]
            info = json.loads(metadata.get("info", "{}"))
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            if isinstance(exc, ReferenceMismatch):
                raise
            raise ReferenceMismatch(f"cannot read reference {path}: {exc}") from None
        if identity.get("forvalue_version") != __version__:
            raise ReferenceMismatch(
                f"{path} was built by forvalue {identity.get('forvalue_version')}, this is "
                f"{__version__}; rebuild the reference")
        return cls(gradient_sum, count, normalize, identity, info)
