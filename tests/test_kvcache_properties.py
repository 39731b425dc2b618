"""attnmem.attention_with_kvcache on decoding problems drawn by hypothesis, against float64
attention over each sequence's whole visible keys and values (check_matches_float64 of
tests/test_attention_kvcache_mla.py): batch, GQA, head dims D and Ev, contiguous, paged (odd
page sizes, a shuffled block table with spare pages) or cache_batch_idx caches, cache lengths
from empty to full, new tokens appended in the same call (packed as the queries, or in about
a third of the examples on their own with cu_seqlens_k_new, counts apart from the queries', 0
included) or none, padded or packed queries, causal, windowed or neither, left padding, the
split count, the score modifications, and rotary embeddings or an e4m3 cache, drawn
together. The caches are checked slot by slot (the new tokens at their slots, every other
slot and spare page untouched), and queries that see no key output zeros with lse -inf.

New tokens packed on their own are checked as tests/test_attention_kvcache_knew.py checks
them (FlashAttention-3's definition): the case is drawn as the caches after the append, with
no new tokens, and _appending takes each sequence's new tokens out of them (NaN left in their
slots) and has the op append them back with cu_seqlens_k_new: the caches must end byte for
byte as drawn, and out and lse as attention over cache_seqlens[b] + n_new[b] keys.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attention_fp8 import _interpreter_e4m3_cast  # noqa: F401 (autouse fixture)
from test_attention_kvcache_mla import _run, check_matches_float64

from backends import BACKENDS, DEVICE

FP8 = torch.float8_e4m3fn


def _length(cap):
    """An integer in [0, cap], its ends as likely as the rest together."""
    return st.sampled_from([0, cap]) | st.integers(0, cap)


@st.composite
def problems(draw):
    """A case for check_matches_float64 and the op's options over it (num_splits, and the
    score modifications: drawn here, made from the seed)."""
    batch, kv_heads, group = (draw(st.integers(1, n)) for n in (3, 2, 3))
    d = draw(st.integers(1, 72))
    ev = draw(st.none() | st.integers(1, 72)) or d
    packed = draw(st.booleans())
    # Packed: some sequences may have no queries, not all (nothing to compare then).
    n_q = (draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch).filter(any))
           if packed else draw(st.integers(1, 3)))
    # New tokens packed on their own, about a third of the time: their counts, else None.
    knew = (draw(st.lists(st.integers(0, 4), min_size=batch, max_size=batch))
            if draw(st.integers(0, 2)) == 0 else None)
    append = knew is None and draw(st.booleans())
    new = knew if knew is not None else [n * append for n in (n_q if packed else [n_q] * batch)]
    layout = draw(st.sampled_from(["contiguous", "rows", "paged"]))
    page = draw(st.integers(1, 8)) if layout == "paged" else 1
    capacity = page * draw(st.integers(max(1, -(-max(new) // page)), max(1, 40 // page)))
    side = st.just(-1) | st.integers(0, capacity)
    # Rotary (with new keys) or an e4m3 cache (with 16-bit queries), not both: the cache
    # check's tolerance for rotated keys is a 16-bit rounding, not an e4m3 one.
    extra = draw(st.sampled_from([None, "rotary", "fp8"]))
    rotary = None
    if extra == "rotary" and append and d >= 2:
        rotary = (2 * draw(st.integers(1, d // 2)), draw(st.booleans()))
    dtypes = [torch.float16] if extra == "fp8" else [torch.float32, torch.float16]
    # With cu_seqlens_k_new the op's cache_seqlens may pass the room its new tokens leave
    # (clamped); the case's lengths are then the caches' after the append.
    starts = [draw(_length(capacity if knew is not None else capacity - n)) for n in new]
    seqlens = (starts if knew is None
               else [min(s, capacity - n) + n for s, n in zip(starts, new)])
    return dict(
        case=dict(heads=kv_heads * group, kv_heads=kv_heads, d=d, ev=ev, n_q=n_q,
                  append=append, capacity=capacity,
                  seqlens=seqlens,
                  layout=page if layout == "paged" else layout, causal=draw(st.booleans()),
                  window=draw(st.none() | st.tuples(side, side)),
                  leftpad=draw(st.none() | st.lists(_length(capacity), min_size=batch,
                                                    max_size=batch)),
                  rotary=rotary, fp8=extra == "fp8", dtype=draw(st.sampled_from(dtypes))),
        num_splits=draw(st.sampled_from([0, 1, 3])),
        softcap=draw(st.none() | st.floats(0.5, 4.0)), sinks=draw(st.booleans()),
        alibi=draw(st.booleans()), seed=draw(st.integers(0, 2**31)),
        knew=None if knew is None else (knew, starts))


def _appending(counts, cache_seqlens):
    """check_matches_float64's run for a case drawn as the caches after the append: sequence
    b's last counts[b] tokens before its length (the case's seqlens) are taken out of the
    caches, NaN left in their slots, and passed to _run as k and v packed on their own
    (cu_seqlens_k_new) with cache_seqlens (unclamped), which the op must write them back at.
    From an e4m3 cache they are passed as their values times the descales in q's 16-bit
    dtype, which the append's quantization turns back into the same e4m3 values (float16
    rounds them by far less than half a step of e4m3's)."""
    def run(name, q, caches, k, v, seqlens, kwargs, backend, **extra):
        rows = [slice(end - n, end) for end, n in zip(seqlens.tolist(), counts)]
        before = [c.clone() for c in caches]
        new = []
        for which, cache in zip("kv", before):
            x = torch.cat([cache[b, r] for b, r in enumerate(rows)])
            if cache.dtype == FP8:
                descales = kwargs[f"{which}_descale"].double().repeat_interleave(
                    torch.tensor(counts), 0)
                x = (x.double() * descales[..., None]).to(q.dtype)
            new.append(x)
            for b, r in enumerate(rows):
                cache[b, r] = math.nan
        cu_seqlens = torch.tensor([0, *counts], device=DEVICE).cumsum(0).to(torch.int32)
        return _run(name, q, before, *new, torch.tensor(cache_seqlens, dtype=torch.int32),
                    kwargs, backend, cu_seqlens_k_new=cu_seqlens, **extra)
    return run


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
# poison_empty only switches torch's NaN fill on for the whole test: every example wants it.
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problem=problems())
def test_random_decoding_problems_match_float64(backend, problem):
    torch.manual_seed(problem["seed"])
    case = problem["case"]
    batch, heads = len(case["seqlens"]), case["heads"]
    knew = problem["knew"]
    check_matches_float64(
        case, backend, run=_run if knew is None else _appending(*knew),
        num_splits=problem["num_splits"], softcap=problem["softcap"],
        sinks=torch.randn(heads) if problem["sinks"] else None,
        alibi_slopes=torch.rand(batch, heads) if problem["alibi"] else None)
