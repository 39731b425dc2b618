"""attnmem.attention_with_kvcache against float64 on fresh random inputs: contiguous and paged
caches (shuffled page tables, odd page sizes), with and without appended tokens, one and
several queries, GQA and MHA, causal or not, windows, ragged lengths from 0 to full. Every
cache slot past a sequence's length holds NaN, so padding that leaks fails; the append is
checked slot by slot. Kernel outputs are poisoned with NaN before they are written.
"""

import importlib.util
import math
import re

import pytest
import torch

import attnmem
from aot import TRITON_TYPES, compile_all
from attnmem.reference import kvcache as twin
from backends import BACKENDS, DEVICE, DTYPE_IDS, DTYPES
from tolerance import assert_close_to_float64

HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNEL = "triton" in BACKENDS

# name: (B, Sq, H, Hkv, D, capacity, cache_seqlens, append, causal, window)
CASES = {
    "decode_gqa8": (3, 1, 8, 1, 64, 80, [79, 0, 30], True, True, None),
    "decode_no_append": (2, 1, 4, 4, 32, 64, [64, 1], False, True, None),
    "chunk_mha": (2, 3, 4, 4, 40, 48, [0, 45], True, True, None),
    "chunk_no_append": (3, 2, 4, 2, 24, 48, [0, 48, 17], False, True, None),
    "not_causal_odd_dim": (2, 4, 2, 1, 33, 56, [5, 20], True, False, None),
    "window_gqa": (2, 3, 8, 2, 16, 64, [40, 3], True, True, (7, 0)),
    "window_both_sides": (2, 5, 2, 2, 16, 48, [30, 2], False, False, (4, 2)),
    "head_dim_3": (2, 2, 4, 2, 3, 32, [10, 30], True, True, None),
    "row_tiles": (2, 7, 8, 2, 32, 64, [20, 57], True, True, None),  # 28 rows: 2 tiles of 16
    "row_tiles_window": (2, 9, 4, 2, 16, 48, [30, 0], True, False, (5, 1)),
    "empty_cache": (2, 2, 2, 1, 16, 32, [0, 0], False, True, None),
    "clamped": (2, 2, 2, 2, 16, 32, [99, -3], True, True, None),
}
PAGE_SIZE = {"decode_gqa8": 16, "chunk_mha": 12, "not_causal_odd_dim": 7, "window_gqa": 8,
             "head_dim_3": 1, "clamped": 16, "row_tiles": 16, "row_tiles_window": 6}


def _inputs(name, dtype):
    """q, contiguous caches with NaN from every sequence's cache_seqlens on (the slots the
    append fills, and those past them), new k and v (or None), cache_seqlens, and the
    keyword arguments."""
    batch, n_q, heads, kv_heads, d, capacity, seqlens, new, causal, window = CASES[name]
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    n_new = n_q if new else 0
    used = seqlens.clamp(0, capacity - n_new)
    caches = []
    for _ in range(2):
        cache = torch.randn(batch, capacity, kv_heads, d, dtype=dtype)
        past = torch.arange(capacity)[None, :] >= used[:, None]
        caches.append(cache.masked_fill(past[..., None, None], math.nan))
    q = torch.randn(batch, n_q, heads, d, dtype=dtype)
    k, v = (torch.randn(batch, n_q, kv_heads, d, dtype=dtype) if new else None
            for _ in range(2))
    return q, *caches, k, v, seqlens, dict(causal=causal, window=window)


def _paged(cache, page_size, order):
    """A pool (pages, page_size, Hkv, D) holding cache's pages at shuffled places, two spare
    pages of NaN, and the block table."""
    batch, capacity = cache.shape[:2]
    blocks = capacity // page_size
    pool = torch.full((batch * blocks + 2, page_size, *cache.shape[2:]), math.nan,
                      dtype=cache.dtype)
    table = order[:batch * blocks].view(batch, blocks).to(torch.int32)
    pool[table.long()] = cache.view(batch, blocks, page_size, *cache.shape[2:])
    return pool, table


def _run(q, k_cache, v_cache, k, v, seqlens, kwargs, backend, block_table=None):
    """out, lse and the caches after the call, on DEVICE."""
    to = lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x  # noqa: E731
    k_cache, v_cache = to(k_cache), to(v_cache)
    with attnmem.use_backend(backend):
        out, lse = attnmem.attention_with_kvcache(
            to(q), k_cache, v_cache, k=to(k), v=to(v), cache_seqlens=to(seqlens),
            block_table=to(block_table), return_lse=True,
            **{name: to(x) for name, x in kwargs.items()})
    return out.cpu(), lse.cpu(), k_cache.cpu(), v_cache.cpu()


