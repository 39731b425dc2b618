"""Weighted read r = w @ M over memory (B, N, D) with weights (B, R, N): forward, backward.

The forward splits the slots across programs (few heads over a large memory still fill a
GPU) and sums the per-split partial reads; the backward's programs own slot tiles and
write dMemory = w^T dr and dWeights = dr M^T for them. Both walk D in chunks of BLOCK_D and
the heads in blocks of BLOCK_R, so that no tile outgrows the registers: any width, any
number of heads. Tile sizes, warps and stages are autotuned per width bucket, head block
and dtype over the configs of `configs_for`, all of which compile without register spills
on sm_80 and sm_90 (tests/test_memory_read.py).

Sparse weights, indices and weights (B, R, K) (-1: no slot), read r = sum_k w_k M[i_k] in
kernels of their own, because the shapes differ: the dense kernels multiply one slot tile
shared by a block of 16 heads (tl.dot) and their backward programs own slot tiles, while a
sparse head's rows are its own, so there is no shared tile to multiply and the backward
must scatter. `_memory_read_sparse_fwd`'s programs each own a head and a width chunk and
sum its K gathered rows, BLOCK_K at a time; `_memory_read_sparse_bwd`'s each own a head
and BLOCK_K of its entries: dWeights_k = dr . M[i_k], and (ATOMIC) w_k dr added into the
dense float32 dMemory with atomics. Otherwise (16-bit memories, which would need a
memory-sized float32 buffer, and under torch.use_deterministic_algorithms) dMemory is the
product-key lookup's sorted row sums (kernels.product_key): each touched row summed by one
program in a fixed order, bit for bit repeatable. Rows are loaded BLOCK_D wide, 16 bytes at
a time for whole chunks. A memory (N, D) shared by the batch is read with batch stride 0,
and its gradient is (N, D) (the same atomics and row sums, with stride 0 and the slot as the
row), or for a sparse gradient the sorted row sums of the touched rows only.
"""

import torch
import triton
import triton.language as tl

from attnmem.kernels._launch import (
    block_width,
    interpreting,
    lastdim_contiguous,
    launch,
    slot_configs,
    slot_splits,
    within,
)

# Heads per block: tl.dot's smallest M. More heads loop over blocks of 16.
BLOCK_R = 16
# Width chunk: 16-bit memories up to 128, float32 up to 64 (full-precision float32 dots run
# on FMA units and hold their operands in registers).
MAX_BLOCK_D = {2: 128, 4: 64}
# (BLOCK_N, num_warps, num_stages) per kernel, element size and width chunk: the configs
# that compile without register spills on sm_90 and load memory tiles 16 bytes at a time
# (tests/test_memory_read.py fails on any spill or scalar load). ptxas is not monotonic in
# the tile size: a smaller tile can spill where a larger one does not, hence a table.
CONFIGS = {
    ("fwd", 2, 16): [(64, 4, 3), (128, 8, 4)],
    ("fwd", 2, 32): [(64, 4, 3), (128, 8, 4), (32, 4, 4)],
    ("fwd", 2, 64): [(64, 4, 3), (128, 4, 3), (128, 8, 4), (32, 4, 4)],
    ("fwd", 2, 128): [(64, 4, 3), (128, 4, 3), (128, 8, 4), (32, 4, 4)],
    ("fwd", 4, 16): [(128, 4, 3), (128, 8, 4)],
    ("fwd", 4, 32): [(128, 4, 3), (128, 8, 4), (32, 4, 4)],
    ("fwd", 4, 64): [(128, 8, 4), (32, 4, 4)],
    ("bwd", 2, 16): [(64, 4, 2), (128, 8, 2)],
    ("bwd", 2, 32): [(64, 4, 2), (32, 4, 2), (64, 8, 2), (128, 8, 2)],
    ("bwd", 2, 64): [(64, 4, 2), (32, 4, 2), (64, 8, 2), (128, 8, 2)],
    ("bwd", 2, 128): [(64, 4, 2), (32, 4, 2), (64, 8, 2), (128, 8, 2)],
    ("bwd", 4, 16): [(32, 4, 2), (64, 8, 2), (128, 8, 2)],
    ("bwd", 4, 32): [(32, 4, 2), (64, 8, 2), (128, 8, 2)],
    ("bwd", 4, 64): [(64, 4, 2), (32, 4, 2)],
}
# Forward splits are whole multiples of the largest BLOCK_N: the grid is the same for all.
SPLIT_QUANTUM = 128
INTERPRET_CONFIG = dict(BLOCK_N=16, num_warps=1, num_stages=1)


