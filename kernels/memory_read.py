"""Weighted read r = w @ M over memory (B, N, D) with weights (B, R, N): forward, backward.

The forward splits the slots across programs (few heads over a large memory still fill a
GPU) and sums the per-split partial reads; the backward's programs own slot tiles and
write dMemory = w^T dr and dWeights = dr M^T for them. Both walk D in chunks: any width.
"""

import torch
import triton
import triton.language as tl

from attnmem.kernels._launch import interpreting, lastdim_contiguous, slot_splits, within

BLOCK_N = 64
INTERPRET_BLOCK_N = 16
MAX_BLOCK_D = 128


@triton.jit
def _memory_read_fwd(mem_ptr, weights_ptr, part_ptr, stride_mb, stride_mn, stride_wb,
                     stride_wr, n_heads, n_slots, width, split_len,
                     DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(0)
    stride_mn = tl.cast(stride_mn, tl.int64)
    heads = tl.arange(0, BLOCK_R)
    start = split * split_len
    end = tl.minimum(start + split_len, n_slots)
    rows = (b * n_splits + split) * n_heads + heads
    for d0 in range(0, width, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = within(offs_d, width, EVEN_D)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            slots = n0 + tl.arange(0, BLOCK_N)
            w = tl.load(weights_ptr + b * stride_wb + heads[:, None] * stride_wr + slots[None, :],
                        mask=(heads[:, None] < n_heads) & (slots[None, :] < end), other=0.0)
            mem = tl.load(mem_ptr + b * stride_mb + slots[:, None] * stride_mn + offs_d[None, :],
                          mask=(slots[:, None] < end) & d_ok[None, :], other=0.0)
            acc = tl.dot(w.to(mem.dtype), mem, acc, input_precision=DOT_PRECISION)
        tl.store(part_ptr + rows[:, None] * width + offs_d[None, :], acc,
                 mask=(heads[:, None] < n_heads) & d_ok[None, :])


@triton.jit
def _memory_read_bwd(dread_ptr, mem_ptr, weights_ptr, dmem_ptr, dweights_ptr,
                     stride_mb, stride_mn, stride_wb, stride_wr, stride_db, stride_dn,
                     n_heads, n_slots, width, DOT_PRECISION: tl.constexpr,
                     EVEN_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    slots = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    stride_mn = tl.cast(stride_mn, tl.int64)
    stride_dn = tl.cast(stride_dn, tl.int64)
    heads = tl.arange(0, BLOCK_R)
    w_mask = (heads[:, None] < n_heads) & (slots[None, :] < n_slots)
    w = tl.load(weights_ptr + b * stride_wb + heads[:, None] * stride_wr + slots[None, :],
                mask=w_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for d0 in range(0, width, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = within(offs_d, width, EVEN_D)
        tile = (slots[:, None] < n_slots) & d_ok[None, :]
        dread = tl.load(dread_ptr + (b * n_heads + heads[:, None]) * width + offs_d[None, :],
                        mask=(heads[:, None] < n_heads) & d_ok[None, :], other=0.0)
        mem = tl.load(mem_ptr + b * stride_mb + slots[:, None] * stride_mn + offs_d[None, :],
                      mask=tile, other=0.0)
        dmem = tl.dot(tl.trans(w), dread, input_precision=DOT_PRECISION)
        tl.store(dmem_ptr + b * stride_db + slots[:, None] * stride_dn + offs_d[None, :],
                 dmem.to(dmem_ptr.dtype.element_ty), mask=tile)
        dw = tl.dot(dread, tl.trans(mem.to(tl.float32)), dw, input_precision=DOT_PRECISION)
    tl.store(dweights_ptr + (b * n_heads + heads[:, None]) * n_slots + slots[None, :],
             dw.to(dweights_ptr.dtype.element_ty), mask=w_mask)


def _meta(memory, n_heads):
    width = memory.shape[2]
    block_d = min(MAX_BLOCK_D, max(16, triton.next_power_of_2(width)))
    block_d = min(block_d, 32) if interpreting() else block_d
    return dict(DOT_PRECISION="ieee" if memory.dtype == torch.float32 else "tf32",
                EVEN_D=width % block_d == 0, BLOCK_R=max(16, triton.next_power_of_2(n_heads)),
                BLOCK_N=INTERPRET_BLOCK_N if interpreting() else BLOCK_N, BLOCK_D=block_d)


def memory_read_forward(memory, weights):
    """-> read (B, R, D) in memory's dtype."""
    memory, weights = lastdim_contiguous(memory), lastdim_contiguous(weights)
    batch, n_slots, width = memory.shape
    n_heads = weights.shape[1]
    meta = _meta(memory, n_heads)
    split_len, n_splits = slot_splits(n_slots, batch, meta["BLOCK_N"], memory.device)
    part = torch.empty((batch, n_splits, n_heads, width), dtype=torch.float32,
                       device=memory.device)
    if memory.numel() == 0 or n_slots == 0:
        return part.zero_().sum(1).to(memory.dtype)
    _memory_read_fwd[(n_splits, batch)](
        memory, weights, part, memory.stride(0), memory.stride(1), weights.stride(0),
        weights.stride(1), n_heads, n_slots, width, split_len, **meta)
    return part.sum(1).to(memory.dtype)


def memory_read_backward(dread, memory, weights):
    """-> dmemory, dweights in the inputs' dtypes."""
    memory, weights = lastdim_contiguous(memory), lastdim_contiguous(weights)
    dread = dread.float().contiguous()  # (B, R, D): small, and the kernel works in fp32
    batch, n_slots, width = memory.shape
    n_heads = weights.shape[1]
    meta = _meta(memory, n_heads)
    dmemory = torch.empty(memory.shape, dtype=memory.dtype, device=memory.device)
    dweights = torch.empty(weights.shape, dtype=weights.dtype, device=weights.device)
    if memory.numel() == 0 or dweights.numel() == 0:
        return dmemory.zero_(), dweights.zero_()
    _memory_read_bwd[(triton.cdiv(n_slots, meta["BLOCK_N"]), batch)](
        dread, memory, weights, dmemory, dweights, memory.stride(0), memory.stride(1),
        weights.stride(0), weights.stride(1), dmemory.stride(0), dmemory.stride(1),
        n_heads, n_slots, width, **meta)
    return dmemory, dweights
