"""attnmem.attention_with_kvcache with FlashAttention-3's cu_seqlens_k_new: the new keys and
values packed on their own, (total_k_new, Hkv, D), with per-sequence counts (0, 1, 5, 7) that
differ from the queries' (padded, or packed with cu_seqlens_q, counts of 0 included).

The float64 reference is the same step done in two: the new tokens written into the caches
by hand, then the attention of the same queries over cache_seqlens[b] + n_new[b] keys with no
new tokens (FlashAttention-3's definition: L = cache_seqlens[b] + n_new[b], query i at
L - Sq + i). Contiguous and paged caches, cache_batch_idx, GQA, causal, windows, left
padding, score modifications, lse; rotary (keys at their slots, queries at their positions);
an FP8 cache; bad inputs; the sm_90 builds of the PACKED_K kernels.

Every cache slot past a sequence's length and every spare page or row holds NaN, so padding
that leaks fails, and the caches are checked slot by slot; kernel outputs are poisoned with
NaN before they are written.
"""

import math

import pytest
import torch
from test_attention_fp8 import _interpreter_e4m3_cast  # noqa: F401 (autouse fixture)
from test_attention_kvcache import HAS_TRITON, NO_SPILLS, _append_job, _attend_job, _paged
from test_attention_kvcache_packed import _exact, _to, assert_refused

import attnmem
from aot import compile_all
from attnmem.reference.rotary import rotary
from backends import BACKENDS
from tolerance import assert_close_to_float64

FP8, FP16, FP32 = torch.float8_e4m3fn, torch.float16, torch.float32

# name: (queries: a list of counts (packed) or Sq (padded), new tokens per sequence, H, Hkv,
# D, capacity, cache_seqlens, causal, window, page size, "rows" (cache_batch_idx) or None,
# dtype, extras: "mods" (softcap, sinks, ALiBi), "leftpad")
CASES = {
    # Rows of a cache pool (cache_batch_idx) with left padding; 7 queries x 2 heads a kv
    # head: one row tile of 16. The first sequence has 2 queries and no key (L = 0): zeros,
    # lse -inf; the third cache is clamped (38 to 35).
    "packed_rows_leftpad_clamped": ([2, 0, 3, 7], [0, 1, 5, 7], 4, 2, 24, 40, [0, 3, 38, 10],
                                    True, None, "rows", FP16, ("leftpad",)),
    # Queries padded to 3 while k is packed; -2 is clamped to 0 and 41 to 35.
    "padded_paged_window": (3, [5, 0, 7, 1], 4, 1, 33, 42, [20, 41, -2, 9], True, (6, 0), 7,
                            FP32, ()),
    # The second sequence has 6 queries but no new token: they align to its cache's end.
    "packed_paged_not_causal_mods": ([1, 6, 0], [7, 0, 5], 4, 2, 16, 32, [25, 4, 0], False,
                                     None, 8, FP32, ("mods",)),
}


def _cumulative(counts):
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(name, dtype=None):
    """q; contiguous caches with NaN from each sequence's clamped cache_seqlens on (and
    below its left padding); k, v packed (total_k_new, Hkv, D); cache_seqlens; the clamped
    ones; cu_seqlens_k_new; the keyword arguments (cu_seqlens_q, max_seqlen_q when packed)."""
    queries, new, heads, kv_heads, d, capacity, seqlens, causal, window, _, cdtype, extras = (
        CASES[name])
    dtype = dtype or cdtype
    batch = len(new)
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    cu_k = _cumulative(new)
    used = seqlens.clamp(min=0).minimum(capacity - cu_k.diff())
    slot = torch.arange(capacity)[None, :]
    padding = slot >= used[:, None]
    kwargs = dict(causal=causal, window=window)
    if "leftpad" in extras:
        kwargs["cache_leftpad"] = torch.tensor([0, 2, 3, 0][:batch], dtype=torch.int32)
        padding |= slot < kwargs["cache_leftpad"][:, None]
    caches = [torch.randn(batch, capacity, kv_heads, d, dtype=dtype)
              .masked_fill(padding[..., None, None], math.nan) for _ in range(2)]
    if isinstance(queries, list):
        q = torch.randn(sum(queries), heads, d, dtype=dtype)
        kwargs.update(cu_seqlens_q=_cumulative(queries), max_seqlen_q=max(queries))
    else:
        q = torch.randn(batch, queries, heads, d, dtype=dtype)
    k, v = (torch.randn(int(cu_k[-1]), kv_heads, d, dtype=dtype) for _ in range(2))
    if "mods" in extras:
        kwargs.update(softcap=1.5, sinks=torch.randn(heads), alibi_slopes=torch.rand(batch, heads))
    return q, caches, k, v, seqlens, used, cu_k, kwargs


