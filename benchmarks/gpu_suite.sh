#!/usr/bin/env bash
# Everything a lent GPU session needs, in stages that each fit one 10-minute device call:
#
#   build      the native module with CUDA (in place; later calls on the same warm machine reuse it)
#   tests      the whole test suite, CUDA tests included
#   memcheck   compute-sanitizer on the CUDA kernel tests
#   kernels    benchmarks/kernels.py (fused ops against torch)
#   cifar10    sample throughput, CIFAR-10 config, batch 1/16/64/256, every provider
#   256        sample throughput, 256 px config, batch 1/16/64
#   profile    where the fast step's time goes
#   conv       the fused-conv path alone (issue 13): its CUDA tests while parallel processes fill
#              the compile caches (benchmarks/warm_caches.py), then throughput of diffusers /
#              compile / fast-inductor / fast-conv / fast-conv-pdl, CIFAR-10 batch 1, 64, 256
#   conv-256   the same providers but PDL at 256 px, batch 4
#   conv-profile  kernels per step and the top kernels (profile_step.py), each layer kind against
#              cuDNN + separate norm (conv2d_layers.py), compute-sanitizer on the conv kernel
#   conv-more  the next questions once conv has run: per-layer tile autotuning (fast-conv-tuned)
#              and Inductor's own PDL (fast-inductor-pdl) beside fast-conv, batch 1 and 256;
#              split-K on and off at batch 1 (fast-conv-nosplit)
#   solvers    the few-step solvers (issue 21): their fused step's tests on CUDA, then per-step
#              time of every sampler against the DDPM step at batch 1 and 256 and the cold start
#              (benchmarks/solver_steps.py)
#
#   OUT=/tmp/out ARCHS=90 bash benchmarks/gpu_suite.sh build conv               # a short window
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh conv-256 conv-profile             # its next call
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh conv-more solvers                 # if time remains
#
#   OUT=/tmp/out ARCHS=90 bash benchmarks/gpu_suite.sh build tests memcheck     # call 1
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh kernels cifar10                    # call 2
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh 256 profile                        # call 3
#   bash benchmarks/gpu_suite.sh                                                 # all, in order
#
# Logs and JSON go to $OUT (default ./gpu_out); results JSON are also written under
# benchmarks/results/ with the device name, to be committed from the session's machine.
# The device has no diffusers: `bash benchmarks/gpu_suite.sh wheels` (here, before the first
# call) downloads its wheel and the one dependency the device lacks into .whl/ (git-ignored);
# carry ".whl" with each call and this script installs them to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = wheels ]; then          # on the machine without the GPU, which has PyPI
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 importlib_metadata
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
ARCHS=${ARCHS:-90}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests memcheck kernels cifar10 256 profile)
for stage in "${STAGES[@]}"; do       # a misspelt stage fails before a long build, not after
    case "$stage" in build|tests|memcheck|kernels|cifar10|256|profile|conv|conv-256|conv-profile|conv-more|solvers) ;;
    *) echo "unknown stage $stage"; exit 2 ;; esac
done
export PYTHONUNBUFFERED=1
status=0
step() { echo "=== $1 ($(date +%T))"; }

step "environment"
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
    > "$OUT/environment.txt" 2>&1
head -20 "$OUT/environment.txt"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
GPU=${GPU:-unknown_gpu}                 # named in every results file this run writes

