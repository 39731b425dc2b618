"""Appends into one latent cache (absorbed multi-head latent attention's decoding, FlashMLA's
workload): v_cache a view of k_cache's first Ev columns, and the new latents given as k with
v=None, attnmem.attention_with_kvcache and attnmem.kvcache_append write k's first Ev columns
as the values (the same bytes to the same addresses).

On both backends, against the same step with the latents written by hand and attended with
k=None: the caches byte for byte, the output against float64 attention over the hand-written
cache (within twice the error of the k=None step); contiguous, paged, cache_batch_idx,
packed queries, new tokens packed on their own (cu_seqlens_k_new), e4m3 caches (k_descale
descales both), D = 40 with Ev = 32 and Ev = 33 (D = 576, Ev = 512 on the torch backend
under the interpreter); under torch.compile; the refusals (rotary, v_descale, a v_cache
that is no such view, v given with a view).
"""

import math
import re

import pytest
import torch
from test_attention_fp8 import _interpreter_e4m3_cast  # noqa: F401 (autouse fixture)
from test_attention_kvcache import _paged

import attnmem
from attnmem.reference import kvcache as twin
from backends import BACKENDS, DEVICE, INTERPRET
from tolerance import assert_close_to_float64

FP8 = torch.float8_e4m3fn
SEQLENS = [5, 0, 17]  # cached tokens before the step
PACKED = [1, 3, 0]  # each sequence's new tokens (its queries) when packed
HEADS, CAPACITY = 4, 24


