"""Log-sum-exp of the transformed logits over the vocabulary, and the label's logit."""

from __future__ import annotations

import torch

from . import dispatch
from .logits import LogitTransform, OnlineSoftmax, check_inputs, compute_dtype, label_terms, vocab_chunks


def vocab_logsumexp_torch(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                          transform: LogitTransform) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(H, W)
    softmax = OnlineSoftmax(H.shape[0], (), dtype, H.device)
    for chunk in vocab_chunks(H, W, transform, dtype):
        softmax.update(chunk.logits)
    label_logit, _ = label_terms(H, W, labels, transform, dtype)
    return softmax.logsumexp(), label_logit


def vocab_logsumexp(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, *,
                    bias: torch.Tensor | None = None, scale: float | None = None,
                    softcap: float | None = None,
                    backend: dispatch.Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``lse_t = log sum_v exp(l_t[v])`` and ``l_t[y_t]`` for every token, shapes ``(T,)``.

    ``H`` is ``(T, d)``, ``W`` the ``(V, d)`` output projection, ``labels`` ``(T,)`` in
    ``[0, V)``; ``l = f(H W^T + bias)`` with the optional logit scale and final softcap.
    """
    check_inputs(H, W, labels, bias, scale, softcap)
    impl = dispatch.pick("vocab_logsumexp", backend, H.device, vocab_logsumexp_torch, None)
    return impl(H, W, labels, LogitTransform(bias, scale, softcap))