def _expected_caches(k_cache, v_cache, k, v, seqlens):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    if k is not None:
        start = seqlens.clamp(0, k_cache.shape[1] - k.shape[1])
        for b in range(len(seqlens)):
            k_cache[b, start[b]:start[b] + k.shape[1]] = k[b]
            v_cache[b, start[b]:start[b] + k.shape[1]] = v[b]
    return k_cache, v_cache


def _exact(got, expect):
    torch.testing.assert_close(got, expect, rtol=0, atol=0, equal_nan=True)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, dtype, backend):
    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs(name, dtype)
    out, lse, k_after, v_after = _run(q, k_cache.clone(), v_cache.clone(), k, v, seqlens,
                                      kwargs, backend)
    # The append writes the new tokens at cache_seqlens and nothing else.
    for got, expect in zip((k_after, v_after), _expected_caches(k_cache, v_cache, k, v, seqlens)):
        _exact(got, expect)
    double = lambda x: None if x is None else x.double()  # noqa: E731
    expect = _run(double(q), double(k_cache), double(v_cache), double(k), double(v), seqlens,
                  kwargs, "torch")
    base = _run(q, k_cache.clone(), v_cache.clone(), k, v, seqlens, kwargs, "torch")
    assert_matches_float64(out, lse, expect, base, dtype)


def assert_matches_float64(out, lse, expect, base, dtype):
    """out and lse against expect's (float64), within twice base's error (torch in dtype);
    queries that see no key (lse -inf in expect) have lse -inf and output zeros."""
    seen = expect[1] > -math.inf
    assert torch.equal(lse > -math.inf, seen)
    assert (out.transpose(1, 2)[~seen] == 0).all(), "a query that sees no key outputs zeros"
    assert_close_to_float64([out, lse.masked_fill(~seen, 0).to(dtype)],
                            [expect[0], expect[1].masked_fill(~seen, 0)],
                            [base[0], base[1].masked_fill(~seen, 0).to(dtype)], dtype)


@pytest.mark.parametrize("name", ["window_gqa", "window_both_sides", "chunk_no_append"])
def test_twin_matches_the_definition(name):
    """The twin against the docstring's mask written out over the whole cache: query i of
    sequence b sits at a = L - Sq + i and sees key j < L with a - l <= j <= a + r."""
    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs(name, torch.float64)
    out, lse, k_cache, v_cache = _run(q, k_cache, v_cache, k, v, seqlens, kwargs, "torch")
    n_q, group = q.shape[1], q.shape[2] // k_cache.shape[2]
    left, right = kwargs["window"] or (-1, -1)
    right = 0 if kwargs["causal"] else right
    length = seqlens + (n_q if k is not None else 0)
    a = (length - n_q)[:, None, None] + torch.arange(n_q)[None, :, None]
    j = torch.arange(k_cache.shape[1])
    keep = j < length[:, None, None]
    keep = keep & ((j >= a - left) if left >= 0 else True) & ((j <= a + right) if right >= 0
                                                              else True)
    kk, vv = (c.nan_to_num().repeat_interleave(group, 2) for c in (k_cache, v_cache))
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~keep[:, None], -math.inf)
    expect_lse = scores.logsumexp(-1)
    weights = torch.exp(scores - expect_lse[..., None]).nan_to_num()
    expect = torch.einsum("bhij,bjhd->bihd", weights, vv)
    torch.testing.assert_close(lse, expect_lse)
    torch.testing.assert_close(out, expect)


# name: (case, softcap, sinks, ALiBi slopes' shape "h" (H,) or "bh" (B, H), or None)
MOD_CASES = {
    "decode_gqa8_all": ("decode_gqa8", 1.5, True, "bh"),
    "window_gqa_all": ("window_gqa", 2.0, True, "h"),
    "row_tiles_window_softcap_alibi": ("row_tiles_window", 1.0, False, "h"),
    "empty_cache_sinks": ("empty_cache", None, True, None),
}


def _mods(name, q):
    batch, _, heads, _ = q.shape
    _, softcap, sinks, alibi = MOD_CASES[name]
    return dict(softcap=softcap, sinks=torch.randn(heads) * 2 if sinks else None,
                alibi_slopes=None if alibi is None else
                torch.rand((heads,) if alibi == "h" else (batch, heads)))


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MOD_CASES))
def test_softcap_sinks_alibi_match_float64(name, backend):
    """softcap, sinks and ALiBi slopes, as attnmem.attention takes them, against the twin
    in float64; a query that sees no key outputs zeros and has lse = its head's sink."""
    dtype = torch.float32
    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs(MOD_CASES[name][0], dtype)
    mods = _mods(name, q)
    out, lse, *_ = _run(q, k_cache.clone(), v_cache.clone(), k, v, seqlens,
                        dict(kwargs, **mods), backend)
    double = lambda x: None if x is None else x.double()  # noqa: E731
    expect = _run(double(q), double(k_cache), double(v_cache), double(k), double(v), seqlens,
                  dict(kwargs, **mods), "torch")
    base = _run(q, k_cache.clone(), v_cache.clone(), k, v, seqlens, dict(kwargs, **mods),
                "torch")
    if mods["sinks"] is not None:  # every row has its sink to see
        assert torch.isfinite(lse).all()
    assert_close_to_float64([out, lse.nan_to_num(neginf=0.0).to(dtype)],
                            [expect[0], expect[1].nan_to_num(neginf=0.0)],
                            [base[0], base[1].nan_to_num(neginf=0.0).to(dtype)], dtype)
    if name == "empty_cache_sinks":
        assert (out == 0).all()
        torch.testing.assert_close(lse, mods["sinks"].view(1, -1, 1).expand_as(lse))


