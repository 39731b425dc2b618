"""Erase/add memory write in one read and one write of memory: forward, backward, launchers.

memory (B, N, D), write weights (B, W, N), erase and add (B, W, D):
M' = M * prod_w (1 - w_w e_w^T) + sum_w w_w a_w^T. Forward programs own TILES consecutive
tiles of slots, which they walk with each tile's write heads in one loop (pipelined
through cp.async where the config has several stages, for any number of heads), and walk
the slot width in chunks, so any D works. The forward may write into memory itself.

The backward's programs each own a split of the slots: they write dMemory and dWeights of
their slots and accumulate dErase and dAdd into their own partial rows, summed by the
launcher; no atomics. The product over the other heads is recomputed, not divided out:
1 - w e is exactly 0 under a full erase.

Width chunks of at most 64 and the configs of `configs_for` keep every tile in registers:
none spills on sm_90 (tests/test_memory_write.py). Slots per tile, tiles per program,
warps and stages are autotuned per width chunk, head count and dtype.
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

MAX_BLOCK_D = 64
# (BLOCK_N, num_warps, num_stages) per kernel, element size and width chunk: the configs
# that compile without register spills on sm_90 and move memory tiles 16 bytes at a time
# (tests/test_memory_write.py fails on either). ptxas is not monotonic in the tile size: a
# smaller tile can spill where a larger one does not, hence a measured table.
CONFIGS = {
    ("fwd", 2, 16): [(64, 4, 1), (128, 8, 1)],
    ("fwd", 2, 32): [(64, 4, 1), (32, 4, 1), (128, 8, 1), (64, 8, 1)],
    ("fwd", 2, 64): [(64, 4, 1), (32, 4, 1), (128, 8, 1), (64, 8, 1)],
    ("fwd", 4, 16): [(64, 4, 1), (32, 4, 1), (128, 8, 1), (64, 8, 1)],
    ("fwd", 4, 32): [(64, 4, 1), (32, 4, 1), (128, 8, 1), (64, 8, 1)],
    ("fwd", 4, 64): [(64, 4, 1), (32, 4, 1), (128, 8, 1), (64, 8, 1)],
    ("bwd", 2, 16): [(64, 4, 2)],
    ("bwd", 2, 32): [(32, 4, 2), (64, 8, 2), (64, 4, 2)],
    ("bwd", 2, 64): [(64, 8, 2), (16, 4, 3), (32, 8, 3), (64, 4, 2)],
    ("bwd", 4, 16): [(64, 8, 2), (64, 4, 2)],
    ("bwd", 4, 32): [(16, 4, 3), (32, 8, 3), (64, 4, 2)],
    ("bwd", 4, 64): [(32, 4, 2), (64, 8, 2), (16, 4, 3), (64, 4, 2)],
}
# Forward configs whose programs walk TILES slot tiles in a loop that loads them through
# LOAD_STAGES - 1 cp.async copies in flight (BLOCK_N, num_warps, stages, TILES), per element
# size and width chunk: candidates beside the one-tile configs above, for any number of
# write heads (one loop walks tiles and heads, so that it is innermost, which Triton's
# pipeliner needs). Each compiles without spills at 1 and 3 heads, stores 16 bytes at a
# time and loads memory tiles with 16-byte cp.async (tests/test_memory_write.py).
PIPELINED = {
    (2, 16): [(64, 4, 3, 4), (64, 4, 2, 8)],
    (2, 32): [(64, 4, 3, 4), (64, 8, 3, 8)],
    (2, 64): [(64, 8, 3, 4), (32, 4, 3, 8)],
    (4, 16): [(64, 4, 3, 4), (32, 4, 2, 8)],
    (4, 32): [(64, 8, 3, 4), (32, 8, 2, 8)],
    (4, 64): [(64, 4, 3, 4), (32, 8, 3, 8)],
}
# The backward's splits are whole multiples of the largest BLOCK_N: its grid is the same
# for every config.
SPLIT_QUANTUM = 64
INTERPRET_CONFIG = dict(BLOCK_N=16, num_warps=1, num_stages=1)
# The forward under the interpreter: two tiles a program, as the pipelined configs walk
# them (tests/test_memory_write.py forces the others).
FWD_INTERPRET_CONFIG = dict(INTERPRET_CONFIG, TILES=2, LOAD_STAGES=2)


def configs_for(kernel, block_d, elem):
    """The autotuning configs of kernel ("fwd" or "bwd") at this width chunk and element
    size."""
    configs = slot_configs(CONFIGS[(kernel, elem, block_d)])
    if kernel == "bwd":
        return configs
    configs = [dict(c, TILES=1, LOAD_STAGES=1) for c in configs]  # one tile: nothing ahead
    return configs + [dict(BLOCK_N=n, TILES=t, LOAD_STAGES=s, num_warps=w, num_stages=s)
                      for n, w, s, t in PIPELINED[(elem, block_d)]]


@triton.jit
def _factor(weights_ptr, erase_ptr, w_row, e_row, slots, offs_d, slot_ok, d_ok):
    """(weights of the tile's slots, 1 - w e^T) for one write head."""
    w = tl.load(weights_ptr + w_row + slots, mask=slot_ok, other=0.0).to(tl.float32)
    e = tl.load(erase_ptr + e_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    return w, 1.0 - w[:, None] * e[None, :]


@triton.jit
def _write_head(keep, added, weights_ptr, erase_ptr, add_ptr, row, slots, offs_d, slot_ok,
                d_ok, n_slots, width):
    """keep and added of a tile with write head `row` (b * W + h) applied."""
    w, f = _factor(weights_ptr, erase_ptr, row * n_slots, row * width, slots, offs_d, slot_ok,
                   d_ok)
    a = tl.load(add_ptr + row * width + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    return keep * f, added + w[:, None] * a[None, :]


@triton.jit
def _memory_write_fwd(mem_ptr, weights_ptr, erase_ptr, add_ptr, out_ptr,
                      stride_mb, stride_mn, stride_ob, stride_on, n_slots, width,
                      N_WRITES: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, TILES: tl.constexpr, LOAD_STAGES: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) * (TILES * BLOCK_N)
    stride_mn = tl.cast(stride_mn, tl.int64)
    stride_on = tl.cast(stride_on, tl.int64)
    for d0 in range(0, width, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = within(offs_d, width, EVEN_D)
        # Triton pipelines innermost loops only, and loads that feed no dot only in a
        # tl.range given num_stages: one loop walks the tiles and, within each, the heads.
        # A tile is loaded at its first head and kept in registers through the others, so
        # its load runs LOAD_STAGES - 1 steps and the tile's other heads ahead of its use.
        mem = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        keep = tl.full([BLOCK_N, BLOCK_D], 1.0, tl.float32)
        added = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for step in tl.range(0, TILES * N_WRITES, num_stages=LOAD_STAGES):
            h = step % N_WRITES
            slots = first + (step // N_WRITES) * BLOCK_N + tl.arange(0, BLOCK_N)
            slot_ok = slots < n_slots
            tile = slot_ok[:, None] & d_ok[None, :]
            # The head as a tensor: the interpreter's masks take no Python bools.
            head = h + tl.zeros([BLOCK_N, 1], tl.int32)
            loaded = tl.load(mem_ptr + b * stride_mb + slots[:, None] * stride_mn
                             + offs_d[None, :], mask=tile & (head == 0), other=0.0)
            mem = tl.where(head == 0, loaded.to(tl.float32), mem)
            keep, added = _write_head(tl.where(head == 0, 1.0, keep),
                                      tl.where(head == 0, 0.0, added), weights_ptr, erase_ptr,
                                      add_ptr, b * N_WRITES + h, slots, offs_d, slot_ok, d_ok,
                                      n_slots, width)
            tl.store(out_ptr + b * stride_ob + slots[:, None] * stride_on + offs_d[None, :],
                     (mem * keep + added).to(out_ptr.dtype.element_ty),
                     mask=tile & (head == N_WRITES - 1))


@triton.jit
def _memory_write_bwd(dout_ptr, mem_ptr, weights_ptr, erase_ptr, add_ptr, dmem_ptr,
                      dweights_ptr, part_derase_ptr, part_dadd_ptr,
                      stride_gb, stride_gn, stride_mb, stride_mn, stride_db, stride_dn,
                      n_writes, n_slots, width, split_len,
                      EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(0)
    stride_gn = tl.cast(stride_gn, tl.int64)
    stride_mn = tl.cast(stride_mn, tl.int64)
    stride_dn = tl.cast(stride_dn, tl.int64)
    start = split * split_len
    end = tl.minimum(start + split_len, n_slots)
    # dweights (zeroed by the launcher) gathers its sum over D across the width chunks.
    for d0 in range(0, width, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = within(offs_d, width, EVEN_D)
        for n0 in range(start, end, BLOCK_N):
            slots = n0 + tl.arange(0, BLOCK_N)
            slot_ok = slots < end
            tile = slot_ok[:, None] & d_ok[None, :]
            dout = tl.load(dout_ptr + b * stride_gb + slots[:, None] * stride_gn
                           + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
            mem = tl.load(mem_ptr + b * stride_mb + slots[:, None] * stride_mn
                          + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
            keep = tl.full([BLOCK_N, BLOCK_D], 1.0, tl.float32)
            for h in range(n_writes):
                row = b * n_writes + h
                _w_all, f = _factor(weights_ptr, erase_ptr, row * n_slots, row * width,
                                    slots, offs_d, slot_ok, d_ok)
                keep *= f
            tl.store(dmem_ptr + b * stride_db + slots[:, None] * stride_dn + offs_d[None, :],
                     (dout * keep).to(dmem_ptr.dtype.element_ty), mask=tile)
            for h in range(n_writes):
                row = b * n_writes + h
                w, _f_own = _factor(weights_ptr, erase_ptr, row * n_slots, row * width,
                                    slots, offs_d, slot_ok, d_ok)
                others = tl.full([BLOCK_N, BLOCK_D], 1.0, tl.float32)
                for h2 in range(n_writes):
                    if h2 != h:
                        row2 = b * n_writes + h2
                        _w_other, f2 = _factor(weights_ptr, erase_ptr, row2 * n_slots,
                                               row2 * width, slots, offs_d, slot_ok, d_ok)
                        others *= f2
                e = tl.load(erase_ptr + row * width + offs_d, mask=d_ok, other=0.0)
                a = tl.load(add_ptr + row * width + offs_d, mask=d_ok, other=0.0)
                g_erased = dout * mem * others  # dM'/d(1 - w e) for this head
                dw = tl.sum(dout * a.to(tl.float32)[None, :]
                            - g_erased * e.to(tl.float32)[None, :], 1)
                w_ptrs = dweights_ptr + row * n_slots + slots
                tl.store(w_ptrs, tl.load(w_ptrs, mask=slot_ok, other=0.0) + dw, mask=slot_ok)
                part = ((b * n_splits + split) * n_writes + h) * width + offs_d
                de_ptrs = part_derase_ptr + part
                tl.store(de_ptrs, tl.load(de_ptrs, mask=d_ok, other=0.0)
                         - tl.sum(g_erased * w[:, None], 0), mask=d_ok)
                da_ptrs = part_dadd_ptr + part
                tl.store(da_ptrs, tl.load(da_ptrs, mask=d_ok, other=0.0)
                         + tl.sum(dout * w[:, None], 0), mask=d_ok)
            # The next tile reads these sums back, possibly in other threads than stored them.
            tl.debug_barrier()


def _block_d(width):
    block_d = min(MAX_BLOCK_D, block_width(width))
    if interpreting():
        block_d = min(block_d, 32)  # several width chunks even on test sizes
    return block_d


def memory_write_forward(memory, weights, erase, add, out=None):
    """-> M' in memory's dtype, written to `out` (which may be memory itself) if given."""
    memory = lastdim_contiguous(memory)
    weights, erase, add = (x.contiguous() for x in (weights, erase, add))
    batch, n_slots, width = memory.shape
    out = torch.empty_like(memory, memory_format=torch.contiguous_format) if out is None \
        else out
    if memory.numel() == 0:
        return out
    n_writes = weights.shape[1]
    if n_writes == 0:  # nothing erased or added; the kernel's loop would store nothing
        return out.copy_(memory)
    block_d = _block_d(width)
    # Tuning runs the kernel several times: out is restored after each, as it may be memory.
    launch(_memory_write_fwd,
           lambda m: (triton.cdiv(n_slots, m["BLOCK_N"] * m["TILES"]), batch),
           (memory, weights, erase, add, out, memory.stride(0), memory.stride(1), out.stride(0),
            out.stride(1), n_slots, width),
           dict(N_WRITES=n_writes, EVEN_D=width % block_d == 0, BLOCK_D=block_d),
           configs_for("fwd", block_d, memory.element_size()),
           ["BLOCK_D", "EVEN_D", "N_WRITES"], FWD_INTERPRET_CONFIG, restore_value=["out_ptr"])
    return out


def memory_write_backward(dout, memory, weights, erase, add):
    """-> dmemory, dweights, derase, dadd in the inputs' dtypes."""
    dout, memory = lastdim_contiguous(dout), lastdim_contiguous(memory)
    weights, erase, add = (x.contiguous() for x in (weights, erase, add))
    batch, n_slots, width = memory.shape
    n_writes = weights.shape[1]
    block_d = _block_d(width)
    quantum = INTERPRET_CONFIG["BLOCK_N"] if interpreting() else SPLIT_QUANTUM
    split_len, n_splits = slot_splits(n_slots, batch, quantum, memory.device)
    f32 = dict(dtype=torch.float32, device=memory.device)
    dmemory = torch.empty(memory.shape, dtype=memory.dtype, device=memory.device)
    dweights = torch.zeros(weights.shape, **f32)
    part_derase = torch.zeros((batch, n_splits, n_writes, width), **f32)
    part_dadd = torch.zeros((batch, n_splits, n_writes, width), **f32)
    if memory.numel():
        launch(_memory_write_bwd, lambda m: (n_splits, batch),
               (dout, memory, weights, erase, add, dmemory, dweights, part_derase, part_dadd,
                dout.stride(0), dout.stride(1), memory.stride(0), memory.stride(1),
                dmemory.stride(0), dmemory.stride(1), n_writes, n_slots, width, split_len),
               dict(EVEN_D=width % block_d == 0, BLOCK_D=block_d),
               configs_for("bwd", block_d, memory.element_size()),
               ["BLOCK_D", "EVEN_D", "n_writes"], INTERPRET_CONFIG,
               reset_to_zero=["dweights_ptr", "part_derase_ptr", "part_dadd_ptr"])
    return (dmemory, dweights.to(weights.dtype), part_derase.sum(1).to(erase.dtype),
            part_dadd.sum(1).to(add.dtype))
