"""Token gram of prediction errors ``e_t . e_s`` between two token sets."""

from __future__ import annotations

import torch

from . import dispatch
from .error_tiles import ErrorChunks, accumulate_mm, write_errors
from .logits import LogitTransform, check_inputs, chunk_error, compute_dtype, vocab_chunks
from .softmax import LSE_PARTIALS, logsumexp_torch, softmax_over_vocab
from .triton_utils import HAVE_TRITON


def error_gram_torch(Ha: torch.Tensor, la: torch.Tensor, Hb: torch.Tensor, lb: torch.Tensor,
                     W: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    # Both sides in one pass: stack the tokens so each vocabulary chunk is one GEMM for the
    # logits and one for the gram, and no T x V block ever exists. A gram of one token set
    # with itself (a squared norm) computes its errors once.
    dtype = compute_dtype(Ha, Hb, W)
    same = Ha is Hb and la is lb
    H = Ha.to(dtype) if same else torch.cat([Ha.to(dtype), Hb.to(dtype)])
    labels = la if same else torch.cat([la, lb])
    lse, _ = logsumexp_torch(H, W, labels, transform)
    Ta = Ha.shape[0]
    out = torch.zeros((Ta, Hb.shape[0]), dtype=dtype, device=H.device)
    for chunk in vocab_chunks(H, W, transform, dtype):
        error = chunk_error(chunk, labels, lse)
        out += error[:Ta] @ (error if same else error[Ta:]).T
    return out


def _error_gram_triton(Ha: torch.Tensor, la: torch.Tensor, Hb: torch.Tensor, lb: torch.Tensor,
                       W: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    # Per vocabulary chunk, kernels write both sides' errors and a GEMM adds Ea Eb^T: the gram
    # costs Ta Tb V on tensor cores instead of recomputing logits per tile pair.
    Ta, Tb = Ha.shape[0], Hb.shape[0]
    lse_a, _ = softmax_over_vocab(Ha, W, la, transform, None, LSE_PARTIALS)
    lse_b, _ = softmax_over_vocab(Hb, W, lb, transform, None, LSE_PARTIALS)
    out = torch.zeros((Ta, Tb), dtype=torch.float32, device=Ha.device)
    for start, parts in ErrorChunks(Ha, Ta + Tb, W.shape[0], transposed=False):
        write_errors(Ha, W, la, None, lse_a, transform, start, [p[:Ta] for p in parts])
        write_errors(Hb, W, lb, None, lse_b, transform, start, [p[Ta:] for p in parts])
        accumulate_mm([p[:Ta] for p in parts], [p[Ta:].T for p in parts], out)
    return out


error_gram_triton = _error_gram_triton if HAVE_TRITON else None


def error_gram(Ha: torch.Tensor, la: torch.Tensor, Hb: torch.Tensor, lb: torch.Tensor,
               W: torch.Tensor, *, bias: torch.Tensor | None = None, scale: float | None = None,
               softcap: float | None = None, backend: dispatch.Backend = "auto") -> torch.Tensor:
    """``(Ta, Tb)`` matrix of ``e_t . e_s``, exact over the whole vocabulary."""
    check_inputs(Ha, W, la, bias, scale, softcap)
    check_inputs(Hb, W, lb, bias, scale, softcap)
    impl = dispatch.pick("error_gram", backend, error_gram_torch, error_gram_triton, Ha, W, Hb, bias)
    return impl(Ha, la, Hb, lb, W, LogitTransform(bias, scale, softcap))
