"""Additive, pointer and hard attention: both backends against float64, every gradient,
bad input, opcheck, torch.compile, and sm_80/sm_90 builds of the kernel.

Kernel outputs are poisoned with NaN before they are written, so an element the kernel
forgets fails. Tolerance as in test_memory_attend: the kernel recomputes the weights from the
logsumexp, so rounding units scale with the largest |score|.
"""


import pytest
import torch

import attnmem
from aot import TRITON_TYPES, compiled, sm90_spills
from attnmem.kernels import additive_attention as kernel
from attnmem.kernels._launch import length_bucket
from attnmem.kernels.attention import SMEM_LIMIT
from attnmem.reference import additive as twin
from attnmem.reference.attention import softmax_with_lse
from backends import BACKENDS, DEVICE, DTYPE_IDS, DTYPES, INTERPRET
from tolerance import assert_close_to_float64

# name: (B, Nq, Nk, A, Dv, kv_lengths or None)
CASES = {
    "one_key": (2, 3, 1, 8, 16, None),
    "odd": (2, 37, 45, 20, 24, [45, 0]),
    "decode_step": (3, 1, 70, 33, 5, [70, 1, 64]),
    "wide_values": (1, 20, 19, 9, 72, None),
    "short_keys": (2, 40, 3, 40, 3, [2, 3]),
}


pytestmark = pytest.mark.usefixtures("poison_empty")


def make(case, dtype):
    b, nq, nk, a, dv, lengths = case
    q, k = torch.randn(b, nq, a, device=DEVICE), torch.randn(b, nk, a, device=DEVICE)
    values = torch.randn(b, nk, dv, device=DEVICE)
    v = torch.randn(a, device=DEVICE) / a ** 0.5 * 3
    lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    return [x.to(dtype) for x in (q, k, values, v)], lengths


def finite(x):
    return x.masked_fill(~torch.isfinite(x), 0)


def run(fn, tensors, lengths, grads_out):
    """Outputs of fn (out, weights, log-probs) and the gradient of a loss using all three."""
    tensors = [x.detach().requires_grad_() for x in tensors]
    outs = fn(*tensors, lengths)
    loss = sum((finite(o).double() * g).sum() for o, g in zip(outs, grads_out))
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, tensors))


def ours(q, k, values, v, lengths):
    out, weights = attnmem.additive_attention(q, k, values, v, kv_lengths=lengths,
                                              return_weights=True)
    return out, weights, attnmem.pointer_attention(q, k, v, kv_lengths=lengths)


def float64_reference(q, k, values, v, lengths):
    out, scores, lse = twin.additive_attention(q, k, v, values, lengths)
    weights, _ = softmax_with_lse(scores)
    return out, weights, scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, dtype, backend):
    tensors, lengths = make(CASES[name], dtype)
    b, nq, nk, _, dv, _ = CASES[name]
    grads_out = [torch.randn(b, nq, dv, device=DEVICE, dtype=torch.float64),
                 torch.randn(b, nq, nk, device=DEVICE, dtype=torch.float64),
                 torch.randn(b, nq, nk, device=DEVICE, dtype=torch.float64)]
    with attnmem.use_backend(backend):
        got = run(ours, tensors, lengths, grads_out)
    expect = run(float64_reference, [x.double() for x in tensors], lengths, grads_out)
    with attnmem.use_backend("torch"):
        base = run(ours, [x.float() for x in tensors], lengths, grads_out)
    log_probs, expect_log_probs = got.pop(2), expect.pop(2)
    base.pop(2)
    masked = ~torch.isfinite(expect_log_probs)
    assert torch.equal(masked, log_probs == float("-inf")), "-inf exactly at the padding keys"
    torch.testing.assert_close(finite(log_probs).double(), finite(expect_log_probs),
                               atol=20 * dtype.itemsize * 1e-4, rtol=0)
    largest_score = expect_log_probs[~masked].abs().max().item() if (~masked).any() else 1.0
    assert_close_to_float64(got, expect, [x.to(dtype) for x in base], dtype,
                            condition=max(1.0, largest_score))
    if lengths is not None and (lengths == 0).any():
        empty = lengths == 0
        assert (got[0][empty] == 0).all() and (got[1][empty] == 0).all()


