"""Pure-torch product-key memory lookup (Lample et al. 2019): the CPU path and the tests'
reference, written as the public implementations run it eagerly: two top-k, the Cartesian
combine, a third top-k, a softmax and an embedding bag.

Shapes: queries (B, H, Dk) for H heads, sub_keys (H, 2, n_keys, Dk / 2), values
(n_keys ** 2, Dv); the selected rows are (B, H, topk), row = i1 * n_keys + i2.

Ties are broken towards the lower index: among equal half scores the lower sub-key index,
among equal candidate sums the lower value row (stable sorts; torch.topk leaves ties
unspecified). The Triton kernels break ties the same way, so both backends select the same
rows wherever the scores are equal in both.
"""

import torch
import torch.nn.functional as F

from attnmem.reference.attention import compute_dtype


def _top(scores, order_key, topk):
    """(scores, positions) of the topk largest scores along the last dim; among equal
    scores, the lower order_key first (order_key None: the lower position). float32 scores
    go through one torch.topk on int64 keys that pack the score, order-preserved, above the
    inverted order key (as the kernels' selection does): the keys are unique, so topk has no
    tie to break. Other dtypes take a stable sort."""
    if scores.dtype == torch.float32:
        order = (torch.arange(scores.shape[-1], device=scores.device) if order_key is None
                 else order_key)
        bits = torch.where(scores == 0, 0.0, scores).view(torch.int32)  # -0.0 ties 0.0
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        keys = (ordered.to(torch.int64) << 32) | (0x7FFFFFFF - order)
        positions = keys.topk(topk, dim=-1).indices
        return scores.gather(-1, positions), positions
    if order_key is not None:
        by_key = order_key.argsort(-1)
        scores = scores.gather(-1, by_key)
    best, positions = torch.sort(scores, dim=-1, descending=True, stable=True)
    positions = positions[..., :topk]
    if order_key is not None:
        positions = by_key.gather(-1, positions)
    return best[..., :topk], positions


def select(queries, sub_keys, topk):
    """-> (rows (B, H, topk) int64, scores (B, H, topk) in the compute dtype, differentiable
    in queries and sub_keys). Selection itself has no gradient."""
    dtype = compute_dtype(queries.dtype)
    n_keys, half = sub_keys.shape[2], sub_keys.shape[3]
    halves = queries.to(dtype).unflatten(-1, (2, half))                    # (B, H, 2, Dk/2)
    scores = torch.einsum("bhsd,hsnd->bhsn", halves, sub_keys.to(dtype))  # (B, H, 2, n_keys)
    with torch.no_grad():
        best, sub = _top(scores, None, topk)                              # (B, H, 2, topk)
        sums = (best[:, :, 0, :, None] + best[:, :, 1, None, :]).flatten(-2)
        candidates = (sub[:, :, 0, :, None] * n_keys + sub[:, :, 1, None, :]).flatten(-2)
        rows = candidates.gather(-1, _top(sums, candidates, topk)[1])
    picked = (scores[:, :, 0].gather(-1, rows // n_keys)
              + scores[:, :, 1].gather(-1, rows % n_keys))
    return rows, picked


def product_key_lookup(queries, sub_keys, values, topk, sparse=False):
    """-> (out (B, Dv) in values' dtype, rows (B, H, topk), weights (B, H, topk) in the
    compute dtype): per head the softmax over its topk best rows, the heads' weighted rows
    summed. sparse=True gives values a sparse gradient."""
    rows, scores = select(queries, sub_keys, topk)
    weights = torch.softmax(scores, -1)
    flat_rows, flat_weights = rows.flatten(1), weights.flatten(1)
    # No (B, 0) bags, and no rows of width 0 (embedding_bag fails its index check on them).
    if values.dtype == weights.dtype and flat_rows.shape[1] > 0 and values.shape[1] > 0:
        out = F.embedding_bag(flat_rows, values, per_sample_weights=flat_weights, mode="sum",
                              sparse=sparse)
    else:  # half-precision values: the selected rows summed in float32
        picked = F.embedding(flat_rows, values, sparse=sparse).to(weights.dtype)
        out = torch.einsum("bk,bkd->bd", flat_weights, picked)
    return out.to(values.dtype), rows, weights