def _written(caches, k, v, used, cu_k):
    """The caches with each sequence's new tokens written at its clamped cache_seqlens."""
    caches = [c.clone() for c in caches]
    for b in range(len(used)):
        rows = slice(*cu_k[b:b + 2].tolist())
        n = rows.stop - rows.start
        for cache, x in zip(caches, (k, v)):
            cache[b, used[b]:used[b] + n] = x[rows]
    return caches


def _layout(name, caches, used, cu_k):
    """The caches as the call takes them: contiguous, a shuffled paged pool with two spare
    pages of NaN (table entries past a sequence's pages -1), or rows of a shuffled pool with
    two spare rows (cache_batch_idx). -> (pools, keyword arguments, view back to (B, S_max,
    ...), the spare pages or rows)."""
    place = CASES[name][9]
    if place is None:
        return caches, {}, lambda pool: pool, None
    page = caches[0].shape[1] if place == "rows" else place
    order = torch.randperm(caches[0].shape[0] * caches[0].shape[1] // page + 2)
    (k_pool, table), (v_pool, _) = (_paged(c, page, order) for c in caches)
    if place == "rows":
        return ([k_pool, v_pool], dict(cache_batch_idx=table[:, 0]),
                lambda pool: pool[table[:, 0].long()], order[-2:])
    unused = torch.arange(table.shape[1]) * page >= (used + cu_k.diff())[:, None]
    return ([k_pool, v_pool], dict(block_table=table.masked_fill(unused, -1)),
            lambda pool: pool[table.long()].flatten(1, 2), order[-2:])


def _call(q, caches, k, v, seqlens, kwargs, backend):
    """out, lse of the call and the caches after it, on the CPU."""
    caches = [_to(c) for c in caches]
    with attnmem.use_backend(backend):
        out, lse = attnmem.attention_with_kvcache(
            _to(q), *caches, k=_to(k), v=_to(v), cache_seqlens=_to(seqlens), return_lse=True,
            **{n: _to(x) for n, x in kwargs.items()})
    return out.cpu(), lse.cpu(), *(c.cpu() for c in caches)


def _double(kwargs):
    return {n: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for n, x in kwargs.items()}


def _assert_close(out, lse, expect, base, dtype):
    """out, lse within twice torch's error (base, in dtype) of float64 (expect); a query
    that sees no key has lse -inf and outputs zeros."""
    seen = expect[1] > -math.inf
    assert torch.equal(lse > -math.inf, seen)
    rows = out.transpose(-3, -2) if out.ndim == 4 else out.transpose(0, 1)
    assert (rows[~seen] == 0).all(), "a query that sees no key outputs zeros"
    assert_close_to_float64([out, lse.masked_fill(~seen, 0).to(dtype)],
                            [expect[0], expect[1].masked_fill(~seen, 0)],
                            [base[0], base[1].masked_fill(~seen, 0).to(dtype)], dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_append_then_attend_float64(name, backend):
    """The caches end slot for slot as the new tokens written by hand leave them (spare
    pages and rows untouched); out and lse within twice torch's error of float64 attention
    over cache_seqlens[b] + n_new[b] keys."""
    q, caches, k, v, seqlens, used, cu_k, kwargs = _inputs(name)
    dtype = q.dtype
    written = _written(caches, k, v, used, cu_k)
    expect = _call(q.double(), [c.double() for c in written], None, None, used + cu_k.diff(),
                   _double(kwargs), "torch")
    pools, where, view, spare = _layout(name, caches, used, cu_k)
    args = dict(kwargs, **where, cu_seqlens_k_new=cu_k)
    base = _call(q, [p.clone() for p in pools], k, v, seqlens, args, "torch")
    out, lse, *after = _call(q, pools, k, v, seqlens, args, backend)
    for pool, cache in zip(after, written):
        _exact(view(pool), cache)
        if spare is not None:
            _exact(pool[spare], torch.full_like(pool[spare], math.nan))
    assert out.shape == (*q.shape[:-1], caches[1].shape[-1])
    _assert_close(out, lse, expect, base, dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_keys_at_their_slots_queries_at_their_positions(backend):
    """Rotary with GPT-NeoX pairs over 24 of 33 dims: key i of sequence b is rotated at its
    slot cache_seqlens[b] + i before it is written, and (causal) query i at its position
    L - Sq + i, which differs from cache_seqlens[b] + i where the counts differ."""
    q, caches, k, v, seqlens, used, cu_k, kwargs = _inputs("padded_paged_window")
    angle = torch.rand(caches[0].shape[1], 12, dtype=torch.float64) * 2 * math.pi
    cos, sin = angle.cos().float(), angle.sin().float()
    counts = cu_k.diff()
    positions = used.long()[:, None] + counts[:, None] - q.shape[1] + torch.arange(q.shape[1])
    q_rotated = rotary(q.double(), cos.double(), sin.double(), positions[..., None], False)
    k_rotated = torch.cat([
        rotary(k[None, cu_k[b]:cu_k[b + 1]].double(), cos.double(), sin.double(),
               (used[b] + torch.arange(counts[b]))[None, :, None], False)[0]
        for b in range(len(used))])
    written = _written([c.double() for c in caches], k_rotated, v.double(), used, cu_k)
    expect = _call(q_rotated, written, None, None, used + counts, _double(kwargs), "torch")
    args = dict(kwargs, cu_seqlens_k_new=cu_k, rotary_cos=cos, rotary_sin=sin)
    base = _call(q, [c.clone() for c in caches], k, v, seqlens, args, "torch")
    out, lse, *after = _call(q, caches, k, v, seqlens, args, backend)
    for got, cache in zip(after, written):
        torch.testing.assert_close(got.double(), cache, rtol=1e-5, atol=1e-5, equal_nan=True)
    _assert_close(out, lse, expect, base, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_before_the_first_key_pass_through_the_rotation(backend):
    """Padded q of 4 queries for a sequence of 1 key (0 cached, 1 new), a window of 8 keys
    back and unbounded ahead: queries 0 to 2 sit at a = -3 to -1, see the key and are not
    rotated (the tables have no row there; the kernels read none: NaN rows lie before the
    tables), query 3 at 0 is; the other sequence as ever. Against float64 with the rotation
    done by hand."""
    n_q, heads, dim, capacity = 4, 2, 16, 16
    q = torch.randn(2, n_q, heads, dim)
    caches = [torch.randn(2, capacity, 1, dim) for _ in range(2)]
    k, v = torch.randn(4, 1, dim), torch.randn(4, 1, dim)
    cu_k = torch.tensor([0, 1, 4], dtype=torch.int32)
    seqlens = torch.tensor([0, 5], dtype=torch.int32)
    angles = torch.rand(capacity, dim // 2) * 6
    tables = [torch.full((capacity + 8, dim // 2), math.nan) for _ in range(2)]
    for table, f in zip(tables, (torch.cos, torch.sin)):
        table[8:] = f(angles)
    cos, sin = (t[8:] for t in tables)
    args = dict(cache_seqlens=_to(seqlens), cu_seqlens_k_new=_to(cu_k), rotary_cos=_to(cos),
                rotary_sin=_to(sin), causal=False, window=(8, -1), return_lse=True)
    with attnmem.use_backend(backend):
        out, lse = attnmem.attention_with_kvcache(_to(q), *(_to(c) for c in caches), k=_to(k),
                                                  v=_to(v), **args)
    counts, rows, lses = cu_k.diff(), [], []
    for b in range(2):
        new = slice(int(cu_k[b]), int(cu_k[b + 1]))
        length = int(seqlens[b] + counts[b])
        slots = torch.arange(int(seqlens[b]), length)
        keys = caches[0][b, :length, 0].double().clone()
        values = caches[1][b, :length, 0].double().clone()
        keys[slots] = rotary(k[new, 0].double(), cos.double(), sin.double(), slots, False)
        values[slots] = v[new, 0].double()
        positions = torch.arange(n_q) + length - n_q
        qb = q[b].double()
        turned = rotary(qb, cos.double(), sin.double(), positions.clamp(min=0)[:, None], False)
        qb = torch.where((positions >= 0)[:, None, None], turned, qb)
        scores = torch.einsum("qhd,kd->hqk", qb, keys) / math.sqrt(dim)
        keep = torch.arange(length)[None, :] >= positions[:, None] - 8
        scores = scores.masked_fill(~keep, float("-inf"))
        rows.append((torch.softmax(scores, -1) @ values).transpose(0, 1))
        lses.append(torch.logsumexp(scores, -1))
    torch.testing.assert_close(out.cpu().double(), torch.stack(rows), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), torch.stack(lses), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_cache_as_append_then_attend(backend):
    """A float8_e4m3fn paged cache with (B, Hkv) descales: the same bytes in the cache as
    the twin's kvcache_append of the same packed tokens (cu_seqlens), and the same out and
    lse as the attention after it over cache_seqlens[b] + n_new[b] keys."""
    q, caches, k, v, seqlens, used, cu_k, kwargs = _inputs("packed_paged_not_causal_mods")
    q, k, v = q.half(), k.half() * 4, v.half() * 4
    kwargs = {n: x for n, x in kwargs.items() if n not in ("softcap", "sinks", "alibi_slopes")}
    descales = {n: 0.02 + 0.48 * torch.rand(len(used), caches[0].shape[2])
                for n in ("k_descale", "v_descale")}
    caches = [(c * 4).to(FP8) for c in caches]
    pools, where, view, spare = _layout("packed_paged_not_causal_mods", caches, used, cu_k)
    expect_pools = [_to(p.clone()) for p in pools]
    with attnmem.use_backend("torch"):  # the twin's bytes, apart from the kernels'
        attnmem.kvcache_append(*expect_pools, _to(k), _to(v), cache_seqlens=_to(seqlens),
                               cu_seqlens=_to(cu_k), max_seqlen=int(cu_k.diff().max()),
                               **{n: _to(x) for n, x in dict(where, **descales).items()})
    expect = _call(q, expect_pools, None, None, used + cu_k.diff(),
                   dict(kwargs, **where, **descales), backend)
    out, lse, *after = _call(q, pools, k, v, seqlens,
                             dict(kwargs, **where, **descales, cu_seqlens_k_new=cu_k), backend)
    for pool, cache in zip(after, expect[2:]):
        assert torch.equal(pool.view(torch.uint8), cache.view(torch.uint8))
    torch.testing.assert_close(out, expect[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, expect[1], rtol=1e-6, atol=1e-6)


def test_no_new_tokens_writes_nothing():
    """k of no rows (every count 0): no append runs, the caches stay as they were and the
    result is the call without k (the kernels' sequences of no new tokens are in the cases
    above)."""
    backend = "torch"
    q, caches, k, v, seqlens, used, _, kwargs = _inputs("packed_paged_not_causal_mods")
    empty, cu_k = k[:0], torch.zeros(len(used) + 1, dtype=torch.int32)
    expect = _call(q, caches, None, None, seqlens, kwargs, backend)
    got = _call(q, [c.clone() for c in caches], empty, empty, seqlens,
                dict(kwargs, cu_seqlens_k_new=cu_k), backend)
    for x, y in zip(got, expect):
        _exact(x, y)


def _good():
    """A valid call: padded q (3 sequences of 2 queries); 1, 0 and 4 new tokens."""
    return dict(q=torch.randn(3, 2, 4, 16), k_cache=torch.randn(3, 16, 2, 16),
                v_cache=torch.randn(3, 16, 2, 16), k=torch.randn(5, 2, 16),
                v=torch.randn(5, 2, 16), cache_seqlens=torch.tensor([3, 5, 0], dtype=torch.int32),
                cu_seqlens_k_new=torch.tensor([0, 1, 1, 5], dtype=torch.int32))


ERRORS = {
    "not_tensor": (dict(cu_seqlens_k_new=[0, 1, 1, 5]), TypeError,
                   "cu_seqlens_k_new must be a torch.Tensor"),
    "int64": (dict(cu_seqlens_k_new=torch.tensor([0, 1, 1, 5])), TypeError,
              "cu_seqlens_k_new must be int32"),
    "batch": (dict(cu_seqlens_k_new=torch.tensor([0, 1, 5], dtype=torch.int32)), ValueError,
              "cu_seqlens_k_new must be (B + 1,) = (4,)"),
    "start": (dict(cu_seqlens_k_new=torch.tensor([1, 1, 1, 5], dtype=torch.int32)), ValueError,
              "cu_seqlens_k_new must start at 0"),
    "decreasing": (dict(cu_seqlens_k_new=torch.tensor([0, 3, 1, 5], dtype=torch.int32)),
                   ValueError, "cu_seqlens_k_new must be nondecreasing"),
    "end": (dict(cu_seqlens_k_new=torch.tensor([0, 1, 1, 4], dtype=torch.int32)), ValueError,
            "cu_seqlens_k_new must end at the 5 packed rows"),
    "past_capacity": (dict(k=torch.randn(20, 2, 16), v=torch.randn(20, 2, 16),
                           cu_seqlens_k_new=torch.tensor([0, 1, 1, 20], dtype=torch.int32)),
                      ValueError, "the cache's capacity = 16 is less than the longest"),
    "without_k": (dict(k=None, v=None), ValueError, "cu_seqlens_k_new packs the new tokens"),
    "k_padded": (dict(k=torch.randn(3, 2, 2, 16)), ValueError,
                 "k must be (total_k_new, Hkv, D), packed by cu_seqlens_k_new"),
    "v_rows": (dict(v=torch.randn(4, 2, 16)), ValueError,
               "v must be (total_k_new, Hkv, Ev), packed by cu_seqlens_k_new = (5, 2, 16)"),
    "int_seqlens_no_room": (dict(cache_seqlens=13), ValueError, "must lie in [0, 12]"),
    "strided": (dict(cu_seqlens_k_new=torch.tensor([0, 9, 1, 9, 1, 9, 5],
                                                   dtype=torch.int32)[::2]), ValueError,
                "cu_seqlens_k_new must be contiguous, got stride 2"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_name_the_argument(name):
    assert_refused(_good(), *ERRORS[name])


def test_append_grid_past_cuda_limit_is_refused():
    """The append runs a program per packed row of k: past CUDA's 2^31 - 1 programs the
    triton backend says why (and auto picks torch); below, it takes them."""
    from attnmem import kvcache

    q, caches = torch.zeros(2, 1, 4, 16), [torch.zeros(2, 8, 2, 16)] * 2
    cu_k = torch.zeros(3, dtype=torch.int32)
    for rows, refused in ((2 ** 31, True), (2 ** 31 - 1, False)):
        k = torch.zeros(1, 1, 16).expand(rows, 2, -1)
        reasons = kvcache._triton_reasons(q, *caches, k=k, cu_seqlens_k_new=cu_k)
        assert bool(reasons) == refused and all("packed rows" in r for r in reasons)


def _packed_k(job):
    job["constexprs"]["PACKED_K"] = True
    job["pointers"]["cu_seqlens_k_new_ptr"] = "i32"
    return dict(job, expect=NO_SPILLS)


def _rotary(job):
    job["constexprs"].update(ROTARY_DIM=64, ROTARY_PER_QUERY=True)
    job["pointers"].update(cos_ptr="fp32", sin_ptr="fp32")
    return job


# The PACKED_K append (paged, e4m3 cache) and attention (packed queries, paged, split, rotary
# per query), bfloat16 and head dim 128, on sm_90.
JOBS = {
    "append-paged-fp8_kv": _append_job(90, "bfloat16", 128, 8, True, fp8_kv=True, packed=True),
    "attend-packed-paged-split-rotary": _packed_k(_rotary(
        _attend_job(90, "bfloat16", 128, 8, True, True, packed=True))),
} if HAS_TRITON else {}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_packed_k_kernels_compile_for_sm90_without_spills():
    for name, result in zip(JOBS, compile_all(list(JOBS.values()))):
        assert result["error"] is None, (name, result["error"])
        assert result["spill_stores"] == result["spill_loads"] == 0, (name, result)
