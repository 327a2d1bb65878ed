"""Kernel benchmark: the Triton kernels against naive full-logit code and the chunked torch twins.

On CUDA (bf16 inputs): time, TFLOP/s, the fraction of the dense bf16 GEMM rate measured on the
same device, and the extra memory beyond inputs and outputs, for each op and model shape,
against (a) naive: cuBLAS logits (and ``G h``) materialised, then softmax, (b) the chunked torch
twin, (c) for ``vocab_logsumexp``, cut-cross-entropy's and Liger-Kernel's fused forward when
they are installed. Every compiled kernel is checked against its torch twin before timing.
On CPU: the torch twin against naive on small shapes (fp32). ``--dry-run``: tiny shapes, the
kernels in Triton's interpreter (set ``TRITON_INTERPRET=1`` first), to keep this script alive.

    python -m forvalue.bench.perf.kernels --out DIR [--device cuda|cpu] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from forvalue import kernels

MODELS = {"smollm2-135m": (576, 49152), "qwen2.5-1.5b": (1536, 151936), "llama-3-8b": (4096, 128256)}
# reference_score_fp32_g: reference_score with an fp32 G beside bf16 H, as the engine runs it
# (its resident reference is fp32).
ALL_OPS = ("vocab_logsumexp", "reference_score", "reference_score_fp32_g", "error_outer", "error_gram",
           "error_sketch")
HOT_OPS = ("vocab_logsumexp", "reference_score", "reference_score_fp32_g")
# (model, tokens, ops): sized to finish in about three minutes on an H200.
GPU_PLAN = [
    ("smollm2-135m", 1024, HOT_OPS),
    ("smollm2-135m", 4096, ALL_OPS),
    ("smollm2-135m", 16384, HOT_OPS),
    ("qwen2.5-1.5b", 4096, ALL_OPS),
    ("llama-3-8b", 4096, ALL_OPS),
    ("llama-3-8b", 16384, HOT_OPS),
]
CPU_PLAN = [("cpu-small", 256, ALL_OPS, 128, 8192), ("cpu-medium", 1024, HOT_OPS, 256, 32000)]
DRY_PLAN = [("dry-run", 40, ALL_OPS, 64, 500)]
GRAM_TOKENS = 512  # the validation side of error_gram: one sample's labels
SKETCH_DIM = 64
CHECK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


@dataclass
class Row:
    op: str
    model: str
    tokens: int
    d: int
    vocab: int
    impl: str
    ms: float | None
    tflops: float | None
    gemm_fraction: float | None
    extra_mb: float | None
    check_rel_err: float | None = None
    note: str = ""


def flops(op: str, T: int, V: int, d: int, Tb: int) -> float:
    """The arithmetic the naive version does with cuBLAS (the same for every implementation)."""
    logits = 2.0 * T * V * d
    return {"vocab_logsumexp": logits, "reference_score": 2 * logits,
            "reference_score_fp32_g": 2 * logits, "error_outer": 2 * logits,
            "error_gram": 2.0 * (T + Tb) * V * d + 2.0 * T * Tb * V,
            "error_sketch": logits + 2.0 * T * V * SKETCH_DIM}[op]


def make_inputs(T: int, V: int, d: int, dtype: torch.dtype, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    return {"H": randn(T, d), "W": randn(V, d, scale=2.0 / d**0.5), "G": randn(V, d, scale=1e-3),
            "R": randn(V, SKETCH_DIM), "Hb": randn(min(T, GRAM_TOKENS), d),
            "labels": torch.randint(0, V, (T,), generator=gen, device=device),
            "lb": torch.randint(0, V, (min(T, GRAM_TOKENS),), generator=gen, device=device),
            "weights": torch.rand(T, generator=gen, device=device)}


def fp32_g(x: dict) -> torch.Tensor:
    """An fp32 ``G`` near the half one (with bits a half cannot hold), made on first use: ``V x d``
    fp32 is 2 GB at Llama-3-8B's shape."""
    if "G32" not in x:
        G = x["G"]
        gen = torch.Generator(device=G.device).manual_seed(1)
        x["G32"] = G.float() + torch.randn(G.shape, generator=gen, device=G.device) * 1e-6
    return x["G32"]


