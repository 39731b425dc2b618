"""Product-key memory lookup: fused selection, weighted gather, and their backward.

Shapes: queries (B, H, Dk), sub_keys (H, 2, n_keys, Dk / 2), values (n_keys ** 2, Dv);
rows and weights (B, H, topk).

- `_pkm_select`: a program scores BLOCK_B queries of one head against both sub-key tables
  in tiles of BLOCK_N keys (tl.dot, Dk / 2 in chunks of BLOCK_D) and keeps each half's
  running top-K (K = topk rounded up to a power of two) as 64-bit keys that pack the float32
  score, order-preserved, above the inverted index, so that one integer tl.topk orders by
  score and breaks ties towards the lower index, as the torch twin's stable sorts do. The
  topk x topk Cartesian sums then reduce to the topk best, A rows of the first half's list
  at a time (rows that cannot reach the topk-th best skipped), and get their softmax
  weights. Neither the (B, H, n_keys) scores nor the
  candidates reach memory. tl.sort and tl.topk exist in every triton attnmem supports
  (3.4 to 3.9); their k must be a power of two, hence K, and at least 2 (triton 3.4 has no
  k = 1 path), the extra entries masked.
- `_pkm_gather`: out[b] = sum over heads and their topk rows of weight * values[row], one
  program per query and Dv chunk, rows loaded BLOCK_D wide (16-byte loads for whole chunks).
- `_pkm_gather_bwd`, one program per query and head: dweights[k] = dout . values[row_k],
  through the softmax the candidates' score gradient ds, and from it the query's gradient,
  sum_k ds_k (keys1[row_k // n_keys], keys2[row_k % n_keys]); with ATOMIC (float32
  values) the value gradient w * dout added into the dense gradient with atomics.
- `_pkm_row_sums`: gradients of table rows without atomics, for the sub-keys (always) and
  the values (deterministic mode, sparse gradients, half-precision values): the entries
  sorted by target row (a stable torch.sort), the first entry of each row's run sums the
  run in sorted order and stores the row, into the dense gradient or into the rows of a
  sparse one. It repeats bit for bit and, for a dense gradient, needs no host sync.

The backward runs no cuBLAS matmul and builds no (B, H, n_keys)-sized tensor: it touches the
selected rows only, and torch's deterministic mode needs no CUBLAS_WORKSPACE_CONFIG for it.
"""

import torch
import triton
import triton.language as tl

from attnmem.kernels._launch import interpreting, lastdim_contiguous, launch, within
from attnmem.kernels._topk import EMPTY, merge, pack, unpack

# Queries per selection program: tl.dot's smallest M.
BLOCK_B = 16
# Cartesian candidates per query merged at once (A rows of the first half's list).
CANDIDATES = 64
# (BLOCK_D, num_warps) of the gather kernels.
GATHER_CONFIGS = [(128, 4), (256, 4), (64, 2)]
# Entries per step of the deterministic value gradient.
BLOCK_E = 16
INTERPRET_GATHER = dict(BLOCK_D=16, num_warps=1, num_stages=1)


def pad_topk(topk):
    """K: topk rounded up to a power of two, at least 2."""
    return max(2, triton.next_power_of_2(topk))


