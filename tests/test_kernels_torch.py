"""The chunked torch twins against a dense float64 autograd oracle."""

import pytest
import torch

from forvalue.kernels import (
    error_gram,
    error_outer,
    error_sketch,
    reference_score,
    set_memory_budget,
    vocab_logsumexp,
)

from kernel_reference import dense_errors, random_problem

TRANSFORMS = [
    {},
    {"scale": 0.37},
    {"softcap": 3.0},
    {"scale": 2.0, "softcap": 5.0},
]


@pytest.fixture(autouse=True)
def tiny_budget():
    # A budget this small forces many vocabulary chunks even at test sizes.
    set_memory_budget(4096)
    yield
    set_memory_budget(None)


def rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("T,V,d", [(1, 300, 8), (7, 517, 16), (33, 1000, 5)])
def test_ops_match_dense_float64(transform, with_bias, T, V, d):
    H, W, labels, bias = random_problem(T, V, d, dtype=torch.float64, seed=T + V,
                                        logit_std=4.0, with_bias=with_bias)
    kw = dict(bias=bias, **transform)
    lse_ref, label_ref, E = dense_errors(H, W, labels, **kw)

    lse, label_logit = vocab_logsumexp(H, W, labels, **kw)
    assert rel_err(lse, lse_ref) < 1e-12
    assert rel_err(label_logit, label_ref) < 1e-12

    G = torch.randn(V, d, dtype=torch.float64)
    s = reference_score(H, W, labels, G, **kw)
    assert rel_err(s, ((E @ G) * H).sum(1)) < 1e-10

    weights = torch.rand(T, dtype=torch.float64)
    weights[0] = 0.0  # a zero-weight token contributes nothing
    assert rel_err(error_outer(H, W, labels, weights, **kw), E.T @ (weights[:, None] * H)) < 1e-10

    Hb, _, lb, _ = random_problem(5, V, d, dtype=torch.float64, seed=1)
    _, _, Eb = dense_errors(Hb, W, lb, **kw)
    assert rel_err(error_gram(H, labels, Hb, lb, W, **kw), E @ Eb.T) < 1e-10

    R = torch.randn(V, 6, dtype=torch.float64)
    assert rel_err(error_sketch(H, W, labels, R, **kw), E @ R) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    H, W, labels, _ = random_problem(20, 700, 32, dtype=dtype, seed=3, logit_std=3.0)
    _, _, E = dense_errors(H, W, labels)
    out = error_outer(H, W, labels)
    assert out.dtype == torch.float32
    assert rel_err(out, E.T @ H.double()) < 1e-5


def test_large_logits_do_not_overflow():
    H, W, labels, _ = random_problem(9, 400, 8, dtype=torch.float32, seed=5)
    W = W * 1e4  # logits in the tens of thousands: exp would overflow without max-shift
    lse_ref, _, E = dense_errors(H, W, labels)
    lse, _ = vocab_logsumexp(H, W, labels)
    assert torch.isfinite(lse).all() and rel_err(lse, lse_ref) < 1e-6
    s = reference_score(H, W, labels, W)
    assert torch.isfinite(s).all()
    assert rel_err(s, ((E @ W.double()) * H.double()).sum(1)) < 1e-4


def test_bad_arguments_are_named():
    H, W, labels, _ = random_problem(4, 50, 8)
    with pytest.raises(ValueError, match="labels must lie"):
        vocab_logsumexp(H, W, labels + 50)
    with pytest.raises(ValueError, match="hidden size"):
        vocab_logsumexp(H[:, :4], W, labels)
    with pytest.raises(ValueError, match="G must have"):
        reference_score(H, W, labels, W[:10])
    with pytest.raises(ValueError, match="backend"):
        vocab_logsumexp(H, W, labels, backend="cuda")
    with pytest.raises(ValueError, match="softcap"):
        vocab_logsumexp(H, W, labels, softcap=0.0)
