#!/usr/bin/env bash
# The one script the GPU device machine runs, from the repository root of a copy of the
# working tree:
#
#     bash scripts/gpu_check.sh [arguments for sparseflow_bench.gpu_run]
#
# That machine has python3 with torch + triton + pytest (+ pytest-timeout) preinstalled,
# no network and no pip index. Wheels it needs beyond that are carried in .whl/ and
# installed with --no-index into /tmp/site: SpikingJelly with the two of its requirements
# that machine lacks, and snnTorch (the zoo models, the e2e section, the GPU tests):
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 #         --implementation cp --platform manylinux2014_x86_64 -d .whl #         spikingjelly==2.0.0 loguru scienceplots snntorch==1.0.0
#
# Our own five packages are NOT installed: their source trees go on PYTHONPATH.
#
# Steps: environment report -> pytest -m gpu -> GPU benchmarks. The benchmarks run even
# if the tests fail; the exit status is non-zero if either step failed.
#
# Environment knobs:
#   OUT               where results and logs go (e.g. an output folder); default for results:
#                     benchmarks/results/<device>/ (sparseflow_bench.layout: h200 for an NVIDIA H200)
#   GPU_TEST_TIMEOUT  per-test timeout in seconds for pytest-timeout (default 120)
#   SKIP_GPU_TESTS=1  skip the pytest step
#   SKIP_GPU_BENCH=1  skip the benchmark step
#   GPU_TEST_WORKERS  pytest-xdist workers when xdist is installed (default 6)
#   GPU_TEST_ARGS     extra pytest arguments (e.g. "--junitxml=$OUT/junit.xml"; split on spaces)
#   GPU_TEST_SELECT   a pytest -k expression (may hold spaces: "compile or spikformer")
#   (with OUT set, each failed test's traceback goes to $OUT/gpu_failures.log as it fails: conftest.py)
#   PROFILE_MODELS    after the benchmarks, scripts/profile_e2e.py on these models (comma-separated)
#   GPU_CACHE         a folder (e.g. .gpu_cache, ignored by git) for Triton's and Inductor's compile caches
#                     (TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR): a run that finds the folder filled (carried
#                     back from an earlier run) reuses its compiled kernels; with OUT set, the folder is packed
#                     into $OUT/gpu_cache.tgz at the end while it is under GPU_CACHE_MAX_MB (default 48)
#   GPU_BENCH=nox     run the benchmarks as `nox -s bench` (nox from .whl/nox/, in this machine's python:
#                     --no-venv --no-install, our packages on PYTHONPATH) with the arguments given to this
#                     script going to the sparseflow-bench CLI; default: python3 -m sparseflow_bench.gpu_run
set -uo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)

# The device runs real kernels: never the CPU interpreter.
unset TRITON_INTERPRET
export SPARSEFLOW_GPU_RUN=1  # the CPU suites' conftests must not turn the interpreter on

log() { printf '\n=== [gpu_check %4ss] %s\n' "$SECONDS" "$*"; }

# 1. carried wheels (only if .whl/ exists and holds any)
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    log "installing carried wheels into /tmp/site: $(cd .whl && echo *.whl)"
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "WARNING: installing the carried wheels failed; going on without them" >&2
    fi
fi

# 2. our source trees first on the path (ahead of anything carried in /tmp/site)
SRC_PATH="$ROOT/packages/sparseflow-kernels/src:$ROOT/packages/sparseflow-ops/src"
SRC_PATH="$SRC_PATH:$ROOT/packages/sparseflow-core/src:$ROOT/packages/sparseflow-bench/src:$ROOT/src"
export PYTHONPATH="$SRC_PATH${PYTHONPATH:+:$PYTHONPATH}"

# compile caches kept in the working tree, to be carried from one run to the next (GPU_CACHE)
if [ -n "${GPU_CACHE:-}" ]; then
    mkdir -p "$GPU_CACHE/triton" "$GPU_CACHE/inductor"
    TRITON_CACHE_DIR="$(cd "$GPU_CACHE" && pwd)/triton"
    TORCHINDUCTOR_CACHE_DIR="$(cd "$GPU_CACHE" && pwd)/inductor"
    export TRITON_CACHE_DIR TORCHINDUCTOR_CACHE_DIR
fi

