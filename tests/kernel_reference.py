"""Dense float64 oracle for the kernel ops: full logits, errors from autograd."""

from __future__ import annotations

import torch


def dense_errors(H, W, labels, bias=None, scale=None, softcap=None):
    """``(lse, label_logit, E)`` with ``E[t] = d log p_t[y_t] / d z_t`` by autograd, fp64."""
    z = (H.double() @ W.double().T).requires_grad_(True)
    zb = z + bias.double() if bias is not None else z
    logits = zb * scale if scale is not None else zb
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=1)
    label_logit = logits.gather(1, labels[:, None].long()).squeeze(1)
    (errors,) = torch.autograd.grad((label_logit - lse).sum(), z)
    return lse.detach(), label_logit.detach(), errors


def random_problem(T, V, d, *, dtype=torch.float32, seed=0, logit_std=1.0, with_bias=False):
    gen = torch.Generator().manual_seed(seed)
    H = torch.randn(T, d, generator=gen, dtype=torch.float64)
    W = torch.randn(V, d, generator=gen, dtype=torch.float64) * (logit_std / d**0.5)
    labels = torch.randint(0, V, (T,), generator=gen)
    bias = torch.randn(V, generator=gen, dtype=torch.float64) if with_bias else None
    cast = (lambda x: x.to(dtype)) if dtype != torch.float64 else (lambda x: x)
    return cast(H), cast(W), labels, (cast(bias) if bias is not None else None)