# The tiles of every tuning config (num_warps means nothing to the interpreter).
TUNED_TILES = sorted({config[:3] for rows in kernel.CONFIGS.values() for config in rows})


@pytest.fixture(scope="module")
def odd_case():
    """The odd case in float32 with gradients of out and scores, and the float64 twin's
    out, scores, dq, dk, dv and dvalues."""
    (q, k, values, v), lengths = make(CASES["odd"], torch.float32)
    b, nq, nk, _, dv, _ = CASES["odd"]
    dout, dscores = torch.randn(b, nq, dv, device=DEVICE), torch.randn(b, nq, nk, device=DEVICE)
    inputs = [x.double().requires_grad_() for x in (q, k, v, values)]
    out, scores, _ = twin.additive_attention(*inputs, lengths)
    loss = (out * dout.double()).sum() + (finite(scores) * dscores.double()).sum()
    expect = [out.detach(), scores.detach(), *torch.autograd.grad(loss, inputs)]
    return (q, k, v, values), lengths, dout, dscores, expect


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's config is what it forces")
@pytest.mark.parametrize("tiles", TUNED_TILES, ids=["x".join(map(str, t)) for t in TUNED_TILES])
def test_every_tuned_tile_matches_float64(tiles, monkeypatch, odd_case):
    """The kernels at each tuning config's (BLOCK_M, BLOCK_N, BLOCK_A), forced under the
    interpreter (which otherwise runs INTERPRET_CONFIG): key tiles longer than
    DV_PART_BLOCK_N leave rows of dv_part unused, tiles outgrow the 37 queries and 45 keys,
    width chunks the attention width 20."""
    (q, k, v, values), lengths, dout, dscores, expect = odd_case
    block_m, block_n, block_a = tiles
    monkeypatch.setattr(kernel, "INTERPRET_CONFIG", dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_A=block_a, num_warps=1, num_stages=1))
    out, lse, scores = kernel.additive_attention_forward(q, k, v, values, lengths, True)
    grads = kernel.additive_attention_backward(dout, dscores, None, q, k, v, values, lengths,
                                               out, lse)
    names = ["out", "scores", "dq", "dk", "dv", "dvalues"]
    for name, got, want in zip(names, [out, scores, *grads], expect):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=name)


