"""The API contract, property by property, on both backends (issue 9).

Every public op and module either gives the right answer (float64 reference on the same
rounded inputs, gradients included, finite where the contract promises numbers, inputs
unchanged) or raises ValueError/TypeError naming the argument. Empty inputs (zero batch,
queries, keys, slots, heads) are valid; padding (keys past kv_lengths, masked slots)
contributes nothing whatever it holds. The ops' references are written out from the
docstrings' formulas in float64 (the pure-torch twins are what the torch backend runs, so
they cannot be their own reference); a module's is itself in float64 on the twins, and
MultiheadAttention's is also torch.nn.MultiheadAttention.

Shapes stay small (the Triton kernels run through the interpreter), with some past the
interpreter's 16-wide tiles. A failure prints hypothesis's reproduction blob;
ATTNMEM_CONTRACT_EXAMPLES (default 12 per property) searches longer.
"""

import math

import numpy as np
import pytest
import torch
from contract_strategies import (
    ERRORS,
    Data,
    arrange,
    bad_tensors,
    check_call,
    check_module,
    compare,
    contract,
    dtypes,
    layouts,
    lengths,
    named,
    poisons,
    same,
    seeds,
)
from hypothesis import given
from hypothesis import strategies as st

import attnmem
import attnmem.nn
from backends import BACKENDS, DEVICE

INF = float("inf")


def safe_softmax(scores, keep):
    """(weights, lse) over the last dim of scores where keep; a row with nothing kept gets
    zero weights and lse -inf, and no gradient."""
    scores = scores.masked_fill(~keep, -INF)
    if scores.shape[-1] == 0:
        return scores, scores.sum(-1) - INF
    top = scores.amax(-1, keepdim=True).detach()
    exps = torch.exp(scores - torch.where(torch.isfinite(top), top, 0.0))
    total = exps.sum(-1, keepdim=True)
    seen = total > 0
    total = torch.where(seen, total, 1.0)
    lse = torch.where(seen, top + torch.log(total), -INF).squeeze(-1)
    return exps / total, lse


def integers(low, high):
    """Python ints and numpy ints alike: numpy integers are accepted where ints are."""
    return st.integers(low, high).flatmap(
        lambda v: st.sampled_from([v, np.int64(v), np.int32(v)]))


def lengths_up_to(small, large):
    """A sequence or slot count: small (0 included), or past the interpreter's 16-wide tiles
    so that the kernels' multi-tile and multi-split paths run."""
    return st.integers(0, small) | st.integers(15, large)


def key_padding(batch, n, lens):
    """(B, N) bool: True where position j is past lens[b]."""
    if lens is None:
        return torch.zeros(batch, n, dtype=torch.bool, device=DEVICE)
    return torch.arange(n, device=DEVICE)[None, :] >= torch.tensor(
        lens, dtype=torch.long, device=DEVICE).view(batch, 1)


def poisoned(x, padding, value):
    """x with value at padding (broadcast over x's trailing dims)."""
    return x.masked_fill(padding.view(*padding.shape, *[1] * (x.ndim - padding.ndim)), value)


# attention ---------------------------------------------------------------------------------

def attention_visible(n_q, n_k, causal, window, lens, batch):
    """(B, 1, Nq, Nk): query i sees key j (the docstring's rules, a = i + Nk - Nq)."""
    i = torch.arange(n_q, device=DEVICE)[:, None]
    j = torch.arange(n_k, device=DEVICE)[None, :]
    a = i + n_k - n_q
    keep = torch.ones(n_q, n_k, dtype=torch.bool, device=DEVICE)
    if causal:
        keep &= j <= a
    if window is not None:
        left, right = (-1 if side is None else int(side) for side in window)
        if left >= 0:
            keep &= j >= a - left
        if right >= 0:
            keep &= j <= a + right
    return keep[None, None] & ~key_padding(batch, n_k, lens)[:, None, None, :]


def attention_reference(keep, scale, return_lse):
    def ref(q, k, v, **unused):
        group = q.shape[1] // k.shape[1]
        k, v = (x.repeat_interleave(group, 1) for x in (k, v))
        weights, lse = safe_softmax(q @ k.transpose(-1, -2) * scale, keep)
        out = (weights @ v).to(q.dtype)
        return (out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)) \
            if return_lse else (out,)
    return ref


@st.composite
def attention_cases(draw, backend):
    batch, kv_heads, group = draw(st.integers(0, 2)), draw(st.integers(1, 2)), \
        draw(st.integers(1, 2))
    n_q, n_k, dim = draw(lengths_up_to(5, 40)), draw(lengths_up_to(6, 40)), \
        draw(st.sampled_from([1, 3, 4, 5, 8, 40]))
    side = st.none() | integers(-1, 4)
    window = draw(st.none() | st.tuples(side, side))
    kv = draw(st.none() | lengths(batch, n_k))
    return dict(shape=(batch, kv_heads * group, kv_heads, n_q, n_k, dim),
                causal=draw(st.booleans()), window=window, kv=kv,
                scale=draw(st.none() | st.floats(0.05, 2.0)), dtype=draw(dtypes(backend)),
                layout=draw(layouts), poison=draw(poisons), seed=draw(seeds),
                return_lse=draw(st.booleans()))


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_attention_matches_float64(backend, data):
    check_attention(backend, data.draw(attention_cases(backend)))


def attention_case(**changes):
    case = dict(shape=(1, 2, 1, 3, 5, 4), causal=False, window=None, kv=None, scale=None,
                dtype=torch.float32, layout="contiguous", poison=float("nan"), seed=0,
                return_lse=True)
    return {**case, **changes}


