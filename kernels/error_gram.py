"""Token gram of prediction errors ``e_t . e_s`` between two token sets."""

from __future__ import annotations

import torch

from . import dispatch
from .logits import LogitTransform, check_inputs, chunk_error, compute_dtype, vocab_chunks
from .vocab_logsumexp import vocab_logsumexp_torch


def error_gram_torch(Ha: torch.Tensor, la: torch.Tensor, Hb: torch.Tensor, lb: torch.Tensor,
                     W: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    # Both sides in one pass: stack the tokens so each vocabulary chunk is one GEMM for the
    # logits and one for the gram, and no T x V block ever exists.
    dtype = compute_dtype(Ha, Hb, W)
    H = torch.cat([Ha.to(dtype), Hb.to(dtype)])
    labels = torch.cat([la, lb])
    lse, _ = vocab_logsumexp_torch(H, W, labels, transform)
    Ta = Ha.shape[0]
    out = torch.zeros((Ta, Hb.shape[0]), dtype=dtype, device=H.device)
    for chunk in vocab_chunks(H, W, transform, dtype):
        error = chunk_error(chunk, labels, lse)
        out += error[:Ta] @ error[Ta:].T
    return out


def error_gram(Ha: torch.Tensor, la: torch.Tensor, Hb: torch.Tensor, lb: torch.Tensor,
               W: torch.Tensor, *, bias: torch.Tensor | None = None, scale: float | None = None,
               softcap: float | None = None, backend: dispatch.Backend = "auto") -> torch.Tensor:
    """``(Ta, Tb)`` matrix of ``e_t . e_s``, exact over the whole vocabulary."""
    check_inputs(Ha, W, la, bias, scale, softcap)
    check_inputs(Hb, W, lb, bias, scale, softcap)
    impl = dispatch.pick("error_gram", backend, Ha.device, error_gram_torch, None)
    return impl(Ha, la, Hb, lb, W, LogitTransform(bias, scale, softcap))