def test_tuning_key_buckets_lengths_by_powers_of_four():
    assert [length_bucket(n, 4) for n in (0, 1, 2, 4, 5, 16, 17, 1000, 10 ** 6)] == [
        1, 1, 4, 4, 16, 16, 64, 1024, 1 << 16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_output_needs_no_weights(backend):
    tensors, lengths = make(CASES["odd"], torch.float32)
    with attnmem.use_backend(backend):
        out = attnmem.additive_attention(*tensors, kv_lengths=lengths)
    expect, _, _ = twin.additive_attention(*(x.double() for x in (tensors[0], tensors[1],
                                                                   tensors[3], tensors[2])),
                                           lengths)
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_counts_for_nothing_whatever_it_holds(backend):
    """NaN and inf in keys and values past kv_lengths change no output and no gradient,
    and get zero gradients themselves."""
    (q, k, values, v), lengths = make(CASES["odd"], torch.float32)
    padding = (torch.arange(k.shape[1], device=DEVICE) >= lengths[:, None])[..., None]
    poisoned = [q, k.masked_fill(padding, float("nan")),
                values.masked_fill(padding, float("inf")), v]
    grads_out = [torch.randn(2, 37, 24, device=DEVICE, dtype=torch.float64),
                 torch.randn(2, 37, 45, device=DEVICE, dtype=torch.float64),
                 torch.randn(2, 37, 45, device=DEVICE, dtype=torch.float64)]
    with attnmem.use_backend(backend):
        got = run(ours, poisoned, lengths, grads_out)
        clean = run(ours, [q, k, values, v], lengths, grads_out)
    for g, c in zip(got, clean):
        torch.testing.assert_close(g, c, equal_nan=False)
    dq, dk, dvalues, dv = got[3:]
    assert all(torch.isfinite(g).all() for g in (dq, dk, dvalues, dv))
    assert (dk.masked_select(padding) == 0).all() and (dvalues.masked_select(padding) == 0).all()


EMPTY = {"no keys": (2, 3, 0), "no queries": (2, 0, 5), "no batch": (0, 3, 5)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY.values(), ids=EMPTY.keys())
def test_empty_inputs_are_valid(shape, backend):
    """No key: zero outputs, -inf log-probabilities, zero gradients; no query or no batch:
    empty outputs. Forward and backward, never NaN."""
    b, nq, nk = shape
    tensors = [torch.randn(*size, device=DEVICE, requires_grad=True)
               for size in ((b, nq, 8), (b, nk, 8), (b, nk, 5), (8,))]
    with attnmem.use_backend(backend):
        out, weights, log_probs = ours(*tensors, None)
    assert out.shape == (b, nq, 5) and weights.shape == log_probs.shape == (b, nq, nk)
    assert (out == 0).all()
    grads = torch.autograd.grad(out.sum() + weights.sum() + log_probs.sum(), tensors,
                                allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)


def test_hard_attention_samples_unnormalised_log_weights():
    """Log-weights far below zero (exp underflows to 0) are still a distribution."""
    log_weights = torch.tensor([[[-1000.0, -999.0, float("-inf")]]])
    indices, _, _ = attnmem.hard_attention(log_weights, torch.randn(1, 3, 2), sample=True)
    assert indices.item() in (0, 1)
    counts = torch.bincount(torch.stack([attnmem.hard_attention(
        log_weights, torch.randn(1, 3, 2), sample=True)[0].view(()) for _ in range(400)]),
        minlength=3)
    assert counts[2] == 0 and counts[1] > counts[0] > 0


def test_hard_attention_argmax_and_sampling():
    log_weights = torch.log_softmax(torch.randn(2, 3, 5) * 2, -1)
    log_weights[1, 2] = float("-inf")  # a query with nothing to attend to
    values = torch.randn(2, 5, 4)
    log_weights.requires_grad_()
    indices, chosen, chosen_log_prob = attnmem.hard_attention(log_weights, values)
    assert torch.equal(indices[0], log_weights[0].argmax(-1))
    assert torch.equal(chosen[0, 1], values[0, indices[0, 1]])
    assert indices[1, 2] == 0 and chosen_log_prob[1, 2] == float("-inf")
    chosen_log_prob[torch.isfinite(chosen_log_prob)].sum().backward()
    assert log_weights.grad.sum() == 5  # one unit of gradient per finite choice

    probs = torch.softmax(torch.tensor([[[0.0, 1.0, 2.0, -30.0]]]), -1)
    values = torch.arange(4.0).view(1, 4, 1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        indices, chosen, _ = attnmem.hard_attention(probs.log(), values, sample=True,
                                                    generator=generator)
        counts[indices.item()] += 1
        assert chosen.item() == indices.item()
    # Binomial standard deviations are below 0.008 at n=4000: 0.03 is about four of them.
    torch.testing.assert_close(counts / 4000, probs.view(-1), atol=0.03, rtol=0)


def test_hard_attention_gives_a_query_without_inputs_a_zero_value():
    """A query whose inputs are all -inf (all padding, kv_lengths 0) takes a zero value, as
    one with no inputs at all, not whatever index 0 holds (NaN padding), argmax or sampled."""
    log_weights = torch.log_softmax(torch.randn(2, 3, 5), -1)
    log_weights[1] = float("-inf")
    values = torch.randn(2, 5, 4)
    values[1] = float("nan")
    for sample in (False, True):
        indices, chosen, log_prob = attnmem.hard_attention(log_weights, values, sample=sample)
        assert (indices[1] == 0).all() and (log_prob[1] == float("-inf")).all()
        assert (chosen[1] == 0).all()
        assert torch.equal(chosen[0], values[0, indices[0]])


@pytest.mark.parametrize("message,call", [
    ("q must be (B, Nq, A)", lambda q, k, val, v: attnmem.additive_attention(q[0], k, val, v)),
    ("k must be (B, Nk, A) with B, A", lambda q, k, val, v: attnmem.additive_attention(
        q, k[..., :3], val, v)),
    ("v must be (A,)", lambda q, k, val, v: attnmem.additive_attention(q, k, val, v[:2])),
    ("values must be (B, Nk, Dv)", lambda q, k, val, v: attnmem.additive_attention(
        q, k, val[:, :2], v)),
    ("k must have q's dtype", lambda q, k, val, v: attnmem.additive_attention(
        q, k.double(), val, v)),
    ("kv_lengths must be an integer", lambda q, k, val, v: attnmem.additive_attention(
        q, k, val, v, kv_lengths=torch.ones(2))),
    ("kv_lengths must have shape", lambda q, k, val, v: attnmem.additive_attention(
        q, k, val, v, kv_lengths=torch.ones(3, dtype=torch.long))),
    ("values must be (B, Nk, Dv) with B, Nk", lambda q, k, val, v: attnmem.hard_attention(
        torch.zeros(2, 4, 7), val)),
    ("values must be a tensor (B, Nk, Dv); for the distribution alone, use pointer_attention",
     lambda q, k, val, v: attnmem.additive_attention(q, k, None, v)),
    ("log_weights must be log-probabilities", lambda q, k, val, v: attnmem.hard_attention(
        torch.full((2, 4, 6), float("nan")), val, sample=True)),
    ("log_weights must be log-probabilities", lambda q, k, val, v: attnmem.hard_attention(
        torch.full((2, 4, 6), float("inf")), val)),
    ("sample must be a bool", lambda q, k, val, v: attnmem.hard_attention(
        torch.zeros(2, 4, 6), val, sample="yes")),
    ("return_weights must be a bool", lambda q, k, val, v: attnmem.additive_attention(
        q, k, val, v, return_weights="no")),
])
def test_bad_input_raises_a_named_error(message, call):
    q, k, val, v = torch.randn(2, 4, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 5), \
        torch.randn(8)
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(
            ")", r"\)")):
        call(q, k, val, v)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter runs the kernel on CPU tensors")
def test_opcheck():
    from attnmem.additive import _additive_backward_op, _additive_op

    q, k, values, v = (x.requires_grad_() for x in make(CASES["odd"], torch.float32)[0])
    lengths = torch.tensor([30, 7])
    torch.library.opcheck(_additive_op.default, (q, k, v, values, lengths, True))
    out, scores, lse = _additive_op(q, k, v, values, lengths, True)
    torch.library.opcheck(_additive_backward_op.default, (
        torch.randn_like(out), torch.randn_like(scores), torch.randn_like(lse), q.detach(),
        k.detach(), v.detach(), values.detach(), lengths, out.detach(), lse.detach()))


def test_torch_compile_fullgraph():
    tensors = [x.requires_grad_() for x in make(CASES["odd"], torch.float32)[0]]
    lengths = torch.tensor([40, 9], device=DEVICE)

    def f(q, k, values, v):
        out, weights = attnmem.additive_attention(q, k, values, v, kv_lengths=lengths,
                                                  return_weights=True)
        return out.sin().sum() + (weights * weights).sum()

    with attnmem.use_backend(BACKENDS[-1]):
        expect = torch.autograd.grad(f(*tensors), tensors)
        got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(
            *tensors), tensors)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e)