pack_cache() {
    [ -n "${GPU_CACHE:-}" ] && [ -n "${OUT:-}" ] || return 0
    local mb
    mb=$(du -sm "$GPU_CACHE" | cut -f1)
    if [ "$mb" -le "${GPU_CACHE_MAX_MB:-48}" ]; then
        tar czf "$OUT/gpu_cache.tgz" -C "$GPU_CACHE" . && log "compile caches ($mb MB) packed into $OUT/gpu_cache.tgz"
    else
        log "compile caches: $mb MB, over GPU_CACHE_MAX_MB=${GPU_CACHE_MAX_MB:-48}: not packed"
    fi
}

# 3. environment report
log "environment"
echo "PYTHONPATH=$PYTHONPATH"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || true
else
    echo "nvidia-smi: not found"
fi
python3 - <<'PY' || true
import sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    for i in range(torch.cuda.device_count()):
        print(f"  cuda:{i}", torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
except Exception as e:  # report and go on: the tests will show the failure
    print("torch: import failed:", repr(e))
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: import failed:", repr(e))
PY

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    TEST_LOG="$OUT/gpu_tests.log"
    export SPARSEFLOW_FAILURE_LOG="$OUT/gpu_failures.log"  # each failure's traceback as it happens (conftest.py)
else
    TEST_LOG=/dev/null
fi
RESULTS_DIR="${OUT:-$(python3 -m sparseflow_bench.layout "$ROOT/benchmarks/results")}"
mkdir -p "$RESULTS_DIR"

# 4. GPU tests
tests_rc=0
if [ "${SKIP_GPU_TESTS:-0}" = 1 ]; then
    log "pytest -m gpu: skipped (SKIP_GPU_TESTS=1)"
else
    test_dirs=()
    for d in packages/sparseflow-kernels/tests packages/sparseflow-ops/tests \
        packages/sparseflow-core/tests packages/sparseflow-bench/tests tests; do
        [ -d "$d" ] && test_dirs+=("$d")
    done
    log "pytest -m gpu on: ${test_dirs[*]} (log: $TEST_LOG)"
    # several workers when pytest-xdist is there (carried in .whl/): Triton's compiles are CPU-bound
    par=()
    if python3 -c "import xdist" 2>/dev/null; then par=(-n "${GPU_TEST_WORKERS:-6}"); fi
    python3 -m pytest -m gpu -q --maxfail=25 -p no:cacheprovider -p no:logging --timeout="${GPU_TEST_TIMEOUT:-120}" \
        "${par[@]}" ${GPU_TEST_ARGS:-} ${GPU_TEST_SELECT:+-k "$GPU_TEST_SELECT"} "${test_dirs[@]}" 2>&1 \
        | tee "$TEST_LOG"
    tests_rc=${PIPESTATUS[0]}
    if [ "$tests_rc" -eq 5 ]; then
        echo "pytest: no test marked gpu was collected (exit 5); counted as a pass"
        tests_rc=0
    fi
    log "pytest -m gpu: exit $tests_rc"
fi

# 5. GPU benchmarks
bench_rc=0
if [ "${SKIP_GPU_BENCH:-0}" = 1 ]; then
    log "benchmarks: skipped (SKIP_GPU_BENCH=1)"
else
    export SPARSEFLOW_RESULTS_DIR="$RESULTS_DIR"
    if [ "${GPU_BENCH:-}" = nox ]; then
        # nox and its pure-Python dependencies in their own folder: only the nox command sees them
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/noxsite \
            .whl/nox/*.whl || echo "WARNING: installing nox from .whl/nox failed" >&2
        log "nox -s bench -- --out $RESULTS_DIR $* (no venv, no install: this machine's python3)"
        PYTHONPATH="/tmp/noxsite:$PYTHONPATH" python3 -m nox --no-venv --no-install -s bench -- \
            --out "$RESULTS_DIR" "$@"
    else
        log "python3 -m sparseflow_bench.gpu_run --out $RESULTS_DIR $*"
        python3 -m sparseflow_bench.gpu_run --out "$RESULTS_DIR" "$@"
    fi
    bench_rc=$?
    log "benchmarks: exit $bench_rc"
fi

# 6. kernel profiles (optional)
if [ -n "${PROFILE_MODELS:-}" ]; then
    log "profile_e2e.py --models $PROFILE_MODELS"
    python3 scripts/profile_e2e.py --models "$PROFILE_MODELS" --out "$RESULTS_DIR" || bench_rc=1
fi

pack_cache
log "summary: tests exit $tests_rc, benchmarks exit $bench_rc, results in $RESULTS_DIR"
if [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
    exit 1
fi
exit 0
