#!/usr/bin/env bash
# Everything a lent GPU session needs, in one command (see the device README for the flags):
# build the native module with CUDA, run the whole test suite (CUDA tests included) and
# compute-sanitizer on the CUDA kernels, then the kernel, throughput and profile benchmarks.
# Logs and JSON go to $OUT (default ./gpu_out); the results JSON are also written under
# benchmarks/results/ with the device name, to be committed from the session's machine.
#
#   OUT=/tmp/out ARCHS=90 bash benchmarks/gpu_suite.sh            # everything
#   SKIP_TESTS=1 bash benchmarks/gpu_suite.sh                      # benchmarks only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
ARCHS=${ARCHS:-90}
status=0
step() { echo "=== $1"; }

step "environment"
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
    > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" | head -20

step "build (CUDA archs $ARCHS)"
rm -rf build
DDPM_FAST_CUDA=ON DDPM_FAST_CUDA_ARCHS="$ARCHS" python3 setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import ddpm_fast._native as n; i = n.build_info(); print(i); assert i.get('cuda')" \
    || { echo "CUDA kernels missing from the build"; exit 1; }

if [ -z "${SKIP_TESTS:-}" ]; then
    step "tests (CUDA ones included)"
    (cd tests && python3 -m pytest -q -x -p no:cacheprovider . ) > "$OUT/tests.log" 2>&1 || status=1
    tail -5 "$OUT/tests.log"
    if command -v compute-sanitizer > /dev/null; then
        step "compute-sanitizer memcheck on the CUDA kernel tests"
        (cd tests && compute-sanitizer --tool memcheck --error-exitcode 3 \
            python3 -m pytest -q -p no:cacheprovider test_cuda.py -k "not graph and not compile") \
            > "$OUT/memcheck.log" 2>&1 || status=1
        tail -5 "$OUT/memcheck.log"
    fi
fi

step "kernels"
python3 benchmarks/kernels.py --device cuda > "$OUT/kernels.log" 2>&1 || status=1
tail -30 "$OUT/kernels.log"
step "sample throughput (CIFAR-10 and 256 px; all baselines in one process)"
timeout 1500 python3 benchmarks/sample_throughput.py --device cuda --config cifar10 \
    > "$OUT/throughput_cifar10.log" 2>&1 || status=1
tail -15 "$OUT/throughput_cifar10.log"
timeout 1500 python3 benchmarks/sample_throughput.py --device cuda --config 256 --batch 1 16 64 \
    --out "benchmarks/results/sample_throughput_256px_$(date +%F).json" \
    > "$OUT/throughput_256.log" 2>&1 || status=1
tail -15 "$OUT/throughput_256.log"
step "profile of the fast step"
python3 benchmarks/profile_step.py --device cuda > "$OUT/profile.log" 2>&1 || status=1
tail -30 "$OUT/profile.log"
cp benchmarks/results/*.json "$OUT/" 2>/dev/null
exit $status
