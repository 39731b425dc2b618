"""Product-key memory lookup (Lample et al. 2019, "Large Memory Layers with Product Keys";
Berges et al. 2024, "Memory Layers at Scale").

Shapes: queries (..., H, Dk) for H heads (leading dims flattened to B), sub_keys
(H, 2, n_keys, Dk / 2): each head its own two sub-key tables, values (n_keys ** 2, Dv)
shared by the heads. The op validates its inputs, then runs on the pure-torch twin
(attnmem.reference.product_key) or on the Triton kernels (attnmem.kernels.product_key),
as attnmem.backend chooses.
"""

import numbers

import torch

from attnmem import _checks, _library
from attnmem import backend as _backend
from attnmem.reference import product_key as _reference

# Value rows are packed with their score into 64-bit sort keys: 31 bits of row index.
MAX_ROWS = 2**31 - 1
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The selection kernel holds each half's best (16 queries, 2 * topk) in registers.
MAX_TRITON_TOPK = 64
# The narrowest column chunk of the gather and row-sum kernels (kernels/product_key.py).
GRID_COLUMN_CHUNK = 16


@_library.custom_op("product_key_lookup", mutates_args=())
def _lookup_op(queries: torch.Tensor, sub_keys: torch.Tensor, values: torch.Tensor, topk: int,
               sparse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton path -> (out (B, Dv), rows (B, H, topk) int64, weights (B, H, topk) float32)."""
    from attnmem.kernels import product_key as kernel

    rows, weights = kernel.select(queries, sub_keys, topk)
    return kernel.gather(values, rows, weights), rows, weights


@_lookup_op.register_fake
def _(queries, sub_keys, values, topk, sparse):
    batch, heads = queries.shape[:2]
    return (values.new_empty((batch, values.shape[1])),
            queries.new_empty((batch, heads, topk), dtype=torch.int64),
            queries.new_empty((batch, heads, topk), dtype=torch.float32))


@_library.custom_op("product_key_lookup_backward", mutates_args=())
def _lookup_backward_op(dout: torch.Tensor, dweights: torch.Tensor, queries: torch.Tensor,
                        sub_keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                        weights: torch.Tensor, sparse: bool, deterministic: bool,
                        need_values: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dqueries, dsub_keys, dvalues, touched): dvalues dense (n_keys ** 2, Dv) and
    touched empty, or with sparse the gradients (U, Dv) of the touched rows (U,); both
    empty without need_values."""
    from attnmem.kernels import product_key as kernel

    dqueries, dsub_keys, dvalues = kernel.backward(dout, dweights, queries, sub_keys, values,
                                                   rows, weights, deterministic, sparse,
                                                   need_values)
    if dvalues is None:
        dvalues = values.new_empty(0)
    touched, dvalues = dvalues if sparse and need_values else (rows.new_empty(0), dvalues)
    return dqueries, dsub_keys, dvalues, touched


@_lookup_backward_op.register_fake
def _(dout, dweights, queries, sub_keys, values, rows, weights, sparse, deterministic,
      need_values):
    if not need_values:
        return (queries.new_empty(queries.shape), sub_keys.new_empty(sub_keys.shape),
                values.new_empty(0), rows.new_empty(0))
    if sparse:
        touched = torch.library.get_ctx().new_dynamic_size()
        return (queries.new_empty(queries.shape), sub_keys.new_empty(sub_keys.shape),
                values.new_empty((touched, values.shape[1])),
                rows.new_empty((touched,)))
    return (queries.new_empty(queries.shape), sub_keys.new_empty(sub_keys.shape),
            values.new_empty(values.shape), rows.new_empty(0))


def _setup_context(ctx, inputs, output):
    queries, sub_keys, values, topk, sparse = inputs
    _, rows, weights = output
    ctx.save_for_backward(queries, sub_keys, values, rows, weights)
    ctx.sparse = sparse


def _backward(ctx, dout, drows, dweights):
    queries, sub_keys, values, rows, weights = ctx.saved_tensors
    if dweights is None:
        dweights = torch.zeros_like(weights)
    if dout is None:
        dout = values.new_zeros((queries.shape[0], values.shape[1]))
    dqueries, dsub_keys, dvalues, touched = _lookup_backward_op(
        dout, dweights, queries, sub_keys, values, rows, weights, ctx.sparse,
        torch.are_deterministic_algorithms_enabled(), ctx.needs_input_grad[2])
    if not ctx.needs_input_grad[2]:
        dvalues = None
    elif ctx.sparse:
        dvalues = torch.sparse_coo_tensor(touched[None], dvalues, values.shape,
                                          is_coalesced=True, check_invariants=False)
    return dqueries, dsub_keys, dvalues, None, None


_lookup_op.register_autograd(_backward, setup_context=_setup_context)


def _arguments(queries, sub_keys, values, topk):
    _checks.tensor("queries", queries, max(3, getattr(queries, "ndim", 3)), "(..., H, Dk)")
    _checks.tensor("sub_keys", sub_keys, 4, "(H, 2, n_keys, Dk / 2)")
    _checks.like("sub_keys", sub_keys, queries, "queries")
    _checks.tensor("values", values, 2, "(n_keys ** 2, Dv)")
    _checks.like("values", values, queries, "queries")
    heads, dim = queries.shape[-2:]
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
    """Product-key memory read. Per head, each half of the query (..., H, Dk) is scored (dot
    product) against its sub-key table, the topk best of each half combine into topk ** 2
    candidates scored by the sum of their halves, the topk best candidates get softmax
    weights, and their value rows (row = i1 * n_keys + i2) are summed by weight; the heads'
    reads are summed, as Lample et al.'s memory does. Returns (..., Dv) in the inputs' dtype,
    and with return_indices=True also the rows (..., H, topk) int64 and the weights
    (..., H, topk) in float32 (float64 for float64 inputs).

    Gradients flow to queries, sub_keys and values through the selected candidates (the
    selection has none); sparse=True makes the values' gradient a sparse COO tensor of the
    touched rows, for sparse optimisers (torch.optim.SparseAdam). Ties go to the lower
    sub-key index, then to the lower row, on both backends."""
    _arguments(queries, sub_keys, values, topk)
    topk, sparse = int(topk), _checks.flag("sparse", sparse)
    _checks.flag("return_indices", return_indices)
    lead = queries.shape[:-2]
    queries = queries.reshape(lead.numel(), *queries.shape[-2:])
    reasons = []
    if queries.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {queries.dtype} (supported: float16, bfloat16, float32)")
    if topk > MAX_TRITON_TOPK:
        reasons.append(f"topk {topk} > {MAX_TRITON_TOPK}")
    # Launch grids hold the heads, and the value rows' (and sub-keys') columns in chunks of
    # at least GRID_COLUMN_CHUNK, on their 2nd axis.
    columns = max(values.shape[1], sub_keys.shape[3])
    reasons += _backend.grid_reasons([
        ("heads", queries.shape[1]),
        (f"{GRID_COLUMN_CHUNK}-column chunks of the value rows",
         -(-columns // GRID_COLUMN_CHUNK))])
    chosen = _backend.resolve(_backend.requested_backend(), (queries,), reasons,
                              "product_key_lookup")
    if chosen == "triton":
        out, rows, weights = _lookup_op(queries, sub_keys, values, topk, sparse)
    else:
        out, rows, weights = _reference.product_key_lookup(queries, sub_keys, values, topk,
                                                           sparse)
    out = out.view(*lead, out.shape[-1])
    if return_indices:
        weights = weights.to(torch.float64 if out.dtype == torch.float64 else torch.float32)
        return out, rows.view(*lead, *rows.shape[1:]), weights.view(*lead, *weights.shape[1:])
    return out
