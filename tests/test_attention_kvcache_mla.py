"""attnmem.attention_with_kvcache and attnmem.kvcache_append with v_cache's head dim Ev apart
from k_cache's D (FlashAttention-3's headdim_v; multi-head latent attention's D = 192,
Ev = 128): out (..., Ev) and lse against float64 attention over each sequence's whole keys
and values (its old cache slots, then its new tokens) built apart from the op, on both
backends: contiguous and paged caches, cache_batch_idx, packed queries, rotary with left
padding, FP8 caches with descales, GQA, causal and windows, score modifications, one split
of the keys and several; the caches slot by slot after the append; kvcache_append against
the twin byte for byte; queries that see no key output zeros; bad shapes raise naming the
argument; an Ev past the kernels runs the twin; the sm_90 builds (slow).

Cache slots a sequence does not use hold NaN, so padding that leaks fails, and kernel
outputs are poisoned with NaN before they are written.
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
    _paged,
    assert_matches_float64,
)
from test_kvcache_tuning import on_a_stand_in_h100  # noqa: F401 (fixture)

import attnmem
from aot import compile_all
from attnmem.reference import attention as attention_twin
from attnmem.reference import kvcache as twin
from attnmem.reference.rotary import rotary
from backends import BACKENDS, DEVICE, INTERPRET
from tolerance import assert_close_to_float64

FP8 = torch.float8_e4m3fn
F16, F32 = torch.float16, torch.float32

# name: dict of the case's own values over BASE's. n_q: queries per sequence (a list:
# packed); layout: "contiguous", a page size, or "rows" (cache_batch_idx picking rows of a
# pool); rotary: (rotary dim, interleaved); mods: softcap, sinks and ALiBi.
BASE = dict(heads=4, kv_heads=2, append=True, causal=True, window=None, layout="contiguous",
            dtype=F32, mods=False, rotary=None, leftpad=None, fp8=False)
CASES = {
    # The second sequence's cache_seqlens is clamped to 46 (capacity less the new tokens).
    "v_wider": dict(n_q=2, d=24, ev=40, capacity=48, seqlens=[5, 99, 0]),
    "v_narrower_paged_window_mods": dict(n_q=3, d=40, ev=8, capacity=49, seqlens=[30, 2],
                                         kv_heads=1, window=(5, 0), layout=7, mods=True),
    # No new tokens: the second sequence sees no key.
    "rows_no_append_float16": dict(n_q=1, d=16, ev=24, capacity=32, seqlens=[20, 0],
                                   append=False, layout="rows", dtype=F16),
    # 5 queries x 2 heads a kv head: row tiles of 16 rows, some past their sequence.
    "packed_paged": dict(n_q=[1, 0, 5, 3], d=24, ev=40, capacity=40, seqlens=[30, 5, 10, 39],
                         layout=8),
    # 24 of 40 dims rotated (GPT-J pairs); the first sequence's keys start at slot 5.
    "rotary_leftpad_float16": dict(n_q=3, d=40, ev=24, capacity=48, seqlens=[20, 40],
                                   rotary=(24, True), leftpad=[5, 0], dtype=F16),
    "fp8_paged": dict(n_q=2, d=32, ev=48, capacity=48, seqlens=[30, 0], layout=16, dtype=F16,
                      fp8=True, mods=True),
}


def _case(name):
    """name: a key of CASES, or a case's own values over BASE's (tests/test_kvcache_properties.py
    draws them)."""
    return {**BASE, **(CASES[name] if isinstance(name, str) else name)}


def _to(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def _build(name):
    """The case's inputs: q, the caches (NaN in every slot a sequence does not use), new k and
    v (or None), and each sequence's old keys and values (its first slots, float32 values, or
    for an FP8 cache the dequantized e4m3 values), its start slot (clamped cache_seqlens),
    cache_seqlens, the keyword arguments and the descales (or None)."""
    c = _case(name)
    packed = isinstance(c["n_q"], list)
    batch, hkv, capacity = len(c["seqlens"]), c["kv_heads"], c["capacity"]
    n_q = c["n_q"] if packed else [c["n_q"]] * batch
    new = [n * c["append"] for n in n_q]
    starts = [min(max(s, 0), capacity - n) for s, n in zip(c["seqlens"], new)]
    first = c["leftpad"] or [0] * batch
    descales = [0.02 + 0.48 * torch.rand(batch, hkv) for _ in range(2)] if c["fp8"] else None
    caches, old = [], []
    slot = torch.arange(capacity)[None, :]
    unused = (slot >= torch.tensor(starts)[:, None]) | (slot < torch.tensor(first)[:, None])
    for i, dim in enumerate((c["d"], c["ev"])):
        cache = (torch.randn(batch, capacity, hkv, dim) * (4 if c["fp8"] else 1)).masked_fill(
            unused[..., None, None], math.nan).to(FP8 if c["fp8"] else c["dtype"])
        values = cache.double() * (descales[i][:, None, :, None] if c["fp8"] else 1)
        old.append([values[b, :s] for b, s in enumerate(starts)])
        caches.append(cache)
    rows = (sum(n_q),) if packed else (batch, n_q[0])
    q = torch.randn(*rows, c["heads"], c["d"], dtype=c["dtype"])
    k, v = ((torch.randn(*rows, hkv, dim, dtype=c["dtype"]) * (4 if c["fp8"] else 1)
             if c["append"] else None) for dim in (c["d"], c["ev"]))
    kwargs = dict(causal=c["causal"], window=c["window"])
    if packed:
        kwargs.update(cu_seqlens_q=torch.tensor([0, *torch.tensor(n_q).cumsum(0).tolist()],
                                                dtype=torch.int32), max_seqlen_q=max(n_q))
    if c["mods"]:
        kwargs.update(softcap=1.5, sinks=torch.randn(c["heads"]),
                      alibi_slopes=torch.rand(batch, c["heads"]))
    if c["rotary"]:
        angle = torch.rand(capacity, c["rotary"][0] // 2, dtype=torch.float64) * 2 * math.pi
        kwargs.update(rotary_cos=angle.cos(), rotary_sin=angle.sin(),
                      rotary_interleaved=c["rotary"][1])
    if c["leftpad"]:
        kwargs["cache_leftpad"] = torch.tensor(c["leftpad"])
    if c["fp8"]:
        kwargs.update(k_descale=descales[0], v_descale=descales[1])
    seqlens = torch.tensor(c["seqlens"], dtype=torch.int32)
    return q, caches, (k, v), old, starts, seqlens, kwargs


def _sequences(x, name):
    """Sequence b's rows of a padded (B, Sq, ...) or packed (total, ...) tensor, each b."""
    c = _case(name)
    if not isinstance(c["n_q"], list):
        return list(x)
    ends = torch.tensor([0, *c["n_q"]]).cumsum(0).tolist()
    return [x[ends[b]:ends[b + 1]] for b in range(len(c["n_q"]))]