def test_twin_score_mods_match_the_definition():
    """The twin against softcap, ALiBi and sinks written out over the whole cache: the bias
    -slope * |a - j| measures from a = L - Sq + i, each sequence's own alignment, and the
    sink joins each row's softmax once."""
    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs("window_gqa", torch.float64)
    mods = {name: x.double() if isinstance(x, torch.Tensor) else x
            for name, x in _mods("window_gqa_all", q).items()}
    out, lse, k_cache, v_cache = _run(q, k_cache, v_cache, k, v, seqlens, dict(kwargs, **mods),
                                      "torch")
    n_q, group = q.shape[1], q.shape[2] // k_cache.shape[2]
    left = kwargs["window"][0]
    length = seqlens + n_q
    a = (length - n_q)[:, None, None] + torch.arange(n_q)[None, :, None]
    j = torch.arange(k_cache.shape[1])
    keep = (j < length[:, None, None]) & (j >= a - left) & (j <= a)
    kk, vv = (c.nan_to_num().repeat_interleave(group, 2) for c in (k_cache, v_cache))
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) * q.shape[-1] ** -0.5
    scores = torch.tanh(scores / mods["softcap"]) * mods["softcap"]
    scores = scores - mods["alibi_slopes"].view(1, -1, 1, 1) * (a - j).abs()[:, None]
    scores = scores.masked_fill(~keep[:, None], -math.inf)
    sink = mods["sinks"].view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    expect_lse = torch.cat([scores, sink], -1).logsumexp(-1)
    weights = torch.exp(scores - expect_lse[..., None]).nan_to_num()
    expect = torch.einsum("bhij,bjhd->bihd", weights, vv)
    torch.testing.assert_close(lse, expect_lse)
    torch.testing.assert_close(out, expect)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAGE_SIZE))
def test_paged_matches_contiguous(name, backend):
    """The same caches paged through a shuffled table (spare pages of NaN, odd page sizes)
    give the same output and lse, and the append lands in the right pages. Table entries
    past a sequence's pages are -1: they are never read."""
    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs(name, torch.float32)
    page_size = PAGE_SIZE[name]
    order = torch.randperm(k_cache.shape[0] * k_cache.shape[1] // page_size + 2)
    (k_pool, table), (v_pool, _) = (_paged(c, page_size, order) for c in (k_cache, v_cache))
    n_new = q.shape[1] if k is not None else 0
    length = seqlens.clamp(0, k_cache.shape[1] - n_new) + n_new
    unused = torch.arange(table.shape[1]) * page_size >= length[:, None]
    flat = _run(q, k_cache, v_cache, k, v, seqlens, kwargs, backend)
    paged = _run(q, k_pool, v_pool, k, v, seqlens, kwargs, backend, table.masked_fill(unused, -1))
    torch.testing.assert_close(paged[:2], flat[:2], rtol=1e-6, atol=1e-6)
    for pool, cache in zip(paged[2:], flat[2:]):
        _exact(pool[table.long()].flatten(1, 2), cache)
        _exact(pool[order[-2:]], torch.full_like(pool[order[-2:]], math.nan))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["decode_gqa8", "chunk_mha", "row_tiles_window", "clamped"])
def test_cache_batch_idx_matches_the_rows_it_picks(name, backend):
    """cache_batch_idx: each sequence reads and appends to its own row of a larger cache
    pool (shuffled, with spare rows of NaN): the same output and lse as the picked rows
    passed as the cache, the append lands in those rows, and the other rows stay as
    they were."""
    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs(name, torch.float32)
    # A pool of one page per row: the table's one column is cache_batch_idx.
    order = torch.randperm(q.shape[0] + 2)
    (k_pool, table), (v_pool, _) = (_paged(c, c.shape[1], order) for c in (k_cache, v_cache))
    flat = _run(q, k_cache, v_cache, k, v, seqlens, kwargs, backend)
    picked = _run(q, k_pool, v_pool, k, v, seqlens,
                  dict(kwargs, cache_batch_idx=table[:, 0].to(DEVICE, torch.int64)), backend)
    torch.testing.assert_close(picked[:2], flat[:2], rtol=1e-6, atol=1e-6)
    for pool, cache in zip(picked[2:], flat[2:]):
        _exact(pool[table[:, 0].long()], cache)
        _exact(pool[order[-2:]], torch.full_like(pool[order[-2:]], math.nan))


