"""``G = sum_t w_t e_t h_t^T``: the output-projection gradient of a weighted set of tokens."""

from __future__ import annotations

import torch

from . import dispatch
from .logits import LogitTransform, check_inputs, chunk_error, compute_dtype, vocab_chunks
from .vocab_logsumexp import vocab_logsumexp_torch


def error_outer_torch(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                      weights: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    dtype = compute_dtype(H, W)
    lse, _ = vocab_logsumexp_torch(H, W, labels, transform)
    weighted_H = H.to(dtype) * weights.to(dtype)[:, None]
    out = torch.empty(W.shape, dtype=dtype, device=H.device)
    for chunk in vocab_chunks(H, W, transform, dtype):
        out[chunk.start:chunk.stop] = chunk_error(chunk, labels, lse).T @ weighted_H
    return out


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
    impl = dispatch.pick("error_outer", backend, H.device, error_outer_torch, None)
    return impl(H, W, labels, weights, LogitTransform(bias, scale, softcap))
