"""attnmem.attention_with_kvcache with FlashAttention's rotary_cos, rotary_sin and
rotary_interleaved (the new keys rotated on their way into the cache, the queries in the
attention kernel) and cache_leftpad (each sequence's keys start at its own slot), against
float64 on fresh random inputs: GPT-NeoX and GPT-J pairs, partial rotary dims that are no
multiple of 16, odd head dims, GQA, causal (each query at its own position), not causal
(all at cache_seqlens[b]) and windows, contiguous and paged caches, cache_batch_idx, packed
queries, FP8 caches, score modifications. The twin against the rotation written as complex
products and the mask written out over the whole cache; bad inputs; torch.compile; the sm_90
builds (slow).

Cache slots past a sequence's length and below its left padding hold NaN, so padding that
leaks fails, and kernel outputs are poisoned with NaN before they are written.
"""

import math
import re

import pytest
import torch
from test_attention_fp8 import _interpreter_e4m3_cast  # noqa: F401 (autouse fixture)
from test_attention_kvcache import (
    HAS_TRITON,
    NO_SPILLS,
    _append_job,
    _attend_job,
    _exact,
    _paged,
    assert_matches_float64,
)
from test_attention_kvcache_packed import _to

import attnmem
from aot import compile_all
from attnmem.reference import kvcache as twin
from backends import BACKENDS
from tolerance import assert_close_to_float64

FP16, FP32 = torch.float16, torch.float32

# name: (B, Sq, H, Hkv, D, rotary dim (0: none, and no new tokens), capacity, cache_seqlens,
# cache_leftpad or None, causal, window, interleaved, page size, "rows" (cache_batch_idx) or
# None, dtype, score modifications)
CASES = {
    # The last sequence's keys all lie below its left padding: it sees none.
    "decode_gqa_leftpad_batch_idx": (3, 1, 8, 2, 64, 64, 80, [79, 0, 30], [10, 0, 40], True,
                                     None, False, "rows", FP16, False),
    # 5 queries x 4 heads: 2 row tiles of 16 under the interpreter; 24 of 40 dims rotated.
    "chunk_interleaved_paged": (2, 5, 4, 4, 40, 24, 49, [0, 40], None, True, None, True, 7,
                                FP32, False),
    # Not causal: every query at cache_seqlens[b] (the second clamped to 53).
    "shared_position_odd_dim": (2, 3, 4, 1, 33, 6, 56, [20, 99], [5, 52], False, None, False,
                                None, FP16, False),
    "window_leftpad_paged_mods": (2, 4, 4, 2, 32, 32, 64, [40, 3], [30, 1], False, (6, 1),
                                  True, 8, FP32, True),
    # Left padding alone, clamped (-3 to 0, 70 to the capacity 48: no key).
    "leftpad_no_append_window": (3, 3, 4, 2, 16, 0, 48, [30, 48, 48], [25, -3, 70], True,
                                 (4, 0), False, 6, FP16, False),
}


