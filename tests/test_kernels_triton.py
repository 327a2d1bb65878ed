"""The Triton kernels against their torch twins and the dense float64 oracle.

Without CUDA the kernels run in Triton's interpreter on CPU (``TRITON_INTERPRET=1`` must be set
before ``forvalue.kernels`` is imported); with CUDA the same tests run compiled, plus the
``gpu``-marked ones (bf16, larger shapes, dispatch).
"""

import subprocess
import sys

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
from forvalue.kernels.triton_utils import HAVE_TRITON, INTERPRET

from kernel_reference import dense_errors, random_problem

if not HAVE_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)
ON_GPU = torch.cuda.is_available() and not INTERPRET
if not ON_GPU and not INTERPRET:
    pytest.skip("no CUDA device: set TRITON_INTERPRET=1 to run the kernels in the interpreter",
                allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")

# Relative error bounds: every product is exact in fp32 (half inputs are upcast or split into
# hi + lo halves), so what remains is fp32 accumulation; bf16 splits keep ~16 bits.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 1e-3}
TRANSFORMS = [
    ({}, False),
    ({}, True),
    ({"scale": 0.37}, False),
    ({"softcap": 3.0}, True),
    ({"scale": 2.0, "softcap": 5.0}, True),
]
# T=1 and T, V, d off every interpreter tile (32 tokens, 64 columns, 32 of d); both make
# several vocabulary splits, the T=1 one with a last split whose second tile is past V.
SHAPES = [(1, 300, 32), (45, 517, 40)]


@pytest.fixture(autouse=True)
def small_budget():
    # Forces several vocabulary chunks in error_outer/error_gram at test sizes.
    set_memory_budget(32 * 1024)
    yield
    set_memory_budget(None)


def rel_err(x, ref):
    return float((x.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300))


def problem(T, V, d, dtype, seed, with_bias=False, logit_std=4.0):
    H, W, labels, bias = random_problem(T, V, d, dtype=dtype, seed=seed, logit_std=logit_std,
                                        with_bias=with_bias)
    return H.to(DEVICE), W.to(DEVICE), labels.to(DEVICE), (bias.to(DEVICE) if with_bias else None)


def check_all_ops(H, W, labels, kw, tol, seed=0):
    """Each op with backend="triton" against the float64 oracle and the torch twin."""
    cpu_kw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
    lse_ref, label_ref, E = dense_errors(H.cpu(), W.cpu(), labels.cpu(), **cpu_kw)
    gen = torch.Generator().manual_seed(seed)
    T, V, d = H.shape[0], W.shape[0], H.shape[1]

    def both(op, *args):
        out = op(*args, backend="triton", **kw)
        twin = op(*args, backend="torch", **kw)
        return out, twin

    (lse, label_logit), (lse_t, _) = both(vocab_logsumexp, H, W, labels)
    assert rel_err(lse, lse_ref) < tol and rel_err(lse, lse_t.double().cpu()) < tol
    assert rel_err(label_logit, label_ref) < tol

    G = torch.randn(V, d, generator=gen, dtype=torch.float64)
    s, s_t = both(reference_score, H, W, labels, G.to(DEVICE, torch.float32))
    ref = ((E @ G) * H.cpu().double()).sum(1)
    assert rel_err(s, ref) < tol and rel_err(s, s_t.double().cpu()) < tol

    weights = torch.rand(T, generator=gen)
    weights[0] = 0.0
    out, out_t = both(error_outer, H, W, labels, weights.to(DEVICE))
    ref = E.T @ (weights.double()[:, None] * H.cpu().double())
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < tol and rel_err(out, out_t.double().cpu()) < tol

    Hb, _, lb, _ = problem(5, V, d, H.dtype, seed + 1)
    _, _, Eb = dense_errors(Hb.cpu(), W.cpu(), lb.cpu(), **cpu_kw)
    gram, gram_t = both(error_gram, H, labels, Hb, lb, W)
    assert rel_err(gram, E @ Eb.T) < tol and rel_err(gram, gram_t.double().cpu()) < tol

    R = torch.randn(V, 20, generator=gen)
    sk, sk_t = both(error_sketch, H, W, labels, R.to(DEVICE, H.dtype))
    ref = E @ R.to(H.dtype).double()
    assert rel_err(sk, ref) < tol and rel_err(sk, sk_t.double().cpu()) < tol


@pytest.mark.parametrize("transform,with_bias", TRANSFORMS)
@pytest.mark.parametrize("T,V,d", SHAPES)
def test_fp32_inputs(transform, with_bias, T, V, d):
    H, W, labels, bias = problem(T, V, d, torch.float32, seed=T + V, with_bias=with_bias)
    check_all_ops(H, W, labels, dict(bias=bias, **transform), TOLERANCE[torch.float32])


@pytest.mark.parametrize("transform,with_bias", [TRANSFORMS[0], TRANSFORMS[-1]])
def test_fp16_inputs(transform, with_bias):
    H, W, labels, bias = problem(45, 517, 40, torch.float16, seed=7, with_bias=with_bias)
    check_all_ops(H, W, labels, dict(bias=bias, **transform), TOLERANCE[torch.float16])


def test_zero_weight_tokens_contribute_nothing():
    H, W, labels, _ = problem(45, 517, 40, torch.float32, seed=11)
    weights = torch.rand(45, device=DEVICE)
    weights[::3] = 0.0
    keep = weights != 0
    full = error_outer(H, W, labels, weights, backend="triton")
    kept = error_outer(H[keep], W, labels[keep], weights[keep], backend="triton")
    assert rel_err(full, kept.double().cpu()) < 1e-6


def test_large_logits_stay_finite():
    H, W, labels, _ = problem(9, 400, 32, torch.float32, seed=5, logit_std=1.0)
    W = W * 1e4  # logits in the tens of thousands: exp overflows without the max shift
    lse_ref, _, E = dense_errors(H.cpu(), W.cpu(), labels.cpu())
    lse, _ = vocab_logsumexp(H, W, labels, backend="triton")
    assert torch.isfinite(lse).all() and rel_err(lse, lse_ref) < 1e-6
    s = reference_score(H, W, labels, W, backend="triton")
    assert torch.isfinite(s).all()
    assert rel_err(s, ((E @ W.cpu().double()) * H.cpu().double()).sum(1)) < 1e-4
    sk = error_sketch(H, W, labels, W[:, :16].contiguous(), backend="triton")
    assert torch.isfinite(sk).all()
    assert rel_err(sk, E @ W[:, :16].cpu().double()) < 1e-4


def test_any_strides():
    H, W, labels, _ = problem(45, 517, 40, torch.float32, seed=13)
    Ht = H.T.contiguous().T  # column-major view of the same values
    Ws = torch.stack([W, W], dim=2)[:, :, 0]  # row stride 80, column stride 2
    labels_s = torch.stack([labels, labels], dim=1)[:, 0]  # stride 2
    G = torch.randn(517, 40, device=DEVICE)
    expected = reference_score(H, W, labels, G, backend="torch")
    got = reference_score(Ht, Ws, labels_s, G.T.contiguous().T, backend="triton")
    assert rel_err(got, expected.double().cpu()) < 1e-5
    got = error_outer(Ht, Ws, labels_s, backend="triton")
    assert rel_err(got, error_outer(H, W, labels, backend="torch").double().cpu()) < 1e-5


def test_results_are_deterministic():
    H, W, labels, _ = problem(45, 517, 40, torch.float32, seed=17)
    G = torch.randn(517, 40, device=DEVICE)
    first = reference_score(H, W, labels, G, backend="triton")
    assert torch.equal(first, reference_score(H, W, labels, G, backend="triton"))
    outer = error_outer(H, W, labels, backend="triton")
    assert torch.equal(outer, error_outer(H, W, labels, backend="triton"))


def test_forcing_triton_on_inputs_it_cannot_take_says_why():
    H, W, labels, _ = problem(4, 50, 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        vocab_logsumexp(H.double(), W.double(), labels, backend="triton")
    with pytest.raises(ValueError, match="mix float16 and bfloat16"):
        reference_score(H.half(), W.half(), labels, W.bfloat16(), backend="triton")
    # auto takes the torch twin for float64, whatever the device
    lse, _ = vocab_logsumexp(H.double(), W.double(), labels)
    assert lse.dtype == torch.float64


def test_ops_work_without_triton():
    # triton is an optional import: blocked, the ops run their torch twins and say so when forced.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from forvalue.kernels import vocab_logsumexp\n"
        "from forvalue.kernels.vocab_logsumexp import vocab_logsumexp_triton\n"
        "assert vocab_logsumexp_triton is None\n"
        "H, W = torch.randn(3, 8), torch.randn(20, 8)\n"
        "y = torch.tensor([1, 2, 3])\n"
        "print(float(vocab_logsumexp(H, W, y)[0].sum()))\n"
        "try:\n"
        "    vocab_logsumexp(H, W, y, backend='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "triton is not installed" in run.stdout


@gpu
@needs_gpu
@pytest.mark.parametrize("transform,with_bias", [TRANSFORMS[0], TRANSFORMS[-1]])
def test_bf16_inputs_on_gpu(transform, with_bias):
    H, W, labels, bias = problem(300, 3001, 256, torch.bfloat16, seed=19, with_bias=with_bias)
    check_all_ops(H, W, labels, dict(bias=bias, **transform), TOLERANCE[torch.bfloat16])


@gpu
@needs_gpu
def test_gpu_shapes_with_many_splits_and_chunks():
    # Several token tiles of 128, vocabulary splits across the SMs, fp32 G with bf16 H (the
    # engine's reference), and vocabulary chunks in error_outer.
    set_memory_budget(8 * 2**20)
    H, W, labels, _ = problem(1000, 20000, 576, torch.bfloat16, seed=23)
    check_all_ops(H, W, labels, {"softcap": 30.0}, TOLERANCE[torch.bfloat16])


def test_auto_dispatch():
    from forvalue.kernels import dispatch

    def twin():
        pass

    def kernel():
        pass

    H = torch.zeros(4, 8, device=DEVICE, dtype=torch.bfloat16)
    # CUDA tensors take the kernel; CPU tensors the twin, interpreter or not.
    assert dispatch.pick("op", "auto", twin, kernel, H, H) is (kernel if ON_GPU else twin)
    assert dispatch.pick("op", "auto", twin, kernel, H.double(), H.double()) is twin
    assert dispatch.pick("op", "auto", twin, None, H, H) is twin
    assert dispatch.pick("op", "triton", twin, kernel, H, H) is kernel
