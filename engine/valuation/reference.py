"""A validation-set reference: the sum of the samples' gradients ``G(b)`` and their count, and,
for the preconditioned value, the raw moment sum ``sum h h^T`` its preconditioner comes from."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import replace_atomically
from ..config import NORMALIZATIONS
from ..version import __version__
from .precondition import Preconditioner

REFERENCE_FORMAT = "forvalue.reference/1"
OWN_SAMPLES = "valid"  # ``covariance`` of a reference whose A comes from its own samples


class ReferenceMismatch(ValueError):
    """A reference used with a model, tokenizer, normalisation or preconditioner it was not
    built with, or merged with one it cannot be merged with."""


@dataclass
class Reference:
    """``gradient_sum = sum_b G(b)`` (each ``G(b)`` normalised as ``normalize`` says) over
    ``count`` validation samples; scoring uses the mean ``Gbar = gradient_sum / count``.

    Preconditioned (``precondition="input"``): ``moment_sum`` (float64 ``sum h h^T`` over
    ``tokens`` states) and ``damping`` give ``P``; scoring uses ``Gbar P``, derived on load.
    ``covariance`` says where ``A`` came from: "valid" (these samples) or the fingerprint of an
    external covariance. ``identity`` records what must match at scoring time; ``info`` the rest
    (how the samples were labelled, errors skipped, ``A``'s effective rank, ...).
    """

    gradient_sum: torch.Tensor
    count: int
    normalize: str
    identity: dict[str, str]
    info: dict[str, str] = field(default_factory=dict)
    precondition: str | None = None
    damping: float = 0.0
    moment_sum: torch.Tensor | None = None
    tokens: int = 0
    covariance: str = ""

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.count <= 0:
            raise ValueError("a reference needs at least one validation sample")
        if self.precondition is not None and (self.moment_sum is None or self.tokens <= 0
                                              or not self.damping > 0):
            raise ValueError("a preconditioned reference needs its moment sum, token count and damping")

    def mean(self) -> torch.Tensor:
        return self.gradient_sum / self.count

    def preconditioner(self) -> Preconditioner | None:
        if self.precondition is None:
            return None
        return Preconditioner(self.moment_sum, self.tokens, self.damping)

    def describe(self) -> str:
        """How this reference values, in a few words (for errors and listings)."""
        if self.precondition is None:
            return f"normalize={self.normalize}, no preconditioner"
        return (f"normalize={self.normalize}, precondition={self.precondition} "
                f"(damping {self.damping:g}, covariance {self.covariance_name})")

    def fingerprint(self) -> str:
        """A digest of what a score depends on: the sums, the count, the model's identity and
        the options. Replicas serving one name must agree on it (the client refuses to mix)."""
        digest = hashlib.sha256(json.dumps([self.count, self.normalize, self.identity, self.precondition,
                                            self.damping, self.tokens, self.covariance],
                                           sort_keys=True).encode())
        for tensor in (self.gradient_sum, self.moment_sum):
            if tensor is not None:
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:32]

    @property
    def covariance_name(self) -> str:
        return self.covariance if self.covariance == OWN_SAMPLES else f"file {self.covariance[:12]}"

    def check_compatible(self, identity: dict[str, str], normalize: str,
                         precondition: str | None = None, damping: float | None = None) -> None:
        """Raise ReferenceMismatch naming every field that differs. ``damping=None`` accepts
        the reference's own."""
        diffs = [f"{key}: reference has {self.identity.get(key)!r}, scoring uses {value!r}"
                 for key, value in identity.items() if self.identity.get(key) != value
                 and key != "model_name"]
        if normalize != self.normalize:
            diffs.append(f"normalize: reference has {self.normalize!r}, scoring uses {normalize!r}")
        if precondition != self.precondition:
            diffs.append(f"precondition: reference has {self.precondition!r}, scoring uses {precondition!r}")
        elif damping is not None and precondition is not None and damping != self.damping:
            diffs.append(f"damping: reference has {self.damping:g}, scoring uses {damping:g}")
        if diffs:
            raise ReferenceMismatch("this reference was built differently and cannot be used: "
                                    + "; ".join(diffs))

    def merge(self, other: Reference) -> Reference:
        """The reference of both validation sets (same model, normalisation and preconditioner).

        With ``A`` from the references' own samples the moment sums add up and ``P`` follows;
        with an external covariance both must have used the same one. Cosine references with
        their own ``A`` cannot merge: each sample's norm was taken under its own set's ``P``.
        """
        other.check_compatible(self.identity, self.normalize, self.precondition, self.damping)
        moment_sum, tokens = self.moment_sum, self.tokens
        if self.precondition is not None:
            if self.covariance != other.covariance:
                raise ReferenceMismatch("cannot merge references preconditioned with different "
                                        f"covariances ({self.covariance_name} and {other.covariance_name})")
            if self.covariance == OWN_SAMPLES:
                if self.normalize == "cosine":
                    raise ReferenceMismatch(
                        "cannot merge cosine references whose covariance comes from their own samples: "
                        "each norm depends on its own set's preconditioner; build one reference over "
                        "the union, or build both with the same covariance file")
                moment_sum = self.moment_sum + other.moment_sum.to(self.moment_sum)
                tokens = self.tokens + other.tokens
        return Reference(self.gradient_sum + other.gradient_sum.to(self.gradient_sum),
                         self.count + other.count, self.normalize, dict(self.identity),
                         dict(self.info), self.precondition, self.damping, moment_sum, tokens,
                         self.covariance)

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file; identity, count, normalisation and preconditioner in its header."""
        metadata = {"format": REFERENCE_FORMAT, "count": str(self.count),
                    "normalize": self.normalize, "identity": json.dumps(self.identity),
                    "info": json.dumps(self.info)}
        tensors = {"gradient_sum": self.gradient_sum.detach().cpu().contiguous()}
        if self.precondition is not None:
            metadata.update(precondition=self.precondition, damping=repr(self.damping),
                            tokens=str(self.tokens), covariance=self.covariance)
            tensors["moment_sum"] = self.moment_sum.detach().cpu().to(torch.float64).contiguous()
        replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Reference:
        try:
            with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != REFERENCE_FORMAT:
                    raise ReferenceMismatch(f"{path} is not a forvalue reference file")
                gradient_sum = f.get_tensor("gradient_sum")
                moment_sum = f.get_tensor("moment_sum") if "moment_sum" in f.keys() else None
            identity = json.loads(metadata["identity"])
            count, normalize = int(metadata["count"]), metadata["normalize"]
            info = json.loads(metadata.get("info", "{}"))
            precondition = metadata.get("precondition")
            damping, tokens = float(metadata.get("damping", 0)), int(metadata.get("tokens", 0))
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            if isinstance(exc, ReferenceMismatch):
                raise
            raise ReferenceMismatch(f"cannot read reference {path}: {exc}") from None
        if identity.get("forvalue_version") != __version__:
            raise ReferenceMismatch(
                f"{path} was built by forvalue {identity.get('forvalue_version')}, this is "
                f"{__version__}; rebuild the reference")
        return cls(gradient_sum, count, normalize, identity, info, precondition, damping, moment_sum,
                   tokens, metadata.get("covariance", ""))