def _new_tokens(name, k, v, starts, kwargs, dtype):
    """Each sequence's new keys and values as the cache must hold them: k rotated at their
    slots (in float64 cos and sin, rounded to q's dtype) and, for an FP8 cache, both
    quantized (twin.quantize, torch's cast); rotated keys in dtype (float64 for the
    reference: unrounded)."""
    c = _case(name)
    ks, vs = [], []
    for b, (k_b, v_b) in enumerate(zip(_sequences(k, name), _sequences(v, name))):
        if c["rotary"]:
            positions = starts[b] + torch.arange(len(k_b))
            k_b = rotary(k_b[None].double(), kwargs["rotary_cos"], kwargs["rotary_sin"],
                         positions[None, :, None], kwargs["rotary_interleaved"])[0]
            k_b = k_b.to(dtype)
        if c["fp8"]:
            k_b, v_b = (twin.quantize(x[None], kwargs[f"{n}_descale"][b:b + 1])[0]
                        for x, n in ((k_b, "k"), (v_b, "v")))
        ks.append(k_b)
        vs.append(v_b)
    return ks, vs


def _reference(name, q, old, new, starts, kwargs, dtype):
    """out, lse of each sequence over its whole keys and values (old, then new), by the
    attention twin in dtype, bottom-right aligned from its first key (its left padding):
    laid out as the op returns them (packed: one batch of the packed rows)."""
    c = _case(name)
    left, right = (-1, -1) if c["window"] is None else c["window"]
    right = 0 if c["causal"] else right
    outs, lses = [], []
    for b, q_b in enumerate(_sequences(q, name)):
        q_b = q_b.to(dtype)
        if c["rotary"]:
            # Per query when causal or local: a window side in [0, capacity).
            local = any(0 <= side < c["capacity"] for side in c["window"] or ())
            step = torch.arange(len(q_b)) * (c["causal"] or local)
            q_b = rotary(q_b[None].double(), kwargs["rotary_cos"], kwargs["rotary_sin"],
                         (starts[b] + step)[None, :, None],
                         kwargs["rotary_interleaved"])[0].to(q_b.dtype)
        first = c["leftpad"][b] if c["leftpad"] else 0
        keys, values = (torch.cat([o[b], n[b].double() * (
            kwargs[f"{which}_descale"][b][None, :, None].double() if c["fp8"] else 1)])[first:]
            .to(dtype) for o, n, which in zip(old, new, ("k", "v")))
        slopes = kwargs.get("alibi_slopes")
        mods = dict(softcap=kwargs.get("softcap") or 0.0,
                    sinks=None if kwargs.get("sinks") is None else kwargs["sinks"].to(dtype),
                    alibi_slopes=None if slopes is None else slopes[b:b + 1].to(dtype))
        out, lse = attention_twin.attention_forward(
            q_b.transpose(0, 1)[None], keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None], None, c["d"] ** -0.5, left, right, **mods)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if isinstance(c["n_q"], list):
        return torch.cat(outs)[None], torch.cat(lses, 1)[None]
    return torch.stack(outs), torch.stack(lses)


