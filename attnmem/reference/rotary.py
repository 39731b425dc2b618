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
