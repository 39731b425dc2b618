"""Where the tests run the kernels: through Triton's interpreter on CPU tensors (CI), or on
CUDA when there is a GPU and the interpreter is off."""

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ["torch"] + (["triton"] if INTERPRET or torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
# Kernel test dtypes: bfloat16 dots are wrong under the interpreter, so bf16 runs on CUDA.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
DTYPE_IDS = ["fp32", "fp16", "bf16"][:len(DTYPES)]