def _run(name, q, caches, k, v, seqlens, kwargs, backend, **extra):
    """out, lse (packed: as a batch of one) and the caches after the call (contiguous
    again), on the CPU. Spare pages of a pool stay NaN."""
    layout = _case(name)["layout"]
    caches = [c.clone() for c in caches]
    table = None
    if layout != "contiguous":
        page_size = caches[0].shape[1] if layout == "rows" else layout
        order = torch.randperm(caches[0].shape[0] * caches[0].shape[1] // page_size + 2)
        (caches[0], table), (caches[1], _) = (_paged(c, page_size, order) for c in caches)
        if layout == "rows":
            kwargs = dict(kwargs, cache_batch_idx=table[:, 0].long())
        else:
            kwargs = dict(kwargs, block_table=table)
    caches = [_to(c) for c in caches]
    with attnmem.use_backend(backend), torch.no_grad():
        out, lse = attnmem.attention_with_kvcache(
            _to(q), *caches, k=_to(k), v=_to(v), cache_seqlens=_to(seqlens), return_lse=True,
            **{n: _to(x) for n, x in kwargs.items()}, **extra)
    caches = [c.cpu() for c in caches]
    if table is not None:
        spare = torch.ones(len(caches[0]), dtype=torch.bool)
        spare[table.long().flatten()] = False
        assert all(c[spare].float().isnan().all() for c in caches), "a spare page was written"
        caches = [c[table.long()].flatten(1, 2) for c in caches]
    if "cu_seqlens_q" in kwargs:
        out, lse = out[None], lse[None]
    return out.cpu(), lse.cpu(), caches


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, backend):
    """out (..., Ev) and lse within twice the error of the attention twin in q's dtype of
    float64 over each sequence's whole keys and values; the append writes each new token
    (rotated, quantized) at its slot and touches no other slot; queries that see no key
    output zeros."""
    out, lse = check_matches_float64(name, backend)
    if name == "rows_no_append_float16":
        assert (out[1] == 0).all() and (lse[1] == -math.inf).all()


