"""Pure-torch additive (Bahdanau) attention: the CPU fallback and the tests' reference.

It forms the (B, Nq, Nk, A) tensor of tanh(q_i + k_j) that the Triton kernel avoids, and
leaves the gradient to torch autograd.
"""

import torch

from attnmem.reference.attention import compute_dtype


def additive_scores(q, k, v, kv_lengths):
    """(B, Nq, Nk) scores v . tanh(q_i + k_j); -inf for keys j >= kv_lengths[b]."""
    scores = torch.tanh(q[:, :, None, :] + k[:, None, :, :]) @ v
    if kv_lengths is not None:
        keys = torch.arange(k.shape[1], device=k.device)
        scores = scores.masked_fill(keys >= kv_lengths[:, None, None], float("-inf"))
    return scores


def softmax_with_lse(scores):
    """(weights, lse) of a softmax over the last dim; a row of -inf scores gets zero
    weights, lse -inf and zero gradients (never NaN)."""
    top = scores.amax(-1, keepdim=True).detach()
    exps = torch.exp(scores - torch.where(torch.isfinite(top), top, 0.0))
    total = exps.sum(-1, keepdim=True)
    nonempty = total > 0
    total = torch.where(nonempty, total, 1.0)
    lse = torch.where(nonempty, top + torch.log(total), float("-inf")).squeeze(-1)
    return exps / total, lse


def additive_attention(q, k, v, values, kv_lengths):
    """-> out (B, Nq, Dv) (None without values), scores (B, Nq, Nk) and lse (B, Nq), half
    precision computed in float32; out in the inputs' dtype."""
    dtype = q.dtype
    q, k, v = (x.to(compute_dtype(dtype)) for x in (q, k, v))
    scores = additive_scores(q, k, v, kv_lengths)
    weights, lse = softmax_with_lse(scores)
    out = None if values is None else (weights @ values.to(weights.dtype)).to(dtype)
    return out, scores, lse