@pytest.mark.skipif(not KERNEL, reason="needs the triton backend")
@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
@pytest.mark.parametrize("n_splits", [1, 2, 7])
def test_split_counts(n_splits, sinks):
    """The combine by logsumexp gives the same result for any number of splits, including
    splits left without keys; with sinks, it counts each sink once."""
    from attnmem.kernels import attention_kvcache as kernel

    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs("window_gqa", torch.float32)
    k_cache, v_cache = _expected_caches(k_cache, v_cache, k, v, seqlens)
    args = [x.to(DEVICE) for x in (q, k_cache, v_cache, seqlens)]
    sink = torch.randn(q.shape[2]) if sinks else None
    out, lse = kernel.attention_with_kvcache(*args, None, q.shape[1], q.shape[-1] ** -0.5, 7, 0,
                                             n_splits=n_splits,
                                             sinks=None if sink is None else sink.to(DEVICE))
    expect = twin.attention_with_kvcache_forward(q.double(), k_cache.double(), v_cache.double(),
                                                 seqlens, None, q.shape[1], q.shape[-1] ** -0.5,
                                                 7, 0, sinks=sink)
    torch.testing.assert_close(out.cpu().double(), expect[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), expect[1], rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
def test_num_splits_match_float64(backend):
    """num_splits 0 (the launch's choice: 3 under the interpreter), 1, 3 and 99 (4 after the
    clamp to the cache's key tiles of 16 under the interpreter) give the same out and lse,
    each within twice torch's error of float64."""
    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs("window_gqa", torch.float32)
    expect = _run(*(x.double() for x in (q, k_cache, v_cache, k, v)), seqlens, kwargs, "torch")
    base = _run(q, k_cache.clone(), v_cache.clone(), k, v, seqlens, kwargs, "torch")
    results = [_run(q, k_cache.clone(), v_cache.clone(), k, v, seqlens,
                    dict(kwargs, num_splits=n), backend) for n in (0, 1, 3, 99)]
    for out, lse, *_ in results:
        assert_matches_float64(out, lse, expect, base, torch.float32)
        torch.testing.assert_close(out, results[0][0], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not KERNEL, reason="needs the triton backend")
def test_one_split_runs_no_combine(monkeypatch):
    """num_splits=1: the attention kernel writes out and lse itself, and the combine does not
    run; with 3 splits it does. A split holds one key tile at least, of the largest BLOCK_N
    the launch's configs may take (kernels/attention_kvcache.py's _splits): 16 under the
    interpreter, up to 128 on a GPU, where window_gqa's 64 slots are one tile and num_splits=3
    runs as 1. The split run takes a cache of three such tiles."""
    from test_grid_limits import _Grids

    from attnmem.kernels import attention_kvcache as kernel

    combine = _Grids()
    monkeypatch.setattr(kernel, "_kvcache_combine", combine)
    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs("window_gqa", torch.float32)
    expect = _run(q, k_cache.clone(), v_cache.clone(), k, v, seqlens, kwargs, "torch")
    got = _run(q, k_cache.clone(), v_cache.clone(), k, v, seqlens, dict(kwargs, num_splits=1),
               "triton")
    assert combine.grids == []
    torch.testing.assert_close(got[:2], expect[:2], rtol=1e-5, atol=1e-5)
    widest = max([n for configs in kernel.CONFIGS.values() for n, _, _ in configs]
                 + [kernel.INTERPRET_CONFIG["BLOCK_N"]])
    long = CASES["window_gqa"][:5] + (3 * widest, [3 * widest - 20, 3]) + CASES["window_gqa"][7:]
    monkeypatch.setitem(CASES, "window_gqa_long", long)
    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs("window_gqa_long", torch.float32)
    _run(q, k_cache, v_cache, k, v, seqlens, dict(kwargs, num_splits=3), "triton")
    assert len(combine.grids) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_seqlens_forms(backend):
    """An int, an int32 tensor and a strided int64 tensor give the same result."""
    q, k_cache, v_cache, k, v, _, kwargs = _inputs("decode_gqa8", torch.float32)
    forms = [9, torch.full((3,), 9, dtype=torch.int32),
             torch.full((3, 2), 9, dtype=torch.int64)[:, 0]]
    results = [_run(q, k_cache.clone(), v_cache.clone(), k, v, s, kwargs, backend)
               for s in forms]
    for result in results[1:]:
        for got, expect in zip(result, results[0]):
            _exact(got, expect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """q laid out (B, H, Sq, D) and transposed, caches that are slices of larger ones (along
    the tokens and the heads), new tokens strided: the same result as contiguous copies."""
    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs("window_gqa", torch.float32)
    contiguous = _run(q, k_cache.clone(), v_cache.clone(), k, v, seqlens, kwargs, backend)
    bigger = lambda x: torch.randn(x.shape[0], x.shape[1] + 5, 2 * x.shape[2], x.shape[3])  # noqa: E731
    views = []
    for cache in (k_cache, v_cache):
        big = bigger(cache)
        big[:, 3:3 + cache.shape[1], 1::2] = cache
        views.append(big[:, 3:3 + cache.shape[1], 1::2])
    strided_q = q.transpose(1, 2).contiguous().transpose(1, 2)
    strided_k, strided_v = (torch.stack([x, x], 2)[:, :, 0] for x in (k, v))
    got = _run(strided_q, *views, strided_k, strided_v, seqlens, kwargs, backend)
    torch.testing.assert_close(got, contiguous, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_bench_decode_points_compute_the_same_attention():
    """Every provider of the GPU profile's decode points gets the same inputs and computes
    the same attention (at shrunk sizes, on the CPU; FlexAttention runs on CUDA only);
    attnmem-fp8 (given float16 queries) that of SDPA over its dequantized e4m3 cache."""
    from bench import cases

    point = next(p for p in cases.decode_points("gpu"))
    q = torch.randn(2, 1, point["heads"], point["d"])
    k, v = (torch.randn(2, 50, point["kv_heads"], point["d"]) for _ in range(2))
    outs = {provider: cases._decode_fn(provider, q, k, v, point["page_size"])()
            for provider in cases.PROVIDERS["decode"] if provider not in ("flex", "attnmem-fp8")}
    outs["sdpa"] = outs["sdpa"].transpose(1, 2)
    for provider, out in outs.items():
        torch.testing.assert_close(out, outs["sdpa"], rtol=1e-5, atol=1e-5, msg=provider)
    fp8 = cases._decode_fn("attnmem-fp8", q.half(), k, v, point["page_size"])()
    k, v = (x.float() * descale[:, None, :, None]
            for x, descale in map(cases._fp8_cache, (k, v)))
    expect = cases._decode_fn("sdpa", q.half().float(), k, v, point["page_size"])()
    torch.testing.assert_close(fp8.float(), expect.transpose(1, 2), rtol=0, atol=2e-3)
    assert {p["batch"] for p in cases.decode_points("gpu")} == {1, 8, 64}
    assert point["heads"] == 8 * point["kv_heads"]


def _good(dtype=torch.float32):
    q = torch.randn(2, 1, 4, 16, dtype=dtype)
    k_cache, v_cache = (torch.randn(2, 32, 2, 16, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(2, 1, 2, 16, dtype=dtype) for _ in range(2))
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))


PAGES = dict(k_cache=torch.zeros(6, 8, 2, 16), v_cache=torch.zeros(6, 8, 2, 16),
             block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
ERRORS = {
    "q_not_tensor": (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    "q_3d": (dict(q=torch.zeros(2, 4, 16)), ValueError, "q must be (B, Sq, H, D)"),
    "q_int": (dict(q=torch.zeros(2, 1, 4, 16, dtype=torch.int32)), TypeError,
              "q must be a floating-point tensor"),
    "cache_dtype": (dict(k_cache=torch.zeros(2, 32, 2, 16, dtype=torch.float16)), TypeError,
                    "k_cache must have q's dtype"),
    "cache_batch": (dict(k_cache=torch.zeros(3, 32, 2, 16), v_cache=torch.zeros(3, 32, 2, 16)),
                    ValueError, "k_cache has batch 3"),
    "v_cache_shape": (dict(v_cache=torch.zeros(2, 31, 2, 16)), ValueError,
                      "v_cache must have k_cache's shape"),
    "head_dim": (dict(k_cache=torch.zeros(2, 32, 2, 8), v_cache=torch.zeros(2, 32, 2, 8)),
                 ValueError, "head dim"),
    "heads": (dict(k_cache=torch.zeros(2, 32, 3, 16), v_cache=torch.zeros(2, 32, 3, 16),
                   k=None, v=None), ValueError, "must divide q's 4 heads"),
    "k_alone": (dict(v=None), ValueError, "k and v must be given together"),
    "k_shape": (dict(k=torch.zeros(2, 2, 2, 16)), ValueError, "k must be (B, Sq, Hkv, D)"),
    "v_dtype": (dict(v=torch.zeros(2, 1, 2, 16, dtype=torch.float64)), TypeError,
                "v must have q's dtype"),
    "too_many_new": (dict(q=torch.zeros(2, 40, 4, 16), k=torch.zeros(2, 40, 2, 16),
                          v=torch.zeros(2, 40, 2, 16)), ValueError, "40 new tokens"),
    "seqlens_float": (dict(cache_seqlens=torch.zeros(2)), TypeError,
                      "cache_seqlens must be an integer tensor"),
    "seqlens_shape": (dict(cache_seqlens=torch.zeros(3, dtype=torch.int32)), ValueError,
                      "cache_seqlens must have shape (B,)"),
    "seqlens_int_past": (dict(cache_seqlens=32), ValueError, "leaves no room"),
    "seqlens_bool": (dict(cache_seqlens=True), TypeError, "cache_seqlens must be an int"),
    "table_dtype": (dict(PAGES, block_table=PAGES["block_table"].long()), TypeError,
                    "block_table must be int32"),
    "table_shape": (dict(PAGES, block_table=torch.zeros(3, 2, dtype=torch.int32)), ValueError,
                    "block_table must be (B, max_blocks)"),
    "table_page": (dict(PAGES, block_table=torch.tensor([[6, 1], [2, 3]], dtype=torch.int32)),
                   ValueError, "block_table[0, 0] = 6 is not a page"),
    "page_size_0": (dict(k_cache=torch.zeros(6, 0, 2, 16), v_cache=torch.zeros(6, 0, 2, 16),
                         block_table=PAGES["block_table"], k=None, v=None), ValueError,
                    "page_size of at least 1"),
    "batch_idx_float": (dict(cache_batch_idx=torch.zeros(2)), TypeError,
                        "cache_batch_idx must be an integer tensor"),
    "batch_idx_shape": (dict(cache_batch_idx=torch.zeros(3, dtype=torch.int64)), ValueError,
                        "cache_batch_idx must have shape (B,) = (2,)"),
    "batch_idx_row": (dict(cache_batch_idx=torch.tensor([1, 2])), ValueError,
                      "cache_batch_idx[1] = 2 is not a row of the cache: rows are 0 to 1"),
    "batch_idx_paged": (dict(PAGES, cache_batch_idx=torch.tensor([0, 1])), ValueError,
                        "pass one of the two"),
    "batch_idx_s_max_0": (dict(k_cache=torch.zeros(3, 0, 2, 16), v_cache=torch.zeros(3, 0, 2, 16),
                               cache_batch_idx=torch.tensor([0, 2]), k=None, v=None,
                               cache_seqlens=0), ValueError, "S_max of at least 1"),
    "causal": (dict(causal=1), TypeError, "causal must be a bool"),
    "window": (dict(window=(3,)), ValueError, "window must be a pair"),
    "window_side": (dict(window=(-2, 0)), ValueError, "window left"),
    "scale": (dict(scale=math.inf), ValueError, "scale must be a finite number"),
    "return_lse": (dict(return_lse=None), TypeError, "return_lse must be a bool"),
    "requires_grad": (dict(q=torch.zeros(2, 1, 4, 16, requires_grad=True)), RuntimeError,
                      "has no gradient, and q requires grad"),
    "expanded_cache": (dict(k_cache=torch.zeros(1, 32, 2, 16).expand(2, -1, -1, -1)),
                       ValueError, "k_cache has overlapping elements"),
    "shared_kv_cache": (dict(v_cache="k_cache"), ValueError, "share storage"),
    "softcap": (dict(softcap=-2.0), ValueError, "softcap must be a finite number > 0"),
    "sinks_shape": (dict(sinks=torch.zeros(2)), ValueError, "sinks must be (H,) = (4,)"),
    "sinks_grad": (dict(sinks=torch.zeros(4, requires_grad=True)), RuntimeError,
                   "has no gradient, and sinks requires grad"),
    "alibi_shape": (dict(alibi_slopes=torch.zeros(4, 2)), ValueError,
                    "alibi_slopes must be (H,) = (4,) or (B, H) = (2, 4)"),
    "num_splits_float": (dict(num_splits=2.0), TypeError, "num_splits must be an int, got float"),
    "num_splits_bool": (dict(num_splits=True), TypeError, "num_splits must be an int, got bool"),
    "num_splits_negative": (dict(num_splits=-1), ValueError,
                            "num_splits must be 0 (the launch picks), 1 (no split) or more, "
                            "got -1"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_name_the_argument(name):
    change, error, match = ERRORS[name]
    args = dict(_good(), **change)
    if args["v_cache"] == "k_cache":
        args["v_cache"] = args["k_cache"]
    q = args.pop("q")
    with pytest.raises(error, match=re.escape(match)):
        attnmem.attention_with_kvcache(q, args.pop("k_cache"), args.pop("v_cache"), **args)


def test_no_gradient_under_no_grad():
    """Inputs that require grad are fine where grad mode is off: the output has none."""
    args = _good()
    q = args.pop("q").requires_grad_()
    with torch.no_grad():
        out = attnmem.attention_with_kvcache(q, args.pop("k_cache"), args.pop("v_cache"), **args)
    assert not out.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_queries(backend):
    for batch, n_q in ((0, 1), (2, 0)):
        q = torch.randn(batch, n_q, 4, 16, device=DEVICE)
        cache = torch.randn(batch, 8, 2, 16, device=DEVICE)
        with attnmem.use_backend(backend):
            out, lse = attnmem.attention_with_kvcache(q, cache, cache.clone(), cache_seqlens=3,
                                                      return_lse=True)
        assert out.shape == q.shape and lse.shape == (batch, 4, n_q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """The custom ops' schemas (the append mutates the caches), fakes and dispatch."""
    from attnmem import kvcache

    args = {name: x.to(DEVICE) for name, x in _good().items()}
    seqlens = args["cache_seqlens"]
    torch.library.opcheck(kvcache._append.default, (args["q"], args["k_cache"], args["v_cache"],
                                                    args["k"], args["v"], seqlens, None, backend))
    torch.library.opcheck(kvcache._attend.default, (args["q"], args["k_cache"], args["v_cache"],
                                                    seqlens, None, 1, 0.25, 3, 0, backend))
    torch.library.opcheck(kvcache._attend.default, (args["q"], args["k_cache"], args["v_cache"],
                                                    seqlens, None, 1, 0.25, 3, 0, backend, 1.5,
                                                    torch.randn(4, device=DEVICE),
                                                    torch.rand(2, 4, device=DEVICE)))


def test_compiles_under_torch_compile():
    args = _good()
    k_cache = args["k_cache"].clone()
    expect = attnmem.attention_with_kvcache(args["q"], k_cache, args["v_cache"].clone(),
                                            k=args["k"], v=args["v"],
                                            cache_seqlens=args["cache_seqlens"])
    fn = torch.compile(lambda *a, **kw: attnmem.attention_with_kvcache(*a, **kw),
                       backend="eager", fullgraph=True)
    got_cache = args["k_cache"].clone()
    got = fn(args["q"], got_cache, args["v_cache"].clone(), k=args["k"], v=args["v"],
             cache_seqlens=args["cache_seqlens"])
    _exact(got, expect)
    _exact(got_cache, k_cache)


# ---------------------------------------------------------------------------------------
# Compiled for sm_80 and sm_90 (no GPU needed; see tests/aot.py)
# ---------------------------------------------------------------------------------------

KERNEL_MODULE = "attnmem.kernels.attention_kvcache"


def kernel_module():
    from attnmem.kernels import attention_kvcache

    return attention_kvcache


NO_SPILLS = dict(spill_stores=0, spill_loads=0)


def _attend_job(arch, dtype, head_dim, rows, paged, split, fp8_kv=False, packed=False):
    """The attention kernel's job; fp8_kv: e4m3 caches (FP8_KV), packed: packed queries
    (PACKED_Q). Those carry the no-spill "expect" that tests/test_triton_versions.py
    repeats on the GPU machines' triton (3.6)."""
    kernel = kernel_module()
    elem = 4 if dtype == "float32" else 2
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    block_m, block_n, warps, stages = kernel.config_for(rows, block_d, elem, interpret=False)
    data, cache = TRITON_TYPES[dtype], "fp8e4nv" if fp8_kv else TRITON_TYPES[dtype]
    job = dict(module=KERNEL_MODULE, kernel="_kvcache_attend", arch=arch,
               constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=block_d, PAGED=paged,
                               DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
                               BLOCK_M=block_m, BLOCK_N=block_n),
               pointers=dict(q_ptr=data, kc_ptr=cache, vc_ptr=cache, seqlens_ptr="i32",
                             table_ptr="i32", o_ptr="fp32" if split else data,
                             lse_ptr="fp32"),
               num_warps=warps, num_stages=stages)
    return _variant(job, fp8_kv, packed)


def _append_job(arch, dtype, head_dim, block_h, paged, fp8_kv=False, packed=False):
    """The append kernel's job; packed: new tokens packed (PACKED_K, as packed queries' and
    cu_seqlens_k_new's are appended)."""
    data, cache = TRITON_TYPES[dtype], "fp8e4nv" if fp8_kv else TRITON_TYPES[dtype]
    job = dict(module=KERNEL_MODULE, kernel="_kvcache_append", arch=arch,
               constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, PAGED=paged,
                               BLOCK_H=block_h),
               pointers=dict(k_ptr=data, v_ptr=data, kc_ptr=cache, vc_ptr=cache,
                             seqlens_ptr="i32", table_ptr="i32"), num_warps=4, num_stages=1)
    if packed:
        job["constexprs"]["PACKED_K"] = True
        job["pointers"]["cu_seqlens_k_new_ptr"] = "i32"
    job = _variant(job, fp8_kv, False)
    return dict(job, expect=NO_SPILLS) if packed else job


def _variant(job, fp8_kv, packed):
    if fp8_kv:
        job["constexprs"]["FP8_KV"] = True
        job["pointers"]["descale_ptr"] = "fp32"
    if packed:
        job["constexprs"]["PACKED_Q"] = True
        job["pointers"]["cu_seqlens_q_ptr"] = "i32"
    return dict(job, expect=NO_SPILLS) if fp8_kv or packed else job


# (dtype, head dim, packed rows: GQA 8:1 decoding, or a chunk of 16 queries at 8:1, paged,
# split) for both archs; on sm_90, e4m3 caches and packed queries too.
ATTEND_CASES = {
    **{f"sm{arch}-{dtype}-d{d}-rows{rows}-{'paged' if paged else 'flat'}"
       f"{'-split' if split else ''}": _attend_job(arch, dtype, d, rows, paged, split)
       for arch in (80, 90)
       for dtype, d, rows, paged, split in (
           ("float16", 128, 8, False, True), ("bfloat16", 128, 8, True, True),
           ("float16", 64, 8, True, True), ("bfloat16", 256, 8, False, True),
           ("float16", 128, 128, True, False), ("bfloat16", 256, 128, True, False),
           ("float32", 128, 8, True, True), ("float32", 256, 64, False, False))},
    **{f"sm90-{dtype}-d{d}-rows{rows}-{'paged' if paged else 'flat'}"
       f"{'-split' if split else ''}-{variant}": _attend_job(
           90, dtype, d, rows, paged, split, **{variant: True})
       for variant, dtype, d, rows, paged, split in (
           ("fp8_kv", "bfloat16", 128, 8, True, True), ("fp8_kv", "float16", 256, 8, False, True),
           ("fp8_kv", "float16", 128, 128, True, False),
           ("packed", "bfloat16", 128, 8, True, True),
           ("packed", "float16", 128, 128, True, False))},
} if HAS_TRITON else {}
OTHER_CASES = {
    **{f"append-sm{arch}-{dtype}-{'paged' if paged else 'flat'}": _append_job(
        arch, dtype, 256, 16, paged)
       for arch in (80, 90) for dtype in ("float16", "bfloat16") for paged in (False, True)},
    "append-sm90-bfloat16-paged-fp8_kv": _append_job(90, "bfloat16", 256, 16, True, fp8_kv=True),
    "append-sm90-bfloat16-paged-packed": _append_job(90, "bfloat16", 128, 8, True, packed=True),
    **{f"combine-sm{arch}-{dtype}": dict(
        module=KERNEL_MODULE, kernel="_kvcache_combine", arch=arch,
        constexprs=dict(HEAD_DIM=256, BLOCK_D=256, BLOCK_S=128),
        pointers=dict(part_o_ptr="fp32", part_lse_ptr="fp32", o_ptr=TRITON_TYPES[dtype],
                      lse_ptr="fp32"), num_warps=kernel_module().combine_warps(256),
        num_stages=1)
       for arch in (80, 90) for dtype in ("float16", "bfloat16")},
} if HAS_TRITON else {}


@pytest.fixture(scope="module")
def compiled_kernels():
    cases = {**ATTEND_CASES, **OTHER_CASES}
    return dict(zip(cases, compile_all(list(cases.values()))))


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
@pytest.mark.parametrize("case", list(ATTEND_CASES))
def test_attend_compiles_with_tensor_cores_without_spills(compiled_kernels, case):
    """16-bit dots on tensor cores (wgmma or mma.sync: a 16-row decode tile is below the
    64 rows of a Hopper warpgroup MMA, so sm_90 runs mma.sync there too), within the
    shared memory the config's estimate promises, and no register spills on sm_90."""
    kernel = kernel_module()
    result, job = compiled_kernels[case], ATTEND_CASES[case]
    assert result["error"] is None, result["error"]
    meta = job["constexprs"]
    elem = 4 if "float32" in case else 2
    estimate = kernel.smem_estimate(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"],
                                    job["num_stages"], elem)
    assert result["shared"] <= min(estimate, kernel.SMEM_LIMIT[job["arch"]]), result["shared"]
    if elem == 2:
        assert result["wgmma"] or result["mma_sync"]
    if job["arch"] == 90:
        assert result["spill_stores"] == result["spill_loads"] == 0, result


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_append_and_combine_compile(compiled_kernels, case):
    result = compiled_kernels[case]
    assert result["error"] is None, result["error"]
    assert result["spill_stores"] == result["spill_loads"] == 0, result