def check_matches_float64(name, backend, run=_run, **options):
    """test_matches_float64's checks of case `name` (see _case) on backend, with `options`
    (the op's keyword arguments: softcap, sinks, alibi_slopes (B, H), num_splits) over the
    case's; run: _run or a stand-in that calls it (tests/test_kvcache_properties.py's).
    -> out, lse (packed: as a batch of one)."""
    c = _case(name)
    q, caches, (k, v), old, starts, seqlens, kwargs = _build(name)
    kwargs.update(options)
    out, lse, after = run(name, q, caches, k, v, seqlens, kwargs, backend)
    rows = (1, *q.shape[:-1]) if "cu_seqlens_q" in kwargs else q.shape[:-1]
    assert out.shape == (*rows, c["ev"])
    new = ([], [])
    if k is not None:
        new = _new_tokens(name, k, v, starts, kwargs, c["dtype"])
        exact = _new_tokens(name, k, v, starts, kwargs, torch.float64)
    for i, (got, before) in enumerate(zip(after, caches)):
        rotated = c["rotary"] and i == 0 and k is not None
        expect = before.double() if rotated else before.clone()
        for b, tokens in enumerate((exact if rotated else new)[i]):
            expect[b, starts[b]:starts[b] + len(tokens)] = tokens.to(expect.dtype)
        if rotated:
            # Rotated in float32 and rounded: within a unit in the last place of float64's.
            torch.testing.assert_close(got.double(), expect.double(), rtol=2 ** -10, atol=1e-6,
                                       equal_nan=True)
        else:
            assert torch.equal(got.view(torch.uint8), expect.view(torch.uint8)), i
    new_ref = exact if k is not None else [[x[b, :0] for b in range(len(starts))]
                                           for x in caches]
    ref = _reference(name, q, old, new_ref, starts, kwargs, torch.float64)
    base = _reference(name, q, old, new_ref, starts, kwargs, c["dtype"])
    if kwargs.get("sinks") is None:
        assert_matches_float64(out, lse, ref, base, c["dtype"])
    else:  # every row sees its sink: lse is finite
        assert_close_to_float64([out, lse.to(c["dtype"])], [ref[0], ref[1]],
                                [base[0], base[1].to(c["dtype"])], c["dtype"])
    return out, lse


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("n_splits", [1, 3])
def test_splits(n_splits):
    """One split (the attention kernel writes out itself) or three (the combine merges Ev
    columns of partial outputs), with sinks: the kernels against the twin in float64."""
    from attnmem.kernels import attention_kvcache as kernel

    name = "v_wider"
    q, caches, (k, v), old, starts, seqlens, kwargs = _build(name)
    with torch.no_grad():
        attnmem.kvcache_append(*caches, k, v, cache_seqlens=seqlens)
    sinks = torch.randn(q.shape[2])
    lengths = torch.tensor(starts, dtype=torch.int32)
    out, lse = kernel.attention_with_kvcache(
        *(_to(x) for x in (q, *caches, lengths)), None, q.shape[1], q.shape[-1] ** -0.5, -1, 0,
        n_splits=n_splits, sinks=_to(sinks))
    expect = twin.attention_with_kvcache_forward(
        q.double(), *(x.double() for x in caches), lengths, None, q.shape[1],
        q.shape[-1] ** -0.5, -1, 0, sinks=sinks.double())
    assert out.shape == (*q.shape[:-1], v.shape[-1])
    torch.testing.assert_close(out.cpu().double(), expect[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), expect[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "paged", "packed", "fp8"])
