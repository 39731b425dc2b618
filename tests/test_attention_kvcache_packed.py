"""attnmem.attention_with_kvcache over packed queries (cu_seqlens_q, FlashAttention-3's mixed
prefill/decode batches) against float64 of the same attention computed per sequence by the
padded API on each sequence alone: contiguous and paged caches, GQA, lengths of 0 and 1
query and chunks longer than a tile, with and without appended tokens (the caches checked
slot by slot after the append), causal and windows, odd head dims, score modifications, an
FP8 cache; bad inputs; torch.compile; the sm_90 builds of the packed kernels (slow).

Every cache slot past a sequence's length holds NaN, so padding that leaks fails, and kernel
outputs are poisoned with NaN before they are written.
"""

import math
import re

import pytest
import torch
from test_attention_fp8 import _interpreter_e4m3_cast  # noqa: F401 (autouse fixture)
from test_attention_kvcache import _paged

import attnmem
from backends import BACKENDS, DEVICE
from tolerance import assert_close_to_float64

FP8 = torch.float8_e4m3fn

# name: (queries per sequence, H, Hkv, D, capacity, cache_seqlens, append, causal, window,
# page size or None, dtype, score modifications)
CASES = {
    # 21 queries x 4 heads: 6 row tiles of 16 under the interpreter; the last cache is clamped.
    "mixed_gqa_append": ([1, 0, 21, 3], 8, 2, 40, 64, [30, 5, 10, 63], True, True, None, None,
                         torch.float16, False),
    "mixed_paged_window_mods": ([5, 1, 0, 18], 4, 4, 33, 49, [20, 48, 0, 12], True, True,
                                (6, 0), 7, torch.float32, True),
    "no_append_paged_both_sides": ([3, 1, 0, 17], 4, 1, 16, 32, [32, 9, 4, 20], False, False,
                                   (5, 2), 8, torch.float32, False),
    # Decoding only (max_seqlen_q 1), one split of the keys (a capacity of one key tile):
    # the attention writes out directly.
    "decode_one_split_mods": ([1, 0, 1], 4, 2, 24, 16, [14, 3, 16], True, True, None, None,
                       torch.float32, True),
}


def _inputs(name, dtype):
    """q (total_q, H, D); contiguous caches with NaN from each sequence's cache_seqlens on;
    new k, v (total_q, Hkv, D) or None; cache_seqlens; cu_seqlens_q; the keyword arguments."""
    lengths, heads, kv_heads, d, capacity, seqlens, new, causal, window, _, _, mods = CASES[name]
    batch, total = len(lengths), sum(lengths)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    used = seqlens.clamp(min=0).minimum(capacity - torch.tensor(lengths, dtype=torch.int32) * new)
    caches = []
    for _ in range(2):
        cache = torch.randn(batch, capacity, kv_heads, d, dtype=dtype)
        past = torch.arange(capacity)[None, :] >= used[:, None]
        caches.append(cache.masked_fill(past[..., None, None], math.nan))
    q = torch.randn(total, heads, d, dtype=dtype)
    k, v = (torch.randn(total, kv_heads, d, dtype=dtype) if new else None for _ in range(2))
    kwargs = dict(causal=causal, window=window)
    if mods:
        kwargs.update(softcap=1.5, sinks=torch.randn(heads),
                      alibi_slopes=torch.rand(batch, heads))
    return q, *caches, k, v, seqlens, cu_seqlens, kwargs