def op_call(op: str, x: dict, backend: str) -> Callable[[], object]:
    base = op.removesuffix("_fp32_g")
    G = fp32_g(x) if base != op else x["G"]
    args = {"vocab_logsumexp": (x["H"], x["W"], x["labels"]),
            "reference_score": (x["H"], x["W"], x["labels"], G),
            "error_outer": (x["H"], x["W"], x["labels"], x["weights"]),
            "error_gram": (x["H"], x["labels"], x["Hb"], x["lb"], x["W"]),
            "error_sketch": (x["H"], x["W"], x["labels"], x["R"])}[base]
    fn = getattr(kernels, base)
    return lambda: fn(*args, backend=backend)


def dense_errors(H: torch.Tensor, W: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive: the full ``T x V`` fp32 logits (cuBLAS in the input dtype), then softmax."""
    logits = (H @ W.T).float()
    lse = torch.logsumexp(logits, dim=1)
    error = logits.sub_(lse[:, None]).exp_().neg_()
    error[torch.arange(len(labels), device=H.device), labels] += 1.0
    return lse, error


def naive_call(op: str, x: dict) -> Callable[[], object]:
    H, W, labels = x["H"], x["W"], x["labels"]

    def lse():
        logits = (H @ W.T).float()
        return torch.logsumexp(logits, dim=1), logits.gather(1, labels[:, None]).squeeze(1)

    def reference():
        _, error = dense_errors(H, W, labels)
        return (error * (H @ x["G"].T).float()).sum(1)

    def reference_fp32_g():
        _, error = dense_errors(H, W, labels)
        return (error * (H.float() @ fp32_g(x).T)).sum(1)

    def outer():
        _, error = dense_errors(H, W, labels)
        return (error * x["weights"][:, None]).to(H.dtype).T @ H

    def gram():
        _, ea = dense_errors(H, W, labels)
        _, eb = dense_errors(x["Hb"], W, x["lb"])
        return ea @ eb.T

    def sketch():
        _, error = dense_errors(H, W, labels)
        return error.to(H.dtype) @ x["R"]

    return {"vocab_logsumexp": lse, "reference_score": reference,
            "reference_score_fp32_g": reference_fp32_g, "error_outer": outer,
            "error_gram": gram, "error_sketch": sketch}[op]


def peer_calls(x: dict) -> dict[str, Callable[[], object]]:
    """Fused linear cross-entropy forwards of other projects, where installed (lse and label)."""
    peers = {}
    H, W, labels = x["H"], x["W"], x["labels"]
    try:
        from cut_cross_entropy import linear_cross_entropy

        peers["cut-cross-entropy"] = lambda: linear_cross_entropy(H, W, labels, reduction="none")
    except ImportError:
        pass
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

        peers["liger-kernel"] = lambda: fused_linear_cross_entropy_forward(H, W, labels, reduction="none")
    except ImportError:
        pass
    return peers


def timed_ms(fn: Callable[[], object], device: str, repeats: int = 3) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=2, rep=50))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def extra_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak device memory of one call beyond what was allocated before it and what it returns."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    outputs = out if isinstance(out, tuple) else (out,)
    kept = sum(t.numel() * t.element_size() for t in outputs if torch.is_tensor(t))
    return (torch.cuda.max_memory_allocated() - base - kept) / 2**20


def rel_err(a: object, b: object) -> float:
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def gemm_tflops(device: str) -> float | None:
    """Dense bf16 GEMM rate of this device: an 8192^3 product on random data."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / timed_ms(lambda: a @ b, device) / 1e9


def bench_case(op: str, model: str, T: int, d: int, V: int, x: dict, device: str,
               gemm: float | None, impls: list[str], repeats: int) -> list[Row]:
    calls = {"naive": naive_call(op, x), "torch": op_call(op, x, "torch")}
    if "triton" in impls:
        calls["triton"] = op_call(op, x, "triton")
    if op == "vocab_logsumexp" and device == "cuda":
        calls.update(peer_calls(x))
    work = flops(op, T, V, d, x["Hb"].shape[0])
    reference = calls["torch"]()
    rows = []
    for impl, fn in calls.items():
        try:
            err = rel_err(fn(), reference) if impl == "triton" else None
            if err is not None and not err < CHECK_TOLERANCE[x["H"].dtype]:
                rows.append(Row(op, model, T, d, V, impl, None, None, None, None, err, "WRONG"))
                continue
            mem = extra_mb(fn, device)
            ms = timed_ms(fn, device, repeats)
        except torch.OutOfMemoryError:
            rows.append(Row(op, model, T, d, V, impl, None, None, None, None, note="out of memory"))
            torch.cuda.empty_cache()
            continue
        except Exception as error:  # a peer's API drift must not end the run; ours must
            if impl in ("triton", "torch", "naive"):
                raise
            rows.append(Row(op, model, T, d, V, impl, None, None, None, None, note=repr(error)[:80]))
            continue
        tflops = work / ms / 1e9
        rows.append(Row(op, model, T, d, V, impl, ms, tflops, tflops / gemm if gemm else None, mem, err))
    return rows


def markdown(rows: list[Row]) -> str:
    head = ("| op | model | T | impl | ms | TFLOP/s | of GEMM | extra MiB | check |\n"
            "|---|---|---|---|---|---|---|---|---|")

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"| {r.op} | {r.model} | {r.tokens} | {r.impl} | {fmt(r.ms, '.3f')} | "
             f"{fmt(r.tflops, '.1f')} | {fmt(r.gemm_fraction, '.0%')} | {fmt(r.extra_mb, '.1f')} | "
             f"{fmt(r.check_rel_err, '.1e')}{' ' + r.note if r.note else ''} |" for r in rows]
    return "\n".join([head, *lines])


