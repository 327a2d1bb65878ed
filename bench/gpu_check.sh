#!/usr/bin/env bash
# Check the compiled Triton kernels against their torch twins, then run the kernel benchmark.
#
#   bench/gpu_check.sh DIR            CUDA machine with torch and triton: ~4 minutes
#   bench/gpu_check.sh DIR --dry-run  CPU, Triton interpreter, tiny shapes: under a minute (CI)
#
# Installs nothing, except comparison wheels from .whl/ (cut-cross-entropy, Liger-Kernel) into
# /tmp/site when that folder exists; the project itself is imported from this checkout through
# a shim folder, not installed. Writes pytest.log, kernels.json, kernels.md and device.txt to DIR
# and prints the short benchmark table last.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || ( $# -eq 2 && $2 != --dry-run ) ]]; then
    echo "usage: $0 DIR [--dry-run]" >&2
    exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd)
dry_run=${2:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
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

if [[ -n $dry_run ]]; then
    export TRITON_INTERPRET=1
    tests=(tests/test_kernels_triton.py::test_fp32_inputs tests/test_kernels_triton.py::test_auto_dispatch
           -k "transform4 or dispatch")
    bench=(--dry-run)
else
    unset TRITON_INTERPRET
    nvidia-smi > "$out/device.txt" 2>&1 || true
    tests=(tests/test_kernels_triton.py -m "gpu or not gpu")
    # Kernel compilation dominates the tests: spread it over workers when xdist is there.
    if "$python" -c "import xdist" 2>/dev/null; then
        tests+=(-n 8)
    fi
    bench=(--device cuda)
fi
"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available())" | tee -a "$out/device.txt"

echo "== correctness: compiled kernels against their torch twins"
"$python" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$out/pytest.log"

echo "== benchmark"
"$python" -m forvalue.bench.kernels --out "$out" "${bench[@]}"
