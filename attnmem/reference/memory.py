"""Pure-torch external-memory ops (NTM, DNC, MemN2N): the fallback and the tests' reference.

Shapes: memory (B, N, D) of N slots, keys (B, R, D) for R read heads, weights (B, R, N),
write weights (B, W, N) with erase and add vectors (B, W, D). Every op is differentiable
through torch autograd and stays finite where the formulas meet zeros: zero-norm slots or
keys under cosine similarity, slots no head may use, zero weights under sharpening.
"""

import math

import torch

from attnmem.reference.attention import compute_dtype, softmax_with_lse

EPS = 1e-8


def _upcast(*tensors):
    """float16/bfloat16 computed in float32 (1e-16 is zero in half precision)."""
    return [None if x is None else x.to(compute_dtype(x.dtype)) for x in tensors]


def similarity(memory, keys, kind):
    """(B, R, N) similarity of every key with every slot: "cosine" u.v / max(|u||v|, 1e-8),
    "dot" u.v or "scaled_dot" u.v / sqrt(D)."""
    dots = torch.matmul(keys, memory.transpose(1, 2))
    if kind == "dot":
        return dots
    if kind == "scaled_dot":
        return dots / math.sqrt(memory.shape[-1])
    # max(|u||v|, eps) as sqrt(max(|u|^2 |v|^2, eps^2)): the same value, and no 0/0 in the
    # gradient of a zero vector's norm. vector_norm reduces without a memory-sized square.
    norms_sq = (torch.linalg.vector_norm(keys, dim=-1).square()[:, :, None]
                * torch.linalg.vector_norm(memory, dim=-1).square()[:, None, :])
    return dots / norms_sq.clamp_min(EPS * EPS).sqrt()


def _usable(x, mask):
    """x (B, N, ...) with the slots mask excludes zeroed: whatever they hold (NaN, inf)
    contributes nothing, and their gradient is zero."""
    return x if mask is None else x.masked_fill(~mask[:, :, None], 0)


def memory_address(memory, keys, strength, kind, mask):
    """Content weights (B, R, N): softmax over slots of strength * sim(key, slot); slots
    with mask False get weight 0, and a head with no usable slot gets zero weights."""
    return _address(_usable(memory, mask), keys, strength, kind, mask)


def _address(memory, keys, strength, kind, mask):
    """memory_address on a memory whose masked slots are already zeroed."""
    dtype = memory.dtype
    memory, keys, strength = _upcast(memory, keys, strength)
    scores = similarity(memory, keys, kind)
    if strength is not None:
        scores = scores * strength[:, :, None]
    if mask is None:  # every slot usable: no row without a slot, torch's softmax is safe
        return torch.softmax(scores, -1).to(dtype)
    return softmax_with_lse(scores.masked_fill(~mask[:, None, :], float("-inf")))[0].to(dtype)


def memory_read(memory, weights):
    """Read vectors (B, R, D): r = sum_n w_n M_n."""
    return torch.matmul(*_upcast(weights, memory)).to(memory.dtype)


def memory_attend(memory, keys, values, strength, kind, mask):
    """Address by content and read in one: (read (B, R, Dv), weights (B, R, N))."""
    memory = _usable(memory, mask)  # once, for the scores and (without values) the read
    weights = _address(memory, keys, strength, kind, mask)
    return memory_read(memory if values is None else _usable(values, mask), weights), weights


def memory_write(memory, weights, erase, add):
    """M' = M * prod_w (1 - w_w e_w^T) + sum_w w_w a_w^T. The last head erases and adds in
    one pass, M'' = M' + w (a - M' e), so one head streams memory twice, not five times."""
    dtype = memory.dtype
    memory, weights, erase, add = _upcast(memory, weights, erase, add)
    if weights.shape[1] == 0:
        return memory.clone().to(dtype)
    for head in range(weights.shape[1] - 1):
        memory = memory * (1 - weights[:, head, :, None] * erase[:, head, None, :])
    out = torch.addcmul(memory, weights[:, -1, :, None],
                        torch.addcmul(add[:, -1, None, :], memory, erase[:, -1, None, :],
                                      value=-1))
    if weights.shape[1] > 1:
        out = out.baddbmm(weights[:, :-1].transpose(1, 2), add[:, :-1])
    return out.to(dtype)


def location_address(content_weights, prev_weights, gate, shift, gamma):
    """The NTM's location stage (B, R, N): interpolate with the previous weights by gate,
    rotate by the shift distribution (shift[..., j] moves the focus by j - S//2 slots,
    circularly), then sharpen by gamma and renormalise."""
    dtype = content_weights.dtype
    content_weights, prev_weights, gate, shift, gamma = _upcast(
        content_weights, prev_weights, gate, shift, gamma)
    gated = gate[..., None] * content_weights + (1 - gate[..., None]) * prev_weights
    half = shift.shape[-1] // 2
    shifted = sum(shift[..., j, None] * torch.roll(gated, j - half, dims=-1)
                  for j in range(shift.shape[-1]))
    # w^gamma / sum(w^gamma) is a softmax of gamma log w: it never underflows to an all-zero
    # row however sharp gamma is. w = 0 has logit -inf, and no log(0) in the gradient.
    positive = shifted > 0
    safe = torch.where(positive, shifted, 1.0)
    logits = torch.where(positive, gamma[..., None] * torch.log(safe), float("-inf"))
    return softmax_with_lse(logits)[0].to(dtype)


def memory_write_(memory, weights, erase, add):
    """memory_write into memory itself: no second memory-sized buffer for inference."""
    for head in range(weights.shape[1]):
        memory.mul_(1 - weights[:, head, :, None] * erase[:, head, None, :])
    return memory.baddbmm_(weights.transpose(1, 2), add)
