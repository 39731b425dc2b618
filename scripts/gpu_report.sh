#!/usr/bin/env bash
# The full GPU report in parts, each within one 10-minute call (ATTNMEM_PART_BUDGET seconds,
# default 540), on a bare machine as scripts/gpu_check.sh runs:
#
#   bash scripts/gpu_report.sh [--smoke] OUT_DIR PART
#
# (--smoke: a benchmark part, ntm or profile on a CPU at the smoke profile's sizes, for CI;
# ntm without torch.compile, which takes the most time there.)
# PART is one of
#   tests              the tests of gpu_check.sh, not stopping at a failure, with more time
#                      (the sm_80/sm_90 compile tests, marked slow, need no GPU: CI runs them);
#                      with ATTNMEM_RERUN=FILE only the node ids FILE lists, one a line, e.g.
#                      an earlier run's failures: grep -E '^\[gw[0-9]+\].* (FAILED|ERROR) '
#                      tests.log | awk '{print $NF}' (tests/conftest.py reads it)
#   attention-fwd      the gpu benchmark profile's attention forward (head dims 64 and
#                      128, then q/k 192 with v 128: swept last, what a short budget drops),
#   attention-bwd      ... backward,
#   attention-fwd_bwd  ... forward and backward,
#   others             memory_attend, memory_write, additive attention, the layers,
#                      packed variable-length batches (attention_varlen) and the rotary
#                      embedding (apply_rotary),
#   decode             decoding from a KV cache (attention_with_kvcache),
#   product-key        the product-key memory lookup (product_key_lookup) against eager
#                      torch and dense memory_attend, value tables of 1e4 to 1e7 rows,
#   ntm                NTM copy-task training steps per second (python -m bench.ntm):
#                      attnmem, attnmem from CUDA graphs (NTM.graphed), eager torch and
#                      torch.compile (reduce-overhead); ntm.md and ntm.json,
#   profile            where the time of a call goes (python -m bench.trace): host and
#                      device time, kernels and host functions, at the gpu-check points
#                      whose speed left a question (decode, memory ops, attention's
#                      backward and short causal forward); profile.md and profile.json.
# OUT_DIR gets summary.json, report.md, the log and, for a benchmark part,
# part-PART.json (its results.json) and bench.tar.gz. Then, on any machine with the parts'
# JSON files gathered, one report in reports/<device-slug>/:
#
#   python -m bench.gpu_check merge reports part-attention-fwd.json part-attention-bwd.json ...
set -uo pipefail
SMOKE=0
if [ "${1:-}" = --smoke ]; then
    SMOKE=1
    shift
fi
PART=${2:-}
# The sweeps' sizes and timing budgets: the gpu profile (the profile part: gpu-check's
# points), or at --smoke the smoke profile.
PROFILE=gpu TRACE_PROFILE=gpu-check BUDGET_S=0.5 CALLS=20 NTM=()
if [ $SMOKE = 1 ]; then
    PROFILE=smoke TRACE_PROFILE=smoke BUDGET_S=0.02 CALLS=2
    NTM=(--smoke --providers attnmem attnmem-graphed eager)
fi
case "$PART" in
    tests | ntm | profile) ;;
    attention-fwd | attention-bwd | attention-fwd_bwd)
        SWEEP=(--ops attention --modes "${PART#attention-}")
        ;;
    others) SWEEP=(--ops memory_attend memory_write additive mha varlen rotary) ;;
    decode) SWEEP=(--ops decode) ;;
    product-key) SWEEP=(--ops product_key) ;;
    *)
        echo "usage: bash scripts/gpu_report.sh OUT_DIR PART, PART one of tests attention-fwd" \
            "attention-bwd attention-fwd_bwd others decode product-key ntm profile" >&2
        exit 2
        ;;
esac
if [ $# -ne 2 ]; then
    echo "usage: bash scripts/gpu_report.sh [--smoke] OUT_DIR PART" >&2
    exit 2
fi
# shellcheck source=scripts/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
START=$(date +%s)
DEADLINE=$((START + ${ATTNMEM_PART_BUDGET:-540}))
start_run "$1" $SMOKE

STATUS=0
if [ "$PART" = tests ]; then
    pytest_step "$(left "$DEADLINE" 20)" 12 0 tests -m "not slow" --ignore=tests/test_bench.py \
        --ignore=tests/test_examples.py --ignore=tests/test_lint.py --ignore=tests/test_gpu_check.py
    STATUS=$?
elif [ "$PART" = ntm ]; then
    step ntm "$(left "$DEADLINE" 15)" "$PY" -m bench.ntm --out "$WORK/bench" "${NTM[@]}" \
        >"$OUT/ntm.log" 2>&1
    STATUS=$?
    cp "$WORK"/bench/*/ntm.json "$WORK"/bench/*/ntm.md "$OUT/" && cat "$OUT/ntm.md"
elif [ "$PART" = profile ]; then
    step profile "$(left "$DEADLINE" 15)" "$PY" -m bench.trace "$OUT" --profile "$TRACE_PROFILE" \
        --calls "$CALLS" --deadline $((DEADLINE - 60)) >"$OUT/profile.log" 2>&1
    STATUS=$?
    # The table of host, wall and device times, for the console (a remote call's reply).
    [ -f "$OUT/profile.md" ] && sed '/^## /q' "$OUT/profile.md"
else
    bench_step "$DEADLINE" --profile "$PROFILE" --budget-s "$BUDGET_S" "${SWEEP[@]}"
    for results in "$WORK"/bench/*/results.json; do
        [ -f "$results" ] && cp "$results" "$OUT/part-$PART.json"
    done
fi
finish_run
exit $STATUS
