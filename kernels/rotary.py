"""Rotary position embeddings (RoFormer; FlashAttention's rotary_cos and rotary_sin), the
rotation of a tile that the kernels which rotate share.

cos and sin, contiguous (seqlen_ro, ROTARY_DIM / 2) at cos_ptr and sin_ptr, any float dtype,
hold each position's angles. Dims d < ROTARY_DIM pair up as (d, d + ROTARY_DIM / 2), or
(2i, 2i + 1) with INTERLEAVED: the first of a pair becomes x * cos - x_pair * sin, the second
x * cos + x_pair * sin, in float32, rounded to x's dtype; a second load of the tile at the
pair's columns supplies x_pair, and cos and sin are gathered by each row's position. Dims
past ROTARY_DIM pass through.
"""

import triton
import triton.language as tl


@triton.jit
def _rotary(x, rows, offs_d, ok, cos_ptr, sin_ptr, positions, ROTARY_DIM: tl.constexpr,
            INTERLEAVED: tl.constexpr):
    """x, the tile loaded from rows[:, None] + offs_d[None, :] where ok, with its first
    ROTARY_DIM dims rotated at positions (rows,) (the module's docstring)."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    rotated = offs_d < ROTARY_DIM
    if INTERLEAVED:
        first = offs_d % 2 == 0
        pair = offs_d ^ 1
        col = offs_d // 2
    else:
        first = offs_d < HALF
        pair = tl.where(first, offs_d + HALF, offs_d - HALF)
        col = tl.where(first, offs_d, offs_d - HALF)
    ok = ok & rotated[None, :]
    x_pair = tl.load(rows[:, None] + pair[None, :], mask=ok, other=0.0).to(tl.float32)
    x_pair = tl.where(first[None, :], -x_pair, x_pair)
    table = positions.to(tl.int64)[:, None] * HALF + col[None, :]
    cos = tl.load(cos_ptr + table, mask=ok, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + table, mask=ok, other=0.0).to(tl.float32)
    return tl.where(rotated[None, :], (x.to(tl.float32) * cos + x_pair * sin).to(x.dtype), x)
