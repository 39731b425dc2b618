"""Product-key memory lookup (Lample et al. 2019, "Large Memory Layers with Product Keys";
Berges et al. 2024, "Memory Layers at Scale").

Shapes: queries (B, H, Dk) for H heads, sub_keys (H, 2, n_keys, Dk / 2): each head its own
two sub-key tables, values (n_keys ** 2, Dv) shared by the heads. The op validates its
inputs, then runs on the pure-torch twin (attnmem.reference.product_key) or on the Triton
kernels (attnmem.kernels.product_key), as attnmem.backend chooses.
"""

import numbers

from attnmem import _checks
from attnmem import backend as _backend
from attnmem.reference import product_key as _reference

# Value rows are packed with their score into 64-bit sort keys: 31 bits of row index.
MAX_ROWS = 2**31 - 1


def _arguments(queries, sub_keys, values, topk):
    _checks.tensor("queries", queries, 3, "(B, H, Dk)")
    _checks.tensor("sub_keys", sub_keys, 4, "(H, 2, n_keys, Dk / 2)")
    _checks.like("sub_keys", sub_keys, queries, "queries")
    _checks.tensor("values", values, 2, "(n_keys ** 2, Dv)")
    _checks.like("values", values, queries, "queries")
    heads, dim = queries.shape[1:]
    if sub_keys.shape[0] != heads or sub_keys.shape[1] != 2 or 2 * sub_keys.shape[3] != dim:
        raise ValueError(f"sub_keys must be (H, 2, n_keys, Dk / 2) with H={heads} and "
                         f"Dk / 2={dim / 2:g} (queries {tuple(queries.shape)}; Dk must be "
                         f"even), got {tuple(sub_keys.shape)}")
    n_keys = sub_keys.shape[2]
    if n_keys * n_keys > MAX_ROWS:
        raise ValueError(f"sub_keys: n_keys={n_keys} gives n_keys ** 2 > 2 ** 31 - 1 rows")
    if values.shape[0] != n_keys * n_keys:
        raise ValueError(f"values must be (n_keys ** 2, Dv) with n_keys ** 2={n_keys * n_keys},"
                         f" got {tuple(values.shape)}")
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral):
        raise TypeError(f"topk must be an int, got {type(topk).__name__} {topk!r}")
    if not 1 <= topk <= n_keys:
        raise ValueError(f"topk must be in [1, n_keys] = [1, {n_keys}], got {topk}")


def product_key_lookup(queries, sub_keys, values, *, topk, return_indices=False,
                       sparse=False):
    """Product-key memory read. Per head, each half of the query (B, H, Dk) is scored (dot
    product) against its sub-key table, the topk best of each half combine into topk ** 2
    candidates scored by the sum of their halves, the topk best candidates get softmax
    weights, and their value rows (row = i1 * n_keys + i2) are summed by weight; the heads'
    reads are summed, as Lample et al.'s memory does. Returns (B, Dv) in the inputs' dtype,
    and with return_indices=True also the rows (B, H, topk) int64 and the weights
    (B, H, topk) float32.

    Gradients flow to queries, sub_keys and values through the selected candidates (the
    selection has none); sparse=True makes the values' gradient a sparse COO tensor of the
    touched rows, for sparse optimisers (torch.optim.SparseAdam). Ties go to the lower
    sub-key index, then to the lower row, on both backends."""
    _arguments(queries, sub_keys, values, topk)
    topk, sparse = int(topk), bool(sparse)
    _backend.resolve(_backend.requested_backend(), (queries,), [], "product_key_lookup")
    out, rows, weights = _reference.product_key_lookup(queries, sub_keys, values, topk, sparse)
    if return_indices:
        return out, rows, weights.float()
    return out
