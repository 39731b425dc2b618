#!/usr/bin/env bash
# Installs attnmem (editable) with its dev tools into the current Python environment.
# An installed torch is reused if it meets the floor. Otherwise a machine with an NVIDIA
# driver gets the default (CUDA) build and a CPU-only machine gets the CPU build, never the
# CUDA packages: pip would otherwise satisfy attnmem's torch requirement with the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_FLOOR=2.8  # as in pyproject.toml
TORCH_CPU_SPEC=${ATTNMEM_TORCH_CPU:-torch==2.13.0+cpu}

installed=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ -n "$installed" ] && "$PY" -c "
import sys
have = tuple(int(part) for part in '$installed'.split('.')[:2])
sys.exit(have < tuple(int(part) for part in '$TORCH_FLOOR'.split('.')))"; then
    echo "setup: reusing torch $installed"
else
    [ -n "$installed" ] && echo "setup: torch $installed is older than $TORCH_FLOOR, replacing it"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: NVIDIA GPU found, installing torch"
        "$PY" -m pip install "torch>=$TORCH_FLOOR"
    else
        echo "setup: no GPU, installing the CPU build of torch ($TORCH_CPU_SPEC)"
        if ! "$PY" -m pip install "$TORCH_CPU_SPEC"; then
            echo "setup: $TORCH_CPU_SPEC not found. Add PyTorch's CPU index and rerun:" >&2
            echo "  PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh" >&2
            exit 1
        fi
    fi
fi
"$PY" -m pip install -e ".[dev]"
