"""Every Triton kernel configuration compiles ahead of time for sm_90 with no register spills.

No GPU is needed: the ops run on CPU tensors with their launches recorded instead of run, each
recorded launch is specialised the way Triton's launcher would and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``; ``ptxas -v`` then reports
registers and spills. The interpreter replaces ``triton.jit`` when ``TRITON_INTERPRET=1`` is set,
so the compilation runs in a subprocess without it (this file, run as a script).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("triton")

SM90 = ("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def problems():
    """Inputs covering every kernel, tile configuration and constexpr branch the ops take."""
    import torch

    from forvalue.kernels.logits import LogitTransform

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d, transform in ((128, LogitTransform()), (100, "all")):
            T, V = 300, 1024
            H = torch.randn(T, d, generator=gen).to(dtype)
            W = torch.randn(V, d, generator=gen).to(dtype)
            if transform == "all":
                transform = LogitTransform(torch.randn(V, generator=gen).to(dtype), 0.5, 30.0)
            labels = torch.randint(0, V, (T,), generator=gen)
            for g_dtype in {dtype, torch.float32}:
                yield "reference_score", (H, W, labels, W.to(g_dtype), transform)
            for k in (16, 64, 200):
                yield "error_sketch", (H, W, labels, torch.randn(V, k, generator=gen).to(dtype), transform)
            yield "error_sketch", (H, W, labels, torch.randn(V, 64, generator=gen), transform)
            yield "vocab_logsumexp", (H, W, labels, transform)
            yield "error_outer", (H, W, labels, torch.rand(T, generator=gen), transform)
            yield "error_gram", (H, labels, H[:50], labels[:50], W, transform)


def record_all():
    """``{key: (kernel, args, meta)}`` of every distinct launch the problems make."""
    import importlib

    from forvalue.kernels.triton_utils import LaunchLog, record_launches

    ops = ("vocab_logsumexp", "reference_score", "error_outer", "error_gram", "error_sketch")
    impls = {op: getattr(importlib.import_module(f"forvalue.kernels.{op}"), f"{op}_triton")
             for op in ops}
    log = LaunchLog()
    record_launches(log)
    try:
        for op, args in problems():
            impls[op](*args)
    finally:
        record_launches(None)
    return log.launches


def specialise(launch):
    """The arguments of ``triton.compile`` for a recorded launch, specialised (dtypes, alignment,
    divisibility by 16) the way Triton's launcher would for these inputs; picklable."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, args, meta = launch
    backend = make_backend(GPUTarget(*SM90))
    meta = {"debug": False, **meta}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization,
                                                              options)
    return kernel.module, kernel.__name__, signature, constexprs, attrs, options.__dict__


def compile_sm90(spec):
    """Compile one specialised kernel for sm_90; return its resource report from ``ptxas -v``."""
    import importlib
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, signature, constexprs, attrs, options = spec
    kernel = getattr(importlib.import_module(module), name)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                              target=GPUTarget(*SM90), options=options)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", ptx.name,
                              "-o", os.devnull], capture_output=True, text=True, check=True).stderr
    numbers = {key: int(re.search(rf"(\d+) bytes {key}", log).group(1))
               for key in ("stack frame", "spill stores", "spill loads")}
    return {"kernel": name,
            "constexprs": {kernel.arg_names[k[0]]: str(v) for k, v in constexprs.items()},
            "signature": {k: v for k, v in signature.items() if v != "constexpr"},
            "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "shared": compiled.metadata.shared, "wgmma": "wgmma" in compiled.asm["ptx"],
            "num_warps": compiled.metadata.num_warps, **numbers}


def main() -> None:
    specs = {repr(spec): spec for spec in map(specialise, record_all())}
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        json.dump(list(pool.map(compile_sm90, specs.values())), sys.stdout)


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(reports):
    kernels = {r["kernel"] for r in reports}
    assert kernels == {"softmax_partials_kernel", "softmax_finalise_kernel",
                       "_sketch_partials_kernel", "_sketch_finalise_kernel", "error_tile_kernel",
                       "accumulate_mm_kernel"}


@pytest.mark.slow
def test_no_register_spills_and_shared_memory_fits(reports):
    for r in reports:
        where = f"{r['kernel']} {r['constexprs']} {r['signature']}"
        assert r["spill stores"] == 0 and r["spill loads"] == 0, f"spills in {where}: {r}"
        assert r["shared"] <= SHARED_LIMIT, f"shared memory over the sm_90 limit in {where}: {r}"


@pytest.mark.slow
def test_matrix_kernels_use_hopper_wgmma(reports):
    # The main loops with a 128-token tile and 8 warps must run on warpgroup MMA, not mma.sync.
    for r in reports:
        if r["kernel"] != "softmax_finalise_kernel" and r["kernel"] != "_sketch_finalise_kernel":
            assert r["wgmma"], f"{r['kernel']} {r['constexprs']} does not use wgmma"


if __name__ == "__main__":
    main()
