"""Random projection of the prediction error over the vocabulary, ``R_V^T e_t``."""

from __future__ import annotations

import torch

from . import dispatch
from .logits import LogitTransform, OnlineSoftmax, check_inputs, compute_dtype, label_terms, vocab_chunks


def error_sketch_torch(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, R: torch.Tensor,
                       transform: LogitTransform) -> torch.Tensor:
    # Attention with query h_t, keys W (the vocabulary) and values f' * R: one online pass.
    dtype = compute_dtype(H, W)
    Rc = R.to(dtype)
    softmax = OnlineSoftmax(H.shape[0], (R.shape[1],), dtype, H.device)
    for chunk in vocab_chunks(H, W, transform, dtype):
        weights = softmax.update(chunk.logits).mul_(chunk.slope)
        softmax.acc += weights @ Rc[chunk.start:chunk.stop]
    _, label_slope = label_terms(H, W, labels, transform, dtype)
    label_rows = Rc[labels] * (label_slope[:, None] if torch.is_tensor(label_slope) else label_slope)
    return label_rows - softmax.acc / softmax.total[:, None]


def error_sketch(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, R_V: torch.Tensor, *,
                 bias: torch.Tensor | None = None, scale: float | None = None,
                 softcap: float | None = None,
                 backend: dispatch.Backend = "auto") -> torch.Tensor:
    """``R_V^T e_t`` for every token, shape ``(T, k)``; ``R_V`` is ``(V, k)``."""
    check_inputs(H, W, labels, bias, scale, softcap)
    if R_V.dim() != 2 or R_V.shape[0] != W.shape[0]:
        raise ValueError(f"R_V must have shape ({W.shape[0]}, k), got {tuple(R_V.shape)}")
    impl = dispatch.pick("error_sketch", backend, H.device, error_sketch_torch, None)
    return impl(H, W, labels, R_V, LogitTransform(bias, scale, softcap))
