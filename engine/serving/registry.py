"""The serving engine's named references (and the covariances references may be built with).

A name maps to a resident reference, replaced atomically: a request keeps the resident it was
admitted with, whatever happens to the name afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..outputs import ReferenceInfo
from ..valuation.label_math import LabelMath
from ..valuation.precondition import Covariance
from ..valuation.reference import Reference
from ..valuation.scoring import ResidentReference


@dataclass(frozen=True)
class Resident:
    info: ReferenceInfo
    reference: ResidentReference


class ReferenceRegistry:
    def __init__(self, math: LabelMath) -> None:
        self.math = math
        self._residents: dict[str, Resident] = {}
        self._versions: dict[str, int] = {}
        self._covariances: dict[str, Covariance] = {}

    def put(self, name: str, reference: Reference, *, merge: bool = False,
            precondition: str | None = None) -> ReferenceInfo:
        """Install ``reference`` under ``name`` (merged into the current one with ``merge``).
        Raises ReferenceMismatch when it was built for another model or tokenizer, or, when
        ``precondition`` is given, with another preconditioner."""
        reference.check_compatible(self.math.model.identity, reference.normalize,
                                   reference.precondition if precondition is None else precondition)
        skipped = int(reference.info.get("skipped", 0))  # of this build, not of a merged one
        current = self._residents.get(name)
        if merge and current is not None:
            reference = current.reference.reference.merge(reference)
        self._versions[name] = self._versions.get(name, 0) + 1
        info = ReferenceInfo(name, reference.count, reference.normalize, reference.info.get("loss_on", ""),
                             skipped, self._versions[name],
                             reference.precondition or "none", reference.damping,
                             reference.covariance_name if reference.precondition else "",
                             reference.fingerprint())
        self._residents[name] = Resident(info, ResidentReference(reference, self.math))
        return info

    def get(self, name: str) -> Resident | None:
        return self._residents.get(name)

    def drop(self, name: str) -> bool:
        return self._residents.pop(name, None) is not None

    def infos(self) -> list[ReferenceInfo]:
        return [resident.info for resident in self._residents.values()]

    def names(self) -> list[str]:
        return sorted(self._residents)

    def __len__(self) -> int:
        return len(self._residents)

    def put_covariance(self, name: str, covariance: Covariance, loss_on: str) -> None:
        """Make ``covariance`` available to reference builds under ``name``."""
        covariance.check_compatible(self.math.model.identity, loss_on)
        self._covariances[name] = covariance

    def covariance(self, name: str) -> Covariance:
        if name not in self._covariances:
            raise ValueError(f"unknown covariance {name!r}; loaded: {sorted(self._covariances)} "
                             "(or 'valid': the reference's own samples)")
        return self._covariances[name]