# Each contract clause once, whatever hypothesis draws.
ATTENTION_CASES = {
    "strided_last": attention_case(layout="strided_last"),
    "padded_rows": attention_case(layout="padded_rows"),
    "transposed": attention_case(layout="transposed"),
    "no batch": attention_case(shape=(0, 2, 1, 3, 5, 4)),
    "no query": attention_case(shape=(2, 2, 1, 0, 5, 4)),
    "no key": attention_case(shape=(2, 2, 1, 3, 0, 4)),
    "fully masked": attention_case(kv=(torch.tensor([0, 2**32 + 1], device=DEVICE), [0, 5]),
                                   shape=(2, 2, 1, 3, 5, 4), poison=float("inf")),
    "tiles": attention_case(shape=(1, 4, 2, 33, 40, 40), causal=True, window=(20, None),
                            kv=(torch.tensor([37], device=DEVICE), [37])),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_cases_match_float64(backend, case):
    check_attention(backend, ATTENTION_CASES[case])


def check_attention(backend, case):
    batch, heads, kv_heads, n_q, n_k, dim = case["shape"]
    rand, dtype, layout = Data(case["seed"]), case["dtype"], case["layout"]
    q, k, v = rand.randn(batch, heads, n_q, dim), rand.randn(batch, kv_heads, n_k, dim), \
        rand.randn(batch, kv_heads, n_k, dim)
    kv_lengths, lens = case["kv"] or (None, None)
    padding = key_padding(batch, n_k, lens)[:, None]
    given_ = dict(q=arrange(q.to(dtype), layout),
                  k=arrange(poisoned(k, padding, case["poison"]).to(dtype), layout),
                  v=arrange(poisoned(v, padding, case["poison"]).to(dtype), layout))
    keep = attention_visible(n_q, n_k, case["causal"], case["window"], lens, batch)
    scale = 1 / math.sqrt(dim) if case["scale"] is None else case["scale"]
    kwargs = dict(causal=case["causal"], scale=case["scale"], window=case["window"],
                  kv_lengths=kv_lengths, return_lse=case["return_lse"])

    def op(q, k, v):
        out = attnmem.attention(q, k, v, **kwargs)
        return out if case["return_lse"] else (out,)

    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    check_call(backend, op, attention_reference(keep, scale, case["return_lse"]), given_,
               dict(q=q, k=k, v=v), rand, [True, True], [dtype, lse_dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_attention_huge_scale_is_hard_attention(backend, data):
    """A scale whose scores overflow the dtype: the softmax becomes a max (ties share)."""
    batch, heads, n_q, n_k, dim = (data.draw(st.integers(1, n)) for n in (2, 2, 3, 5, 4))
    scale = data.draw(st.sampled_from([1e10, 1e30, 1e38, 3e38]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    rand = Data(data.draw(seeds))
    # Small integers: the dot products are exact, so the argmax is the same in every dtype.
    q, k = (torch.randint(-2, 3, (batch, heads, n, dim), generator=rand.gen,
                          device=DEVICE).double() for n in (n_q, n_k))
    v = rand.randn(batch, heads, n_k, dim)
    scores = q @ k.transpose(-1, -2)
    top = scores == scores.amax(-1, keepdim=True)
    expect = (top.double() / top.sum(-1, keepdim=True)) @ v.to(dtype).double()
    with attnmem.use_backend(backend):
        try:
            out, lse = attnmem.attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=scale,
                                         return_lse=True)
        except ERRORS as error:  # a scale the computation cannot hold may be refused
            named(error, "scale")
            return
    assert torch.isfinite(out).all(), f"non-finite output at scale {scale}"
    assert not torch.isnan(lse).any(), "NaN lse"
    torch.testing.assert_close(out.double(), expect, atol=4e-3 if dtype == torch.float16
                               else 1e-5, rtol=0)


# memory ops --------------------------------------------------------------------------------

def similarity(memory, keys, kind):
    dots = keys @ memory.transpose(1, 2)
    if kind == "dot":
        return dots
    if kind == "scaled_dot":
        return dots / math.sqrt(memory.shape[-1])
    norms_sq = keys.pow(2).sum(-1)[:, :, None] * memory.pow(2).sum(-1)[:, None, :]
    return dots / norms_sq.clamp_min(1e-16).sqrt()


def address_reference(memory, keys, strength, kind, mask):
    scores = similarity(memory, keys, kind)
    if strength is not None:
        scores = scores * strength[:, :, None]
    keep = torch.ones_like(scores, dtype=torch.bool) if mask is None else \
        mask[:, None, :].expand_as(scores)
    return safe_softmax(scores, keep)[0]


@st.composite
def memory_cases(draw, backend):
    batch, n, dim, heads = draw(st.integers(0, 2)), draw(lengths_up_to(6, 50)), \
        draw(st.sampled_from([1, 2, 3, 5, 8, 40])), draw(st.integers(0, 3))
    return dict(batch=batch, n=n, dim=dim, heads=heads,
                similarity=draw(st.sampled_from(["cosine", "dot", "scaled_dot"])),
                strength=draw(st.sampled_from([None, 1.0, 5.0])),
                # None: no mask; 0.0: every slot masked; else the share of usable slots
                masked=draw(st.sampled_from([None, 0.0, 0.3, 0.7, 1.0])),
                value_dim=draw(st.none() | st.integers(1, 4)),
                zero_rows=draw(st.booleans()), return_weights=draw(st.booleans()),
                shared=draw(st.booleans()),
                dtype=draw(dtypes(backend)), layout=draw(layouts), poison=draw(poisons),
                seed=draw(seeds))


def memory_inputs(case):
    """(given, clean, mask): memory, keys, strength, values; masked slots poisoned."""
    rand, dtype, layout = Data(case["seed"]), case["dtype"], case["layout"]
    b, n, d, r = case["batch"], case["n"], case["dim"], case["heads"]
    memory, keys = rand.randn(b, n, d), rand.randn(b, r, d)
    # Zero-norm keys and slots: cosine similarity must stay finite. (The gradient for a
    # zero key is of order 1/eps = 1e8: more than float16 holds.)
    if case["zero_rows"] and dtype != torch.float16:
        memory[:, :1] = 0
        keys[:, :1] = 0
    clean = dict(memory=memory, keys=keys)
    if case["strength"] is not None:
        clean["strength"] = rand.rand(b, r) * case["strength"]
    if case["value_dim"] is not None:
        clean["values"] = rand.randn(b, n, case["value_dim"])
    mask = None if case["masked"] is None else rand.bools(b, n, p=case["masked"])
    given_ = {}
    for name, x in clean.items():
        if mask is not None and name in ("memory", "values"):
            x = poisoned(x, ~mask, case["poison"])
        if case["shared"] and mask is None and name in ("memory", "values") and b:
            # one memory for the whole batch, expanded without copies (KeyValueMemory)
            clean[name] = x[:1].expand_as(x)
            given_[name] = arrange(x[:1].to(dtype), layout).expand_as(x)
        else:
            given_[name] = arrange(x.to(dtype), layout)
    return given_, clean, mask, rand


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_memory_address_and_attend_match_float64(backend, data):
    check_memory(backend, data.draw(memory_cases(backend)))


def memory_case(**changes):
    case = dict(batch=2, n=5, dim=3, heads=2, similarity="cosine", strength=5.0, masked=0.7,
                value_dim=None, zero_rows=False, return_weights=True, shared=False,
                dtype=torch.float32, layout="contiguous", poison=float("nan"), seed=0)
    return {**case, **changes}


MEMORY_CASES = {
    "strided_last": memory_case(layout="strided_last", value_dim=2),
    "shared memory": memory_case(masked=None, shared=True, value_dim=4),
    "every slot masked": memory_case(masked=0.0, poison=float("inf")),
    "no head": memory_case(heads=0),
    "no slot": memory_case(n=0),
    "no batch": memory_case(batch=0),
    "zero-norm rows": memory_case(zero_rows=True, masked=None),
    "splits": memory_case(n=50, dim=40, similarity="dot", value_dim=3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_memory_cases_match_float64(backend, case):
    check_memory(backend, MEMORY_CASES[case])


def check_memory(backend, case):
    given_, clean, mask, rand = memory_inputs(case)
    kind, return_weights = case["similarity"], case["return_weights"]

    def address(memory, keys, strength=None, values=None):
        return (attnmem.memory_address(memory, keys, strength=strength, similarity=kind,
                                       mask=mask),)

    def address_ref(memory, keys, strength=None, values=None):
        return (address_reference(memory, keys, strength, kind, mask).to(memory.dtype),)

    def attend(memory, keys, strength=None, values=None):
        out = attnmem.memory_attend(memory, keys, values=values, strength=strength,
                                    similarity=kind, mask=mask, return_weights=return_weights)
        return out if return_weights else (out,)

    def attend_ref(memory, keys, strength=None, values=None):
        weights = address_reference(memory, keys, strength, kind, mask)
        read = (weights @ (memory if values is None else values)).to(memory.dtype)
        return (read, weights.to(memory.dtype)) if return_weights else (read,)

    # A cosine score's gradient divides by the norms; strengths scale the logits.
    condition = 1.0 + (case["strength"] or 1.0)
    dtype = case["dtype"]
    check_call(backend, address, address_ref, given_, clean, rand, [True], [dtype], condition)
    check_call(backend, attend, attend_ref, given_, clean, rand, [True, True], [dtype, dtype],
               condition)


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_addressing_weights_sum_to_one_at_huge_strengths(backend, data):
    batch, n, dim, heads = (data.draw(st.integers(1, m)) for m in (2, 20, 8, 3))
    kind = data.draw(st.sampled_from(["cosine", "dot", "scaled_dot"]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    strength = data.draw(st.sampled_from([1e4, 6e4] if dtype == torch.float16 else
                                         [1e4, 1e8, 1e12]))
    rand = Data(data.draw(seeds))
    memory, keys = rand.randn(batch, n, dim).to(dtype), rand.randn(batch, heads, dim).to(dtype)
    mask = rand.bools(batch, n, p=0.8)
    mask[:, 0] = True
    with attnmem.use_backend(backend):
        weights = attnmem.memory_address(memory, keys, strength=torch.full(
            (batch, heads), strength, dtype=dtype, device=DEVICE), similarity=kind, mask=mask)
        read, attended = attnmem.memory_attend(memory, keys, strength=torch.full(
            (batch, heads), strength, dtype=dtype, device=DEVICE), similarity=kind, mask=mask,
            return_weights=True)
    for w in (weights, attended):
        assert torch.isfinite(w).all() and (w >= 0).all(), "weights not finite or negative"
        assert (w.masked_select(~mask[:, None, :]) == 0).all(), "weight on a masked slot"
        sums = w.double().sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-2 if dtype == torch.float16
                              else 1e-5), f"weights sum to {sums.tolist()} at strength {strength}"
    assert torch.isfinite(read).all(), "read not finite"


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_memory_read_matches_float64(backend, data):
    b, n, d, r = (data.draw(s) for s in (st.integers(0, 2), lengths_up_to(6, 50),
                                         st.integers(1, 5), st.integers(0, 3)))
    dtype, layout, rand = data.draw(dtypes(backend)), data.draw(layouts), Data(data.draw(seeds))
    clean = dict(memory=rand.randn(b, n, d), weights=rand.randn(b, r, n))
    given_ = {name: arrange(x.to(dtype), layout) for name, x in clean.items()}
    check_call(backend, lambda memory, weights: (attnmem.memory_read(memory, weights),),
               lambda memory, weights: ((weights @ memory).to(memory.dtype),),
               given_, clean, rand, [True], [dtype])


def write_reference(memory, weights, erase, add):
    keep = torch.prod(1 - weights[:, :, :, None] * erase[:, :, None, :], dim=1)
    return memory * keep + weights.transpose(1, 2) @ add


@st.composite
def write_cases(draw, backend):
    b, n, d, w = (draw(s) for s in (st.integers(0, 2), lengths_up_to(6, 50),
                                     st.integers(1, 5), st.integers(0, 3)))
    return dict(shape=(b, n, d, w), dtype=draw(dtypes(backend)), layout=draw(layouts),
                seed=draw(seeds))


def write_inputs(case):
    b, n, d, w = case["shape"]
    rand = Data(case["seed"])
    clean = dict(memory=rand.randn(b, n, d), weights=rand.rand(b, w, n),
                 erase=rand.rand(b, w, d), add=rand.randn(b, w, d))
    return {name: arrange(x.to(case["dtype"]), case["layout"]) for name, x in clean.items()}, \
        clean, rand


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_memory_write_matches_float64(backend, data):
    case = data.draw(write_cases(backend))
    given_, clean, rand = write_inputs(case)
    check_call(backend, lambda **x: (attnmem.memory_write(**x),),
               lambda **x: (write_reference(**x).to(x["memory"].dtype),), given_, clean, rand,
               [True], [case["dtype"]])


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_memory_write_inplace(backend, data):
    """inplace=True under no_grad writes memory itself (and nothing else); memory that is
    an expanded view shares its elements across the batch and cannot be written in place."""
    case = data.draw(write_cases(backend))
    given_, clean, _ = write_inputs(case)
    dtype = case["dtype"]
    b, n, d, w = case["shape"]
    expanded = data.draw(st.booleans()) and b > 1 and n > 0
    if expanded:
        given_["memory"] = given_["memory"][:1].expand_as(given_["memory"])
    # add read from the memory being written: the old values, or a named error
    aliased = not expanded and 0 < w <= n and data.draw(st.booleans())
    if aliased:
        given_["add"] = given_["memory"][:, :w]
        clean["add"] = clean["memory"][:, :w]
    others = {name: x.clone() for name, x in given_.items() if name != "memory"}
    before = given_["memory"].clone()
    memory = given_["memory"]
    with torch.no_grad(), attnmem.use_backend(backend):
        if expanded:
            with pytest.raises(ERRORS) as error:
                attnmem.memory_write(**given_, inplace=True)
            named(error.value, "memory")
            assert same(memory, before), "memory was changed by a write that raised"
            return
        try:
            out = attnmem.memory_write(**given_, inplace=True)
        except ERRORS as error:
            if aliased:
                named(error, "add")
                return
            # documented: the kernel writes rows with unit stride
            assert backend == "triton" and memory.stride(-1) != 1, error
            named(error, "memory")
            return
    rounded = {name: x.to(dtype).double() for name, x in clean.items()}
    expect = write_reference(**rounded).to(dtype)
    base = write_reference(**{n: x.to(dtype) for n, x in rounded.items()})
    assert out.data_ptr() == memory.data_ptr() or memory.numel() == 0, "not written in place"
    compare("memory", memory, expect.double(), base, dtype)
    for name, x in others.items():
        assert aliased and name == "add" or same(given_[name], x), f"{name} was modified"


def location_reference(content_weights, prev_weights, gate, shift, gamma):
    n, s = content_weights.shape[-1], shift.shape[-1]
    gated = gate[..., None] * content_weights + (1 - gate[..., None]) * prev_weights
    if n == 0:
        return (gated,)
    # shift[j] moves the focus by j - S//2: slot m receives gated[m - (j - S//2)].
    source = (torch.arange(n, device=DEVICE)[None, :]
              - (torch.arange(s, device=DEVICE)[:, None] - s // 2)) % n
    shifted = (shift[..., :, None] * gated[..., source]).sum(-2)
    positive = shifted > 0
    sharp = torch.where(positive, torch.exp(gamma[..., None] * torch.log(
        torch.where(positive, shifted, 1.0))), 0.0)
    total = sharp.sum(-1, keepdim=True)
    return ((sharp / torch.where(total > 0, total, 1.0)).to(content_weights.dtype),)


@st.composite
def location_cases(draw, backend):
    b, r, n = draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(lengths_up_to(7, 40))
    return dict(shape=(b, r, n, draw(st.sampled_from([1, 3, 5]))),
                gamma=draw(st.sampled_from([1.0, 3.0, 25.0])),
                temperature=draw(st.sampled_from([0.3, 1.0, 100.0])),
                dtype=draw(dtypes(backend)), layout=draw(layouts), seed=draw(seeds))


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_location_address_matches_float64(backend, data):
    case = data.draw(location_cases(backend))
    b, r, n, s = case["shape"]
    rand, dtype = Data(case["seed"]), case["dtype"]
    clean = dict(content_weights=rand.simplex(b, r, n, temperature=case["temperature"]),
                 prev_weights=rand.simplex(b, r, n), gate=rand.rand(b, r),
                 shift=rand.simplex(b, r, s), gamma=1 + rand.rand(b, r) * (case["gamma"] - 1))
    given_ = {name: arrange(x.to(dtype), case["layout"]) for name, x in clean.items()}
    out = check_call(backend, lambda **x: (attnmem.location_address(**x),),
                     location_reference, given_, clean, rand, [True], [dtype],
                     condition=case["gamma"])
    if n:
        sums = out[0].double().sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-2), "weights do not sum to 1"


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_location_sharpening_near_uniform_weights_sums_to_one(backend, data):
    """w^gamma of near-uniform weights over many slots underflows in float32 (0.005^25):
    the weights must still sum to 1 and match float64."""
    b, r = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    n = data.draw(st.integers(100, 300))
    gamma = data.draw(st.floats(15.0, 30.0))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]))
    rand = Data(data.draw(seeds))
    uniform = (1 + 1e-2 * rand.randn(b, r, n)) / n
    x = dict(content_weights=uniform, prev_weights=uniform.flip(-1), gate=rand.rand(b, r),
             shift=rand.simplex(b, r, 3),
             gamma=torch.full((b, r), gamma, dtype=torch.float64, device=DEVICE))
    given_ = {name: t.to(dtype) for name, t in x.items()}
    with attnmem.use_backend(backend):
        out = attnmem.location_address(**given_)
    expect = location_reference(**{n_: t.double() for n_, t in given_.items()})[0]
    assert torch.isfinite(out).all(), "non-finite weights"
    sums = out.double().sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-2), \
        f"weights sum to {sums.tolist()} (gamma {gamma}, N {n})"
    torch.testing.assert_close(out.double(), expect, rtol=0.05 if dtype == torch.float16
                               else 1e-4, atol=1e-6)


# additive, pointer and hard attention -----------------------------------------------------

def additive_reference(keep):
    def ref(q, k, v, values=None):
        scores = torch.tanh(q[:, :, None, :] + k[:, None, :, :]) @ v
        weights, lse = safe_softmax(scores, keep)
        log_probs = torch.where(keep, scores - torch.where(torch.isfinite(lse), lse, 0.0)[
            ..., None], -INF)
        return weights, log_probs
    return ref


@st.composite
def additive_cases(draw, backend):
    b, n_q, n_k = draw(st.integers(0, 2)), draw(lengths_up_to(4, 20)), \
        draw(lengths_up_to(5, 40))
    return dict(shape=(b, n_q, n_k, draw(st.sampled_from([1, 3, 4, 7])),
                       draw(st.integers(1, 4))),
                kv=draw(st.none() | lengths(b, n_k)), return_weights=draw(st.booleans()),
                dtype=draw(dtypes(backend)), layout=draw(layouts), poison=draw(poisons),
                seed=draw(seeds))


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_additive_and_pointer_attention_match_float64(backend, data):
    check_additive(backend, data.draw(additive_cases(backend)))


def additive_case(**changes):
    case = dict(shape=(2, 3, 5, 4, 2), kv=(torch.tensor([5, 2], device=DEVICE), [5, 2]),
                return_weights=True, dtype=torch.float32, layout="contiguous",
                poison=float("nan"), seed=0)
    return {**case, **changes}


ADDITIVE_CASES = {
    "strided_last": additive_case(layout="strided_last"),
    "no key": additive_case(shape=(2, 3, 0, 4, 2), kv=None),
    "no query": additive_case(shape=(2, 0, 5, 4, 2)),
    "fully masked": additive_case(kv=(torch.tensor([0, -3], device=DEVICE), [0, 0]),
                                  poison=float("-inf")),
    "tiles": additive_case(shape=(1, 17, 40, 7, 3), kv=(torch.tensor([33], device=DEVICE), [33])),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ADDITIVE_CASES))
def test_additive_cases_match_float64(backend, case):
    check_additive(backend, ADDITIVE_CASES[case])


def check_additive(backend, case):
    b, n_q, n_k, a, dv = case["shape"]
    rand, dtype, layout = Data(case["seed"]), case["dtype"], case["layout"]
    kv_lengths, lens = case["kv"] or (None, None)
    padding = key_padding(b, n_k, lens)
    keep = ~padding[:, None, :].expand(b, n_q, n_k)
    clean = dict(q=rand.randn(b, n_q, a), k=rand.randn(b, n_k, a), v=rand.randn(a),
                 values=rand.randn(b, n_k, dv))
    given_ = {name: arrange((poisoned(x, padding, case["poison"]) if name in ("k", "values")
                             else x).to(dtype), layout) for name, x in clean.items()}
    ref = additive_reference(keep)
    return_weights = case["return_weights"]

    def additive(q, k, v, values):
        out = attnmem.additive_attention(q, k, values, v, kv_lengths=kv_lengths,
                                         return_weights=return_weights)
        return out if return_weights else (out,)

    def additive_ref(q, k, v, values):
        weights = ref(q, k, v)[0]
        out = (weights @ values).to(q.dtype)
        return (out, weights.to(q.dtype)) if return_weights else (out,)

    def pointer(q, k, v):
        return (attnmem.pointer_attention(q, k, v, kv_lengths=kv_lengths),)

    def pointer_ref(q, k, v):
        return (ref(q, k, v)[1].float(),)

    check_call(backend, additive, additive_ref, given_, clean, rand, [True, True],
               [dtype, dtype])
    del given_["values"], clean["values"]
    check_call(backend, pointer, pointer_ref, given_, clean, rand, [True], [torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_hard_attention(backend, data):
    b, n_q, n_k, dv = (data.draw(st.integers(lo, hi)) for lo, hi in
                       ((0, 2), (0, 4), (0, 5), (1, 3)))
    dtype, rand = data.draw(dtypes(backend)), Data(data.draw(seeds))
    sample = data.draw(st.booleans())
    allowed = rand.bools(b, n_q, n_k)
    log_weights = torch.log_softmax(rand.randn(b, n_q, n_k).masked_fill(~allowed, -INF), -1)
    log_weights = torch.nan_to_num(log_weights, nan=-INF).to(dtype)
    values = rand.randn(b, n_k, dv).to(dtype)
    before = (log_weights.clone(), values.clone())
    leaf = log_weights.clone().requires_grad_()
    with attnmem.use_backend(backend):
        indices, chosen, log_prob = attnmem.hard_attention(leaf, values, sample=sample,
                                                           generator=rand.gen)
    assert indices.dtype == torch.int64 and indices.shape == (b, n_q)
    if n_k == 0:  # nothing to choose: index 0, a zero value, log-probability -inf
        assert (indices == 0).all() and (chosen == 0).all() and (log_prob == -INF).all()
        assert chosen.shape == (b, n_q, dv) and log_prob.shape == (b, n_q)
        return
    assert ((indices >= 0) & (indices < n_k)).all(), "index out of range"
    picked = torch.gather(log_weights, 2, indices[..., None]).squeeze(-1)
    assert same(log_prob.detach(), picked), "log_prob is not the chosen input's"
    possible = allowed.any(-1)
    # A query with no possible input takes a zero value, whatever index 0 holds.
    assert same(chosen, torch.gather(values, 1, indices[..., None].expand(-1, -1, dv))
                .masked_fill(~possible[..., None], 0))
    assert torch.isfinite(picked[possible]).all(), "chose an impossible input"
    assert (indices[~possible] == 0).all() and (log_prob[~possible] == -INF).all()
    if not sample:
        assert same(indices, log_weights.argmax(-1)), "not the most likely input"
    upstream = rand.randn(b, n_q).to(dtype).masked_fill(~possible, 0)
    (grad,) = torch.autograd.grad(log_prob, leaf, upstream)
    expect = torch.zeros_like(log_weights).scatter(2, indices[..., None], upstream[..., None])
    assert same(grad, expect), "log_prob's gradient is not one-hot"
    assert same(log_weights, before[0]) and same(values, before[1]), "an input was modified"


# invalid arguments -------------------------------------------------------------------------

@st.composite
def small_sizes(draw):
    return dict(b=draw(st.integers(1, 2)), n=draw(st.integers(1, 3)), m=draw(st.integers(1, 3)),
                d=draw(st.integers(1, 3)), r=draw(st.integers(1, 2)), seed=draw(seeds))


def valid_call(op, sizes):
    """(function, keyword arguments, the argument the others are checked against, arguments
    whose last size is free) for a small valid call of op."""
    b, n, m, d, r = (sizes[x] for x in "bnmdr")
    rand = Data(sizes["seed"])

    def f(*shape):
        return rand.randn(*shape).float()

    lens = torch.tensor([n] * b, device=DEVICE)
    if op == "attention":
        return (lambda **x: attnmem.attention(**x),
                dict(q=f(b, 2 * r, m, d), k=f(b, r, n, d), v=f(b, r, n, d), kv_lengths=lens,
                     causal=False, scale=None, window=None), "q", {"v"})
    memory = dict(memory=f(b, n, d), keys=f(b, r, d), strength=rand.rand(b, r).float(),
                  mask=rand.bools(b, n), similarity="cosine")
    if op == "memory_address":
        return lambda **x: attnmem.memory_address(**x), memory, "memory", set()
    if op == "memory_attend":
        return (lambda **x: attnmem.memory_attend(**x), {**memory, "values": f(b, n, m)},
                "memory", {"values"})
    if op == "memory_read":
        return (lambda **x: attnmem.memory_read(**x), dict(memory=f(b, n, d),
                                                           weights=f(b, r, n)),
                "memory", {"memory"})
    if op == "memory_write":
        return (lambda **x: attnmem.memory_write(**x),
                dict(memory=f(b, n, d), weights=rand.rand(b, r, n).float(),
                     erase=rand.rand(b, r, d).float(), add=f(b, r, d)), "memory", set())
    if op == "location_address":
        return (lambda **x: attnmem.location_address(**x),
                dict(content_weights=rand.simplex(b, r, n).float(),
                     prev_weights=rand.simplex(b, r, n).float(), gate=rand.rand(b, r).float(),
                     shift=rand.simplex(b, r, 3).float(), gamma=1 + rand.rand(b, r).float()),
                "content_weights", set())
    if op == "additive_attention":
        return (lambda **x: attnmem.additive_attention(**x),
                dict(q=f(b, m, d), k=f(b, n, d), values=f(b, n, r), v=f(d), kv_lengths=lens),
                "q", {"values"})
    if op == "pointer_attention":
        return (lambda **x: attnmem.pointer_attention(**x),
                dict(q=f(b, m, d), k=f(b, n, d), v=f(d), kv_lengths=lens), "q", set())
    assert op == "hard_attention"
    return (lambda **x: attnmem.hard_attention(**x),
            dict(log_weights=torch.log_softmax(f(b, m, n), -1), values=f(b, n, d),
                 sample=False), "log_weights", {"values"})


OPS = ["attention", "memory_address", "memory_attend", "memory_read", "memory_write",
       "location_address", "additive_attention", "pointer_attention", "hard_attention"]
# Values of non-tensor arguments that must be refused.
BAD_OPTIONS = {
    "causal": [1, "yes", None],
    "scale": [float("nan"), float("inf"), "1", True, 1j],
    "window": [3, (1, 2, 3), (-2, 0), (1.5, 0), (True, 0), ("a", None)],
    "similarity": ["cos", 3, None],
    "sample": ["yes", 2],
}


def bad_arguments(op, args, primary, free_last):
    """(argument, what is wrong, bad value, names the error may give): one argument changed."""
    tensors = [n for n, x in args.items() if isinstance(x, torch.Tensor)]
    cases = []
    for name in tensors:
        x = args[name]
        partners = tensors if name == primary else [name, primary]
        bad = bad_tensors(x)
        if name not in free_last:
            bad.append(("last size + 1", torch.cat([x, x[..., :1]], -1)))
        # hard_attention's log-weights (float32 from pointer_attention) and values need not
        # share a dtype.
        cases += [(name, what, value, partners if what in (
            "first size + 1", "last size + 1", "meta device", "other float dtype") else [name])
            for what, value in bad if not (op == "hard_attention" and what == "other float dtype")]
    cases += [(name, repr(value), value, [name]) for name in args if name in BAD_OPTIONS
              for value in BAD_OPTIONS[name]]
    if op == "additive_attention":
        cases.append(("values", "None", None, ["values"]))
    if op == "hard_attention":
        for value in (float("nan"), float("inf")):
            poisoned_ = args["log_weights"].clone()
            poisoned_[0, 0, 0] = value
            cases.append(("log_weights", f"holds {value}", poisoned_, ["log_weights"]))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@contract
@given(sizes=small_sizes())
def test_invalid_arguments_raise_named_errors(backend, op, sizes):
    fn, args, primary, free_last = valid_call(op, sizes)
    with attnmem.use_backend(backend):
        fn(**args)  # the valid call runs
        failures = []
        for name, what, value, names in bad_arguments(op, args, primary, free_last):
            try:
                fn(**{**args, name: value})
            except ERRORS as error:
                try:
                    named(error, *names)
                except AssertionError as unnamed:
                    failures.append(f"{name} {what}: {unnamed}")
            except Exception as error:  # noqa: BLE001 - every other error breaks the contract
                failures.append(f"{name} {what}: {type(error).__name__}: {error}")
            else:
                failures.append(f"{name} {what}: accepted")
    assert not failures, f"{op}:\n" + "\n".join(failures)


# modules -----------------------------------------------------------------------------------

def optional_lengths(draw, batch, n):
    return draw(st.none() | lengths(batch, n).map(lambda pair: pair[0]))


def multihead_attention(draw, rand):
    heads, head_dim = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    embed = heads * head_dim
    kdim, vdim = draw(st.none() | st.integers(1, 4)), draw(st.none() | st.integers(1, 4))
    batch_first = draw(st.booleans())
    module = attnmem.nn.MultiheadAttention(
        embed, heads, bias=draw(st.booleans()), add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()), kdim=kdim, vdim=vdim, batch_first=batch_first)
    b, n_q, n_k = draw(st.integers(0, 2)), draw(st.integers(0, 4)), draw(st.integers(0, 4))
    n_k = n_q if draw(st.booleans()) else n_k

    def seq(n, width):
        x = rand.randn(b, n, width)
        return x if batch_first else x.transpose(0, 1).contiguous()

    padding = draw(st.sampled_from(["none", "right", "any"]))
    mask = None if padding == "none" else (
        key_padding(b, n_k, [draw(st.integers(0, n_k)) for _ in range(b)]) if padding == "right"
        else rand.bools(b, n_k, p=0.3))
    causal = n_q == n_k and draw(st.booleans())
    need_weights = draw(st.booleans())
    # A causal mask, or any bool or float one (rows of -inf or True included: zeros out).
    attn_mask = draw(st.sampled_from(["none", "bool", "float"]))
    if causal:
        attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=DEVICE).triu(1)
    elif attn_mask == "bool":
        attn_mask = rand.bools(n_q, n_k, p=0.3)
    elif attn_mask == "float":
        attn_mask = rand.randn(n_q, n_k).masked_fill(rand.bools(n_q, n_k, p=0.3), -INF)
    else:
        attn_mask = None
    kwargs = dict(key_padding_mask=mask, need_weights=need_weights, is_causal=causal,
                  attn_mask=attn_mask)

    def forward(m, query, key, value):
        out, weights = m(query, key, value, **kwargs)
        return (out, weights) if need_weights else (out,)

    return module, dict(query=seq(n_q, embed), key=seq(n_k, kdim or embed),
                        value=seq(n_k, vdim or embed)), forward


def self_attention(draw, rand, layer):
    kv_heads, group, head_dim = (draw(st.integers(1, 2)) for _ in range(3))
    heads = kv_heads * group
    side = st.none() | integers(0, 3)
    options = dict(num_kv_heads=kv_heads, causal=draw(st.booleans()),
                   window=draw(st.none() | st.tuples(side, side)), bias=draw(st.booleans()),
                   softcap=draw(st.none() | st.floats(0.5, 8.0)), sinks=draw(st.booleans()),
                   alibi=draw(st.booleans()))
    if layer:
        module = attnmem.nn.TransformerEncoderLayer(
            heads * head_dim, heads, dim_feedforward=draw(st.integers(1, 6)), dropout=0.0,
            activation=draw(st.sampled_from(["relu", "gelu"])), norm_first=draw(st.booleans()),
            **options)
    else:
        module = attnmem.nn.MultiheadSelfAttention(heads * head_dim, heads, **options)
    b, n = draw(st.integers(0, 2)), draw(st.integers(0, 5))
    kv_lengths = optional_lengths(draw, b, n)
    return module, dict(x=rand.randn(b, n, heads * head_dim)), \
        lambda m, x: (m(x, kv_lengths=kv_lengths),)


def positional_encoding(draw, rand):
    d_model, n = draw(st.integers(1, 6)), draw(st.integers(0, 5))
    module = attnmem.nn.SinusoidalPositionalEncoding(d_model, max_len=n + draw(
        st.integers(0, 3)))
    return module, dict(x=rand.randn(draw(st.integers(0, 2)), n, d_model)), \
        lambda m, x: (m(x),)


def additive_module(draw, rand, pointer):
    query_dim, key_dim, attn_dim = (draw(st.integers(1, 4)) for _ in range(3))
    cls = attnmem.nn.PointerAttention if pointer else attnmem.nn.AdditiveAttention
    module = cls(query_dim, key_dim, attn_dim)
    b, n_q, n_k = draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(st.integers(0, 4))
    step = draw(st.booleans())
    query = rand.randn(b, query_dim) if step else rand.randn(b, n_q, query_dim)
    kv_lengths = optional_lengths(draw, b, n_k)
    inputs = dict(query=query, keys=rand.randn(b, n_k, key_dim))
    if pointer:
        return module, inputs, lambda m, query, keys: (m(query, keys, kv_lengths=kv_lengths),)
    return_weights = draw(st.booleans())
    if draw(st.booleans()):
        inputs["values"] = rand.randn(b, n_k, draw(st.integers(1, 3)))

    def forward(m, query, keys, values=None):
        out = m(query, keys, values, kv_lengths=kv_lengths, return_weights=return_weights)
        return out if return_weights else (out,)

    return module, inputs, forward


def luong(draw, rand):
    hidden, score = draw(st.integers(1, 4)), draw(st.sampled_from(["dot", "general", "concat"]))
    source_size = hidden if score == "dot" else draw(st.integers(1, 4))
    module = attnmem.nn.LuongAttention(
        hidden, score=score, mode=draw(st.sampled_from(["global", "local-m", "local-p"])),
        window=draw(st.integers(0, 3)), source_size=source_size,
        attn_dim=draw(st.none() | st.integers(1, 4)))
    b, n_q, n_s = draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(st.integers(0, 5))
    query = rand.randn(b, hidden) if draw(st.booleans()) else rand.randn(b, n_q, hidden)
    source_lengths = optional_lengths(draw, b, n_s)
    return_weights = draw(st.booleans())

    def forward(m, query, source):
        out = m(query, source, source_lengths=source_lengths, return_weights=return_weights)
        return out if return_weights else (out,)

    return module, dict(query=query, source=rand.randn(b, n_s, source_size)), forward


def ntm(draw, rand):
    sizes = dict(input_size=draw(st.integers(1, 3)), output_size=draw(st.integers(1, 3)),
                 controller_size=draw(st.integers(1, 4)), memory_slots=draw(st.integers(1, 5)),
                 memory_width=draw(st.integers(1, 3)), read_heads=draw(st.integers(1, 2)),
                 write_heads=draw(st.integers(1, 2)), shift_range=draw(st.integers(0, 1)))
    batch_first = draw(st.booleans())
    module = attnmem.nn.NTM(**sizes, memory_init=draw(st.sampled_from(["learned", "constant"])),
                            batch_first=batch_first)
    t, b = draw(st.integers(0, 3)), draw(st.integers(0, 2))
    shape = (b, t) if batch_first else (t, b)

    def forward(m, inputs):
        outputs, state = m(inputs)
        return outputs, state.memory, state.reads

    return module, dict(inputs=rand.randn(*shape, sizes["input_size"])), forward


def memn2n(draw, rand):
    vocab, memory_size = draw(st.integers(2, 6)), draw(st.integers(1, 4))
    module = attnmem.nn.MemN2N(vocab, embed_dim=draw(st.integers(1, 4)),
                               memory_size=memory_size, hops=draw(st.integers(1, 2)),
                               position_encoding=draw(st.booleans()),
                               temporal_encoding=draw(st.booleans()))
    b, s, w = draw(st.integers(0, 2)), draw(st.integers(0, memory_size)), draw(st.integers(1, 3))
    story = torch.randint(0, vocab, (b, s, w), generator=rand.gen, device=DEVICE)
    query = torch.randint(0, vocab, (b, w), generator=rand.gen, device=DEVICE)
    return module, dict(story=story, query=query), lambda m, story, query: (m(story, query),)


def key_value_memory(draw, rand):
    state_dim, slots = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    module = attnmem.nn.KeyValueMemory(
        state_dim, num_slots=slots, key_dim=draw(st.integers(1, 3)),
        value_dim=draw(st.integers(1, 3)),
        similarity=draw(st.sampled_from(["cosine", "dot", "scaled_dot"])))
    b = draw(st.integers(0, 2))
    h = rand.randn(b, state_dim) if draw(st.booleans()) else \
        rand.randn(b, draw(st.integers(0, 3)), state_dim)
    mask = rand.bools(b, slots) if draw(st.booleans()) else None
    return_weights = draw(st.booleans())

    def forward(m, h):
        out = m(h, mask=mask, return_weights=return_weights)
        return out if return_weights else (out,)

    return module, dict(h=h), forward


MODULES = {
    "MultiheadAttention": multihead_attention,
    "MultiheadSelfAttention": lambda draw, rand: self_attention(draw, rand, layer=False),
    "TransformerEncoderLayer": lambda draw, rand: self_attention(draw, rand, layer=True),
    "SinusoidalPositionalEncoding": positional_encoding,
    "AdditiveAttention": lambda draw, rand: additive_module(draw, rand, pointer=False),
    "PointerAttention": lambda draw, rand: additive_module(draw, rand, pointer=True),
    "LuongAttention": luong,
    "NTM": ntm,
    "MemN2N": memn2n,
    "KeyValueMemory": key_value_memory,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
@contract
@given(data=st.data())
def test_module_matches_float64(backend, name, data):
    """Float32 (float64 on torch too) modules on backend against the same module in float64
    on the pure-torch twins: outputs, every parameter's and input's gradient."""
    rand = Data(data.draw(seeds))
    torch.manual_seed(data.draw(seeds))
    module, inputs, forward = MODULES[name](data.draw, rand)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64] if backend == "torch"
                                      else [torch.float32]))
    module = module.to(DEVICE, dtype).eval()
    inputs = {n: x.to(dtype) if x.dtype.is_floating_point else x for n, x in inputs.items()}
    check_module(backend, module, inputs, forward, rand, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["dot", "general", "concat"])
@pytest.mark.parametrize("mode", ["global", "local-m", "local-p"])
@pytest.mark.parametrize("source", ["empty", "fully masked", "wider"])
@pytest.mark.parametrize("window", [0, 2])
def test_luong_attention_cases(backend, score, mode, source, window):
    """Every score and mode with no source position, every position masked, or a source
    wider than the decoder state (dot needs them equal); a window of 0 (local modes: only
    p_t itself) or 2."""
    rand = Data(0)
    torch.manual_seed(0)
    hidden, width = 3, 3 if score == "dot" or source != "wider" else 5
    module = attnmem.nn.LuongAttention(hidden, score=score, mode=mode, window=window,
                                       source_size=width).to(DEVICE)
    n_s = 0 if source == "empty" else 4
    lengths_ = torch.tensor([0, 0], device=DEVICE) if source == "fully masked" else None

    def forward(m, query, source):
        return m(query, source, source_lengths=lengths_, return_weights=True)

    check_module(backend, module, dict(query=rand.randn(2, 3, hidden).float(),
                                       source=rand.randn(2, n_s, width).float()),
                 forward, rand, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_hard_attention_module(backend, data):
    rand = Data(data.draw(seeds))
    torch.manual_seed(data.draw(seeds))
    query_dim, key_dim, attn_dim = (data.draw(st.integers(1, 4)) for _ in range(3))
    module = attnmem.nn.HardAttention(query_dim, key_dim, attn_dim).to(DEVICE)
    b, n_q, n_k = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 3)), \
        data.draw(st.integers(1, 4))
    query, keys = rand.randn(b, n_q, query_dim).float(), rand.randn(b, n_k, key_dim).float()
    kv_lengths = optional_lengths(data.draw, b, n_k)
    sample = data.draw(st.booleans())
    with attnmem.use_backend(backend):
        indices, chosen, log_prob = module(query, keys, kv_lengths=kv_lengths, sample=sample,
                                           generator=rand.gen)
        log_probs = attnmem.nn.PointerAttention.forward(module, query, keys, kv_lengths)
    picked = torch.gather(log_probs, 2, indices[..., None]).squeeze(-1)
    possible = torch.isfinite(log_probs).any(-1)
    assert same(log_prob.detach(), picked), "log_prob is not the chosen key's"
    assert torch.isfinite(picked[possible]).all(), "chose padding"
    assert same(chosen, torch.gather(keys, 1, indices[..., None].expand(-1, -1, key_dim))
                .masked_fill(~possible[..., None], 0))
    if log_prob.numel():
        grads = torch.autograd.grad(log_prob.masked_fill(~possible, 0).sum(),
                                    list(module.parameters()), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads), "non-finite gradient"