def test_kvcache_append_matches_the_twin(layout, backend):
    """kvcache_append of k (D 40) and v (Ev 8) leaves the caches byte for byte as the twin's
    append does: contiguous, paged, packed (with rotary) and into e4m3 caches. Compiled, the
    kernel's rotation x * cos + x_pair * sin is one fused multiply-add (triton contracts it;
    the interpreter and torch round the product first), so its 24 rotated dims may differ by
    a float32 rounding: see _assert_rotated_close."""
    batch, n_new, hkv, d, ev, capacity = 2, 3, 2, 40, 8, 16
    caches = [torch.full((batch, capacity, hkv, dim), math.nan) for dim in (d, ev)]
    k, v = (torch.randn(batch, n_new, hkv, dim) for dim in (d, ev))
    seqlens = torch.tensor([4, 20], dtype=torch.int32)  # the second clamped to 13
    kwargs = dict(cache_seqlens=seqlens)
    if layout == "paged":
        order = torch.randperm(batch * capacity // 4 + 2)
        (caches[0], table), (caches[1], _) = (_paged(c, 4, order) for c in caches)
        kwargs["block_table"] = table
    if layout == "packed":
        k, v = (x.flatten(0, 1)[:4] for x in (k, v))
        angle = torch.rand(capacity, 12)
        kwargs.update(cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32), max_seqlen=3,
                      rotary_cos=angle.cos(), rotary_sin=angle.sin())
    if layout == "fp8":
        caches = [c.to(FP8) for c in caches]
        k, v = k.half() * 4, v.half() * 4
        kwargs.update(k_descale=torch.rand(batch, hkv) + 0.1, v_descale=torch.rand(batch, hkv))
    after = {}
    for which in dict.fromkeys((backend, "torch")):
        got = [_to(c.clone()) for c in caches]
        with attnmem.use_backend(which):
            attnmem.kvcache_append(*got, _to(k), _to(v), **{n: _to(x) for n, x in kwargs.items()})
        after[which] = [c.cpu() for c in got]
    for got, expect, before in zip(after[backend], after["torch"], caches):
        if layout == "packed" and got.shape[-1] == d and backend == "triton" and not INTERPRET:
            rotary_dim = 2 * angle.shape[1]
            _assert_rotated_close(got[..., :rotary_dim], expect[..., :rotary_dim])
            got, expect = got[..., rotary_dim:], expect[..., rotary_dim:]
        assert torch.equal(got.view(torch.uint8), expect.view(torch.uint8))
        assert not torch.equal(got.view(torch.uint8), before.view(torch.uint8))


def _assert_rotated_close(got, expect):
    """Float32 keys rotated in (d, d + R / 2) pairs (got, expect: (..., R)) alike but for the
    rounding of the rotation: y = x * cos + x_pair * sin (x_pair sin's sign per pair) is within
    2u (|x cos| + |x_pair sin|), u = 2^-24, of exact whether rounded as two products and a sum
    (torch) or as a product and a fused multiply-add (a compiled kernel), so the two are within
    4u (|x| + |x_pair|) <= 4 sqrt(2) u hypot(x, x_pair) of each other, and a rotation keeps
    hypot(x, x_pair) = hypot(y, y_pair). Slots the append leaves (NaN) match byte for byte."""
    half = expect.shape[-1] // 2
    pair = torch.cat([expect[..., half:], expect[..., :half]], -1)
    bound = 2.0**-21 * torch.hypot(expect.double(), pair.double())
    same = got.view(torch.int32) == expect.view(torch.int32)
    close = (got.double() - expect.double()).abs() <= bound
    assert (same | close).all(), (
        f"{int((~(same | close)).sum())} rotated elements differ past the bound, most by "
        f"{(got.double() - expect.double()).abs()[~(same | close)].max():.3g}")


def _good(d=16, ev=24):
    return dict(q=torch.randn(2, 1, 4, d), k_cache=torch.randn(2, 32, 2, d),
                v_cache=torch.randn(2, 32, 2, ev), k=torch.randn(2, 1, 2, d),
                v=torch.randn(2, 1, 2, ev), cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))


def _packed_good():
    args = _good()
    return dict(args, q=args["q"][:, 0], k=args["k"][:, 0], v=args["v"][:, 0],
                cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32), max_seqlen_q=1)


