"""Pure-torch additive (Bahdanau) attention: the CPU fallback and the tests' reference.

It forms the (B, Nq, Nk, A) tensor of tanh(q_i + k_j) that the Triton kernel avoids, and
leaves the gradient to torch autograd.
"""

import torch

from attnmem.reference.attention import compute_dtype, softmax_with_lse


def additive_scores(q, k, v, kv_lengths):
    """(B, Nq, Nk) scores v . tanh(q_i + k_j); -inf for keys j >= kv_lengths[b]."""
    scores = torch.tanh(q[:, :, None, :] + k[:, None, :, :]) @ v
    if kv_lengths is not None:
        keys = torch.arange(k.shape[1], device=k.device)
        scores = scores.masked_fill(keys >= kv_lengths[:, None, None], float("-inf"))
    return scores


def additive_attention(q, k, v, values, kv_lengths):
    """-> out (B, Nq, Dv) (None without values), scores (B, Nq, Nk) and lse (B, Nq), half
    precision computed in float32; out in the inputs' dtype."""
    dtype = q.dtype
    q, k, v = (x.to(compute_dtype(dtype)) for x in (q, k, v))
    scores = additive_scores(q, k, v, kv_lengths)
    weights, lse = softmax_with_lse(scores)
    out = None if values is None else (weights @ values.to(weights.dtype)).to(dtype)
    return out, scores, lse
