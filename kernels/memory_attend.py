"""Content addressing and read in one pass over memory: forward, backward and launchers.
Content addressing alone (memory_address) is the same pass without the read (READ=False).

memory (B, N, D), keys (B, R, D), values (B, N, Dv) (memory itself when absent), strength
(B, R), mask (B, N). Scores s = strength * sim(key, slot); read = softmax_n(s) @ values.

Few heads over a large memory must still fill a GPU, so each forward program owns one batch
entry, one split of the slots (flash-decoding) and a block of BLOCK_R heads (more heads
stream memory once per block: no tile outgrows the registers), streams its slots through
tiles and writes a partial read with its running max and sum, which the
launcher combines into each head's max score and sum of exp(s - max), kept apart: at
strengths like 1e8 a logsumexp rounds by float32's step there (8), and weights recomputed
from it would not sum to 1. Masked slots are never loaded, so whatever they hold counts
for nothing.

The backward recomputes the scores and weights from the saved max and sum. Each program
owns one batch entry and one split of the slots, streams the split's slot tiles once and,
for each, walks the heads in blocks of BWD_BLOCK_R: dMemory and dValues of the tile sum
over the head blocks in registers and are written once, so that its registers do not grow
with the number of heads. Each head block's dKeys and dStrength of the tile are added to
the program's own rows of float32 partials (per split; no other program touches them),
which the launcher sums: no atomics, deterministic. The products over the slot width (the
scores, and dRead against the values) run DOT_CHUNK columns a step, from tiles the cache
holds. Tile sizes, warps and stages are autotuned per element size, width chunk and
whole or masked width over BWD_CONFIGS; whole widths load memory tiles 16 bytes at a time.
Masked widths past 128 (PADDED) carry no width mask through the head loop: the launcher
pads keys, dRead and the dKeys partials to whole blocks, and memory and values tiles
repeat their last column past the width, where the padded operands' zeros cancel it.

Top-k selection (memory_topk_forward, TOPK > 0) is the same forward pass without the
softmax: each program keeps a running best TOPK scores per head as int64s that order as
(score, -slot), merged tile by tile with tl.topk (triton 3.4 has it), and writes them; the
launcher merges the splits' candidates with torch.topk. Neither writes the scores.
"""

import torch
import triton
import triton.language as tl

from attnmem.kernels._launch import (
    block_width,
    combine_splits,
    interpreting,
    lastdim_contiguous,
    launch,
    slot_configs,
    slot_splits,
    within,
)
from attnmem.kernels._topk import EMPTY, merge, pack

LOG2E = tl.constexpr(1.4426950408889634)
EPS_SQ = tl.constexpr(1e-16)  # cosine's max(|u||v|, 1e-8), squared
SIMILARITY_CODES = {"cosine": 0, "dot": 1, "scaled_dot": 2}


