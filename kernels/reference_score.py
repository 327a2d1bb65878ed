"""Per-token reference score ``s_t = e_t^T G h_t`` in one pass over the vocabulary."""

from __future__ import annotations

import torch

from . import dispatch
from .logits import LogitTransform, OnlineSoftmax, check_inputs, compute_dtype, label_terms, vocab_chunks
from .softmax import softmax_over_vocab
from .triton_utils import HAVE_TRITON, KernelConfig


def reference_score_torch(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, G: torch.Tensor,
                          transform: LogitTransform) -> torch.Tensor:
    # s_t = f'_y (G h)_y - E_p[f' (G h)]: the expectation runs as an online softmax whose
    # "values" are the columns of G h, so no separate log-sum-exp pass is needed.
    dtype = compute_dtype(H, W)
    Hc = H.to(dtype)
    softmax = OnlineSoftmax(H.shape[0], (), dtype, H.device)
    for chunk in vocab_chunks(H, W, transform, dtype):
        weights = softmax.update(chunk.logits)
        projected = (Hc @ G[chunk.start:chunk.stop].to(dtype).T).mul_(weights).mul_(chunk.slope)
        softmax.acc += projected.sum(dim=1)
    _, label_slope = label_terms(H, W, labels, transform, dtype)
    label_projected = (Hc * G[labels].to(dtype)).sum(dim=1)
    return label_slope * label_projected - softmax.acc / softmax.total


# Two 128 x 128 fp32 accumulators (H W^T and H G^T) with 8 warps: the fastest single tile of
# bench/perf/tune_kernels.py on an H200 across the SmolLM2, Qwen2.5-1.5B and Llama-3-8B shapes
# (within 14% of the best tile for each; bench/results/kernels.md).
SCORE_PARTIALS = KernelConfig(
    gpu=dict(BLOCK_T=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
    compact=dict(BLOCK_T=128, BLOCK_V=32, BLOCK_K=16, num_warps=8, num_stages=2),
    interpret=dict(BLOCK_T=32, BLOCK_V=64, BLOCK_K=32),
)
def _reference_score_triton(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, G: torch.Tensor,
                            transform: LogitTransform) -> torch.Tensor:
    # One pass: the split partials carry (max, sum, E[f' G h]) and the finaliser adds the label
    # term, so no log-sum-exp pass precedes it. An fp32 G beside half H (the engine's resident
    # reference) runs as two half matrices through the same tiles.
    score, _ = softmax_over_vocab(H, W, labels, transform, G, SCORE_PARTIALS)
    return score


reference_score_triton = _reference_score_triton if HAVE_TRITON else None


def reference_score(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, G: torch.Tensor, *,
                    bias: torch.Tensor | None = None, scale: float | None = None,
                    softcap: float | None = None,
                    backend: dispatch.Backend = "auto") -> torch.Tensor:
    """``s_t = e_t^T G h_t`` for every token, shape ``(T,)``; ``G`` is ``(V, d)``.

    ``e_t = (onehot(y_t) - softmax(l_t)) * f'(z_t)`` is the prediction error; the sum of
    ``s_t`` over a sample's label tokens is ``<G(sample), G>``.
    """
    check_inputs(H, W, labels, bias, scale, softcap)
    if G.shape != W.shape:
        raise ValueError(f"G must have the shape of W {tuple(W.shape)}, got {tuple(G.shape)}")
    impl = dispatch.pick("reference_score", backend, reference_score_torch, reference_score_triton,
                         H, W, G, bias)
    return impl(H, W, labels, G, LogitTransform(bias, scale, softcap))
