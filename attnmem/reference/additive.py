"""Pure-torch additive (Bahdanau) attention: the CPU fallback and the tests' reference.

It forms the (B, Nq, Nk, A) tensor of tanh(q_i + k_j) that the Triton kernel avoids, and
leaves the gradient to torch autograd.
"""

import torch

from attnmem.reference.attention import compute_dtype, softmax_with_lse


def additive_attention(q, k, v, values, kv_lengths):
    """-> out (B, Nq, Dv) (None without values), scores (B, Nq, Nk) v . tanh(q_i + k_j),
    -inf for keys j >= kv_lengths[b], and lse (B, Nq); half precision computed in float32,
    out in the inputs' dtype. Padding keys and values are zeroed first: whatever they hold
    (NaN, inf) reaches neither the output nor a gradient."""
    dtype = q.dtype
    q, k, v = (x.to(compute_dtype(dtype)) for x in (q, k, v))
    padding = None
    if kv_lengths is not None:
        padding = (torch.arange(k.shape[1], device=k.device) >= kv_lengths[:, None])[..., None]
        k = k.masked_fill(padding, 0)
        values = None if values is None else values.masked_fill(padding, 0)
    scores = torch.tanh(q[:, :, None, :] + k[:, None, :, :]) @ v
    if padding is not None:
        scores = scores.masked_fill(padding.transpose(1, 2), float("-inf"))
    weights, lse = softmax_with_lse(scores)
    out = None if values is None else (weights @ values.to(weights.dtype)).to(dtype)
    return out, scores, lse