# module arguments --------------------------------------------------------------------------

# name: (constructor, valid arguments, the integer arguments among them, other refused values)
CONSTRUCTORS = {
    "MultiheadAttention": (attnmem.nn.MultiheadAttention, dict(embed_dim=4, num_heads=2, kdim=3,
                                                               vdim=5),
                           {"dropout": [-0.1, 1.5, "0"], "batch_first": [1]}),
    "MultiheadSelfAttention": (attnmem.nn.MultiheadSelfAttention,
                               dict(embed_dim=4, num_heads=2, num_kv_heads=1),
                               {"causal": [1, "no"], "window": [3, (1, 2, 3), (-2, 0), (1.5, 0)],
                                "softcap": [0.0, -1.0, "x"], "sinks": [1], "alibi": ["yes"]}),
    "TransformerEncoderLayer": (attnmem.nn.TransformerEncoderLayer,
                                dict(d_model=4, nhead=2, dim_feedforward=3, num_kv_heads=1),
                                {"activation": ["tanh", None], "dropout": [2.0, -1.0]}),
    "SinusoidalPositionalEncoding": (attnmem.nn.SinusoidalPositionalEncoding,
                                     dict(d_model=4, max_len=10), {"dropout": [-0.5, "x"]}),
    "AdditiveAttention": (attnmem.nn.AdditiveAttention, dict(query_dim=2, key_dim=3,
                                                             attn_dim=4), {}),
    "PointerAttention": (attnmem.nn.PointerAttention, dict(query_dim=2, key_dim=3, attn_dim=4),
                         {}),
    "HardAttention": (attnmem.nn.HardAttention, dict(query_dim=2, key_dim=3, attn_dim=4), {}),
    "LuongAttention": (attnmem.nn.LuongAttention, dict(hidden_size=3, window=2, source_size=4,
                                                       attn_dim=2),
                       {"score": ["cosine", 1], "mode": ["local", None]}),
    "NTM": (attnmem.nn.NTM, dict(input_size=2, output_size=3, controller_size=4,
                                 memory_slots=5, memory_width=2, read_heads=1, write_heads=2,
                                 shift_range=1), {"memory_init": ["random", 0]}),
    "MemN2N": (attnmem.nn.MemN2N, dict(vocab_size=5, embed_dim=3, memory_size=4, hops=2), {}),
    "KeyValueMemory": (attnmem.nn.KeyValueMemory, dict(state_dim=3, num_slots=4, key_dim=2,
                                                       value_dim=2),
                       {"similarity": ["cos", None]}),
}


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_module_constructors_name_bad_arguments(name):
    """Sizes: negative, bool, float or str are refused naming the argument; numpy integers
    build the same module as ints."""
    cls, valid, others = CONSTRUCTORS[name]
    torch.manual_seed(0)
    reference = cls(**valid)
    torch.manual_seed(0)
    numpy_built = cls(**{k: np.int64(v) for k, v in valid.items()})
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                 numpy_built.state_dict().values()))
    failures = []
    bad = [(k, v) for k in valid for v in (-1, True, 2.5, "3")]
    bad += [(k, v) for k, values in others.items() for v in values]
    for key, value in bad:
        try:
            cls(**{**valid, key: value})
        except ERRORS as error:
            try:
                named(error, key)
            except AssertionError as unnamed:
                failures.append(f"{key}={value!r}: {unnamed}")
        except Exception as error:  # noqa: BLE001 - every other error breaks the contract
            failures.append(f"{key}={value!r}: {type(error).__name__}: {error}")
        else:
            failures.append(f"{key}={value!r}: accepted")
    assert not failures, f"{name}:\n" + "\n".join(failures)