for stage in "${STAGES[@]}"; do
    case "$stage" in
    build)
        step "build (CUDA archs $ARCHS)"
        rm -rf build
        DDPM_FAST_CUDA=ON DDPM_FAST_CUDA_ARCHS="$ARCHS" python3 setup.py build_ext --inplace \
            > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
        ;;
    tests)
        step "tests (CUDA ones included)"
        (cd tests && python3 -m pytest -o addopts=-ra -q -x -p no:cacheprovider . ) > "$OUT/tests.log" 2>&1 || status=1
        tail -5 "$OUT/tests.log"
        ;;
    memcheck)
        command -v compute-sanitizer > /dev/null || { echo "no compute-sanitizer"; continue; }
        step "compute-sanitizer memcheck on the CUDA kernel tests"
        (cd tests && compute-sanitizer --tool memcheck --error-exitcode 3 \
            python3 -m pytest -o addopts=-ra -q -p no:cacheprovider test_cuda.py -k "not graph and not compile") \
            > "$OUT/memcheck.log" 2>&1 || status=1
        tail -5 "$OUT/memcheck.log"
        ;;
    kernels)
        step "kernels"
        python3 benchmarks/kernels.py --device cuda > "$OUT/kernels.log" 2>&1 || status=1
        tail -30 "$OUT/kernels.log"
        ;;
    cifar10)
        step "sample throughput, CIFAR-10 (all baselines in one process)"
        python3 benchmarks/sample_throughput.py --device cuda --config cifar10 \
            > "$OUT/throughput_cifar10.log" 2>&1 || status=1
        tail -30 "$OUT/throughput_cifar10.log"
        ;;
    256)
        step "sample throughput, 256 px"
        python3 benchmarks/sample_throughput.py --device cuda --config 256 --batch 1 16 64 \
            --providers diffusers compile fast \
            --out "benchmarks/results/sample_throughput_256px_${GPU}_$(date +%F).json" \
            > "$OUT/throughput_256.log" 2>&1 || status=1
        tail -15 "$OUT/throughput_256.log"
        ;;
    conv)
        # the CUDA tests (parallel where pytest-xdist is there) while other processes fill the
        # compile caches for the throughput runs: compiling is most of a cold run's time
        step "fused conv: CUDA tests, and the compile caches warming beside them"
        xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6")
        (cd tests && python3 -m pytest -o addopts=-ra -q -p no:cacheprovider $xdist test_cuda.py -k conv) \
            > "$OUT/conv_tests.log" 2>&1 &
        tests_pid=$!
        warm_jobs=()
        for b in 1 64 256; do
            for p in compile fast-inductor fast-conv fast-conv-pdl; do warm_jobs+=("$p:cifar10:$b"); done
        done
        python3 benchmarks/warm_caches.py --device cuda --workers 8 --jobs "${warm_jobs[@]}" \
            > "$OUT/warm_caches.log" 2>&1 || status=1
        tail -16 "$OUT/warm_caches.log"
        wait $tests_pid || status=1
        tail -5 "$OUT/conv_tests.log"
        step "sample throughput, CIFAR-10: diffusers / compile / fast-inductor / fast-conv (PDL off, on)"
        python3 benchmarks/sample_throughput.py --device cuda --config cifar10 --batch 1 64 256 \
            --providers diffusers compile fast-inductor fast-conv fast-conv-pdl \
            --out "benchmarks/results/sample_throughput_conv_${GPU}_$(date +%F).json" \
            > "$OUT/throughput_conv.log" 2>&1 || status=1
        tail -22 "$OUT/throughput_conv.log"
        python3 benchmarks/decide_unet.py \
            "benchmarks/results/sample_throughput_conv_${GPU}_$(date +%F).json" \
            | tee "$OUT/decide_unet.txt"        # the UNET_TABLE entries these numbers give
        ;;
    conv-256)
        step "sample throughput, 256 px, batch 4"
        python3 benchmarks/warm_caches.py --device cuda --jobs compile:256:4 fast-inductor:256:4 \
            fast-conv:256:4 > "$OUT/warm_caches_256.log" 2>&1 || status=1
        python3 benchmarks/sample_throughput.py --device cuda --config 256 --batch 4 \
            --providers diffusers compile fast-inductor fast-conv \
            --out "benchmarks/results/sample_throughput_conv_256px_${GPU}_$(date +%F).json" \
            > "$OUT/throughput_conv_256.log" 2>&1 || status=1
        tail -8 "$OUT/throughput_conv_256.log"
        ;;
    conv-profile)
        step "fused conv: kernels per step and where the time goes"
        python3 benchmarks/profile_step.py --device cuda --kernels conv --batch 1 256 --steps 5 \
            > "$OUT/profile_conv.log" 2>&1 || status=1
        tail -25 "$OUT/profile_conv.log"
        step "fused conv per layer kind, against cuDNN + separate norm"
        python3 benchmarks/conv2d_layers.py --device cuda --batch 1 64 256 \
            > "$OUT/conv2d_layers.log" 2>&1 || status=1
        tail -45 "$OUT/conv2d_layers.log"
        python3 benchmarks/conv2d_layers.py --device cuda --layers 256 --batch 4 \
            > "$OUT/conv2d_layers_256.log" 2>&1 || status=1
        tail -18 "$OUT/conv2d_layers_256.log"
        if command -v compute-sanitizer > /dev/null; then
            step "fused conv: compute-sanitizer memcheck (bf16, batch 1 and 3)"
            (cd tests && compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -o addopts=-ra \
                -q -p no:cacheprovider test_cuda.py \
                -k "(conv2d_triton_cuda and bf16 and b3) or (conv2d_group_statistics and b3) or split_k") \
                > "$OUT/conv_memcheck.log" 2>&1 || status=1
            tail -5 "$OUT/conv_memcheck.log"
        fi
        ;;
    conv-more)
        step "sample throughput: fast-conv against its tuned-tile and Inductor-PDL neighbours"
        python3 benchmarks/sample_throughput.py --device cuda --config cifar10 --batch 1 256 \
            --providers fast-inductor fast-inductor-pdl fast-conv fast-conv-tuned \
            --out "benchmarks/results/sample_throughput_conv_more_${GPU}_$(date +%F).json" \
            > "$OUT/throughput_conv_more.log" 2>&1 || status=1
        tail -12 "$OUT/throughput_conv_more.log"
        step "sample throughput, batch 1: fast-conv with and without split-K"
        python3 benchmarks/sample_throughput.py --device cuda --config cifar10 --batch 1 \
            --providers fast-conv fast-conv-nosplit \
            --out "benchmarks/results/sample_throughput_conv_splitk_${GPU}_$(date +%F).json" \
            > "$OUT/throughput_conv_splitk.log" 2>&1 || status=1
        tail -8 "$OUT/throughput_conv_splitk.log"
        ;;
    solvers)
        step "few-step solvers: per-step time against the DDPM step, cold start (issue 21)"
        python3 -m pytest -o addopts=-ra -q tests/test_solver_step.py tests/test_solvers_pipeline.py \
            -k "fast_mode or implementations" > "$OUT/solver_tests.log" 2>&1 || status=1
        tail -3 "$OUT/solver_tests.log"
        python3 benchmarks/solver_steps.py --device cuda --config cifar10 --batch 1 256 \
            > "$OUT/solver_steps.log" 2>&1 || status=1
        tail -16 "$OUT/solver_steps.log"
        ;;
    profile)
        step "profile of the fast step"
        python3 benchmarks/profile_step.py --device cuda > "$OUT/profile.log" 2>&1 || status=1
        tail -30 "$OUT/profile.log"
        ;;
    esac
    # every stage needs the CUDA build: say so at once rather than after a long stage
    if [ "$stage" = build ]; then
        python3 -c "import ddpm_fast._native as n; i = n.build_info(); print(i); assert i.get('cuda')" \
            || { echo "CUDA kernels missing from the build"; exit 1; }
    fi
done
cp benchmarks/results/*.json "$OUT/" 2>/dev/null
exit $status
