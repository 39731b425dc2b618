"""Launch helpers shared by the kernel files."""

import os

import torch
import triton


def interpreting() -> bool:
    """Triton runs kernels through its interpreter (CPU tensors, tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def lastdim_contiguous(x):
    """x, copied only if its last dimension is strided (kernels take the other strides)."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def slot_splits(n_slots: int, rows: int, block_n: int, device):
    """(split_len, n_splits): splits of whole tiles along the slots, enough that `rows`
    independent rows times the splits fill the GPU twice over (three under the interpreter,
    so that the combining code runs on test sizes)."""
    if interpreting():
        target = 3
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = max(1, triton.cdiv(2 * sms, rows))
    tiles = triton.cdiv(max(n_slots, 1), block_n)
    split_len = block_n * triton.cdiv(tiles, min(target, tiles))
    return split_len, triton.cdiv(max(n_slots, 1), split_len)