def select_config(topk):
    """The selection kernel's one config: K keys a tile (16 at least, tl.dot's smallest N),
    so that a merge sorts 2 K keys; A rows of candidates a merge; from K = 64, 8 warps and
    one stage. These compile without register spills on sm_90 at K = 32 and 64
    (tests/test_product_key.py); 64-key tiles, or 128 candidates a merge, spill the packed
    int64 keys at K = 32."""
    k = pad_topk(topk)
    return dict(BLOCK_N=max(16, k), BLOCK_D=32, A=max(1, min(k, CANDIDATES // k)),
                num_warps=4 if k <= 32 else 8, num_stages=2 if k <= 32 else 1)


def gather_configs(topk):
    """The gathers' configs at this topk: value chunks narrowed to K * BLOCK_D <= 1024 *
    num_warps (32 elements a thread), past which the backward's atomics spill on sm_90."""
    k = pad_topk(topk)
    configs = sorted({(min(d, 1024 * w // k), w) for d, w in GATHER_CONFIGS})
    return [dict(BLOCK_D=d, num_warps=w, num_stages=1) for d, w in configs]


@triton.jit
def _pkm_select(q_ptr, keys_ptr, rows_ptr, weights_ptr, stride_qb, stride_qh, stride_kh,
                stride_ks, stride_kn, n_queries, n_heads, n_keys, half,
                TOPK: tl.constexpr, K: tl.constexpr, A: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    h = tl.program_id(1).to(tl.int64)
    queries = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    query_ok = queries < n_queries
    q_rows = q_ptr + queries[:, None] * stride_qb + h * stride_qh
    keys = keys_ptr + h * stride_kh
    empty = tl.full((BLOCK_B, K), EMPTY, tl.int64)
    best1, best2 = empty, empty
    for n0 in range(0, n_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < n_keys
        key_rows = keys + offs_n[:, None] * stride_kn
        s1 = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        s2 = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        for d0 in range(0, half, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < half
            q_mask = query_ok[:, None] & d_ok[None, :]
            k_mask = key_ok[:, None] & d_ok[None, :]
            q1 = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0)
            q2 = tl.load(q_rows + half + offs_d[None, :], mask=q_mask, other=0.0)
            k1 = tl.load(key_rows + offs_d[None, :], mask=k_mask, other=0.0)
            k2 = tl.load(key_rows + stride_ks + offs_d[None, :], mask=k_mask, other=0.0)
            s1 = tl.dot(q1, tl.trans(k1), s1, input_precision=DOT_PRECISION)
            s2 = tl.dot(q2, tl.trans(k2), s2, input_precision=DOT_PRECISION)
        index = tl.broadcast_to(offs_n[None, :], (BLOCK_B, BLOCK_N))
        best1 = merge(best1, pack(s1, index, key_ok[None, :]), K)
        best2 = merge(best2, pack(s2, index, key_ok[None, :]), K)
    score1, index1 = unpack(best1)
    score2, index2 = unpack(best2)
    cols = tl.arange(0, K)[None, :]
    in_top = cols < TOPK
    best = empty
    # Candidates (a, b): A rows a of the first half's list at a time, each with the second
    # half's topk. Both lists are sorted, so once no row's best remaining candidate,
    # score1[a0] + score2[0], reaches its topk-th best score, the rest are skipped.
    rank = tl.arange(0, A)[None, :, None]
    for a0 in range(0, TOPK, A):
        kth = tl.sum(tl.where(cols == TOPK - 1, unpack(best)[0], 0.0), 1)
        bound = tl.sum(tl.where(cols == a0, score1, 0.0), 1) + tl.max(
            tl.where(in_top, score2, float("-inf")), 1)
        if tl.max((~(bound < kth)).to(tl.int32), 0) > 0:  # a NaN kth: not yet topk found
            first = cols[:, None, :] == a0 + rank                       # (1, A, K)
            score_a = tl.sum(tl.where(first, score1[:, None, :], 0.0), 2)   # (BLOCK_B, A)
            index_a = tl.sum(tl.where(first, index1[:, None, :], 0), 2)
            ok = (a0 + rank < TOPK) & in_top[:, None, :]
            candidates = pack(score_a[:, :, None] + score2[:, None, :],
                               index_a[:, :, None] * n_keys + index2[:, None, :], ok)
            best = merge(best, tl.reshape(candidates, (BLOCK_B, A * K)), K)
    score, row = unpack(best)
    score = tl.where(in_top, score, float("-inf"))
    p = tl.exp(score - tl.max(score, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    out = (queries[:, None] * n_heads + h) * TOPK + cols
    mask = query_ok[:, None] & in_top
    tl.store(rows_ptr + out, row.to(tl.int64), mask=mask)
    tl.store(weights_ptr + out, p, mask=mask)


@triton.jit
def _pkm_gather(values_ptr, rows_ptr, weights_ptr, out_ptr, stride_vn, n_heads, value_dim,
                TOPK: tl.constexpr, K: tl.constexpr, EVEN_D: tl.constexpr,
                BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = within(offs_d, value_dim, EVEN_D)
    offs_k = tl.arange(0, K)
    k_ok = offs_k < TOPK
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for h in range(n_heads):
        entries = (b * n_heads + h) * TOPK + offs_k
        rows = tl.load(rows_ptr + entries, mask=k_ok, other=0)
        w = tl.load(weights_ptr + entries, mask=k_ok, other=0.0)
        v = tl.load(values_ptr + rows[:, None] * stride_vn + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * v.to(tl.float32), 0)
    tl.store(out_ptr + b * value_dim + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _pkm_gather_bwd(values_ptr, rows_ptr, weights_ptr, dout_ptr, dweights_ptr, dscores_ptr,
                    dvalues_ptr, keys_ptr, dq_ptr, stride_vn, stride_kh, stride_ks, stride_kn,
                    n_heads, value_dim, n_keys, half, TOPK: tl.constexpr, K: tl.constexpr,
                    ATOMIC: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    # Sub-keys past 2^31 elements: h * stride_kh in 64 bits.
    h = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, K)
    k_ok = offs_k < TOPK
    entries = (b * n_heads + h) * TOPK + offs_k
    rows = tl.load(rows_ptr + entries, mask=k_ok, other=0)
    w = tl.load(weights_ptr + entries, mask=k_ok, other=0.0)
    dw = tl.load(dweights_ptr + entries, mask=k_ok, other=0.0)
    for d0 in range(0, value_dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = within(offs_d, value_dim, EVEN_D)
        mask = k_ok[:, None] & d_ok[None, :]
        g = tl.load(dout_ptr + b * value_dim + offs_d, mask=d_ok, other=0.0)
        v = tl.load(values_ptr + rows[:, None] * stride_vn + offs_d[None, :], mask=mask,
                    other=0.0)
        dw += tl.sum(v.to(tl.float32) * g[None, :], 1)
        if ATOMIC:
            tl.atomic_add(dvalues_ptr + rows[:, None] * value_dim + offs_d[None, :],
                          w[:, None] * g[None, :], mask=mask)
    ds = w * (dw - tl.sum(w * dw, 0))  # through the softmax: the candidates' scores
    tl.store(dscores_ptr + entries, ds, mask=k_ok)
    # score = q1 . keys1[row // n_keys] + q2 . keys2[row % n_keys]: dq from the picked keys
    keys1 = keys_ptr + h * stride_kh + (rows // n_keys)[:, None] * stride_kn
    keys2 = keys_ptr + h * stride_kh + stride_ks + (rows % n_keys)[:, None] * stride_kn
    dq = dq_ptr + (b * n_heads + h) * 2 * half
    for d0 in range(0, half, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = k_ok[:, None] & (offs_d < half)[None, :]
        k1 = tl.load(keys1 + offs_d[None, :], mask=mask, other=0.0)
        k2 = tl.load(keys2 + offs_d[None, :], mask=mask, other=0.0)
        tl.store(dq + offs_d, tl.sum(ds[:, None] * k1.to(tl.float32), 0), mask=offs_d < half)
        tl.store(dq + half + offs_d, tl.sum(ds[:, None] * k2.to(tl.float32), 0),
                 mask=offs_d < half)


@triton.jit
def _pkm_row_sums(sorted_rows_ptr, ends_ptr, dest_ptr, order_ptr, weights_ptr, src_ptr,
                  out_ptr, stride_src, stride_on, entries_per_src, width,
                  EVEN_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = within(offs_d, width, EVEN_D)
    row = tl.load(sorted_rows_ptr + s)
    previous = tl.load(sorted_rows_ptr + s - 1, mask=s > 0, other=-1)
    if previous != row:  # the first entry of its row's run sums the run, in order
        end = tl.load(ends_ptr + s)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for e0 in range(s, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_ok = offs_e < end
            entry = tl.load(order_ptr + offs_e, mask=e_ok, other=0)
            w = tl.load(weights_ptr + entry, mask=e_ok, other=0.0)
            g = tl.load(src_ptr + (entry // entries_per_src)[:, None] * stride_src
                        + offs_d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(w[:, None] * g.to(tl.float32), 0)
        tl.store(out_ptr + tl.load(dest_ptr + s) * stride_on + offs_d,
                 acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def _gather_meta(value_dim, topk):
    return dict(TOPK=topk, K=pad_topk(topk))


def _gather_launch(fn, grid, args, meta, value_dim, **options):
    """fn over gather_configs; EVEN_D follows each config's BLOCK_D."""
    configs = [dict(c, EVEN_D=value_dim % c["BLOCK_D"] == 0)
               for c in gather_configs(meta["TOPK"])]
    interpret = dict(INTERPRET_GATHER, EVEN_D=value_dim % INTERPRET_GATHER["BLOCK_D"] == 0)
    launch(fn, grid, args, meta, configs, ["value_dim", "TOPK"], interpret, **options)


def select(queries, sub_keys, topk):
    """-> rows (B, H, topk) int64 and softmax weights (B, H, topk) float32."""
    queries, sub_keys = lastdim_contiguous(queries), lastdim_contiguous(sub_keys)
    batch, heads, _ = queries.shape
    n_keys, half = sub_keys.shape[2], sub_keys.shape[3]
    rows = torch.empty((batch, heads, topk), dtype=torch.int64, device=queries.device)
    weights = torch.empty((batch, heads, topk), dtype=torch.float32, device=queries.device)
    if batch == 0 or heads == 0:
        return rows, weights
    config = select_config(topk)
    meta = dict(TOPK=topk, K=pad_topk(topk), BLOCK_B=BLOCK_B,
                DOT_PRECISION="ieee" if queries.dtype == torch.float32 else "tf32")
    interpret = dict(config, BLOCK_D=16, num_warps=1, num_stages=1)
    launch(_pkm_select, lambda m: (triton.cdiv(batch, BLOCK_B), heads),
           (queries, sub_keys, rows, weights, queries.stride(0), queries.stride(1),
            sub_keys.stride(0), sub_keys.stride(1), sub_keys.stride(2), batch, heads, n_keys,
            half), meta, [config], ["TOPK"], interpret)
    return rows, weights


def gather(values, rows, weights):
    """-> (B, Dv) in values' dtype: the weighted sum of each query's rows over its heads."""
    values = lastdim_contiguous(values)
    batch, heads, topk = rows.shape
    value_dim = values.shape[1]
    out = torch.empty((batch, value_dim), dtype=values.dtype, device=values.device)
    if batch == 0 or value_dim == 0:
        return out
    if heads == 0:
        return out.zero_()
    _gather_launch(_pkm_gather, lambda m: (batch, triton.cdiv(value_dim, m["BLOCK_D"])),
                   (values, rows, weights, out, values.stride(0), heads, value_dim),
                   _gather_meta(value_dim, topk), value_dim)
    return out


def _row_sums(targets, weights, src, entries_per_src, out, compact):
    """out[target] = sum of weights[e] * src[e // entries_per_src] over the entries e with
    that target, summed in entry order (a stable sort by target), one program per target:
    no atomics. compact: out's rows are the touched targets in order, returned with them."""
    sorted_rows, order = torch.sort(targets.reshape(-1), stable=True)
    n = sorted_rows.numel()
    first = torch.ones(n, dtype=torch.bool, device=targets.device)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    starts = torch.where(first, torch.arange(n, device=targets.device), n)
    # A run ends where the next one starts: the smallest start after each entry.
    ends = torch.cat([starts[1:], starts.new_full((1,), n)]).flip(0).cummin(0).values.flip(0)
    touched, dest = None, sorted_rows
    if compact:
        touched = sorted_rows[first]
        dest = torch.cumsum(first, 0) - 1
        out = out.new_empty((len(touched), out.shape[1]))
    width = out.shape[1]
    if n and width:
        block_d = 16 if interpreting() else min(128, triton.next_power_of_2(width))
        _pkm_row_sums[(n, triton.cdiv(width, block_d))](
            sorted_rows, ends, dest, order, weights, src, out, src.stride(0), out.stride(0),
            entries_per_src, width, EVEN_D=width % block_d == 0, BLOCK_E=BLOCK_E,
            BLOCK_D=block_d)
    return (touched, out) if compact else out


def backward(dout, dweights, queries, sub_keys, values, rows, weights, deterministic, sparse,
             need_values):
    """-> (dqueries, dsub_keys, dvalues) in the inputs' dtypes, dvalues the dense
    (n_rows, Dv) gradient, or (touched rows (U,) int64, their gradients (U, Dv)) for a
    sparse gradient, or None without need_values. The value gradient takes float32 atomics
    for float32 values unless deterministic or sparse, otherwise the sorted row sums, which
    need no table-sized float32 buffer (and, for a sparse gradient, one host sync for U).
    The sub-keys' gradient is always the sorted row sums: deterministic."""
    values, sub_keys = lastdim_contiguous(values), lastdim_contiguous(sub_keys)
    queries = queries.contiguous()
    dout = dout.float().contiguous()
    batch, heads, topk = rows.shape
    n_rows, value_dim = values.shape
    n_keys, half = sub_keys.shape[2], sub_keys.shape[3]
    atomic = need_values and values.dtype == torch.float32 and not (deterministic or sparse)
    dscores = torch.zeros((batch, heads, topk), dtype=torch.float32, device=values.device)
    dqueries = torch.zeros(queries.shape, dtype=torch.float32, device=values.device)
    dvalues = torch.zeros(values.shape if atomic else 0, dtype=values.dtype,
                          device=values.device)
    if dscores.numel():
        _gather_launch(_pkm_gather_bwd, lambda m: (batch, heads),
                       (values, rows, weights, dout, dweights.float().contiguous(), dscores,
                        dvalues, sub_keys, dqueries, values.stride(0), sub_keys.stride(0),
                        sub_keys.stride(1), sub_keys.stride(2), heads, value_dim, n_keys,
                        half),
                       dict(_gather_meta(value_dim, topk), ATOMIC=atomic), value_dim,
                       reset_to_zero=["dvalues_ptr"] if atomic else [])
    # Sub-key rows (h, s, i) of the flattened (H * 2 * n_keys, Dk / 2) gradient.
    dsub_keys = torch.zeros(sub_keys.shape, dtype=sub_keys.dtype, device=values.device)
    table = torch.arange(heads, device=values.device)[None, :, None] * 2 * n_keys
    flat_queries = queries.view(batch * heads, 2, half)
    for side, index in enumerate((rows // n_keys, rows % n_keys)):
        _row_sums(table + side * n_keys + index, dscores, flat_queries[:, side], topk,
                  dsub_keys.view(-1, half), compact=False)
    if atomic or not need_values:
        dvalues = dvalues if atomic else None
    else:
        dvalues = _row_sums(rows, weights, dout, heads * topk,
                            values.new_zeros((n_rows, value_dim)), compact=sparse)
    return dqueries.to(queries.dtype), dsub_keys, dvalues
