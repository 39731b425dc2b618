#!/usr/bin/env bash
# The GPU check: one command, at most 9 minutes on an H100, from a bare machine with the
# repository copied in (missing pure-Python packages come from .whl/, see gpu_wheels.sh).
#
#   bash scripts/gpu_check.sh OUT_DIR            on a GPU machine
#   bash scripts/gpu_check.sh --smoke OUT_DIR    tiny sizes on a CPU (CI, well under a minute)
#
# 1. facts: device, driver, torch, triton, Python, commit, copy bandwidth, bf16 matmul rate;
# 2. tests: the kernel tests on CUDA (TRITON_INTERPRET=0) against float64, stopping at the
#    25th failure, so that a first run shows more than one fault (--smoke: two kernel tests
#    through Triton's interpreter, stopping at the first);
# 3. bench: the gpu-check benchmark profile until the time is up (--smoke: the forward of
#    attention and memory_attend at the smoke sizes, attnmem's torch backend on the CPU);
# 4. OUT_DIR gets summary.json, report.md, tests.log, bench.log and bench.tar.gz (the
#    benchmark's results.json, report.md and plots, in a folder named after the device).
# Exit status: 0 when the tests passed, 1 when they failed or ran out of time, 2 on misuse.
# ATTNMEM_CHECK_BUDGET: the seconds the whole check may take (default 530; --smoke 150);
# ATTNMEM_COMMIT: the commit to record, over what .git says (a copy may lack it or lag).
# The split, estimated before any run on a GPU (summary.json's steps hold the real times):
# facts about 20 s; tests at most 300 s (some 2000 tests meeting some 550 tuning keys, one
# config run for each: about 930 kernel compiles of 1-3 s on 12 workers); bench the rest,
# at least 170 s, stopping 30 s before the end; summary and tarball a few seconds.
set -uo pipefail
SMOKE=0
if [ "${1:-}" = --smoke ]; then
    SMOKE=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu_check.sh [--smoke] OUT_DIR" >&2
    exit 2
fi
# shellcheck source=scripts/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
START=$(date +%s)
DEADLINE=$((START + ${ATTNMEM_CHECK_BUDGET:-$((SMOKE ? 150 : 530))}))
start_run "$1" $SMOKE

if [ $SMOKE = 1 ]; then
    pytest_step "$(left "$DEADLINE" 60)" 1 1 -x \
        "tests/test_attention.py::test_matches_float64[plain-fp32-cpu-triton-atomic]" \
        "tests/test_memory_write.py::test_matches_float64[2x75x20x1-fp32-triton]"
else
    # At least 170 s of the call are kept for the benchmarks.
    limit=$(left "$DEADLINE" 170)
    pytest_step $((limit < 300 ? limit : 300)) 12 0 tests --maxfail 25 -m "not slow" \
        --ignore=tests/test_bench.py --ignore=tests/test_examples.py --ignore=tests/test_lint.py \
        --ignore=tests/test_gpu_check.py
fi
TESTS=$?

if [ $SMOKE = 1 ]; then
    # Two ops, one plot of each kind: tests/test_bench.py sweeps every op at smoke sizes.
    bench_step "$DEADLINE" --profile smoke --budget-s 0.02 --ops attention memory_attend \
        --modes fwd
else
    bench_step "$DEADLINE" --profile gpu-check --budget-s 0.1
fi
finish_run
if [ $TESTS -ne 0 ]; then
    echo "gpu_check: the tests failed or ran out of time: see $OUT/tests.log" >&2
    exit 1
fi