def _to(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def _packed(q, k_cache, v_cache, k, v, seqlens, cu_seqlens, kwargs, backend, block_table=None):
    """out, lse of the packed call and the caches after it, on the CPU."""
    k_cache, v_cache = _to(k_cache), _to(v_cache)
    with attnmem.use_backend(backend):
        out, lse = attnmem.attention_with_kvcache(
            _to(q), k_cache, v_cache, k=_to(k), v=_to(v), cache_seqlens=_to(seqlens),
            block_table=_to(block_table), return_lse=True, cu_seqlens_q=_to(cu_seqlens),
            max_seqlen_q=int(cu_seqlens.diff().max()), **{n: _to(x) for n, x in kwargs.items()})
    return out.cpu(), lse.cpu(), k_cache.cpu(), v_cache.cpu()


def _per_sequence(q, k_cache, v_cache, k, v, seqlens, cu_seqlens, kwargs, backend, dtype=None):
    """The same attention by the padded API on each sequence alone (in dtype, default the
    inputs'), packed the same way: out, lse and the caches after."""
    cast = lambda x: x if x is None or dtype is None else x.to(dtype)  # noqa: E731
    k_cache, v_cache = cast(k_cache).clone(), cast(v_cache).clone()
    outs, lses = [], []
    for b in range(len(seqlens)):
        rows = slice(*cu_seqlens[b:b + 2].tolist())
        own = {n: x[b:b + 1] if n in ("alibi_slopes", "k_descale", "v_descale") else x
               for n, x in kwargs.items()}
        with attnmem.use_backend(backend):
            out, lse = attnmem.attention_with_kvcache(
                cast(q)[None, rows], k_cache[b:b + 1], v_cache[b:b + 1],
                k=None if k is None else cast(k)[None, rows],
                v=None if v is None else cast(v)[None, rows], cache_seqlens=seqlens[b:b + 1],
                return_lse=True, **own)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, 1), k_cache, v_cache


