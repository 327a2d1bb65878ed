"""Log-sum-exp of the transformed logits over the vocabulary, and the label's logit."""

from __future__ import annotations

import torch

from . import dispatch
from .logits import LogitTransform, check_inputs
from .softmax import LSE_PARTIALS, logsumexp_torch, softmax_over_vocab
from .triton_utils import HAVE_TRITON

vocab_logsumexp_torch = logsumexp_torch


def _vocab_logsumexp_triton(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                            transform: LogitTransform) -> tuple[torch.Tensor, torch.Tensor]:
    # LSE_PARTIALS is looked up in this module at each call: bench/perf/tune_kernels.py swaps it here.
    return softmax_over_vocab(H, W, labels, transform, None, LSE_PARTIALS)


vocab_logsumexp_triton = _vocab_logsumexp_triton if HAVE_TRITON else None


def vocab_logsumexp(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, *,
                    bias: torch.Tensor | None = None, scale: float | None = None,
                    softcap: float | None = None,
                    backend: dispatch.Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``lse_t = log sum_v exp(l_t[v])`` and ``l_t[y_t]`` for every token, shapes ``(T,)``.

    ``H`` is ``(T, d)``, ``W`` the ``(V, d)`` output projection, ``labels`` ``(T,)`` in
    ``[0, V)``; ``l = f(H W^T + bias)`` with the optional logit scale and final softcap.
    """
    check_inputs(H, W, labels, bias, scale, softcap)
    impl = dispatch.pick("vocab_logsumexp", backend, vocab_logsumexp_torch, vocab_logsumexp_triton,
                         H, W, bias)
    return impl(H, W, labels, LogitTransform(bias, scale, softcap))
