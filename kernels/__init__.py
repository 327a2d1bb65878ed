"""Vocabulary-chunked ops of For-Value: no ``T x V`` logit matrix is ever built.

Each op has a Triton kernel (CUDA) and a torch twin chunked over the vocabulary (CPU and
the test oracle); ``backend="auto"|"torch"|"triton"`` chooses. The op modules share helpers
only through the common modules (``logits``, ``softmax``, ``error_tiles``, ``triton_utils``,
``dispatch``), never through one another.
"""

if __name__ != "forvalue.kernels":  # reached as `kernels` through the repository root: kernels/toplevel.py
    from runpy import run_path

    run_path(f"{__path__[0]}/../kernels/toplevel.py")["yield_name"](__name__, __file__)
else:
    from .dispatch import BACKENDS, Backend
    from .error_gram import error_gram
    from .error_outer import error_outer
    from .error_sketch import error_sketch
    from .logits import LogitTransform, VocabChunk, logit_chunks, memory_budget, set_memory_budget
    from .reference_score import reference_score
    from .vocab_logsumexp import vocab_logsumexp

    __all__ = [
        "BACKENDS",
        "Backend",
        "LogitTransform",
        "VocabChunk",
        "error_gram",
        "error_outer",
        "error_sketch",
        "logit_chunks",
        "memory_budget",
        "reference_score",
        "set_memory_budget",
        "vocab_logsumexp",
    ]