def _exact(got, expect):
    torch.testing.assert_close(got, expect, rtol=0, atol=0, equal_nan=True)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_per_sequence_float64(name, backend):
    """Out and lse within twice torch's error of float64 per sequence; the append writes each
    sequence's new tokens at its cache_seqlens (clamped) and nothing else, through its pages
    when paged (table entries past a sequence's pages are -1: never read)."""
    dtype, page_size = CASES[name][10], CASES[name][9]
    q, k_cache, v_cache, k, v, seqlens, cu_seqlens, kwargs = _inputs(name, dtype)
    expect = _per_sequence(q, k_cache, v_cache, k, v, seqlens, cu_seqlens,
                           {n: x.double() if isinstance(x, torch.Tensor) else x
                            for n, x in kwargs.items()}, "torch", torch.float64)
    base = _per_sequence(q, k_cache, v_cache, k, v, seqlens, cu_seqlens, kwargs, "torch")
    if page_size is None:
        out, lse, *caches = _packed(q, k_cache, v_cache, k, v, seqlens, cu_seqlens, kwargs,
                                    backend)
    else:
        order = torch.randperm(k_cache.shape[0] * k_cache.shape[1] // page_size + 2)
        (k_pool, table), (v_pool, _) = (_paged(c, page_size, order) for c in (k_cache, v_cache))
        n_new = cu_seqlens.diff() * (k is not None)
        length = seqlens.clamp(min=0).minimum(k_cache.shape[1] - n_new) + n_new
        unused = torch.arange(table.shape[1]) * page_size >= length[:, None]
        out, lse, *pools = _packed(q, k_pool, v_pool, k, v, seqlens, cu_seqlens, kwargs,
                                   backend, table.masked_fill(unused, -1))
        caches = [pool[table.long()].flatten(1, 2) for pool in pools]
        for pool in pools:  # the spare pages
            _exact(pool[order[-2:]], torch.full_like(pool[order[-2:]], math.nan))
    for got, want in zip(caches, base[2:]):
        _exact(got, want)
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    seen = expect[1] > -math.inf
    assert torch.equal(lse > -math.inf, seen)
    assert (out.transpose(0, 1)[~seen] == 0).all(), "a query that sees no key outputs zeros"
    assert_close_to_float64([out, lse.masked_fill(~seen, 0).to(dtype)],
                            [expect[0], expect[1].masked_fill(~seen, 0)],
                            [base[0], base[1].masked_fill(~seen, 0).to(dtype)], dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_cache_matches_per_sequence(backend):
    """A float8_e4m3fn paged cache with (B, Hkv) descales: the packed call quantizes the same
    bytes into the cache as the padded API run on each sequence alone, and attends alike
    (tests/test_attention_kvcache_fp8.py checks the padded API against float64)."""
    q, k_cache, v_cache, k, v, seqlens, cu_seqlens, kwargs = _inputs("mixed_paged_window_mods",
                                                                     torch.float16)
    descales = {n: 0.02 + 0.48 * torch.rand(len(seqlens), k_cache.shape[2])
                for n in ("k_descale", "v_descale")}
    k_cache, v_cache = ((c.float() * 4).to(FP8) for c in (k_cache, v_cache))
    kwargs.update(descales)
    page_size = CASES["mixed_paged_window_mods"][9]
    order = torch.randperm(k_cache.shape[0] * k_cache.shape[1] // page_size + 2)
    (k_pool, table), (v_pool, _) = (_paged(c, page_size, order) for c in (k_cache, v_cache))
    out, lse, *pools = _packed(q, k_pool, v_pool, k, v, seqlens, cu_seqlens, kwargs, backend,
                               table)
    expect = _per_sequence(*map(_to, (q, k_cache, v_cache, k, v, seqlens)), cu_seqlens,
                           {n: _to(x) for n, x in kwargs.items()}, backend)
    for pool, cache in zip(pools, expect[2:]):
        assert torch.equal(pool[table.long()].flatten(1, 2).view(torch.uint8),
                           cache.cpu().view(torch.uint8))
    torch.testing.assert_close(out, expect[0].cpu(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse, expect[1].cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_batch_idx_matches_the_rows_it_picks(backend):
    """Packed queries over rows cache_batch_idx of a shuffled cache pool (spare rows of NaN):
    the same out, lse and appends as those rows passed as the cache."""
    q, k_cache, v_cache, k, v, seqlens, cu_seqlens, kwargs = _inputs("mixed_gqa_append",
                                                                     torch.float16)
    # A pool of one page per row: the table's one column is cache_batch_idx.
    order = torch.randperm(len(seqlens) + 2)
    (k_pool, table), (v_pool, _) = (_paged(c, c.shape[1], order) for c in (k_cache, v_cache))
    expect = _packed(q, k_cache, v_cache, k, v, seqlens, cu_seqlens, kwargs, backend)
    got = _packed(q, k_pool, v_pool, k, v, seqlens, cu_seqlens,
                  dict(kwargs, cache_batch_idx=table[:, 0]), backend)
    torch.testing.assert_close(got[:2], expect[:2], rtol=1e-3, atol=1e-3)
    for pool, cache in zip(got[2:], expect[2:]):
        _exact(pool[table[:, 0].long()], cache)
        _exact(pool[order[-2:]], torch.full_like(pool[order[-2:]], math.nan))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_empty(backend):
    """q with strided heads and rows, k and v strided, caches that are slices of larger ones:
    the contiguous copies' result. No queries at all (B = 0, or sequences of length 0, with
    a max_seqlen_q of 0 or more): empty out (0, H, D) and lse (H, 0)."""
    q, k_cache, v_cache, k, v, seqlens, cu_seqlens, kwargs = _inputs("decode_one_split_mods",
                                                                     torch.float32)
    expect = _packed(q, k_cache.clone(), v_cache.clone(), k, v, seqlens, cu_seqlens, kwargs,
                     backend)
    strided_q = torch.stack([q, q], 2)[:, :, 1]
    strided_k, strided_v = (torch.stack([x, x], 2)[:, :, 0] for x in (k, v))
    views = []
    for cache in (k_cache, v_cache):
        big = torch.randn(cache.shape[0], cache.shape[1] + 3, 2 * cache.shape[2], cache.shape[3])
        big[:, 3:, 1::2] = cache
        views.append(big[:, 3:, 1::2])
    got = _packed(strided_q, *views, strided_k, strided_v, seqlens, cu_seqlens, kwargs, backend)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6, equal_nan=True)
    for batch, max_seqlen_q in ((0, 0), (2, 0), (2, 3)):
        q, k = torch.randn(0, 4, 16, device=DEVICE), torch.randn(0, 2, 16, device=DEVICE)
        cache = torch.randn(batch, 8, 2, 16, device=DEVICE)
        with attnmem.use_backend(backend):
            out, lse = attnmem.attention_with_kvcache(
                q, cache, cache.clone(), k=k, v=k, cache_seqlens=3,
                cu_seqlens_q=torch.zeros(batch + 1, dtype=torch.int32, device=DEVICE),
                max_seqlen_q=max_seqlen_q, return_lse=True)
        assert out.shape == (0, 4, 16) and lse.shape == (4, 0)


def _good():
    """A valid packed call: 3 sequences of 2, 0 and 3 queries."""
    return dict(q=torch.randn(5, 4, 16), k_cache=torch.randn(3, 32, 2, 16),
                v_cache=torch.randn(3, 32, 2, 16), k=torch.randn(5, 2, 16),
                v=torch.randn(5, 2, 16), cache_seqlens=torch.tensor([3, 5, 0], dtype=torch.int32),
                cu_seqlens_q=torch.tensor([0, 2, 2, 5], dtype=torch.int32), max_seqlen_q=3)


ERRORS = {
    "q_4d": (dict(q=torch.zeros(1, 5, 4, 16)), ValueError, "q must be (total_q, H, D)"),
    "cu_not_tensor": (dict(cu_seqlens_q=[0, 2, 2, 5]), TypeError,
                      "cu_seqlens_q must be a torch.Tensor"),
    "cu_int64": (dict(cu_seqlens_q=torch.tensor([0, 2, 2, 5])), TypeError,
                 "cu_seqlens_q must be int32"),
    "cu_2d": (dict(cu_seqlens_q=torch.zeros(2, 2, dtype=torch.int32)), ValueError,
              "cu_seqlens_q must be (B + 1,)"),
    "cu_end": (dict(cu_seqlens_q=torch.tensor([0, 2, 2, 4], dtype=torch.int32)), ValueError,
               "cu_seqlens_q must end at the 5 packed rows"),
    "cu_start": (dict(cu_seqlens_q=torch.tensor([1, 2, 2, 5], dtype=torch.int32)), ValueError,
                 "cu_seqlens_q must start at 0"),
    "cu_decreasing": (dict(cu_seqlens_q=torch.tensor([0, 3, 2, 5], dtype=torch.int32)),
                      ValueError, "cu_seqlens_q must be nondecreasing"),
    "cu_batch": (dict(cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError,
                 "k_cache has batch 3 but cu_seqlens_q has 2 sequences"),
    "max_seqlen_small": (dict(max_seqlen_q=2), ValueError,
                         "max_seqlen_q = 2 is less than the longest sequence"),
    "max_seqlen_sizes": (dict(max_seqlen_q=1), ValueError, "max_seqlen_q = 1 cannot hold 5 rows"),
    "max_seqlen_none": (dict(max_seqlen_q=None), TypeError, "max_seqlen_q must be an int"),
    "max_seqlen_float": (dict(max_seqlen_q=3.0), TypeError, "max_seqlen_q must be an int"),
    "max_seqlen_alone": (dict(cu_seqlens_q=None, q=torch.zeros(3, 1, 4, 16),
                              k=None, v=None), ValueError, "max_seqlen_q applies to packed"),
    "max_seqlen_past_capacity": (dict(max_seqlen_q=33), ValueError,
                                 "k holds 33 new tokens (max_seqlen_q)"),
    "k_other_packing": (dict(k=torch.zeros(4, 2, 16), v=torch.zeros(4, 2, 16)), ValueError,
                        "k must be (total_q, Hkv, D), packed as q = (5, 2, 16)"),
    "k_padded": (dict(k=torch.zeros(3, 3, 2, 16)), ValueError, "k must be (total_q, Hkv, D)"),
    "v_dtype": (dict(v=torch.zeros(5, 2, 16, dtype=torch.float64)), TypeError,
                "v must have q's dtype"),
    "cache_dtype": (dict(k_cache=torch.zeros(3, 32, 2, 16, dtype=torch.float16)), TypeError,
                    "k_cache must have q's dtype"),
    "seqlens_shape": (dict(cache_seqlens=torch.zeros(5, dtype=torch.int32)), ValueError,
                      "cache_seqlens must have shape (B,) = (3,)"),
    "seqlens_int_no_room": (dict(cache_seqlens=30), ValueError, "must lie in [0, 29]"),
    "table_batch": (dict(k_cache=torch.zeros(8, 8, 2, 16), v_cache=torch.zeros(8, 8, 2, 16),
                         block_table=torch.zeros(5, 4, dtype=torch.int32)), ValueError,
                    "block_table must be (B, max_blocks) with B = 3"),
    "alibi_batch": (dict(alibi_slopes=torch.zeros(5, 4)), ValueError,
                    "alibi_slopes must be (H,) = (4,) or (B, H) = (3, 4)"),
}


def assert_refused(args, change, error, match):
    """attention_with_kvcache of the call `args` (a dict of every argument) with `change`
    applied raises `error` whose message holds `match`."""
    args = dict(args, **change)
    q, k_cache, v_cache = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
    with pytest.raises(error, match=re.escape(match)):
        attnmem.attention_with_kvcache(q, k_cache, v_cache, **args)


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_name_the_argument(name):
    assert_refused(_good(), *ERRORS[name])


def test_opcheck_and_torch_compile():
    """The custom ops' schemas and fakes with packed queries (lse (H, total_q)), and a
    torch.compile(fullgraph=True) trace that appends and attends as the eager call."""
    from attnmem import kvcache

    args = _good()
    packing = (args["cu_seqlens_q"], 3)
    seqlens = args["cache_seqlens"]
    torch.library.opcheck(kvcache._append.default, (
        args["q"], args["k_cache"], args["v_cache"], args["k"], args["v"], seqlens, None, "torch",
        None, *packing))
    torch.library.opcheck(kvcache._attend.default, (
        args["q"], args["k_cache"], args["v_cache"], seqlens, None, 5, 0.25, 3, 0, "torch", 0.0,
        None, None, None, *packing))
    q, k_cache, v_cache = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
    eager_cache = k_cache.clone()
    expect = attnmem.attention_with_kvcache(q, eager_cache, v_cache.clone(), **args)
    fn = torch.compile(lambda *a, **kw: attnmem.attention_with_kvcache(*a, **kw),
                       backend="eager", fullgraph=True)
    got = fn(q, k_cache, v_cache, **args)
    _exact(got, expect)
    _exact(k_cache, eager_cache)


def test_grid_past_cuda_limit_is_refused():
    """The attention's grid is sized by max_seqlen_q: past CUDA's 2^31 - 1 programs on its first
    axis the triton backend says why (and auto picks torch); below, it takes them."""
    from attnmem import kvcache

    q = torch.zeros(1, 1, 16).expand(5, 8, -1)
    caches = [torch.zeros(1, 1, 1, 16).expand(2 ** 16, 4, 2, -1)] * 2
    cu_seqlens = torch.zeros(2 ** 16 + 1, dtype=torch.int32)
    [reason] = kvcache._triton_reasons(q, *caches, cu_seqlens, 2 ** 16)
    assert "65536 sequences of up to max_seqlen_q = 65536 queries need" in reason
    assert kvcache._triton_reasons(q, *caches, cu_seqlens, 2 ** 13) == []
