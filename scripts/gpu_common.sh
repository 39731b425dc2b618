# Sourced by scripts/gpu_check.sh, gpu_report.sh and gpu_wheels.sh: the Python packages the
# GPU runs need, their installation from carried wheels, and steps run against a clock.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
SITE=/tmp/attnmem-site
# Triton kernels run compiled; only the smoke run's tests ask for the interpreter.
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
# Pure-Python packages (import name:requirement) that tests and benchmarks use; a bare GPU
# machine may lack some, or hold a version the requirement excludes (its transformers was
# 5.17 on 2026-11-24). scripts/gpu_wheels.sh downloads them into .whl/.
PURE_PYTHON=(pytest:pytest pluggy:pluggy iniconfig:iniconfig packaging:packaging
             pygments:pygments hypothesis:hypothesis sortedcontainers:sortedcontainers
             xdist:pytest-xdist execnet:execnet pytest_timeout:pytest-timeout
             pytest_benchmark:pytest-benchmark cpuinfo:py-cpuinfo2 tqdm:tqdm
             "transformers:transformers>=5.23")

# Prints the requirements of PURE_PYTHON whose module does not import or whose installed
# version the requirement excludes, then matplotlib if it does not import (it is no
# pure-Python wheel: without it the reports have no plots).
missing_packages() {
    "$PY" - "${PURE_PYTHON[@]}" matplotlib:matplotlib <<'EOF'
import importlib.metadata
import importlib.util
import sys

from packaging.requirements import Requirement


def met(module, requirement):
    if importlib.util.find_spec(module) is None:
        return False
    # Versions only where the requirement names one: py-cpuinfo2's module has another name.
    requirement = Requirement(requirement)
    return not requirement.specifier or requirement.specifier.contains(
        importlib.metadata.version(requirement.name), prereleases=True)


print(" ".join(req for module, req in (a.split(":") for a in sys.argv[1:])
               if not met(module, req)))
EOF
}

# Installs each missing package from .whl/ into $SITE (on PYTHONPATH); writes what is still
# missing to the file $1, one name a line.
install_wheels() {
    local dist still=()
    for dist in $(missing_packages); do
        if [ -d "$ROOT/.whl" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --upgrade --target "$SITE" --find-links "$ROOT/.whl" "$dist" \
                >/dev/null 2>&1; then
            echo "installed $dist from .whl/"
        else
            still+=("$dist")
        fi
    done
    printf '%s\n' "${still[@]}" >"$1"
    if [ ${#still[@]} -gt 0 ]; then
        echo "missing (no wheel in .whl/, which scripts/gpu_wheels.sh fills): ${still[*]}"
    fi
}

# step NAME LIMIT_S COMMAND...: runs COMMAND under timeout (SIGTERM at LIMIT_S, SIGKILL 15 s
# later) and appends "NAME seconds limit exit-code" to $WORK/steps.tsv. Returns the exit code.
step() {
    local name=$1 limit=$2 begin code
    shift 2
    if [ "$limit" -lt 1 ]; then
        echo "$name: no time left" >&2
        echo "$name 0 0 124" >>"$WORK/steps.tsv"
        return 124
    fi
    echo "== $name (limit ${limit}s)"
    begin=$(date +%s)
    timeout -k 15 "$limit" "$@"
    code=$?
    echo "$name $(($(date +%s) - begin)) $limit $code" >>"$WORK/steps.tsv"
    echo "== $name: exit $code after $(($(date +%s) - begin))s"
    return $code
}

# Seconds left until the epoch time $1, less $2.
left() {
    echo $(($1 - $(date +%s) - ${2:-0}))
}

# pytest_step LIMIT_S WORKERS INTERPRET ARGS...: the tests (on CUDA with INTERPRET 0, through
# Triton's interpreter with 1), the log in $OUT/tests.log, the JUnit XML in $WORK; WORKERS
# processes where pytest-xdist is there, and a hung test fails after 150 s where
# pytest-timeout is. The workers share their autotuning choices through a Triton cache of
# their own: choices made while twelve processes share the GPU never reach the benchmarks.
# ATTNMEM_TUNING=one: each tuning key runs one of its configs (kernels/_launch.py's
# one_config_per_key), about 930 kernel compiles in place of about 2400.
pytest_step() {
    local limit=$1 workers=$2 interpret=$3 extra=()
    shift 3
    # loadgroup: the sm_80/sm_90 compile tests share one worker, as in CI.
    "$PY" -c "import xdist" 2>/dev/null && [ "$workers" -gt 1 ] &&
        extra+=(-n "$workers" --dist loadgroup)
    "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 150)
    step tests "$limit" env TRITON_INTERPRET="$interpret" TRITON_CACHE_AUTOTUNING=1 \
        ATTNMEM_TUNING=one TRITON_CACHE_DIR="$WORK/triton-cache" "$PY" -m pytest "$@" \
        "${extra[@]}" -v --tb=short -ra --durations=20 -p no:cacheprovider \
        --junitxml="$WORK/tests.xml" >"$OUT/tests.log" 2>&1
}

# start_run OUT_DIR SMOKE: sets OUT and a WORK folder (removed at exit), installs missing
# wheels, refuses a machine without CUDA unless SMOKE is 1, and runs the facts step.
start_run() {
    mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 2
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    cd "$ROOT" || exit 2
    install_wheels "$WORK/missing.txt"
    local smoke=()
    if [ "$2" = 1 ]; then
        smoke=(--smoke)
    elif ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "torch sees no CUDA device; on a CPU: bash scripts/gpu_check.sh --smoke OUT_DIR" >&2
        exit 2
    fi
    step facts 120 "$PY" -m bench.gpu_check facts "$WORK/facts.json" "${smoke[@]}" ||
        { echo "the facts step failed" >&2; exit 2; }
}

# bench_step DEADLINE ARGS...: the deadline-aware sweep (python -m bench.gpu_check bench
# ARGS), which stops starting points 30 s before DEADLINE (the timeout is its backstop);
# the log in $OUT/bench.log, the report in $WORK/bench/<device-slug>/.
bench_step() {
    local deadline=$1
    shift
    step bench "$(left "$deadline" 15)" "$PY" -m bench.gpu_check bench "$WORK/bench" \
        --deadline $((deadline - 30)) --facts "$WORK/facts.json" "$@" >"$OUT/bench.log" 2>&1
}

# finish_run: $OUT/bench.tar.gz (the benchmark folder, when there is one), summary.json and
# report.md.
finish_run() {
    [ -d "$WORK/bench" ] && tar -czf "$OUT/bench.tar.gz" -C "$WORK/bench" .
    "$PY" -m bench.gpu_check summarize "$OUT" "$WORK"
    echo "$(($(date +%s) - START))s; wrote $OUT: $(cd "$OUT" && echo *)"
}