def summary(rows: list[Row]) -> str:
    """One line per case: the Triton kernel against naive, the twin and the best peer."""
    head = ("| op | model | T | triton ms | naive ms | torch ms | best peer ms | triton of GEMM | "
            "triton extra MiB | naive extra MiB | fastest |\n|---|---|---|---|---|---|---|---|---|---|---|")
    cases: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        cases.setdefault((r.op, r.model, r.tokens), {})[r.impl] = r

    def cell(row: Row | None, field: str, spec: str) -> str:
        value = getattr(row, field) if row is not None else None
        return "-" if value is None else format(value, spec)

    lines = [head]
    for (op, model, T), impls in cases.items():
        peers = [r for name, r in impls.items() if name not in ("triton", "naive", "torch") and r.ms]
        best_peer = min(peers, key=lambda r: r.ms) if peers else None
        timed = [r for r in impls.values() if r.ms is not None]
        fastest = min(timed, key=lambda r: r.ms).impl if timed else "-"
        t, n = impls.get("triton"), impls.get("naive")
        lines.append(f"| {op} | {model} | {T} | {cell(t, 'ms', '.3f')} | {cell(n, 'ms', '.3f')} | "
                     f"{cell(impls.get('torch'), 'ms', '.3f')} | "
                     f"{cell(best_peer, 'ms', '.3f')}{' ' + best_peer.impl if best_peer else ''} | "
                     f"{cell(t, 'gemm_fraction', '.0%')} | {cell(t, 'extra_mb', '.1f')} | "
                     f"{cell(n, 'extra_mb', '.1f')} | {fastest} |")
    return "\n".join(lines)


def plan_for(args: argparse.Namespace) -> list[tuple[str, int, tuple[str, ...], int, int]]:
    if args.dry_run:
        return DRY_PLAN
    if args.device == "cpu":
        return CPU_PLAN
    return [(model, T, tuple(op for op in ops if not args.ops or op in args.ops), *MODELS[model])
            for model, T, ops in GPU_PLAN if not args.models or model in args.models]


def run(args: argparse.Namespace) -> tuple[list[Row], dict]:
    from forvalue.kernels.triton_utils import HAVE_TRITON, INTERPRET

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with_triton = HAVE_TRITON and (device == "cuda" or INTERPRET)
    impls = ["naive", "torch"] + (["triton"] if with_triton else [])
    if device == "cuda":
        kernels.set_memory_budget(1 << 30)  # the chunked twins and error buffers may use 1 GiB
    gemm = gemm_tflops(device)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "torch": torch.__version__, "dtype": str(dtype), "gemm_bf16_tflops": gemm,
            "interpreter": INTERPRET, "threads": torch.get_num_threads()}
    rows: list[Row] = []
    for model, T, ops, d, V in plan_for(args):
        x = make_inputs(T, V, d, dtype, device)
        for op in ops:
            new = bench_case(op, model, T, d, V, x, device, gemm, impls, 1 if args.dry_run else 3)
            print("\n".join(markdown(new).splitlines()[2:]), flush=True)
            rows += new
        del x
    return rows, meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kernels.json and kernels.md")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU, interpreter")
    parser.add_argument("--ops", nargs="+", choices=ALL_OPS, help="only these ops (GPU plan)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="only these shapes (GPU plan)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    rows, meta = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]},
                                                      indent=1))
    short = summary(rows)
    (args.out / "kernels.md").write_text(f"{json.dumps(meta)}\n\n{short}\n\n{markdown(rows)}\n")
    print(f"\n{json.dumps(meta)}\n{short}")


if __name__ == "__main__":
    main()
