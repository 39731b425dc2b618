"""Rotary position embeddings (RoFormer; FlashAttention's rotary_cos and rotary_sin), the
rotation of a tile that the kernels which rotate share.

cos and sin, contiguous (seqlen_ro, ROTARY_DIM / 2) at cos_ptr and sin_ptr, any float dtype,
hold each position's angles. Dims d < ROTARY_DIM pair up as (d, d + ROTARY_DIM / 2), or
(2i, 2i + 1) with INTERLEAVED: the first of a pair becomes x * cos - x_pair * sin, the second
x * cos + x_pair * sin, in float32, rounded to x's dtype; cos and sin are gathered by each
row's position. x_pair comes from a second load of the tile at the pair's columns (it hits
the lines the first load brought in), or, in the rotary kernel with INTERLEAVED, from the
tile itself (_rotary's PAIRS_IN_REGISTERS). Dims past ROTARY_DIM pass through.
"""

import torch
import triton
import triton.language as tl

from attnmem.kernels._launch import block_width, lastdim_contiguous, launch, within


@triton.jit
def _rotary(x, rows, offs_d, ok, cos_ptr, sin_ptr, positions, ROTARY_DIM: tl.constexpr,
            INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr = False,
            PAIRS_IN_REGISTERS: tl.constexpr = False):
    """x, the tile loaded from rows[:, None] + offs_d[None, :] where ok, with its first
    ROTARY_DIM dims rotated at positions (rows,) (the module's docstring); by the inverse
    rotation (sin negated) with CONJUGATE. Elements outside ok pass through.
    PAIRS_IN_REGISTERS (with INTERLEAVED): the pairs come from x itself, split in registers,
    with cos and sin loaded once per pair, so that every load covers whole 16-byte runs: the
    rotary kernel's, whose loads are all it does. The attention kernels load the pairs a
    second time instead: there the split spilled 4 to 16 B in sm_90 tiles that the second
    load leaves spill-free (reports/kvcache-tuning.md)."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    rotated = offs_d < ROTARY_DIM
    ok = ok & rotated[None, :]
    if INTERLEAVED and PAIRS_IN_REGISTERS:
        M: tl.constexpr = x.shape[0]
        PAIRS: tl.constexpr = x.shape[1] // 2
        x0, x1 = tl.split(tl.reshape(x.to(tl.float32), [M, PAIRS, 2]))
        # Rows where the tile rotates anything (column 0 always rotates), times the pairs
        # to rotate: a mask constant along runs of columns, which vector loads need.
        pair_ok = tl.arange(0, PAIRS) < HALF
        ok0 = (tl.max(ok.to(tl.int32), axis=1) > 0)[:, None] & pair_ok[None, :]
        table = positions.to(tl.int64)[:, None] * HALF + tl.arange(0, PAIRS)[None, :]
        cos = tl.load(cos_ptr + table, mask=ok0, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=ok0, other=0.0).to(tl.float32)
        if CONJUGATE:
            sin = -sin
        out = tl.reshape(tl.join(x0 * cos + -x1 * sin, x1 * cos + x0 * sin), [M, 2 * PAIRS])
    else:
        if INTERLEAVED:
            first = offs_d % 2 == 0
            pair = offs_d ^ 1
            col = offs_d // 2
        else:
            first = offs_d < HALF
            pair = tl.where(first, offs_d + HALF, offs_d - HALF)
            col = tl.where(first, offs_d, offs_d - HALF)
        x_pair = tl.load(rows[:, None] + pair[None, :], mask=ok, other=0.0).to(tl.float32)
        x_pair = tl.where(first[None, :] != CONJUGATE, -x_pair, x_pair)
        table = positions.to(tl.int64)[:, None] * HALF + col[None, :]
        cos = tl.load(cos_ptr + table, mask=ok, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=ok, other=0.0).to(tl.float32)
        out = x.to(tl.float32) * cos + x_pair * sin
    return tl.where(rotated[None, :], out.to(x.dtype), x)


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, offsets_ptr, cu_seqlens_ptr,
                   stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh,
                   seqlen, n_heads, seqlen_ro, offset, total,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY_DIM: tl.constexpr,
                   INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
                   HAS_OFFSETS: tl.constexpr, VARLEN: tl.constexpr, INPLACE: tl.constexpr,
                   ROWS: tl.constexpr):
    """ROWS rows (token s, head h) of sequence b, r = s * n_heads + h, rotated at positions
    s + offset (s + offsets[b] with HAS_OFFSETS); positions outside [0, seqlen_ro) pass
    through. Program (tile, b). VARLEN: x and out packed (total, H, D), batch strides 0,
    sequence b in rows cu_seqlens[b] to cu_seqlens[b + 1]; seqlen is max_seqlen. INPLACE:
    out is x, and only the rotated dims are stored."""
    tile = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    if VARLEN:
        start = tl.load(cu_seqlens_ptr + b).to(tl.int64)
        seqlen = tl.minimum(tl.load(cu_seqlens_ptr + b + 1).to(tl.int64), total) - start
        x_ptr += start * stride_xs
        out_ptr += start * stride_os
    if tile * ROWS // n_heads >= seqlen:  # as tile * ROWS >= seqlen * n_heads, in int64
        return
    r = tile * ROWS + tl.arange(0, ROWS)
    s = r // n_heads
    h = r % n_heads
    row_ok = s < seqlen
    if HAS_OFFSETS:
        offset = tl.load(offsets_ptr + b)
    positions = s + offset
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = within(offs_d, HEAD_DIM, HEAD_DIM == BLOCK_D)
    ok = row_ok[:, None] & d_ok[None, :]
    rows = x_ptr + b * stride_xb + s * stride_xs + h * stride_xh
    x = tl.load(rows[:, None] + offs_d[None, :], mask=ok, other=0.0)
    in_table = (positions >= 0) & (positions < seqlen_ro)
    x = _rotary(x, rows, offs_d, ok & in_table[:, None], cos_ptr, sin_ptr, positions,
                ROTARY_DIM, INTERLEAVED, CONJUGATE, PAIRS_IN_REGISTERS=True)
    if INPLACE:
        ok = ok & (offs_d < ROTARY_DIM)[None, :]
        if not INTERLEAVED:
            # Other threads (other warps, for wide rows) load their pairs from x: every
            # thread loads before any overwrites x.
            tl.debug_barrier()
    out_rows = out_ptr + b * stride_ob + s * stride_os + h * stride_oh
    tl.store(out_rows[:, None] + offs_d[None, :], x, mask=ok)


def configs_for(block_d):
    """Autotuning candidates: rows per program holding 2K to 16K elements, 4 or 8 warps
    (no loop: one stage)."""
    return [dict(ROWS=max(1, elements // block_d), num_warps=warps, num_stages=1)
            for elements, warps in ((2048, 4), (4096, 4), (8192, 8), (16384, 8))]


# Under the interpreter: 8 rows a program, so test sizes span several tiles.
INTERPRET_CONFIG = dict(ROWS=8, num_warps=1, num_stages=1)


def apply_rotary(x, cos, sin, seqlen_offsets, offset, cu_seqlens, max_seqlen, interleaved,
                 conjugate, inplace):
    """-> x (B, S, H, D), or packed (total, H, D) with cu_seqlens (B + 1,) int32 and
    max_seqlen, rotated by cos, sin (seqlen_ro, R / 2) at positions s + offset, or s +
    seqlen_offsets[b] (an integer tensor (B,)); by the inverse rotation with conjugate. A new
    tensor, or x itself rotated in place with inplace (x's last dimension contiguous)."""
    varlen = cu_seqlens is not None
    source = lastdim_contiguous(x)
    out = source if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return x if inplace else out
    cos, sin = cos.contiguous(), sin.contiguous()
    head_dim = x.shape[-1]
    block_d = block_width(head_dim)
    if varlen:
        batch, seqlen = cu_seqlens.shape[0] - 1, max_seqlen
        stride_x, stride_o = (0, *source.stride()[:2]), (0, *out.stride()[:2])
    else:
        batch, seqlen = x.shape[:2]
        stride_x, stride_o = source.stride()[:3], out.stride()[:3]
    n_heads = x.shape[-2]
    launch(_rotary_kernel, lambda m: (triton.cdiv(seqlen * n_heads, m["ROWS"]), batch),
           (source, out, cos, sin, seqlen_offsets, cu_seqlens, *stride_x, *stride_o, seqlen,
            n_heads, cos.shape[0], offset, x.shape[0]),
           dict(HEAD_DIM=head_dim, BLOCK_D=block_d, ROTARY_DIM=2 * cos.shape[1],
                INTERLEAVED=interleaved, CONJUGATE=conjugate,
                HAS_OFFSETS=seqlen_offsets is not None, VARLEN=varlen, INPLACE=inplace),
           configs_for(block_d), ["BLOCK_D", "ROTARY_DIM", "INTERLEAVED", "INPLACE"],
           INTERPRET_CONFIG, restore_value=["out_ptr"] if inplace else [])
    if inplace and out is not x:
        x.copy_(out)  # x's last dimension was strided: rotated in a contiguous copy
    return x if inplace else out