@triton.jit
def _scores(keys, k_sq, strength, mem, head_dim, SIMILARITY: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """(s, sim, denom, m_sq) of every head against a tile of slots; s = strength * sim."""
    dots = tl.dot(keys, tl.trans(mem), input_precision=DOT_PRECISION)
    m_sq = tl.sum(mem.to(tl.float32) * mem.to(tl.float32), 1)
    s, sim, denom = _similarity(dots, k_sq, m_sq, strength, head_dim, SIMILARITY)
    return s, sim, denom, m_sq


@triton.jit
def _similarity(dots, k_sq, m_sq, strength, head_dim, SIMILARITY: tl.constexpr):
    """(s, sim, denom) from the dot products of heads (k_sq: their squared norms) and slots
    (m_sq)."""
    denom = tl.full(dots.shape, 1.0, tl.float32)
    if SIMILARITY == 0:
        denom = tl.sqrt(tl.maximum(k_sq[:, None] * m_sq[None, :], EPS_SQ))
    elif SIMILARITY == 2:
        denom = denom * tl.sqrt(tl.cast(head_dim, tl.float32))
    sim = dots / denom
    return sim * strength[:, None], sim, denom


@triton.jit
def _row_dots(a_ptr, a_rows, a_ok, b_ptr, b_rows, b_ok, width, EVEN: tl.constexpr,
              BLOCK: tl.constexpr, CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
              PADDED: tl.constexpr):
    """(len(a_rows), len(b_rows)) float32 dot products of rows a_ptr + a_rows and b_ptr +
    b_rows (rows not ok count as 0) over their width, CHUNK columns a step (a in b's
    dtype): operands of a whole wide row, replicated in every warp that computes a few
    outputs, would hold more registers than a backward program has. PADDED: a's rows are
    whole blocks, zero past the width, and b's columns past the width repeat its last
    column, whose products vanish against them: no width masks."""
    acc = tl.zeros([a_rows.shape[0], b_rows.shape[0]], tl.float32)
    if PADDED and not EVEN:  # a width of 0 has no last column
        b_ok &= b_rows * 0 + width > 0
    for d0 in range(0, BLOCK, CHUNK):
        offs = d0 + tl.arange(0, CHUNK)
        if PADDED and not EVEN:
            b = tl.load(b_ptr + b_rows[:, None] + tl.minimum(offs, width - 1)[None, :],
                        mask=b_ok[:, None], other=0.0)
            a = tl.load(a_ptr + a_rows[:, None] + offs[None, :], mask=a_ok[:, None], other=0.0)
        else:
            ok = within(offs, width, EVEN)
            b = tl.load(b_ptr + b_rows[:, None] + offs[None, :],
                        mask=b_ok[:, None] & ok[None, :], other=0.0)
            a = tl.load(a_ptr + a_rows[:, None] + offs[None, :],
                        mask=a_ok[:, None] & ok[None, :], other=0.0)
        acc = tl.dot(a.to(b.dtype), tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _values_tile(values_ptr, mem, b, stride_vb, stride_vn, slots, offs_dv, usable, dv_ok,
                 HAS_VALUES: tl.constexpr):
    """The values of a tile's usable slots (BLOCK_N, BLOCK_DV); memory's tile without
    values."""
    if HAS_VALUES:
        val = tl.load(values_ptr + b * stride_vb + slots[:, None] * stride_vn + offs_dv[None, :],
                      mask=usable[:, None] & dv_ok[None, :], other=0.0)
    else:
        val = mem
    return val


@triton.jit
def _merge_top(top, packed, TOPK: tl.constexpr):
    """A head's running TOPK best (BLOCK_R, TOPK) merged with a tile's packed scores
    (kernels/_topk's pack and merge: int64s ordered as (score, -slot)). Past the first
    tiles few tiles hold a score above some head's running TOPK-th: the others skip the
    sorting networks."""
    if tl.max((tl.max(packed, 1) > tl.min(top, 1)).to(tl.int32), 0) > 0:
        top = merge(top, packed, TOPK)
    return top


@triton.jit
def _memory_attend_fwd(mem_ptr, keys_ptr, values_ptr, strength_ptr, mask_ptr,
                       part_read_ptr, part_max_ptr, part_sum_ptr, scores_ptr, part_top_ptr,
                       stride_mb, stride_mn, stride_kb, stride_kr, stride_vb, stride_vn,
                       n_heads, n_slots, head_dim, value_dim, split_len,
                       SIMILARITY: tl.constexpr, HAS_VALUES: tl.constexpr,
                       HAS_STRENGTH: tl.constexpr, HAS_MASK: tl.constexpr,
                       STORE_SCORES: tl.constexpr, READ: tl.constexpr, TOPK: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
                       EVEN_DV: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    n_splits = tl.num_programs(0)
    stride_mn = tl.cast(stride_mn, tl.int64)
    stride_vn = tl.cast(stride_vn, tl.int64)
    heads = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = within(offs_d, head_dim, EVEN_D)
    dv_ok = within(offs_dv, value_dim, EVEN_DV)
    keys = tl.load(keys_ptr + b * stride_kb + heads[:, None] * stride_kr + offs_d[None, :],
                   mask=(heads[:, None] < n_heads) & d_ok[None, :], other=0.0)
    k_sq = tl.sum(keys.to(tl.float32) * keys.to(tl.float32), 1)
    strength = tl.full([BLOCK_R], 1.0, tl.float32)
    if HAS_STRENGTH:
        strength = tl.load(strength_ptr + b * n_heads + heads, mask=heads < n_heads,
                           other=1.0).to(tl.float32)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    if TOPK > 0:
        top = tl.full([BLOCK_R, TOPK], EMPTY, tl.int64)
    start = split * split_len
    end = tl.minimum(start + split_len, n_slots)
    for n0 in range(start, end, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        usable = slots < end
        if HAS_MASK:
            usable &= tl.load(mask_ptr + b * n_slots + slots, mask=usable, other=0) != 0
        mem = tl.load(mem_ptr + b * stride_mb + slots[:, None] * stride_mn + offs_d[None, :],
                      mask=usable[:, None] & d_ok[None, :], other=0.0)
        s, _, _, _ = _scores(keys, k_sq, strength, mem, head_dim, SIMILARITY, DOT_PRECISION)
        if TOPK > 0:
            top = _merge_top(top, pack(s, slots[None, :], usable[None, :]), TOPK)
        else:
            s = tl.where(usable[None, :], s, float("-inf"))
            if STORE_SCORES:
                tl.store(scores_ptr + (b * n_heads + heads[:, None]) * n_slots
                         + slots[None, :], s,
                         mask=(heads[:, None] < n_heads) & (slots[None, :] < end))
            # The max in natural units is a score itself, so s - max is exact near the top.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2((m_i - m_shift) * LOG2E)
            p = tl.math.exp2((s - m_shift[:, None]) * LOG2E)
            l_i = l_i * alpha + tl.sum(p, 1)
            if READ:
                val = _values_tile(values_ptr, mem, b, stride_vb, stride_vn, slots, offs_dv,
                                   usable, dv_ok, HAS_VALUES)
                acc = tl.dot(p.to(val.dtype), val, acc * alpha[:, None],
                             input_precision=DOT_PRECISION)
            m_i = m_new

    rows = (split * n_heads) + b * n_splits * n_heads + heads
    if TOPK > 0:
        tl.store(part_top_ptr + rows[:, None] * TOPK + tl.arange(0, TOPK)[None, :], top,
                 mask=heads[:, None] < n_heads)
    else:
        if READ:
            tl.store(part_read_ptr + rows[:, None] * value_dim + offs_dv[None, :], acc,
                     mask=(heads[:, None] < n_heads) & dv_ok[None, :])
        tl.store(part_max_ptr + rows, m_i, mask=heads < n_heads)
        tl.store(part_sum_ptr + rows, l_i, mask=heads < n_heads)


@triton.jit
def _memory_attend_bwd(mem_ptr, keys_ptr, values_ptr, strength_ptr, mask_ptr, row_max_ptr,
                       row_sum_ptr,
                       dread_ptr, delta_ptr, dweights_ptr, dmem_ptr, dvalues_ptr,
                       part_dkeys_ptr, part_dstrength_ptr,
                       stride_mb, stride_mn, stride_kb, stride_kr, stride_vb, stride_vn,
                       stride_dmb, stride_dmn, stride_dvb, stride_dvn,
                       n_heads, n_slots, head_dim, value_dim, split_len,
                       SIMILARITY: tl.constexpr, HAS_VALUES: tl.constexpr,
                       HAS_STRENGTH: tl.constexpr, HAS_MASK: tl.constexpr,
                       HAS_DREAD: tl.constexpr, HAS_DWEIGHTS: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
                       EVEN_DV: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK_D: tl.constexpr,
                       CHUNK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                       PADDED: tl.constexpr = False):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(0)
    stride_mn = tl.cast(stride_mn, tl.int64)
    stride_vn = tl.cast(stride_vn, tl.int64)
    stride_dmn = tl.cast(stride_dmn, tl.int64)
    stride_dvn = tl.cast(stride_dvn, tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = within(offs_d, head_dim, EVEN_D)
    dv_ok = within(offs_dv, value_dim, EVEN_DV)
    # PADDED (masked widths past 128): the launcher pads keys, dRead and the dKeys partials
    # to whole blocks, which then load without width masks (at 16-bit width 256 they spill).
    dread_width = BLOCK_DV if PADDED else value_dim
    dkeys_width = BLOCK_D if PADDED else head_dim
    row_d_ok = within(offs_d, head_dim, True) if PADDED else d_ok
    row_dv_ok = within(offs_dv, value_dim, True) if PADDED else dv_ok
    start = split * split_len
    end = tl.minimum(start + split_len, n_slots)
    for n0 in range(start, end, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        in_range = slots < end
        usable = in_range
        if HAS_MASK:
            usable &= tl.load(mask_ptr + b * n_slots + slots, mask=in_range, other=0) != 0
        if PADDED and not EVEN_D:
            # Columns past the width repeat the last one, as in _row_dots: zero in m_sq and
            # against the padded keys; what they add to dMemory's and the partials' padding
            # is not stored.
            mem = tl.load(mem_ptr + b * stride_mb + slots[:, None] * stride_mn
                          + tl.minimum(offs_d, head_dim - 1)[None, :],
                          mask=(usable & (slots * 0 + head_dim > 0))[:, None], other=0.0)
            sq = mem.to(tl.float32) * mem.to(tl.float32)
            m_sq = tl.sum(tl.where(d_ok[None, :], sq, 0.0), 1)
        else:
            mem = tl.load(mem_ptr + b * stride_mb + slots[:, None] * stride_mn
                          + offs_d[None, :], mask=usable[:, None] & d_ok[None, :], other=0.0)
            m_sq = tl.sum(mem.to(tl.float32) * mem.to(tl.float32), 1)
        if HAS_DREAD and HAS_VALUES:
            dval = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        dmem = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        norm_slot = tl.zeros([BLOCK_N], tl.float32)  # cosine: sum_r c_rn |k_r|^2
        for r0 in range(0, n_heads, BLOCK_R):
            heads = r0 + tl.arange(0, BLOCK_R)
            head_ok = heads < n_heads
            row = b * n_heads + heads
            keys = tl.load(keys_ptr + b * stride_kb + heads[:, None] * stride_kr
                           + offs_d[None, :], mask=head_ok[:, None] & row_d_ok[None, :],
                           other=0.0)
            k_sq = tl.sum(keys.to(tl.float32) * keys.to(tl.float32), 1)
            strength = tl.full([BLOCK_R], 1.0, tl.float32)
            if HAS_STRENGTH:
                strength = tl.load(strength_ptr + row, mask=head_ok, other=1.0).to(tl.float32)
            # Heads with no usable slot have max 0 and sum 1: every p is masked to 0 below.
            row_max = tl.load(row_max_ptr + row, mask=head_ok, other=0.0)
            row_sum = tl.load(row_sum_ptr + row, mask=head_ok, other=1.0)
            delta = tl.load(delta_ptr + row, mask=head_ok, other=0.0)
            # The products again from the tiles (cached), a width chunk at a time.
            dots = _row_dots(keys_ptr + b * stride_kb, heads * stride_kr, head_ok,
                             mem_ptr + b * stride_mb, slots * stride_mn, usable, head_dim,
                             EVEN_D, BLOCK_D, CHUNK_D, DOT_PRECISION, PADDED)
            s, sim, denom = _similarity(dots, k_sq, m_sq, strength, head_dim, SIMILARITY)
            keep = usable[None, :] & head_ok[:, None]
            p = tl.where(keep, tl.math.exp2((s - row_max[:, None]) * LOG2E) / row_sum[:, None],
                         0.0)
            dp = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
            if HAS_DREAD:
                dread = tl.load(dread_ptr + row[:, None] * dread_width + offs_dv[None, :],
                                mask=head_ok[:, None] & row_dv_ok[None, :], other=0.0)
                # Values: memory itself (and its strides) without values.
                dp = _row_dots(dread_ptr, row * dread_width, head_ok,
                               values_ptr + b * stride_vb, slots * stride_vn, usable, value_dim,
                               EVEN_DV, BLOCK_DV, CHUNK_DV, DOT_PRECISION, PADDED)
                if HAS_VALUES:
                    dval = tl.dot(tl.trans(p), dread, dval, input_precision=DOT_PRECISION)
                else:  # the read's gradient reaches memory itself
                    dmem = tl.dot(tl.trans(p), dread, dmem, input_precision=DOT_PRECISION)
            if HAS_DWEIGHTS:
                dp += tl.load(dweights_ptr + row[:, None] * n_slots + slots[None, :],
                              mask=head_ok[:, None] & in_range[None, :], other=0.0)
            ds = p * (dp - delta[:, None])
            # Gradient of the dot products; near a zero slot it is ~1/eps, past fp16's range.
            g = ds * strength[:, None] / denom
            dmem = tl.dot(tl.trans(g), keys.to(tl.float32), dmem, input_precision=DOT_PRECISION)
            # The program's own rows of the partials (no other program touches them), summed
            # over its slot tiles in place: the first tile overwrites them. n0 > start per
            # head: the interpreter cannot mask with a scalar and a tensor.
            rows = (b * n_splits + split) * n_heads + heads
            ptrs = part_dkeys_ptr + rows[:, None] * dkeys_width + offs_d[None, :]
            tile_ok = head_ok[:, None] & row_d_ok[None, :]
            again = heads * 0 + n0 > start
            dkeys = tl.load(ptrs, mask=tile_ok & again[:, None], other=0.0)
            dkeys = tl.dot(g, mem.to(tl.float32), dkeys, input_precision=DOT_PRECISION)
            dstrength = tl.sum(ds * sim, 1) + tl.load(part_dstrength_ptr + rows,
                                                      mask=head_ok & again, other=0.0)
            if SIMILARITY == 0:
                # Through the norms, where max(|k|^2 |M|^2, eps^2) is not clamped.
                c = tl.where(k_sq[:, None] * m_sq[None, :] > EPS_SQ, -g * sim / denom, 0.0)
                dkeys += keys.to(tl.float32) * tl.sum(c * m_sq[None, :], 1)[:, None]
                norm_slot += tl.sum(c * k_sq[:, None], 0)
            tl.store(ptrs, dkeys, mask=tile_ok)
            tl.store(part_dstrength_ptr + rows, dstrength, mask=head_ok)
            # The next tile's loads may read partials that other threads of the program
            # stored: a barrier orders the two.
            tl.debug_barrier()
        if SIMILARITY == 0:
            dmem += mem.to(tl.float32) * norm_slot[:, None]
        if HAS_DREAD and HAS_VALUES:
            tl.store(dvalues_ptr + b * stride_dvb + slots[:, None] * stride_dvn
                     + offs_dv[None, :], dval.to(dvalues_ptr.dtype.element_ty),
                     mask=in_range[:, None] & dv_ok[None, :])
        tl.store(dmem_ptr + b * stride_dmb + slots[:, None] * stride_dmn + offs_d[None, :],
                 dmem.to(dmem_ptr.dtype.element_ty),
                 mask=in_range[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

# Slots per tile and per split under the interpreter (several splits even on test sizes).
INTERPRET_BLOCK_N = 16
# The forward: heads per program, and slot splits in whole multiples of the largest BLOCK_N
# of its configs, so that its grid is the same for every config.
FWD_BLOCK_R = 16
SPLIT_QUANTUM = 64
# (BLOCK_N, num_warps, num_stages) of the forward per element size and the wider of its
# width chunks: the configs that compile without register spills on sm_90 and load
# memory tiles 16 bytes at a time (tests/test_memory_attend.py fails on either).
_ALL = [(64, 4, 3), (32, 4, 3), (64, 8, 3), (32, 8, 3), (16, 4, 3)]
FWD_CONFIGS = {
    (2, 16): [(64, 4, 3)], (2, 32): _ALL[:3], (2, 64): _ALL, (2, 128): _ALL, (2, 256): _ALL,
    (4, 16): _ALL[:3], (4, 32): _ALL, (4, 64): _ALL,
    (4, 128): [(64, 4, 3), (32, 8, 3), (16, 4, 3)],
    # Past the float32 range (128): the smallest tile, not checked for spills.
    (4, 256): [(16, 4, 3)],
}
# Masked (odd) widths hold their masks too: at the widest chunks fewer configs fit.
MASKED_FWD_CONFIGS = {**FWD_CONFIGS, (2, 256): [(32, 4, 3), (64, 8, 3), (32, 8, 3)],
                      (4, 128): [(32, 8, 3), (16, 4, 3)]}


# (BLOCK_N, num_warps, num_stages) of the top-k selection (TOPK > 0) per element size and
# width: no register spills on sm_90 with 2 to 32 candidates per head, on triton 3.6 and
# 3.9 (tests/test_memory_sparse.py; float32 at 256 spills 4 bytes at 3 stages on 3.6).
TOPK_CONFIGS = {**{(elem, width): [(32, 8, 3)] for elem in (2, 4)
                   for width in (16, 32, 64, 128, 256)}, (4, 256): [(32, 8, 2)]}


# The backward: heads per block (tl.dot's smallest M; each program walks all of its batch
# entry's heads in blocks), and slot splits in whole multiples of the largest BLOCK_N of
# its configs.
BWD_BLOCK_R = 16
BWD_SPLIT_QUANTUM = 64
# Width chunk of the backward's dot products over the slot width (_row_dots): at 64 the
# 16-bit backward spills at width 256.
DOT_CHUNK = 32
# (BLOCK_N, num_warps, num_stages) of the backward per element size and the wider of its
# width chunks: the configs that compile without register spills on sm_90 on triton 3.9
# and 3.6 (cosine with values, strength, mask and dWeights: the most registers) and load
# memory tiles 16 bytes at a time, except 16-bit at width 16, whose configs that load 16
# bytes spill (tests/test_memory_attend.py checks the first config of the widest chunks).
BWD_CONFIGS = {
    (2, 16): [(32, 4, 2), (16, 8, 2)], (2, 32): [(64, 4, 2), (32, 4, 2), (64, 8, 2)],
    (2, 64): [(32, 4, 2), (64, 8, 2), (32, 8, 2)], (2, 128): [(64, 8, 2), (16, 8, 2)],
    (2, 256): [(16, 8, 1)],
    (4, 16): [(64, 8, 2)], (4, 32): [(32, 8, 2), (16, 4, 2), (32, 4, 2)],
    (4, 64): [(32, 8, 2), (16, 4, 2), (64, 8, 2)], (4, 128): [(16, 8, 1)],
    # Past the float32 range (128): the smallest tile, not checked for spills.
    (4, 256): [(16, 8, 1)],
}
# Masked (odd) widths hold their masks too: fewer configs fit. At 16-bit 256 (PADDED rows)
# (16, 8, 1) compiles without spills on triton 3.9 and spills 8 bytes on 3.6 (204 and 40
# with width masks carried through the loops); (16, 8, 2) spills 64 and 276.
MASKED_BWD_CONFIGS = {**BWD_CONFIGS, (2, 64): [(64, 8, 2), (32, 8, 2)],
                      (2, 128): [(16, 8, 2)], (4, 64): [(32, 8, 2), (16, 8, 2), (64, 8, 2)]}


def fwd_configs(elem, block_d, even):
    """The forward's autotuning configs at this element size and width chunk, for whole
    (even) or masked widths."""
    table = FWD_CONFIGS if even else MASKED_FWD_CONFIGS
    return slot_configs(table[(elem, block_d)])


def bwd_configs(elem, block_d, even):
    """The backward's autotuning configs at this element size and width chunk, for whole
    (even) or masked widths."""
    return slot_configs((BWD_CONFIGS if even else MASKED_BWD_CONFIGS)[(elem, block_d)])


def _prepare(memory, keys, values, strength, mask, similarity, **layout):
    """The inputs as the kernels take them, their sizes and the kernels' meta-parameters."""
    memory, keys, values = (lastdim_contiguous(x) for x in (memory, keys, values))
    strength = None if strength is None else strength.contiguous()
    mask = None if mask is None else mask.contiguous()
    sizes, meta = _layout(memory, keys, values, **layout)
    meta["SIMILARITY"] = SIMILARITY_CODES[similarity]
    return (memory, keys, values, strength, mask), sizes, meta


def _layout(memory, keys, values, block_r, quantum, head_grid=True):
    """Sizes and meta-parameters: BLOCK_R heads per block and slot splits of whole
    multiples of `quantum` slots (INTERPRET_BLOCK_N under the interpreter), enough to fill
    the GPU with a program per head block (head_grid) or per batch entry."""
    batch, n_slots, head_dim = memory.shape
    n_heads = keys.shape[1]
    value_dim = head_dim if values is None else values.shape[2]
    rows = batch * (triton.cdiv(n_heads, block_r) if head_grid else 1)
    split_len, n_splits = slot_splits(n_slots, rows,
                                      INTERPRET_BLOCK_N if interpreting() else quantum,
                                      memory.device)
    meta = dict(SIMILARITY=None, HAS_VALUES=values is not None,
                DOT_PRECISION="ieee" if memory.dtype == torch.float32 else "tf32",
                BLOCK_R=block_r, BLOCK_D=block_width(head_dim),
                BLOCK_DV=block_width(value_dim))
    meta.update(EVEN_D=head_dim == meta["BLOCK_D"], EVEN_DV=value_dim == meta["BLOCK_DV"])
    return (batch, n_slots, head_dim, n_heads, value_dim, split_len, n_splits), meta


def memory_attend_forward(memory, keys, values, strength, mask, similarity, need_scores,
                          need_read=True):
    """-> read (B, R, Dv) in memory's dtype (empty unless need_read), float32 stats (2, B, R)
    (each head's max score and sum of exp(s - max); 0 and 1 for a head with no usable slot)
    and, if need_scores, the float32 scores (B, R, N) (-inf on masked slots)."""
    (memory, keys, values, strength, mask), sizes, meta = _prepare(
        memory, keys, values, strength, mask, similarity, block_r=FWD_BLOCK_R,
        quantum=SPLIT_QUANTUM)
    batch, n_slots, head_dim, n_heads, value_dim, split_len, n_splits = sizes
    f32 = dict(dtype=torch.float32, device=memory.device)
    part_read = torch.empty((batch, n_splits, n_heads, value_dim) if need_read else (0,), **f32)
    part_max = torch.empty((batch, n_splits, n_heads), **f32)
    part_sum = torch.empty((batch, n_splits, n_heads), **f32)
    scores = torch.empty((batch, n_heads, n_slots) if need_scores else (0,), **f32)
    values_arg = memory if values is None else values
    head_blocks = max(1, triton.cdiv(n_heads, FWD_BLOCK_R))
    widest = max(meta["BLOCK_D"], meta["BLOCK_DV"] if need_read else 16)
    launch(_memory_attend_fwd, lambda m: (n_splits, head_blocks, batch),
           (memory, keys, values_arg, keys if strength is None else strength,
            memory if mask is None else mask, part_read, part_max, part_sum, scores, part_max,
            memory.stride(0), memory.stride(1), keys.stride(0), keys.stride(1),
            values_arg.stride(0), values_arg.stride(1),
            n_heads, n_slots, head_dim, value_dim, split_len),
           dict(meta, HAS_STRENGTH=strength is not None, HAS_MASK=mask is not None,
                STORE_SCORES=need_scores, READ=need_read, TOPK=0),
           fwd_configs(memory.element_size(), widest,
                       meta["EVEN_D"] and (meta["EVEN_DV"] or not need_read)),
           ["BLOCK_D", "BLOCK_DV", "EVEN_D", "EVEN_DV", "READ", "TOPK", "n_heads"],
           dict(BLOCK_N=INTERPRET_BLOCK_N, num_warps=1, num_stages=1))
    # Combine the splits: each holds sum_n exp(s_n - max) v_n, that sum of exps and its max.
    stats, read = combine_splits(part_max, part_sum, part_read if need_read else None,
                                 memory.dtype)
    return read if need_read else memory.new_empty(0), stats, scores


def topk_block(k):
    """Candidates each program keeps per head for the top k: a power of two (tl.topk's),
    at least 2 (triton 3.4 and 3.6's tl.topk cannot take k = 1)."""
    return max(2, triton.next_power_of_2(k))


def topk_configs(elem, block_d, k):
    """The selection's configs at this element size and width: those whose tiles hold at
    least topk_block(k) slots (a tile's best are taken from a whole tile)."""
    return slot_configs([c for c in TOPK_CONFIGS[(elem, block_d)] if c[0] >= topk_block(k)])


def memory_topk_forward(memory, keys, strength, mask, similarity, k):
    """-> the k best-scoring usable slots per head, int64 (B, R, k), best first, ties to the
    lower slot; -1 past a head's last usable slot. One pass over memory: each program keeps
    its split's best topk_block(k) per head (_merge_top), and torch.topk merges the splits'
    candidates."""
    # The interpreter runs triton's sorting networks element by element: fewer heads a
    # program keep test sizes fast.
    block_r = max(2, triton.next_power_of_2(keys.shape[1])) if interpreting() else FWD_BLOCK_R
    (memory, keys, _, strength, mask), sizes, meta = _prepare(
        memory, keys, None, strength, mask, similarity, block_r=min(block_r, FWD_BLOCK_R),
        quantum=SPLIT_QUANTUM)
    batch, n_slots, head_dim, n_heads, _, split_len, n_splits = sizes
    block_k = topk_block(k)
    if batch * n_heads == 0:
        return torch.empty((batch, n_heads, k), dtype=torch.int64, device=memory.device)
    part_top = torch.empty((batch, n_splits, n_heads, block_k), dtype=torch.int64,
                           device=memory.device)
    head_blocks = max(1, triton.cdiv(n_heads, meta["BLOCK_R"]))
    unused = part_top.new_empty(0, dtype=torch.float32)
    launch(_memory_attend_fwd, lambda m: (n_splits, head_blocks, batch),
           (memory, keys, memory, keys if strength is None else strength,
            memory if mask is None else mask, unused, unused, unused, unused, part_top,
            memory.stride(0), memory.stride(1), keys.stride(0), keys.stride(1),
            memory.stride(0), memory.stride(1), n_heads, n_slots, head_dim, head_dim,
            split_len),
           dict(meta, HAS_STRENGTH=strength is not None, HAS_MASK=mask is not None,
                STORE_SCORES=False, READ=False, TOPK=block_k),
           topk_configs(memory.element_size(), meta["BLOCK_D"], k),
           ["BLOCK_D", "EVEN_D", "TOPK", "n_heads"],
           dict(BLOCK_N=max(INTERPRET_BLOCK_N, block_k), num_warps=1, num_stages=1))
    # Packed entries are distinct (one slot each) and order as (score, -slot).
    best = part_top.permute(0, 2, 1, 3).reshape(batch, n_heads, n_splits * block_k)
    best = best.topk(k, dim=-1).values
    slots = 0x7FFFFFFF - (best & 0x7FFFFFFF)
    return torch.where(best == EMPTY.value, -1, slots)


def memory_attend_backward(dread, dweights, memory, keys, values, strength, mask, read,
                           weights, stats, similarity):
    """-> dmemory, dkeys, dvalues (None without values), dstrength (None without strength).
    dread (None when only weights were computed) and dweights may be None."""
    (memory, keys, values, strength, mask), sizes, meta = _prepare(
        memory, keys, values, strength, mask, similarity, block_r=BWD_BLOCK_R,
        quantum=BWD_SPLIT_QUANTUM, head_grid=False)
    batch, n_slots, head_dim, n_heads, value_dim, split_len, n_splits = sizes
    delta = stats.new_zeros(stats.shape[1:])
    # Masked widths past 128: keys, dRead and the dKeys partials in rows of whole blocks,
    # zero past the width (PADDED: the kernel reads them without width masks).
    widest = max(meta["BLOCK_D"], meta["BLOCK_DV"] if dread is not None else 16)
    padded = widest > 128 and not (meta["EVEN_D"] and (meta["EVEN_DV"] or dread is None))
    pad_d = meta["BLOCK_D"] - head_dim if padded else 0
    keys = torch.nn.functional.pad(keys, (0, pad_d)) if pad_d else keys
    if dread is not None:
        dread = dread.float().contiguous()
        delta = (dread * read.float()).sum(-1)
        if padded:
            dread = torch.nn.functional.pad(dread, (0, meta["BLOCK_DV"] - value_dim))
    if dweights is not None:
        dweights = dweights.float().contiguous()
        delta = delta + (weights.float() * dweights).sum(-1)
    f32 = dict(dtype=torch.float32, device=memory.device)
    dmemory = torch.empty(memory.shape, dtype=memory.dtype, device=memory.device)
    dvalues = None if values is None else torch.empty(values.shape, dtype=values.dtype,
                                                      device=values.device)
    # Each program's partials start at its first slot tile: without slots there is none.
    new = torch.zeros if n_slots == 0 else torch.empty
    part_dkeys = new((batch, n_splits, n_heads, head_dim + pad_d), **f32)
    part_dstrength = new((batch, n_splits, n_heads), **f32)
    values_arg = memory if values is None else values
    dvalues_arg = dmemory if dvalues is None else dvalues
    launch(_memory_attend_bwd, lambda m: (n_splits, batch),
           (memory, keys, values_arg, keys if strength is None else strength,
            memory if mask is None else mask, *stats.contiguous(),
            delta if dread is None else dread, delta.contiguous(),
            delta if dweights is None else dweights, dmemory, dvalues_arg, part_dkeys,
            part_dstrength,
            memory.stride(0), memory.stride(1), keys.stride(0), keys.stride(1),
            values_arg.stride(0), values_arg.stride(1), dmemory.stride(0), dmemory.stride(1),
            dvalues_arg.stride(0), dvalues_arg.stride(1),
            n_heads, n_slots, head_dim, value_dim, split_len),
           dict(meta, HAS_STRENGTH=strength is not None, HAS_MASK=mask is not None,
                HAS_DREAD=dread is not None, HAS_DWEIGHTS=dweights is not None,
                CHUNK_D=min(DOT_CHUNK, meta["BLOCK_D"]),
                CHUNK_DV=min(DOT_CHUNK, meta["BLOCK_DV"]), PADDED=padded),
           bwd_configs(memory.element_size(), widest,
                       meta["EVEN_D"] and (meta["EVEN_DV"] or dread is None)),
           ["BLOCK_D", "BLOCK_DV", "EVEN_D", "EVEN_DV", "HAS_DREAD", "n_heads"],
           dict(BLOCK_N=INTERPRET_BLOCK_N, num_warps=1, num_stages=1))
    dkeys = part_dkeys[..., :head_dim].sum(1).to(keys.dtype)
    dstrength = None if strength is None else part_dstrength.sum(1).to(strength.dtype)
    return dmemory, dkeys, dvalues, dstrength