def _job(name, arch, dtype, block_dv, config):
    t = TRITON_TYPES[dtype]
    tiles = dict(DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
                 BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                 BLOCK_A=config["BLOCK_A"], BLOCK_DV=block_dv, HAS_LENGTHS=True,
                 HAS_VALUES=True)
    job = dict(module="attnmem.kernels.additive_attention", arch=arch,
               num_warps=config["num_warps"], num_stages=config["num_stages"])
    if name == "fwd":
        job.update(kernel="_additive_fwd", constexprs=dict(tiles, STORE_SCORES=True),
                   pointers={"q_ptr": t, "k_ptr": t, "v_ptr": t, "val_ptr": t,
                             "lengths_ptr": "i64", "out_ptr": t, "lse_ptr": "fp32",
                             "scores_ptr": "fp32"})
    else:
        job.update(kernel="_additive_bwd", constexprs=dict(
            tiles, OWN_KEYS=name == "dkv", HAS_DSCORES=True),
            pointers={"q_ptr": t, "k_ptr": t, "v_ptr": t, "val_ptr": t, "lengths_ptr": "i64",
                      "lse_ptr": "fp32", "delta_ptr": "fp32", "dout_ptr": t,
                      "dscores_ptr": "fp32", "dq_ptr": "fp32", "dk_ptr": "fp32",
                      "dval_ptr": t, "dv_part_ptr": "fp32"})
    return job


