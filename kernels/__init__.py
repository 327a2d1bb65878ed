"""Vocabulary-chunked ops of For-Value: no ``T x V`` logit matrix is ever built.

Each op has a Triton kernel (CUDA) and a torch twin chunked over the vocabulary (CPU and
the test oracle); ``backend="auto"|"torch"|"triton"`` chooses.
"""

from .dispatch import BACKENDS, Backend
from .error_gram import error_gram
from .error_outer import error_outer
from .error_sketch import error_sketch
from .logits import memory_budget, set_memory_budget
from .reference_score import reference_score
from .vocab_logsumexp import vocab_logsumexp

__all__ = [
    "BACKENDS",
    "Backend",
    "error_gram",
    "error_outer",
    "error_sketch",
    "memory_budget",
    "reference_score",
    "set_memory_budget",
    "vocab_logsumexp",
]
