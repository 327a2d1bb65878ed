"""What the index answers: values of the stored samples, and a query's ranked samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..inputs.samples import SampleError


@dataclass
class IndexValues:
    """Values of the stored samples (in index order) against each group of a target."""

    ids: list[str]
    sources: np.ndarray  # each sample's source (training file) number
    rows: np.ndarray  # and its row in that source
    values: np.ndarray  # (samples, groups) float64
    errors: list[SampleError] = field(default_factory=list)  # the target's bad samples
    estimated: np.ndarray | None = None  # per sample: a coarse estimate, not valued exactly

    def exact_rows(self) -> np.ndarray:
        """The positions of the samples valued exactly (all, unless shortlisted)."""
        return np.arange(len(self.ids)) if self.estimated is None else exact_rows(self.estimated)


def exact_rows(estimated: np.ndarray) -> np.ndarray:
    """The positions valued exactly (where none is, all: the estimates are what there is)."""
    return np.arange(len(estimated)) if estimated.all() else np.flatnonzero(~estimated)


def ranked_answers(ids: list[str], values: np.ndarray, samples: int, errors: list[SampleError],
                   top: int) -> list[dict[str, Any]]:
    """A query's answer per sample (in order): its ``top`` most and least valuable of the
    valued stored samples (``values``: one column per sample without an error), or its error."""
    failed = {e.index for e in errors}
    usable = [i for i in range(samples) if i not in failed]
    answers = []
    for column, position in enumerate(usable):
        order = np.argsort(-values[:, column], kind="stable")
        ranked = [{"id": ids[i], "value": float(values[i, column])} for i in order]
        answers.append({"position": position, "most": ranked[:top], "least": ranked[::-1][:top]})
    answers.extend({"position": error.index, "error": str(error)} for error in errors)
    return sorted(answers, key=lambda answer: answer["position"])