def configs_for(kernel, block_d, elem):
    """The autotuning configs of kernel ("fwd" or "bwd") at this width chunk and element
    size."""
    return slot_configs(CONFIGS[(kernel, elem, block_d)])


@triton.jit
def _memory_read_fwd(mem_ptr, weights_ptr, part_ptr, stride_mb, stride_mn, stride_wb,
                     stride_wr, n_heads, n_slots, width, split_len,
                     DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(0)
    stride_mn = tl.cast(stride_mn, tl.int64)
    # R heads of N weights can pass 2^31 elements in one batch entry.
    stride_wr = tl.cast(stride_wr, tl.int64)
    start = split * split_len
    end = tl.minimum(start + split_len, n_slots)
    for r0 in range(0, n_heads, BLOCK_R):
        heads = r0 + tl.arange(0, BLOCK_R)
        rows = (b * n_splits + split) * n_heads + heads
        for d0 in range(0, width, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = within(offs_d, width, EVEN_D)
            acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
            for n0 in range(start, end, BLOCK_N):
                slots = n0 + tl.arange(0, BLOCK_N)
                w = tl.load(weights_ptr + b * stride_wb + heads[:, None] * stride_wr
                            + slots[None, :],
                            mask=(heads[:, None] < n_heads) & (slots[None, :] < end), other=0.0)
                mem = tl.load(mem_ptr + b * stride_mb + slots[:, None] * stride_mn
                              + offs_d[None, :],
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
    slot_ok = slots < n_slots
    stride_mn = tl.cast(stride_mn, tl.int64)
    stride_dn = tl.cast(stride_dn, tl.int64)
    stride_wr = tl.cast(stride_wr, tl.int64)
    # dMemory of a width chunk sums every head block; dWeights of a head block sums every
    # width chunk: two loop nests, so that each accumulator is one tile. Only the second
    # reads memory, once.
    for d0 in range(0, width, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = within(offs_d, width, EVEN_D)
        dmem = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for r0 in range(0, n_heads, BLOCK_R):
            heads = r0 + tl.arange(0, BLOCK_R)
            w = tl.load(weights_ptr + b * stride_wb + heads[:, None] * stride_wr
                        + slots[None, :],
                        mask=(heads[:, None] < n_heads) & slot_ok[None, :], other=0.0)
            dread = tl.load(dread_ptr + (b * n_heads + heads[:, None]) * width + offs_d[None, :],
                            mask=(heads[:, None] < n_heads) & d_ok[None, :], other=0.0)
            dmem = tl.dot(tl.trans(w.to(tl.float32)), dread, dmem,
                          input_precision=DOT_PRECISION)
        tl.store(dmem_ptr + b * stride_db + slots[:, None] * stride_dn + offs_d[None, :],
                 dmem.to(dmem_ptr.dtype.element_ty), mask=slot_ok[:, None] & d_ok[None, :])
    for r0 in range(0, n_heads, BLOCK_R):
        heads = r0 + tl.arange(0, BLOCK_R)
        dw = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        for d0 in range(0, width, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = within(offs_d, width, EVEN_D)
            dread = tl.load(dread_ptr + (b * n_heads + heads[:, None]) * width + offs_d[None, :],
                            mask=(heads[:, None] < n_heads) & d_ok[None, :], other=0.0)
            mem = tl.load(mem_ptr + b * stride_mb + slots[:, None] * stride_mn + offs_d[None, :],
                          mask=slot_ok[:, None] & d_ok[None, :], other=0.0)
            dw = tl.dot(dread, tl.trans(mem.to(tl.float32)), dw, input_precision=DOT_PRECISION)
        tl.store(dweights_ptr + (b * n_heads + heads[:, None]) * n_slots + slots[None, :],
                 dw.to(dweights_ptr.dtype.element_ty),
                 mask=(heads[:, None] < n_heads) & slot_ok[None, :])


def block_d_for(width, elem):
    """The width chunk: the width's power of two, at least 16, at most MAX_BLOCK_D."""
    return min(MAX_BLOCK_D[elem], block_width(width))


def _meta(memory):
    width, elem = memory.shape[2], memory.element_size()
    block_d = block_d_for(width, elem)
    return dict(DOT_PRECISION="ieee" if memory.dtype == torch.float32 else "tf32",
                EVEN_D=width % block_d == 0, BLOCK_R=BLOCK_R, BLOCK_D=block_d)


# Under the interpreter: width chunks of 32 at most, so that test widths span several.
def _interpret_meta(meta, width):
    block_d = min(meta["BLOCK_D"], 32)
    return dict(meta, BLOCK_D=block_d, EVEN_D=width % block_d == 0)


def memory_read_forward(memory, weights):
    """-> read (B, R, D) in memory's dtype."""
    memory, weights = lastdim_contiguous(memory), lastdim_contiguous(weights)
    batch, n_slots, width = memory.shape
    n_heads = weights.shape[1]
    meta = _meta(memory)
    if interpreting():
        meta = _interpret_meta(meta, width)
    quantum = INTERPRET_CONFIG["BLOCK_N"] if interpreting() else SPLIT_QUANTUM
    split_len, n_splits = slot_splits(n_slots, batch, quantum, memory.device)
    part = torch.empty((batch, n_splits, n_heads, width), dtype=torch.float32,
                       device=memory.device)
    if memory.numel() == 0 or n_slots == 0 or n_heads == 0:
        return part.zero_().sum(1).to(memory.dtype)
    launch(_memory_read_fwd, lambda m: (n_splits, batch),
           (memory, weights, part, memory.stride(0), memory.stride(1), weights.stride(0),
            weights.stride(1), n_heads, n_slots, width, split_len), meta,
           configs_for("fwd", meta["BLOCK_D"], memory.element_size()),
           ["BLOCK_D", "EVEN_D", "n_heads"], INTERPRET_CONFIG)
    return part.sum(1).to(memory.dtype)


def memory_read_backward(dread, memory, weights):
    """-> dmemory, dweights in the inputs' dtypes."""
    memory, weights = lastdim_contiguous(memory), lastdim_contiguous(weights)
    dread = dread.float().contiguous()  # (B, R, D): small, and the kernel works in fp32
    batch, n_slots, width = memory.shape
    meta = _meta(memory)
    if interpreting():
        meta = _interpret_meta(meta, width)
    dmemory = torch.empty(memory.shape, dtype=memory.dtype, device=memory.device)
    dweights = torch.empty(weights.shape, dtype=weights.dtype, device=weights.device)
    if memory.numel() == 0 or dweights.numel() == 0:
        return dmemory.zero_(), dweights.zero_()
    launch(_memory_read_bwd, lambda m: (triton.cdiv(n_slots, m["BLOCK_N"]), batch),
           (dread, memory, weights, dmemory, dweights, memory.stride(0), memory.stride(1),
            weights.stride(0), weights.stride(1), dmemory.stride(0), dmemory.stride(1),
            weights.shape[1], n_slots, width), meta,
           configs_for("bwd", meta["BLOCK_D"], memory.element_size()),
           ["BLOCK_D", "EVEN_D", "n_heads"], INTERPRET_CONFIG)
    return dmemory, dweights


# Sparse read: (BLOCK_D, num_warps) per element size, the widest chunk 256 bytes of a row
# (a warp's 16-byte loads cover two rows); BLOCK_K entries a step. These compile without
# register spills on sm_90, atomics included, and load rows 16 bytes at a time
# (tests/test_memory_read.py).
SPARSE_CONFIG = {2: (128, 4), 4: (64, 4)}
MAX_BLOCK_K = 16
INTERPRET_SPARSE = dict(BLOCK_D=16, BLOCK_K=4, num_warps=1, num_stages=1)


@triton.jit
def _sparse_entries(idx_ptr, weights_ptr, head, offs_k, topk, n_slots):
    """(slots, weights, usable) of BLOCK_K entries of a head: a slot outside [0, N) and its
    weight (which may hold anything) count as nothing."""
    k_ok = offs_k < topk
    slots = tl.load(idx_ptr + head * topk + offs_k, mask=k_ok, other=-1)
    ok = k_ok & (slots >= 0) & (slots < n_slots)
    w = tl.load(weights_ptr + head * topk + offs_k, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, slots, 0), w, ok


@triton.jit
def _memory_read_sparse_fwd(mem_ptr, idx_ptr, weights_ptr, out_ptr, stride_mb, stride_mn,
                            n_heads, n_slots, width, topk, EVEN_D: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0).to(tl.int64)  # b * R + r
    b = head // n_heads
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = within(offs_d, width, EVEN_D)
    stride_mn = tl.cast(stride_mn, tl.int64)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for k0 in range(0, topk, BLOCK_K):
        slots, w, ok = _sparse_entries(idx_ptr, weights_ptr, head, k0 + tl.arange(0, BLOCK_K),
                                       topk, n_slots)
        rows = tl.load(mem_ptr + b * stride_mb + slots[:, None] * stride_mn + offs_d[None, :],
                       mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * rows.to(tl.float32), 0)
    tl.store(out_ptr + head * width + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _memory_read_sparse_bwd(dread_ptr, mem_ptr, idx_ptr, weights_ptr, dmem_ptr, dweights_ptr,
                            stride_mb, stride_mn, stride_db, stride_dn, n_heads, n_slots,
                            width, topk, ATOMIC: tl.constexpr, EVEN_D: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0).to(tl.int64)
    b = head // n_heads
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slots, w, ok = _sparse_entries(idx_ptr, weights_ptr, head, offs_k, topk, n_slots)
    stride_mn = tl.cast(stride_mn, tl.int64)
    stride_dn = tl.cast(stride_dn, tl.int64)
    dw = tl.zeros([BLOCK_K], tl.float32)
    for d0 in range(0, width, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = within(offs_d, width, EVEN_D)
        tile = ok[:, None] & d_ok[None, :]
        g = tl.load(dread_ptr + head * width + offs_d, mask=d_ok, other=0.0)
        rows = tl.load(mem_ptr + b * stride_mb + slots[:, None] * stride_mn + offs_d[None, :],
                       mask=tile, other=0.0)
        dw += tl.sum(rows.to(tl.float32) * g[None, :], 1)
        if ATOMIC:
            tl.atomic_add(dmem_ptr + b * stride_db + slots[:, None] * stride_dn
                          + offs_d[None, :], w[:, None] * g[None, :], mask=tile, sem="relaxed")
    tl.store(dweights_ptr + head * topk + offs_k, dw.to(dweights_ptr.dtype.element_ty),
             mask=offs_k < topk)


def sparse_config(width, topk, elem):
    """The sparse kernels' launch config on a GPU: the width chunk (at most SPARSE_CONFIG's,
    at least 16), BLOCK_K entries a step (topk's power of two, 2 to MAX_BLOCK_K), warps."""
    block_d, warps = SPARSE_CONFIG[elem]
    return dict(BLOCK_D=min(block_d, block_width(width)),
                BLOCK_K=min(MAX_BLOCK_K, max(2, triton.next_power_of_2(topk))),
                num_warps=warps, num_stages=1)


def _sparse_meta(width, topk, elem):
    """(meta, config) of a launch: constexprs and the config (under the interpreter, small
    chunks so that test sizes span several)."""
    config = dict(INTERPRET_SPARSE) if interpreting() else sparse_config(width, topk, elem)
    block_d = config.pop("BLOCK_D")
    meta = dict(EVEN_D=width % block_d == 0, BLOCK_D=block_d, BLOCK_K=config.pop("BLOCK_K"))
    return meta, config


def _sparse_memory(memory):
    """(memory, batch stride, slot stride): a memory (N, D) shared by the batch has batch
    stride 0."""
    memory = lastdim_contiguous(memory)
    return memory, 0 if memory.ndim == 2 else memory.stride(0), memory.stride(-2)


def memory_read_sparse_forward(memory, indices, weights):
    """-> read (B, R, D) in memory's dtype: sum_k weights[..., k] memory[b, indices[..., k]]
    (memory[indices[..., k]] for a memory (N, D) shared by the batch), entries with an index
    outside [0, N) left out."""
    memory, stride_mb, stride_mn = _sparse_memory(memory)
    indices, weights = indices.contiguous(), weights.contiguous()
    (batch, n_heads, topk), (n_slots, width) = indices.shape, memory.shape[-2:]
    out = torch.empty((batch, n_heads, width), dtype=memory.dtype, device=memory.device)
    if out.numel() == 0:
        return out
    if topk == 0 or n_slots == 0:
        return out.zero_()
    meta, config = _sparse_meta(width, topk, memory.element_size())
    launch(_memory_read_sparse_fwd,
           lambda m: (batch * n_heads, triton.cdiv(width, meta["BLOCK_D"])),
           (memory, indices, weights, out, stride_mb, stride_mn, n_heads, n_slots, width, topk),
           meta, [config], ["BLOCK_D", "EVEN_D", "BLOCK_K"], config)
    return out


def memory_read_sparse_backward(dread, memory, indices, weights, deterministic, sparse=False):
    """-> (dmemory like memory, dweights (B, R, K), None) in the inputs' dtypes. dMemory by
    float32 atomics for a float32 memory, else (16-bit, deterministic) by sorted row sums.
    sparse (a memory (N, D) shared by the batch): (dmemory's touched rows (U, D), dweights,
    the touched slots (U,) int64, ascending) instead, by sorted row sums."""
    from attnmem.kernels.product_key import _row_sums

    memory, stride_mb, stride_mn = _sparse_memory(memory)
    indices, weights = indices.contiguous(), weights.contiguous()
    dread = dread.float().contiguous()  # (B, R, D): small, and the kernel works in fp32
    (batch, n_heads, topk), (n_slots, width) = indices.shape, memory.shape[-2:]
    atomic = memory.dtype == torch.float32 and not (deterministic or sparse)
    dmemory = torch.zeros(memory.shape if atomic else 0, dtype=memory.dtype,
                          device=memory.device)
    dweights = torch.empty(weights.shape, dtype=weights.dtype, device=weights.device)
    if dweights.numel() == 0 or n_slots == 0 or width == 0:
        if sparse:
            return memory.new_zeros((0, width)), dweights.zero_(), indices.new_zeros(0)
        dmemory = torch.zeros(memory.shape, dtype=memory.dtype, device=memory.device)
        return dmemory, dweights.zero_(), None
    meta, config = _sparse_meta(width, topk, memory.element_size())
    launch(_memory_read_sparse_bwd,
           lambda m: (batch * n_heads, triton.cdiv(topk, meta["BLOCK_K"])),
           (dread, memory, indices, weights, dmemory, dweights, stride_mb, stride_mn,
            dmemory.stride(0) if atomic and memory.ndim == 3 else 0,
            dmemory.stride(-2) if atomic else 0, n_heads, n_slots, width, topk),
           dict(meta, ATOMIC=atomic), [config], ["BLOCK_D", "EVEN_D", "BLOCK_K", "ATOMIC"],
           config, reset_to_zero=["dmem_ptr"] if atomic else [])
    if atomic:
        return dmemory, dweights, None
    # Row b * N + slot of a (B * N + 1, D) gradient (slot of (N + 1, D) for a shared
    # memory); entries without a slot sum into the last row, which is dropped.
    n_rows = n_slots if memory.ndim == 2 else batch * n_slots
    usable = (indices >= 0) & (indices < n_slots)
    if memory.ndim == 3:
        indices = torch.arange(batch, device=memory.device)[:, None, None] * n_slots + indices
    targets = torch.where(usable, indices, n_rows)
    # compact takes only out's width and dtype: no (N, D) buffer for a sparse gradient.
    rows = _row_sums(targets, weights, dread.view(-1, width), topk,
                     memory.new_zeros((0 if sparse else n_rows + 1, width)), compact=sparse)
    if sparse:
        touched, rows = rows
        keep = touched < n_rows
        return rows[keep], dweights, touched[keep]
    return rows[:-1].view(memory.shape), dweights, None
