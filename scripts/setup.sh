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
# Triton 3.6 and older run a kernel's loop bounds through int() of one-element numpy arrays in
# their interpreter, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted";
# triton issue 9171, fixed in 3.7): the tests' interpreted kernels fail there. An installed
# torch that pins such a triton (2.11 pins 3.6) then keeps numpy below 2.4.
if "$PY" -c "
import sys
import numpy, triton
version = lambda v: tuple(int(p) for p in v.split('+')[0].split('.')[:2])
sys.exit(not (version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4)))
" 2>/dev/null; then
    echo "setup: triton $("$PY" -c 'import triton; print(triton.__version__)')'s interpreter needs numpy < 2.4"
    "$PY" -m pip install "numpy<2.4"
fi
