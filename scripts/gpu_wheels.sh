#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the pure-Python wheels of the packages that the GPU scripts
# need (PURE_PYTHON in gpu_common.sh), for the GPU machine's Python 3.12, where they are
# installed only if missing. Run it here, where pip reaches an index; then carry .whl with
# the call: bash scripts/gpu_wheels.sh
set -euo pipefail
# shellcheck source=scripts/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"
cd "$ROOT"
dists=()
for pair in "${PURE_PYTHON[@]}"; do
    dists+=("${pair#*:}")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --abi none --platform any -d .whl "${dists[@]}"
# Only py3-none-any wheels: anything else could not run there or would need compiling.
for wheel in .whl/*.whl; do
    case "$wheel" in
        *-none-any.whl) ;;
        *) echo "gpu_wheels: $wheel is not a pure-Python wheel" >&2; exit 1 ;;
    esac
done
du -sh .whl