def forward_calls(rand):
    """name: (module, forward, valid inputs, the changes of bad_tensors that are valid,
    as (input, what) pairs; "*" for what is every change but a device, a size or a list)."""
    torch.manual_seed(0)
    b = 2
    nn_ = attnmem.nn
    kinds = ["int64", "bool", "float", "other float dtype", "extra dim", "fewer dims"]
    return {
        "MultiheadAttention": (
            nn_.MultiheadAttention(4, 2, kdim=3, vdim=5, batch_first=True),
            lambda m, **x: m(**x),
            dict(query=rand.randn(b, 3, 4).float(), key=rand.randn(b, 2, 3).float(),
                 value=rand.randn(b, 2, 5).float(),
                 key_padding_mask=torch.tensor([[False, True], [False, False]], device=DEVICE)),
            # float padding masks are added to the scores; torch's unbatched 2-D inputs
            {("key_padding_mask", "*")} | {(k, w) for k in ("query", "key", "value")
                                           for w in ("extra dim", "fewer dims")}),
        "MultiheadSelfAttention": (
            nn_.MultiheadSelfAttention(4, 2), lambda m, **x: m(**x),
            dict(x=rand.randn(b, 3, 4).float(), kv_lengths=torch.tensor([1, 3], device=DEVICE)),
            set()),
        "TransformerEncoderLayer": (
            nn_.TransformerEncoderLayer(4, 2, 3), lambda m, **x: m(**x),
            dict(x=rand.randn(b, 3, 4).float(), kv_lengths=torch.tensor([1, 3], device=DEVICE)),
            set()),
        "SinusoidalPositionalEncoding": (
            # no parameters: any float dtype, any batch
            nn_.SinusoidalPositionalEncoding(4, 8), lambda m, **x: m(**x),
            dict(x=rand.randn(b, 3, 4).float()),
            {("x", "other float dtype"), ("x", "first size + 1")}),
        "AdditiveAttention": (
            nn_.AdditiveAttention(2, 3, 4), lambda m, **x: m(**x),
            dict(query=rand.randn(b, 3, 2).float(), keys=rand.randn(b, 4, 3).float(),
                 values=rand.randn(b, 4, 2).float(),
                 kv_lengths=torch.tensor([2, 4], device=DEVICE)),
            {("values", "last size + 1"), ("query", "fewer dims")}),
        "PointerAttention": (
            nn_.PointerAttention(2, 3, 4), lambda m, **x: m(**x),
            dict(query=rand.randn(b, 3, 2).float(), keys=rand.randn(b, 4, 3).float(),
                 kv_lengths=torch.tensor([2, 4], device=DEVICE)), {("query", "fewer dims")}),
        "HardAttention": (
            # values are gathered, never multiplied: any dtype
            nn_.HardAttention(2, 3, 4).eval(), lambda m, **x: m(**x),
            dict(query=rand.randn(b, 3, 2).float(), keys=rand.randn(b, 4, 3).float(),
                 values=rand.randn(b, 4, 2).float(),
                 kv_lengths=torch.tensor([2, 4], device=DEVICE)),
            {("values", w) for w in kinds[:4] + ["last size + 1"]} | {("query", "fewer dims")}),
        "LuongAttention": (
            nn_.LuongAttention(3, source_size=4), lambda m, **x: m(**x),
            dict(query=rand.randn(b, 2, 3).float(), source=rand.randn(b, 5, 4).float(),
                 source_lengths=torch.tensor([5, 1], device=DEVICE)), {("query", "fewer dims")}),
        "NTM": (
            # inputs (T, B, I): any number of steps
            nn_.NTM(2, 3, 4, 5, 2), lambda m, **x: m(**x)[0],
            dict(inputs=rand.randn(3, b, 2).float()), {("inputs", "first size + 1")}),
        "MemN2N": (
            nn_.MemN2N(5, 3, 4, 2), lambda m, **x: m(**x),
            dict(story=torch.randint(0, 5, (b, 3, 2), generator=rand.gen, device=DEVICE),
                 query=torch.randint(0, 5, (b, 2), generator=rand.gen, device=DEVICE)),
            {("story", "last size + 1"), ("query", "last size + 1")}),
        "KeyValueMemory": (
            nn_.KeyValueMemory(3, 4, 2, 2), lambda m, **x: m(**x),
            dict(h=rand.randn(b, 2, 3).float(), mask=rand.bools(b, 4)), {("h", "fewer dims")}),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_module_forward_names_bad_inputs(backend, name):
    """Each input made wrong in one way (not a tensor, another device, integer or another
    float dtype, a wrong ndim, a wrong size) is refused with an error naming it (or, for a
    batch size that disagrees, naming another input)."""
    module, forward, inputs, valid = forward_calls(Data(0))[name]
    module.to(DEVICE)
    failures = []
    with attnmem.use_backend(backend):
        try:
            forward(module, **inputs)
        except Exception as error:  # noqa: BLE001 - reported with the rest
            failures.append(f"the valid call: {type(error).__name__}: {error}")
        for key, x in inputs.items():
            bad = bad_tensors(x) + [("last size + 1", torch.cat([x, x[..., :1]], -1))]
            for what, value in bad:
                if (key, what) in valid or ((key, "*") in valid and what not in (
                        "list", "meta device", "first size + 1", "last size + 1")):
                    continue
                names = list(inputs) if what == "first size + 1" else [key]
                try:
                    forward(module, **{**inputs, key: value})
                except ERRORS as error:
                    try:
                        named(error, *names)
                    except AssertionError as unnamed:
                        failures.append(f"{key} {what}: {unnamed}")
                except Exception as error:  # noqa: BLE001 - all other errors break the contract
                    failures.append(f"{key} {what}: {type(error).__name__}: {error}")
                else:
                    failures.append(f"{key} {what}: accepted")
    assert not failures, f"{name}:\n" + "\n".join(failures)


@pytest.mark.parametrize("backend", BACKENDS)
@contract
@given(data=st.data())
def test_multihead_attention_is_a_drop_in(backend, data):
    """attnmem.nn.MultiheadAttention against torch.nn.MultiheadAttention in float64 with the
    same state_dict, where every query sees a key (torch gives NaN otherwise)."""
    rand = Data(data.draw(seeds))
    torch.manual_seed(data.draw(seeds))
    heads, head_dim = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    embed = heads * head_dim
    options = dict(bias=data.draw(st.booleans()), add_bias_kv=data.draw(st.booleans()),
                   add_zero_attn=data.draw(st.booleans()),
                   kdim=data.draw(st.none() | st.integers(1, 4)),
                   vdim=data.draw(st.none() | st.integers(1, 4)),
                   batch_first=data.draw(st.booleans()))
    ours = attnmem.nn.MultiheadAttention(embed, heads, **options).to(DEVICE).eval()
    theirs = torch.nn.MultiheadAttention(embed, heads, **options).to(DEVICE, torch.float64).eval()
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    base = torch.nn.MultiheadAttention(embed, heads, **options).to(DEVICE).eval()
    base.load_state_dict(ours.state_dict())
    b, n_q, n_k = data.draw(st.integers(1, 2)), data.draw(st.integers(0, 4)), \
        data.draw(st.integers(1, 4))
    causal = n_q == n_k and data.draw(st.booleans())
    lens = [data.draw(st.integers(1, n_k)) for _ in range(b)]
    mask = key_padding(b, n_k, lens) if data.draw(st.booleans()) else None
    # torch's is_causal hint, with an extra key (bias_k, the zero key), masks that key too
    # (SDPA's top-left causal mask); attnmem keeps it visible, as the attn_mask says.
    extra = options["add_bias_kv"] or options["add_zero_attn"]
    kwargs = dict(key_padding_mask=mask, need_weights=data.draw(st.booleans()),
                  average_attn_weights=data.draw(st.booleans()), is_causal=causal and not extra,
                  attn_mask=torch.ones(n_q, n_k, dtype=torch.bool, device=DEVICE).triu(1)
                  if causal else None)

    def seq(n, width):
        x = rand.randn(b, n, width).float()
        return x if options["batch_first"] else x.transpose(0, 1).contiguous()

    inputs = dict(query=seq(n_q, embed), key=seq(n_k, options["kdim"] or embed),
                  value=seq(n_k, options["vdim"] or embed))
    runs = []
    for module, dtype, chosen in ((ours, torch.float32, backend),
                                  (theirs, torch.float64, "torch"), (base, torch.float32,
                                                                     "torch")):
        leaves = {n: x.to(dtype).requires_grad_() for n, x in inputs.items()}
        with attnmem.use_backend(chosen):
            out, weights = module(**leaves, **kwargs)
        runs.append((module, leaves, out, weights))
    (_, leaves, out, weights), (_, ref_leaves, ref_out, ref_weights), (_, _, base_out,
                                                                       base_weights) = runs
    compare("output", out, ref_out, base_out, torch.float32)
    if kwargs["need_weights"]:
        compare("weights", weights, ref_weights, base_weights, torch.float32)
    else:
        assert weights is None
    upstream = rand.randn(*ref_out.shape)
    got = torch.autograd.grad(out, [*leaves.values(), *ours.parameters()], upstream.float())
    want = torch.autograd.grad(ref_out, [*ref_leaves.values(), *theirs.parameters()], upstream)
    base_grads = torch.autograd.grad(base_out, [*runs[2][1].values(), *base.parameters()],
                                     upstream.float())
    names = [*inputs, *(n for n, _ in ours.named_parameters())]
    for name, g, w, bg in zip(names, got, want, base_grads):
        compare(f"d{name}", g, w, bg, torch.float32)


@pytest.mark.parametrize("name", ["cuda", "Torch", "", None, 1])
def test_use_backend_names_bad_backends(name):
    with pytest.raises(ERRORS) as error:
        with attnmem.use_backend(name):
            pass
    named(error.value, "backend")