def _to(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def _setup(layout, fp8, d, ev, n_q):
    """q (B, n_q, H, D), new latents k (B, n_q, 1, D) (packed (total, ...) with cu_seqlens
    when n_q is None), the cache as stored (NaN past each sequence's tokens; a paged pool or
    a pool of rows for cache_batch_idx), the keyword arguments that place it, the descales
    (B, 1) or None, and slot(b, t): the cache index of sequence b's token t."""
    batch = len(SEQLENS)
    unused = torch.arange(CAPACITY)[None, :] >= torch.tensor(SEQLENS)[:, None]
    cache = torch.randn(batch, CAPACITY, 1, d).masked_fill(unused[..., None, None], math.nan)
    places = dict(cache_seqlens=torch.tensor(SEQLENS, dtype=torch.int32))
    slot = lambda b, t: (b, t)  # noqa: E731
    if layout == "paged":
        cache, table = _paged(cache, 6, torch.randperm(batch * 4 + 2))
        places["block_table"] = table
        slot = lambda b, t: (int(table[b, t // 6]), t % 6)  # noqa: E731
    elif layout == "batch_idx":
        rows = torch.tensor([3, 0, 1])
        pool = torch.full((4, *cache.shape[1:]), math.nan)
        pool[rows] = cache
        cache, places["cache_batch_idx"] = pool, rows
        slot = lambda b, t: (int(rows[b]), t)  # noqa: E731
    dtype = torch.float16 if fp8 else torch.float32
    descales = 0.05 + torch.rand(batch, 1) if fp8 else None
    if fp8:
        cache = (cache * 4).to(FP8)
        places["k_descale"] = descales
    lengths = [n_q] * batch if n_q is not None else PACKED
    q = torch.randn(sum(lengths), HEADS, d) if n_q is None else torch.randn(batch, n_q, HEADS, d)
    k = torch.randn(*q.shape[:-2], 1, d) * (4 if fp8 else 1)
    if n_q is None:
        places.update(cu_seqlens_q=torch.tensor([0, *torch.tensor(PACKED).cumsum(0).tolist()],
                                                dtype=torch.int32), max_seqlen_q=max(PACKED))
    return q.to(dtype), k.to(dtype), cache, places, descales, slot, lengths


def _by_hand(cache, k, descales, slot, lengths):
    """The cache with each sequence's new latents written at its slots by indexing (quantized
    as attnmem.reference.kvcache.quantize for an e4m3 cache)."""
    cache, row = cache.clone(), 0
    for b, n in enumerate(lengths):
        for i in range(n):
            x = k[row + i] if k.ndim == 3 else k[b, i]
            if descales is not None:
                x = twin.quantize(x[None, None], descales[b:b + 1])[0, 0]
            cache[slot(b, SEQLENS[b] + i)] = x
        row += n
    return cache


def _float64(q, cache, descales, ev, slot, lengths):
    """Causal attention in float64 of each sequence's queries over its keys (the cache's
    first L = cache_seqlens + its new tokens slots) and values (their first Ev columns)."""
    outs, row = [], 0
    for b, n in enumerate(lengths):
        length = SEQLENS[b] + n
        keys = torch.stack([cache[slot(b, t)][0].double() for t in range(length)])
        keys = keys * (1 if descales is None else float(descales[b, 0]))
        queries = (q[row:row + n] if q.ndim == 3 else q[b]).double()
        scores = torch.einsum("ihd,jd->hij", queries, keys) / math.sqrt(q.shape[-1])
        seen = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
        weights = scores.masked_fill(~seen, -math.inf).softmax(-1)
        outs.append(torch.einsum("hij,jd->ihd", weights, keys[:, :ev]))
        row += n
    return torch.cat(outs) if q.ndim == 3 else torch.stack(outs)


def _bytes(x):
    return x.cpu().contiguous().view(torch.uint8)


def _step(backend, q, cache, ev, **kwargs):
    """attention_with_kvcache over cache (on DEVICE) and its view; -> out, the cache."""
    cache = _to(cache)
    with attnmem.use_backend(backend), torch.no_grad():
        out = attnmem.attention_with_kvcache(_to(q), cache, cache[..., :ev],
                                             **{name: _to(x) for name, x in kwargs.items()})
    return out.cpu(), cache.cpu()


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout, fp8, n_q, d, ev", [
    ("contiguous", False, 2, 40, 32),
    ("paged", True, None, 40, 32),
    ("batch_idx", False, None, 40, 32),
    ("paged", True, 1, 40, 33),
    ("contiguous", False, 1, 576, 512),
])
def test_v_none_appends_the_latents_as_written_by_hand(layout, fp8, n_q, d, ev, backend):
    """A decoding step with k=latents, v=None over v_cache = k_cache[..., :Ev] leaves the
    cache byte for byte as the latents written by hand do (kvcache_append(..., v=None) too),
    and outputs the attention over it: within twice the error of the same step attended
    with k=None of float64."""
    if d > 256 and backend != "torch" and INTERPRET:
        pytest.skip("D = 576 under the interpreter is slow: the torch backend checks it here")
    torch.manual_seed(d + ev + (n_q or 0) + fp8)
    q, k, cache, places, descales, slot, lengths = _setup(layout, fp8, d, ev, n_q)
    written = _by_hand(cache, k, descales, slot, lengths)
    out, appended = _step(backend, q, cache, ev, k=k, **places)
    assert torch.equal(_bytes(appended), _bytes(written))
    grown = dict(places, cache_seqlens=places["cache_seqlens"] + torch.tensor(lengths,
                                                                             dtype=torch.int32))
    if fp8:
        grown["v_descale"] = descales
    if n_q is None:
        # Without new tokens the packed queries align to the end of their grown caches.
        grown["cu_seqlens_q"] = places["cu_seqlens_q"]
    base, _ = _step(backend, q, written, ev, **grown)
    expect = _float64(q, written, descales, ev, slot, lengths)
    assert_close_to_float64([out], [expect], [base], q.dtype)
    own = _to(cache.clone())
    # kvcache_append names the packing cu_seqlens and max_seqlen.
    names = dict(cu_seqlens_q="cu_seqlens", max_seqlen_q="max_seqlen")
    append = {names.get(name, name): _to(x) for name, x in places.items()}
    with attnmem.use_backend(backend), torch.no_grad():
        attnmem.kvcache_append(own, own[..., :ev], _to(k), None, **append)
    assert torch.equal(_bytes(own), _bytes(written))


@pytest.mark.parametrize("backend", BACKENDS)
def test_v_none_with_new_tokens_packed_on_their_own(backend):
    """cu_seqlens_k_new (FlashAttention-3's): one query per sequence, the new latents packed
    on their own, 2, 0 and 3 of them: the cache as written by hand, the output as the step
    over it with k=None."""
    torch.manual_seed(7)
    q, _, cache, places, _, slot, _ = _setup("paged", False, 40, 32, 1)
    counts = [2, 0, 3]
    k = torch.randn(sum(counts), 1, 40)
    knew = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    out, appended = _step(backend, q, cache, 32, k=k, cu_seqlens_k_new=knew, **places)
    written = _by_hand(cache, k, None, slot, counts)
    assert torch.equal(_bytes(appended), _bytes(written))
    grown = places["cache_seqlens"] + torch.tensor(counts, dtype=torch.int32)
    base, _ = _step(backend, q, written, 32, **dict(places, cache_seqlens=grown))
    torch.testing.assert_close(out, base)


def test_compiles_under_torch_compile():
    """The latent append in one graph (the view's layout checked, its data pointers not):
    the output and the cache as without compiling."""
    cache, q, k = torch.randn(2, 8, 1, 40), torch.randn(2, 1, 4, 40), torch.randn(2, 1, 1, 40)
    step = lambda q, c, k: attnmem.attention_with_kvcache(  # noqa: E731
        q, c, c[..., :32], k=k, cache_seqlens=3)
    expect_cache, got_cache = cache.clone(), cache.clone()
    expect = step(q, expect_cache, k)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, got_cache, k)
    assert torch.equal(got, expect) and torch.equal(got_cache, expect_cache)


def _good():
    """A decoding step with v=None over a latent cache, and its cache."""
    cache = torch.randn(2, 8, 1, 40)
    return dict(q=torch.randn(2, 1, 4, 40), k_cache=cache, v_cache=cache[..., :32],
                k=torch.randn(2, 1, 1, 40), cache_seqlens=3)


def _e4m3(args):
    """The step over an e4m3 latent cache, q and k in float16."""
    cache = args["k_cache"].to(FP8)
    return dict(k_cache=cache, v_cache=cache[..., :32], q=args["q"].half(),
                k=args["k"].half())


# name: (the change to _good()'s arguments, what the ValueError says)
ERRORS = {
    "rotary": (lambda a: dict(rotary_cos=torch.ones(8, 4), rotary_sin=torch.zeros(8, 4)),
               "rotary_cos and rotary_sin rotate k's first R dims"),
    "v_descale": (lambda a: dict(_e4m3(a), k_descale=torch.ones(2, 1),
                                 v_descale=torch.ones(2, 1)),
                  "v_descale must be None when v is None"),
    "not_a_prefix": (lambda a: dict(v_cache=a["k_cache"][..., 8:]),
                     "k and v must be given together"),
    "own_values": (lambda a: dict(v_cache=a["k_cache"][..., :32].clone()),
                   "k and v must be given together"),
    "v_given": (lambda a: dict(v=torch.randn(2, 1, 1, 32)),
                "k_cache and v_cache share storage"),
}


@pytest.mark.parametrize("op", ["attention_with_kvcache", "kvcache_append"])
@pytest.mark.parametrize("name", list(ERRORS))
def test_refusals_name_the_argument(name, op):
    """Where k's bytes would not be the values, v=None is refused: a rotation of k, a descale
    of v's own (e4m3), a v_cache that is not k_cache's first columns (a view further in, or a
    copy); v given with a view keeps the overlap error."""
    args = _good()
    change, match = ERRORS[name]
    args.update(change(args))
    q, k_cache, v_cache, k, v = (args.pop(key, None) for key in ("q", "k_cache", "v_cache",
                                                                 "k", "v"))
    with pytest.raises(ValueError, match=re.escape(match)), torch.no_grad():
        if op == "kvcache_append":
            attnmem.kvcache_append(k_cache, v_cache, k, v, **args)
        else:
            attnmem.attention_with_kvcache(q, k_cache, v_cache, k=k, v=v, **args)