ERRORS = {
    "v_cache_slots": (dict(v_cache=torch.zeros(2, 31, 2, 24)),
                      "v_cache must have k_cache's shape but for its head dim, (2, 32, 2, Ev) "
                      "with Ev >= 1, got (2, 31, 2, 24)"),
    "v_cache_heads": (dict(v_cache=torch.zeros(2, 32, 1, 24)),
                      "v_cache must have k_cache's shape but for its head dim"),
    "v_cache_no_columns": (dict(v_cache=torch.zeros(2, 32, 2, 0)), "with Ev >= 1"),
    "v_cache_3d": (dict(v_cache=torch.zeros(2, 32, 24)), "v_cache must be (B, S_max, Hkv, Ev)"),
    "v_with_k_head_dim": (dict(v=torch.zeros(2, 1, 2, 16)),
                          "v must be (B, Sq, Hkv, Ev) = (2, 1, 2, 24), got (2, 1, 2, 16)"),
    "k_with_v_head_dim": (dict(k=torch.zeros(2, 1, 2, 24)),
                          "k must be (B, Sq, Hkv, D) = (2, 1, 2, 16), got (2, 1, 2, 24)"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_shapes_name_the_argument(name):
    change, words = ERRORS[name]
    args = dict(_good(), **change)
    with pytest.raises(ValueError, match=re.escape(words)):
        attnmem.attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                                       **args)


def test_bad_packed_and_appended_v_names_v():
    args = _packed_good()
    args["v"] = args["v"][..., :16]
    with pytest.raises(ValueError, match=re.escape("v must be (total_q, Hkv, Ev), packed as q "
                                                   "= (2, 2, 24)")):
        attnmem.attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                                       **args)
    args = _good()
    with pytest.raises(ValueError, match=re.escape("v must be (B, S, Hkv, Ev) = (2, 1, 2, 24)")):
        attnmem.kvcache_append(args["k_cache"], args["v_cache"], args["k"], args["k"],
                               cache_seqlens=args["cache_seqlens"])


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
def test_value_head_dim_past_the_kernels_falls_back_to_the_twin():
    """Ev past 512: backend="triton" refuses naming v_cache's head dim, "auto" runs the twin
    (the append included)."""
    args = {n: _to(x) for n, x in _good(ev=520).items()}
    q, caches = args.pop("q"), [args.pop("k_cache"), args.pop("v_cache")]
    with attnmem.use_backend("triton"), pytest.raises(RuntimeError,
                                                      match="v_cache's head dim 520 > 512"):
        attnmem.attention_with_kvcache(q, *[c.clone() for c in caches], **args)
    results = {}
    for backend in ("auto", "torch"):
        got = [c.clone() for c in caches]
        with attnmem.use_backend(backend):
            results[backend] = (attnmem.attention_with_kvcache(q, *got, **args), *got)
    assert results["auto"][0].shape == (2, 1, 4, 520)
    for got, expect in zip(results["auto"], results["torch"]):
        assert torch.equal(got, expect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """The custom ops' fakes give out v_cache's head dim, padded and packed."""
    from attnmem import kvcache

    args = {n: _to(x) for n, x in _good().items()}
    caches, seqlens = (args["k_cache"], args["v_cache"]), args["cache_seqlens"]
    torch.library.opcheck(kvcache._append.default, (
        args["q"], *caches, args["k"], args["v"], seqlens, None, backend))
    torch.library.opcheck(kvcache._attend.default, (
        args["q"], *caches, seqlens, None, 1, 0.25, 3, 0, backend))
    packed = {n: _to(x) for n, x in _packed_good().items()}
    torch.library.opcheck(kvcache._attend.default, (
        packed["q"], *caches, seqlens, None, 2, 0.25, -1, 0, backend, 0.0, None, None, None,
        packed["cu_seqlens_q"], 1))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_configs_follow_the_larger_head_dim(on_a_stand_in_h100):  # noqa: F811
    """v's tile goes to the kernel only where its head dim differs (equal head dims launch and
    tune as before); BLOCK_M, the configs and the splits' tiles follow the larger tile; the
    combine merges Ev columns; on sm_90, the configs that spill only with Ev apart drop out."""
    from attnmem.kernels import attention_kvcache as kernel

    q = torch.zeros(2, 1, 16, 64, dtype=F16)
    for ev in (128, 64):
        k_cache = torch.zeros(2, 512, 2, 64, dtype=F16)
        v_cache = torch.zeros(2, 512, 2, ev, dtype=F16)
        kernel.attention_with_kvcache(q, k_cache, v_cache, torch.tensor([9, 500]).int(), None,
                                      1, 0.125, -1, 0)
    mla, same = on_a_stand_in_h100.calls
    assert (mla["meta"]["HEAD_DV"], mla["meta"]["BLOCK_DV"]) == (128, 128)
    assert "HEAD_DV" not in same["meta"] and "BLOCK_DV" not in same["meta"]
    block_m = kernel.config_for(8, 128, 2, interpret=False)[0]
    assert mla["meta"]["BLOCK_M"] == block_m
    assert mla["configs"] == kernel.launch_configs(block_m, 128, 2, False,
                                                   kernel.SMEM_LIMIT[90])
    assert len(mla["key"]) == len(same["key"]) + 1 and 128 in mla["key"]
    kept = kernel.without_value_spills(kernel.launch_configs(16, 256, 2, False, 232448), 16,
                                       kernel.head_dims_meta(192, 128), 2, False)
    assert kept and dict(BLOCK_N=32, num_warps=4, num_stages=1) not in kept
    full = kernel.launch_configs(16, 256, 2, False, 232448)
    assert kernel.without_value_spills(full, 16, kernel.head_dims_meta(256, 256), 2,
                                       False) == full


# ---------------------------------------------------------------------------------------
# Compiled for sm_90 (no GPU needed; see tests/aot.py)
# ---------------------------------------------------------------------------------------


def _mla_job(job, d, ev, rows=8, **expect):
    """job (tests/test_attention_kvcache.py's) at head dims D = d and Ev = ev; the attention's
    at BLOCK_M for `rows` rows a kv head and the first config the sm_90 launch keeps (the
    larger tile's, less VALUE_HEAD_DIM_SPILLS_SM90's). Carries no spill and `expect`."""
    from attnmem.kernels import attention_kvcache as kernel

    meta = kernel.head_dims_meta(d, ev)
    constexprs = dict(job["constexprs"], **meta)
    if job["kernel"] == "_kvcache_attend":
        elem, fp8 = (4 if job["pointers"]["q_ptr"] == "fp32" else 2), "FP8_KV" in constexprs
        tile = kernel.tile_head_dim(meta)
        block_m = kernel.config_for(rows, tile, elem, interpret=False)[0]
        config = kernel.without_value_spills(kernel.launch_configs(
            block_m, tile, elem, fp8, kernel.SMEM_LIMIT[90]), block_m, meta, elem, fp8)[0]
        constexprs.update(BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"])
        job = dict(job, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return dict(job, constexprs=constexprs, expect=dict(NO_SPILLS, **expect))


# Multi-head latent attention's (192, 128), decoding GQA 8:1 from a paged cache in splits in
# float16 and from an e4m3 cache (16-row tiles: mma.sync); (64, 128) with 128 rows a kv head
# (64-row tiles: wgmma); the append at (192, 128).
AOT_CASES = {
    "attend-sm90-float16-d192-ev128": _mla_job(_attend_job(90, "float16", 192, 8, True, True),
                                               192, 128),
    "attend-sm90-fp8-bfloat16-d192-ev128": _mla_job(
        _attend_job(90, "bfloat16", 192, 8, True, True, fp8_kv=True), 192, 128),
    "attend-sm90-float16-d64-ev128-rows128": _mla_job(
        _attend_job(90, "float16", 64, 128, True, False), 64, 128, rows=128, wgmma=True),
    "append-sm90-bfloat16-d192-ev128": _mla_job(_append_job(90, "bfloat16", 192, 8, True),
                                                192, 128),
} if HAS_TRITON else {}


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_compile_for_sm90_without_spills():
    """No register spills and wgmma where a 64-row tile allows it (the jobs carry both, so
    tests/test_triton_versions.py checks them on the GPU machines' triton too), 16-bit dots
    on tensor cores, 16-byte loads."""
    jobs = dict(AOT_CASES)
    for (name, job), result in zip(jobs.items(), compile_all(list(jobs.values()))):
        assert result["error"] is None, (name, result["error"])
        assert {key: result[key] for key in job["expect"]} == job["expect"], (name, result)
        assert result["vector_loads"], name
        if job["kernel"] == "_kvcache_attend":
            assert result["wgmma"] or result["mma_sync"], name
