"""Pure-torch rotary position embeddings."""

import torch

from attnmem.reference import attention as _attention


def rotary(x, cos, sin, positions, interleaved):
    """x (..., D) with its first R = 2 * cos.shape[1] dims rotated by cos, sin (seqlen_ro,
    R / 2) at positions (integers broadcasting to x.shape[:-1]): in pairs (d, d + R / 2), or
    (2i, 2i + 1) when interleaved, the first of a pair becomes x * cos - x_pair * sin and the
    second x * cos + x_pair * sin, in the compute dtype, rounded to x's dtype. Dims past R
    are untouched."""
    ct = _attention.compute_dtype(x.dtype)
    half = cos.shape[1]
    cos, sin = (t.to(ct)[positions.long()] for t in (cos, sin))
    if interleaved:
        first, second = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        pair = torch.stack([-second, first], -1).flatten(-2)
        cos, sin = (t.repeat_interleave(2, -1) for t in (cos, sin))
    else:
        first, second = x[..., :half], x[..., half:2 * half]
        pair = torch.cat([-second, first], -1)
        cos, sin = (torch.cat([t, t], -1) for t in (cos, sin))
    rotated = x[..., :2 * half].to(ct) * cos + pair.to(ct) * sin
    return torch.cat([rotated.to(x.dtype), x[..., 2 * half:]], -1)


def positions(x, seqlen_offsets, cu_seqlens):
    """Each row's position, broadcasting to x.shape[:-1]: token s of sequence b (x (B, S, H,
    D), or packed (total, H, D) with sequence b in rows cu_seqlens[b] to cu_seqlens[b + 1])
    sits at s + seqlen_offsets, an int or an integer tensor (B,)."""
    if cu_seqlens is None:
        tokens = torch.arange(x.shape[1], device=x.device)[None, :]
        if isinstance(seqlen_offsets, torch.Tensor):
            seqlen_offsets = seqlen_offsets.long()[:, None]
        return (tokens + seqlen_offsets)[..., None]
    rows = torch.arange(x.shape[0], device=x.device)
    cu_seqlens = cu_seqlens.long()
    sequence = torch.searchsorted(cu_seqlens[1:], rows, right=True)
    tokens = rows - cu_seqlens[sequence]
    if isinstance(seqlen_offsets, torch.Tensor):
        seqlen_offsets = seqlen_offsets.long()[sequence]
    return (tokens + seqlen_offsets)[:, None]


def apply_rotary(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, interleaved=False,
                 conjugate=False):
    """x (B, S, H, D), or packed (total, H, D) with cu_seqlens (B + 1,), rotated by cos, sin
    (seqlen_ro, R / 2) at positions(x, seqlen_offsets, cu_seqlens) as rotary rotates; by the
    inverse rotation (sin negated) with conjugate. Rows at positions outside [0, seqlen_ro)
    pass through (cos 1, sin 0), as FlashAttention's kernel reads them."""
    pos = positions(x, seqlen_offsets, cu_seqlens)
    seqlen_ro = cos.shape[0]
    pos = torch.where((pos >= 0) & (pos < seqlen_ro), pos, seqlen_ro)
    cos = torch.cat([cos, cos.new_ones((1, cos.shape[1]))])
    sin = torch.cat([-sin if conjugate else sin, sin.new_zeros((1, sin.shape[1]))])
    return rotary(x, cos, sin, pos, interleaved)