def _compile_jobs():
    """The first config of each table at every value width of its bucket (32 to 256) in
    every dtype on sm_90 and, but bfloat16, on sm_80; the other configs at the widest width
    of their bucket, which needs the most registers and shared memory, in float16 or
    float32, on sm_90. Every config's sm_90 job at that width expects no spill on the GPU
    machines' triton too (tests/test_triton_versions.py). No config comes near sm_80's
    shared memory (64 KB at most of 163 when every config was compiled for both, on
    2026-11-25): there the first configs stand for the others."""
    jobs = {}
    for (name, elem, bucket), rows in kernel.CONFIGS.items():
        narrower = [w for w in kernel.VALUE_BUCKETS[elem] if w < bucket]
        widths = [w for w in (32, 64, 128, 256) if max(narrower, default=0) < w <= bucket]
        for i, config in enumerate(kernel.configs_for(name, elem, bucket)):
            tag = "x".join(map(str, rows[i]))
            for dtype in ("float16", "bfloat16") if elem == 2 else ("float32",):
                if i and dtype == "bfloat16":
                    continue
                for block_dv in widths if i == 0 else [bucket]:
                    for arch in (80, 90) if dtype != "bfloat16" and i == 0 else (90,):
                        job = _job(name, arch, dtype, block_dv, config)
                        if arch == 90 and block_dv == bucket and dtype != "bfloat16":
                            job["expect"] = {"spill_stores": 0, "spill_loads": 0}
                        jobs[f"{name}-sm{arch}-{dtype}-dv{block_dv}-{tag}"] = job
    return jobs


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_kernel_compiles_for_sm80_and_sm90():
    """Every tuning config compiles for sm_90 (each table's first for sm_80 too), fits shared
    memory, runs its 16-bit value products on tensor cores and spills no register on sm_90
    (issue 15), at value widths up to 256 (see _compile_jobs)."""
    results = compiled(_compile_jobs())
    for name, result in results.items():
        arch = 80 if "sm80" in name else 90
        assert result["shared"] <= SMEM_LIMIT[arch], (name, result["shared"])
    for name, result in results.items():  # the value products run on tensor cores
        if "float32" not in name:
            assert result["mma_sync"] or result["wgmma"], name
    spills = sm90_spills(results)
    assert not spills, spills
