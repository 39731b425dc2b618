#!/usr/bin/env bash
# Installs attnmem (editable) with its dev tools into the current Python environment.
# An installed torch is reused. Without one, a machine with an NVIDIA driver gets the
# default (CUDA) build and a CPU-only machine gets the CPU build, never the CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_CPU_SPEC=${ATTNMEM_TORCH_CPU:-torch==2.13.0+cpu}

if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: reusing torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch"
    "$PY" -m pip install torch
else
    echo "setup: no GPU and no torch, installing the CPU build ($TORCH_CPU_SPEC)"
    if ! "$PY" -m pip install "$TORCH_CPU_SPEC"; then
        echo "setup: $TORCH_CPU_SPEC not found. Add PyTorch's CPU index and rerun:" >&2
        echo "  PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh" >&2
        exit 1
    fi
fi
"$PY" -m pip install -e ".[dev]"