def _inputs(name, dtype):
    """q; contiguous caches holding NaN below each sequence's cache_leftpad and from its
    cache_seqlens (clamped) on; new k and v; cache_seqlens; the keyword arguments, with
    cos and sin of random angles (capacity, R / 2) in dtype, and the angles in float64."""
    (batch, n_q, heads, kv_heads, d, rotary_dim, capacity, seqlens, leftpad, causal, window,
     interleaved, _, _, mods) = CASES[name]
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    used = seqlens.clamp(0, capacity - n_q * (rotary_dim > 0))
    slot = torch.arange(capacity)[None, :]
    padding = slot >= used[:, None]
    if leftpad is not None:
        leftpad = torch.tensor(leftpad)  # int64, as the kernels do not read it
        padding |= slot < leftpad[:, None]
    caches = [torch.randn(batch, capacity, kv_heads, d, dtype=dtype)
              .masked_fill(padding[..., None, None], math.nan) for _ in range(2)]
    q = torch.randn(batch, n_q, heads, d, dtype=dtype)
    k, v = (torch.randn(batch, n_q, kv_heads, d, dtype=dtype) for _ in range(2))
    angle = torch.rand(capacity, rotary_dim // 2, dtype=torch.float64) * 2 * math.pi
    kwargs = dict(causal=causal, window=window, cache_leftpad=leftpad)
    if rotary_dim:
        kwargs.update(rotary_cos=angle.cos().to(dtype), rotary_sin=angle.sin().to(dtype),
                      rotary_interleaved=interleaved)
    else:
        k = v = None
    if mods:
        kwargs.update(softcap=1.5, sinks=torch.randn(heads), alibi_slopes=torch.rand(heads))
    return q, *caches, k, v, seqlens, kwargs, angle


def _double(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _run(q, k_cache, v_cache, k, v, seqlens, kwargs, backend, page_size=None):
    """out, lse and the caches after the call (through a shuffled pool with spare pages of
    NaN when paged, or with page_size "rows" rows of one picked by cache_batch_idx;
    contiguous again), on the CPU."""
    table = block_table = None
    if page_size is not None:
        rows = page_size == "rows"
        page_size = k_cache.shape[1] if rows else page_size
        order = torch.randperm(k_cache.shape[0] * k_cache.shape[1] // page_size + 2)
        (k_cache, table), (v_cache, _) = (_paged(c, page_size, order) for c in (k_cache, v_cache))
        if rows:
            kwargs = dict(kwargs, cache_batch_idx=table[:, 0].long())
        else:
            block_table = table
    k_cache, v_cache = _to(k_cache.clone()), _to(v_cache.clone())
    with attnmem.use_backend(backend):
        out, lse = attnmem.attention_with_kvcache(
            _to(q), k_cache, v_cache, k=_to(k), v=_to(v), cache_seqlens=_to(seqlens),
            block_table=_to(block_table), return_lse=True,
            **{n: _to(x) for n, x in kwargs.items()})
    caches = [c.cpu() for c in (k_cache, v_cache)]
    if table is not None:
        for pool in caches:
            _exact(pool[order[-2:]], torch.full_like(pool[order[-2:]], math.nan))
        caches = [c[table.long()].flatten(1, 2) for c in caches]
    return out.cpu(), lse.cpu(), *caches


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, backend):
    """out, lse and the rotated keys the append writes within twice torch's error of float64
    (cos and sin of the same angles in float64); v appended exactly, every other slot (NaN
    below the left padding and past the length included) untouched; queries that see no key
    output zeros."""
    dtype, page_size = CASES[name][13], CASES[name][12]
    q, k_cache, v_cache, k, v, seqlens, kwargs, angle = _inputs(name, dtype)
    got = _run(q, k_cache, v_cache, k, v, seqlens, kwargs, backend, page_size)
    exact_angles = dict(rotary_cos=angle.cos(), rotary_sin=angle.sin()) if k is not None else {}
    expect = _run(*map(_double, (q, k_cache, v_cache, k, v)), seqlens,
                  dict({n: _double(x) for n, x in kwargs.items()}, **exact_angles), "torch")
    base = _run(q, k_cache, v_cache, k, v, seqlens, kwargs, "torch")
    start = seqlens.clamp(0, k_cache.shape[1] - q.shape[1])
    new = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for b, s in enumerate(start.tolist()):
        new[b, s:s + q.shape[1]] = k is not None
    _exact(got[3], base[3])
    _exact(got[2][~new], k_cache[~new])
    if k is not None:
        assert_close_to_float64([got[2][new]], [expect[2][new]], [base[2][new]], dtype)
    assert_matches_float64(*got[:2], expect[:2], base[:2], dtype)


def _rotated(x, angle, interleaved):
    """x (..., D) with its first 2 * angle.shape[-1] dims rotated as complex numbers: each
    pair (re, im) times e^(i angle)."""
    half = angle.shape[-1]
    if interleaved:
        z = torch.view_as_complex(x[..., :2 * half].unflatten(-1, (half, 2)).contiguous())
    else:
        z = torch.complex(x[..., :half], x[..., half:2 * half])
    z = z * torch.polar(torch.ones_like(angle), angle)
    pairs = torch.view_as_real(z).flatten(-2) if interleaved else torch.cat([z.real, z.imag], -1)
    return torch.cat([pairs, x[..., 2 * half:]], -1)


# (case, causal, window, each query at its own position): FlashAttention's rule, a window
# side below the capacity (64) counting as a window.
DEFINITION = {
    "causal": ("window_leftpad_paged_mods", True, None, True),
    "not_causal": ("window_leftpad_paged_mods", False, None, False),
    "window": ("window_leftpad_paged_mods", False, (63, 70), True),
    "window_past_capacity": ("window_leftpad_paged_mods", False, (64, 64), False),
    "interleaved_odd_dim": ("shared_position_odd_dim", False, None, False),
}


@pytest.mark.parametrize("variant", list(DEFINITION))
def test_twin_matches_the_definition(variant):
    """The twin in float64 against the definition over the whole cache: new key i rotated at
    slot cache_seqlens[b] + i as a complex product, the queries at their positions a = L -
    Sq + i or all at cache_seqlens[b], and query i seeing slot j iff cache_leftpad[b] <= j
    < L and the causal or window mask around a allows it."""
    name, causal, window, per_query = DEFINITION[variant]
    q, k_cache, v_cache, k, v, seqlens, kwargs, angle = _inputs(name, torch.float64)
    kwargs.update(causal=causal, window=window, softcap=None, sinks=None, alibi_slopes=None,
                  rotary_cos=angle.cos(), rotary_sin=angle.sin())
    interleaved = kwargs["rotary_interleaved"] = variant == "interleaved_odd_dim"
    out, lse, k_after, v_after = _run(q, k_cache, v_cache, k, v, seqlens, kwargs, "torch")
    n_q, capacity = q.shape[1], k_cache.shape[1]
    start = seqlens.clamp(0, capacity - n_q)
    slots = start[:, None] + torch.arange(n_q)  # (B, Sq): the new tokens' slots
    expect_k = k_cache.clone()
    for b in range(len(seqlens)):
        expect_k[b, slots[b]] = _rotated(k[b], angle[slots[b]][:, None], interleaved)
    torch.testing.assert_close(k_after, expect_k, equal_nan=True)
    a = slots  # query i's position: each sequence's queries are its new tokens
    rotated_q = _rotated(q, angle[a if per_query else start[:, None].expand_as(a)][:, :, None],
                         interleaved)
    left, right = window or (-1, -1)
    right = 0 if causal else right
    j = torch.arange(capacity)
    keep = ((j >= kwargs["cache_leftpad"][:, None, None]) & (j < (start + n_q)[:, None, None])
            & ((j >= a[..., None] - left) if 0 <= left < capacity else True)
            & ((j <= a[..., None] + right) if 0 <= right < capacity else True))
    group = q.shape[2] // k_cache.shape[2]
    kk, vv = (c.nan_to_num().repeat_interleave(group, 2) for c in (k_after, v_after))
    scores = torch.einsum("bihd,bjhd->bhij", rotated_q, kk) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~keep[:, None], -math.inf)
    expect_lse = scores.logsumexp(-1)
    weights = torch.exp(scores - expect_lse[..., None]).nan_to_num()
    torch.testing.assert_close(lse, expect_lse)
    torch.testing.assert_close(out, torch.einsum("bhij,bjhd->bihd", weights, vv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_matches_per_sequence(backend):
    """Packed queries (lengths 2, 0 and 5) over a shuffled paged pool, interleaved rotary
    over 24 of 40 dims and left padding: the same out, lse and appends as the padded API on
    each sequence alone (its own cache, cache_seqlens and cache_leftpad)."""
    *_, kwargs, _ = _inputs("chunk_interleaved_paged", FP32)
    cu_seqlens = torch.tensor([0, 2, 2, 7], dtype=torch.int32)
    seqlens = torch.tensor([30, 9, 47], dtype=torch.int32)  # the last clamped to 49 - 5
    leftpad = torch.tensor([28, 3, 0], dtype=torch.int32)
    slot = torch.arange(49)[None, :]
    padding = (slot < leftpad[:, None]) | (slot >= seqlens.clamp(max=44)[:, None])
    k_cache, v_cache = (torch.randn(3, 49, 4, 40).masked_fill(padding[..., None, None], math.nan)
                        for _ in range(2))
    q, k, v = (torch.randn(7, 4, 40) for _ in range(3))
    expect, outs, lses = [k_cache.clone(), v_cache.clone()], [], []
    for b in range(3):
        rows = slice(*cu_seqlens[b:b + 2].tolist())
        own = dict(kwargs, cache_leftpad=leftpad[b:b + 1])
        out, lse, *caches = _run(q[None, rows], expect[0][b:b + 1], expect[1][b:b + 1],
                                 k[None, rows], v[None, rows], seqlens[b:b + 1], own, backend)
        expect[0][b], expect[1][b] = caches[0][0], caches[1][0]
        outs.append(out[0])
        lses.append(lse[0])
    order = torch.randperm(3 * 49 // 7 + 2)
    (k_pool, table), (v_pool, _) = (_paged(c, 7, order) for c in (k_cache, v_cache))
    k_pool, v_pool = _to(k_pool), _to(v_pool)
    with attnmem.use_backend(backend):
        out, lse = attnmem.attention_with_kvcache(
            _to(q), k_pool, v_pool, k=_to(k), v=_to(v), cache_seqlens=_to(seqlens),
            block_table=_to(table), cu_seqlens_q=_to(cu_seqlens), max_seqlen_q=5,
            return_lse=True, **{n: _to(x) for n, x in dict(kwargs, cache_leftpad=leftpad).items()})
    torch.testing.assert_close(out.cpu(), torch.cat(outs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu(), torch.cat(lses, 1), rtol=1e-5, atol=1e-5)
    for pool, cache in zip((k_pool.cpu(), v_pool.cpu()), expect):
        _exact(pool[table.long()].flatten(1, 2), cache)
        _exact(pool[order[-2:]], torch.full_like(pool[order[-2:]], math.nan))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_cache_quantizes_the_rotated_keys(backend):
    """Into a float8_e4m3fn cache the append writes the rotated keys quantized (the twin's
    quantize(rotary(k))), within one e4m3 step (the rotation's float32 rounding may differ
    by an ulp), and v byte for byte; the attention matches the torch backend's."""
    q, k_cache, v_cache, k, v, seqlens, kwargs, _ = _inputs("window_leftpad_paged_mods", FP16)
    descales = {n: 0.02 + 0.48 * torch.rand(2, k_cache.shape[2]) for n in ("k_descale",
                                                                          "v_descale")}
    k_cache, v_cache = ((c.float() * 4).to(torch.float8_e4m3fn) for c in (k_cache, v_cache))
    kwargs.update(descales)
    got = _run(q, k_cache, v_cache, k, v, seqlens, kwargs, backend, page_size=8)
    expect = _run(q, k_cache, v_cache, k, v, seqlens, kwargs, "torch")
    rotated = twin.rotary(k, kwargs["rotary_cos"], kwargs["rotary_sin"],
                          (seqlens.clamp(0, 60)[:, None] + torch.arange(4))[..., None], True)
    expect_k = k_cache.clone()
    twin.append(expect_k, v_cache.clone(), rotated, v, seqlens.clamp(0, 60), None,
                torch.stack(list(descales.values()), -1))
    torch.testing.assert_close(expect[2].float(), expect_k.float(), rtol=0, atol=0,
                               equal_nan=True)
    torch.testing.assert_close(got[2].float(), expect_k.float(), rtol=2 ** -3, atol=2 ** -9,
                               equal_nan=True)
    assert torch.equal(got[3].view(torch.uint8), expect[3].view(torch.uint8))
    torch.testing.assert_close(got[:2], expect[:2], rtol=2e-3, atol=2e-3, equal_nan=True)


def _good():
    """A valid call: 2 sequences of 1 new token, rotary over 8 of 16 dims, left padding."""
    return dict(q=torch.randn(2, 1, 4, 16), k_cache=torch.randn(2, 32, 2, 16),
                v_cache=torch.randn(2, 32, 2, 16), k=torch.randn(2, 1, 2, 16),
                v=torch.randn(2, 1, 2, 16), cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
                rotary_cos=torch.randn(32, 4), rotary_sin=torch.randn(32, 4),
                cache_leftpad=torch.tensor([1, 0], dtype=torch.int32))


ERRORS = {
    "cos_alone": (dict(rotary_sin=None), ValueError, "rotary_cos and rotary_sin must be given"),
    "cos_not_tensor": (dict(rotary_cos=[1.0]), TypeError, "rotary_cos must be a torch.Tensor"),
    "cos_1d": (dict(rotary_cos=torch.randn(32)), ValueError,
               "rotary_cos must be (seqlen_ro, rotary_dim / 2)"),
    "cos_int": (dict(rotary_cos=torch.ones(32, 4, dtype=torch.int32)), TypeError,
                "rotary_cos must be a floating-point tensor"),
    "cos_fp8": (dict(rotary_cos=torch.ones(32, 4).to(torch.float8_e4m3fn)), TypeError,
                "rotary_cos must be float16, bfloat16, float32 or float64"),
    "sin_shape": (dict(rotary_sin=torch.randn(32, 2)), ValueError,
                  "rotary_sin must have rotary_cos's shape (32, 4)"),
    "rotary_dim_past_head_dim": (dict(rotary_cos=torch.randn(32, 9), rotary_sin=torch.randn(32, 9)),
                                 ValueError, "0 < rotary_dim <= the head dim 16"),
    "rotary_dim_0": (dict(rotary_cos=torch.randn(32, 0), rotary_sin=torch.randn(32, 0)),
                     ValueError, "0 < rotary_dim"),
    "seqlen_ro_short": (dict(rotary_cos=torch.randn(31, 4), rotary_sin=torch.randn(31, 4)),
                        ValueError, "rotary_cos has 31 positions but the cache has 32 slots"),
    "no_new_tokens": (dict(k=None, v=None), ValueError, "pass k and v with them"),
    "interleaved_alone": (dict(rotary_cos=None, rotary_sin=None, rotary_interleaved=True),
                          ValueError, "rotary_interleaved applies with rotary_cos"),
    "interleaved_int": (dict(rotary_interleaved=1), TypeError, "rotary_interleaved must be a bool"),
    "cos_grad": (dict(rotary_cos=torch.randn(32, 4, requires_grad=True)), RuntimeError,
                 "has no gradient, and rotary_cos requires grad"),
    "sin_in_v_cache": (dict(rotary_sin="v_cache"), ValueError,
                       "rotary_sin shares storage with v_cache"),
    "leftpad_float": (dict(cache_leftpad=torch.zeros(2)), TypeError,
                      "cache_leftpad must be an integer tensor"),
    "leftpad_shape": (dict(cache_leftpad=torch.zeros(3, dtype=torch.int32)), ValueError,
                      "cache_leftpad must have shape (B,) = (2,)"),
    "leftpad_int": (dict(cache_leftpad=1), TypeError, "cache_leftpad must be a tensor"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_name_the_argument(name):
    change, error, match = ERRORS[name]
    args = dict(_good(), **change)
    if args["rotary_sin"] == "v_cache":
        args["rotary_sin"] = args["v_cache"][0, :, 0, :4]
    with pytest.raises(error, match=re.escape(match)):
        attnmem.attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                                       **args)


def test_opcheck_and_torch_compile():
    """The custom ops' schemas and fakes with the rotary and left-padding arguments, and a
    torch.compile(fullgraph=True) trace that appends and attends as the eager call."""
    from attnmem import kvcache

    args = _good()
    rotary = (args["rotary_cos"], args["rotary_sin"], True)
    seqlens = args["cache_seqlens"]
    torch.library.opcheck(kvcache._append.default, (
        args["q"], args["k_cache"], args["v_cache"], args["k"], args["v"], seqlens, None, "torch",
        None, None, 0, *rotary))
    torch.library.opcheck(kvcache._attend.default, (
        args["q"], args["k_cache"], args["v_cache"], seqlens, None, 1, 0.25, -1, 0, "torch", 0.0,
        None, None, None, None, 0, *rotary, True, args["cache_leftpad"]))
    results = []
    for fn in (attnmem.attention_with_kvcache,
               torch.compile(attnmem.attention_with_kvcache, backend="eager", fullgraph=True)):
        own = {n: x.clone() if isinstance(x, torch.Tensor) else x for n, x in args.items()}
        out = fn(own.pop("q"), own["k_cache"], own["v_cache"], return_lse=True,
                 **{n: x for n, x in own.items() if n not in ("k_cache", "v_cache")})
        results.append((*out, own["k_cache"], own["v_cache"]))
    for got, expect in zip(*results):
        _exact(got, expect)


# ---------------------------------------------------------------------------------------
# Compiled for sm_90 (no GPU needed; see tests/aot.py)
# ---------------------------------------------------------------------------------------


def _rotary_job(job, interleaved, leftpad=False):
    """job with the rotary flags on (cos and sin in float16, all of the head rotated) and,
    for the attention, each query at its own position and, with leftpad, LEFTPAD."""
    constexprs = dict(job["constexprs"], ROTARY_DIM=job["constexprs"]["HEAD_DIM"],
                      INTERLEAVED=interleaved)
    pointers = dict(job["pointers"], cos_ptr="fp16", sin_ptr="fp16")
    if job["kernel"] == "_kvcache_attend":
        constexprs["ROTARY_PER_QUERY"] = True
        if leftpad:
            constexprs["LEFTPAD"] = True
            pointers["leftpad_ptr"] = "i32"
    return dict(job, constexprs=constexprs, pointers=pointers, expect=NO_SPILLS)


# float16, head dims 64 and 128: decoding GQA 8:1 from a paged cache in splits, and at 128 a
# chunk of 16 queries at 8:1 (128 rows); the append of one token's 8 kv heads.
AOT_CASES = {
    **{f"attend-sm90-d{d}-rows{rows}-{'interleaved' if interleaved else 'neox'}-leftpad":
       _rotary_job(_attend_job(90, "float16", d, rows, rows == 8, rows == 8), interleaved, True)
       for d, rows, interleaved in ((64, 8, False), (128, 8, True), (128, 128, False))},
    **{f"append-sm90-d{d}-{'interleaved' if interleaved else 'neox'}":
       _rotary_job(_append_job(90, "float16", d, 8, True), interleaved)
       for d, interleaved in ((64, True), (128, False))},
} if HAS_TRITON else {}


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_rotary_and_leftpad_compile_without_spills():
    """The attention and append kernels with the rotary and left-padding flags on: no
    register spills on sm_90, and the attention's dots still on tensor cores."""
    results = dict(zip(AOT_CASES, compile_all(list(AOT_CASES.values()))))
    for name, result in results.items():
        assert result["error"] is None, (name, result["error"])
        assert result["spill_stores"] == result["spill_loads"] == 0, (name, result)
        if name.startswith("attend"):
            assert result["wgmma"] or result["mma_sync"], name
