"""``G = sum_t w_t e_t h_t^T``: the output-projection gradient of a weighted set of tokens."""

from __future__ import annotations

import torch

from . import dispatch
from .error_tiles import ErrorChunks, accumulate_mm, write_errors
from .logits import LogitTransform, check_inputs, chunk_error, compute_dtype, vocab_chunks
from .softmax import LSE_PARTIALS, logsumexp_torch, softmax_over_vocab
from .triton_utils import HAVE_TRITON


def error_outer_torch(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                      weights: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    dtype = compute_dtype(H, W)
    lse, _ = logsumexp_torch(H, W, labels, transform)
    weighted_H = H.to(dtype) * weights.to(dtype)[:, None]
    out = torch.empty(W.shape, dtype=dtype, device=H.device)
    for chunk in vocab_chunks(H, W, transform, dtype):
        out[chunk.start:chunk.stop] = chunk_error(chunk, labels, lse).T @ weighted_H
    return out


def _error_outer_triton(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                        weights: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    # Chunk by chunk: a kernel writes the weighted errors, a GEMM adds E^T H into the chunk's
    # rows. Each output row has one writer and a fixed order: deterministic.
    lse, _ = softmax_over_vocab(H, W, labels, transform, None, LSE_PARTIALS)
    out = torch.zeros(W.shape, dtype=torch.float32, device=H.device)
    for start, parts in ErrorChunks(H, H.shape[0], W.shape[0], transposed=True):
        write_errors(H, W, labels, weights, lse, transform, start, parts)
        accumulate_mm([p.T for p in parts], [H], out[start:start + parts[0].shape[1]])
    return out


error_outer_triton = _error_outer_triton if HAVE_TRITON else None


def error_outer(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
                scale: float | None = None, softcap: float | None = None,
                backend: dispatch.Backend = "auto") -> torch.Tensor:
    """``sum_t w_t e_t h_t^T``, shape ``(V, d)``, fp32 (fp64 for fp64 inputs).

    With unit weights this is the gradient of ``sum_t log p_t[y_t]`` with respect to ``W``.
    """
    check_inputs(H, W, labels, bias, scale, softcap)
    if weights is None:
        weights = torch.ones(H.shape[0], dtype=torch.float32, device=H.device)
    if weights.shape != (H.shape[0],):
        raise ValueError(f"weights must have shape ({H.shape[0]},), got {tuple(weights.shape)}")
    impl = dispatch.pick("error_outer", backend, error_outer_torch, error_outer_triton,
                         H, W, bias)
    return impl(H, W, labels, weights, LogitTransform(bias, scale, softcap))
