"""attnmem.attention and attention_varlen with v's head dim Ev apart from q's and k's D (SDPA's
(..., S, Ev) values; multi-head latent attention's D = 192, Ev = 128): out and lse and every
gradient (dq, dk with D columns, dv with Ev) against the float64 twin, on both backends and in
both triton backward modes, with masks, lengths, GQA, score modifications, dropout, a packed
batch and the FP8 forward; queries that see no key give zeros; bad shapes raise naming v; and
the sm_90 kernels at (256, 128) and (128, 64) compile to wgmma without spills (slow; D = 192
runs in a main tile and a tail: tests/test_attention_tail.py).

Tolerance as tests/test_attention.py: at most twice the error of torch's own attention in
the input dtype, plus a few rounding units (tests/tolerance.py).
"""

import importlib
import re

import pytest
import torch
from test_attention import _window, naive
from test_attention_fp8 import _interpreter_e4m3_cast, assert_fp8_close  # noqa: F401
from test_attention_varlen import cu_seqlens, each_sequence, per_sequence

import attnmem
from attnmem.reference import attention as twin
from backends import BACKENDS, DEVICE
from tolerance import assert_close_to_float64

api = importlib.import_module("attnmem.attention")  # the module; attnmem.attention is the op

pytestmark = pytest.mark.usefixtures("poison_empty")

TARGETS = [pytest.param("torch", None, id="torch")] + [
    pytest.param("triton", mode, id=f"triton-{mode}")
    for mode in ("atomic", "deterministic") if "triton" in BACKENDS]

# name: (B, H, Hkv, Nq, Nk, D, Ev, causal, window, kv_lengths). Under the interpreter the
# kernels run 16 x 16 tiles, so every head dim here ends inside a tile of its own width.
CASES = {
    "v_wider": (1, 2, 2, 19, 29, 24, 40, False, None, None),
    # Causal, more queries than keys: the first two see no key.
    "v_narrower_causal_gqa": (1, 4, 2, 23, 21, 64, 32, True, None, None),
    # Batch 1 sees no key.
    "window_lengths_mqa": (2, 2, 1, 21, 30, 40, 8, True, (6, None), [30, 0]),
}


@pytest.fixture
def mode(request):
    """The triton backward's mode through torch's switch (atomic dQ or the dQ kernel); the
    poison_empty fixture turns it back off."""
    torch.use_deterministic_algorithms(request.param != "atomic")
    return request.param


def make_inputs(case, dtype=torch.float32):
    b, h, hkv, nq, nk, d, ev, causal, window, lengths = case
    q, k, v = (torch.randn(b, heads, n, dim).to(DEVICE, dtype)
               for heads, n, dim in ((h, nq, d), (hkv, nk, d), (hkv, nk, ev)))
    kv_lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    return q, k, v, dict(causal=causal, window=window, kv_lengths=kv_lengths)


def run(fn, inputs, dout, dlse):
    """out, lse and the gradients of sum(out * dout) + sum(lse * dlse) (over finite lse) in
    each of inputs (q, k, v, and sinks where given)."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out, lse = fn(*inputs)
    loss = ((out.float() * dout.float()).sum()
            + torch.where(torch.isfinite(lse), lse, 0.0).mul(dlse.float()).sum())
    return [out.detach(), lse.detach(), *torch.autograd.grad(loss, inputs)]


def check(q, k, v, kwargs, backend, softcap=0.0, sinks=None, alibi_slopes=None, dropout_p=0.0,
          seed=None):
    """attnmem.attention(q, k, v) with the masks of kwargs, score modifications and dropout
    (its generator seeded with `seed`) on backend against the float64 twin, run with the keep
    mask the backend applies: out (B, H, Nq, Ev), lse and the gradients of q, k, v (and
    sinks). The baseline: naive attention in q's dtype, or with score modifications or
    dropout the twin in q's dtype. -> (ours, the rows that see no key)."""
    scale = q.shape[-1] ** -0.5  # the default: q's head dim, as in SDPA
    left, right = _window(kwargs)
    dout = torch.randn(*q.shape[:3], v.shape[-1], device=DEVICE).to(q.dtype)
    dlse = torch.randn(q.shape[:3], device=DEVICE)
    inputs = [q, k, v] + ([] if sinks is None else [sinks])
    drop = {}
    if dropout_p:
        with attnmem.use_backend(backend):
            keep = api.dropout_mask(q, k, dropout_p, torch.Generator(DEVICE).manual_seed(seed))
        assert keep.any() and not keep.all()
        drop = dict(dropout_p=dropout_p, dropout_mask=keep)

    def twin_fn(q, k, v, sinks=None):
        return twin.attention_forward(q, k, v, kwargs["kv_lengths"], scale, left, right,
                                      softcap, sinks, alibi_slopes, **drop)

    def attend(q, k, v, sinks=None):
        generator = torch.Generator(DEVICE).manual_seed(seed) if dropout_p else None
        return attnmem.attention(q, k, v, **kwargs, softcap=softcap, sinks=sinks,
                                 alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                 generator=generator, return_lse=True)

    ref = run(twin_fn, [x.double() for x in inputs], dout.double(), dlse.double())
    if softcap or sinks is not None or alibi_slopes is not None or dropout_p:
        base = run(twin_fn, inputs, dout, dlse)
    else:
        base = run(lambda *x: naive(*x, kwargs, scale), inputs, dout, dlse)
    with attnmem.use_backend(backend):
        ours = run(attend, inputs, dout, dlse)
    assert ours[0].shape == (*q.shape[:3], v.shape[-1])
    assert [g.shape for g in ours[2:]] == [x.shape for x in inputs]
    unseen = torch.isinf(ref[1])
    assert torch.equal(torch.isinf(ours[1]), unseen) and (ours[1][unseen] < 0).all()
    assert (ours[0][unseen] == 0).all() and (ours[2][unseen] == 0).all()
    lses = [r[1].masked_fill(unseen, 0.0) for r in (ours, base, ref)]
    assert_close_to_float64(lses[:1], lses[2:], lses[1:2], torch.float32)
    assert_close_to_float64([ours[0], *ours[2:]], [ref[0], *ref[2:]], [base[0], *base[2:]],
                            q.dtype)
    return ours, unseen


@pytest.mark.parametrize("backend, mode", TARGETS, indirect=["mode"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, backend, mode):
    _, unseen = check(*make_inputs(CASES[name]), backend)
    assert unseen.any() == (name != "v_wider")  # zero output, lse -inf, zero gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16(backend):
    check(*make_inputs(CASES["v_narrower_causal_gqa"], torch.float16), backend)


def check_modifications_and_dropout(case, backend):
    """check() of case with softcap, ALiBi, sinks (and their gradient) and dropout together."""
    q, k, v, kwargs = make_inputs(case)
    heads = q.shape[1]
    check(q, k, v, kwargs, backend, softcap=3.0, sinks=torch.randn(heads, device=DEVICE),
          alibi_slopes=torch.rand(heads, device=DEVICE) * 0.3, dropout_p=0.25, seed=5)


@pytest.mark.parametrize("backend, mode", TARGETS, indirect=["mode"])
def test_score_modifications_and_dropout(backend, mode):
    """softcap, ALiBi, sinks (and their gradient) and dropout together."""
    check_modifications_and_dropout(CASES["window_lengths_mqa"], backend)


@pytest.mark.parametrize("backend, mode", TARGETS, indirect=["mode"])
def test_varlen_matches_float64(backend, mode):
    """A packed batch (an empty query and an empty key sequence, GQA, causal with more and
    fewer queries than keys) against the twin run one sequence at a time."""
    lengths_q, lengths_k = [5, 0, 18, 3], [9, 3, 13, 0]
    heads, d, ev = 2, 24, 40
    q = torch.randn(sum(lengths_q), heads, d, device=DEVICE)
    k, v = (torch.randn(sum(lengths_k), 1, dim, device=DEVICE) for dim in (d, ev))
    args = (cu_seqlens(lengths_q), cu_seqlens(lengths_k), max(lengths_q), max(lengths_k))
    scale = d ** -0.5
    dout = torch.randn(q.shape[0], heads, ev, device=DEVICE)
    dlse = torch.randn(heads, q.shape[0], device=DEVICE)
    ref = run(lambda *x: per_sequence(
        lambda *y: twin.attention_forward(*y, None, scale, -1, 0), *x, *args[:2]),
        [x.double() for x in (q, k, v)], dout.double(), dlse.double())
    masks = dict(causal=True, window=None, kv_lengths=None)
    base = run(lambda *x: per_sequence(lambda *y: naive(*y, masks, scale), *x, *args[:2]),
               [q, k, v], dout, dlse)
    with attnmem.use_backend(backend):
        ours = run(lambda *x: attnmem.attention_varlen(*x, *args, causal=True, return_lse=True),
                   [q, k, v], dout, dlse)
    assert ours[0].shape == (q.shape[0], heads, ev) and ours[4].shape == v.shape
    unseen = torch.isinf(ref[1])
    assert unseen.any() and torch.equal(torch.isinf(ours[1]), unseen)
    assert (ours[0].transpose(0, 1)[unseen] == 0).all()
    assert (ours[2].transpose(0, 1)[unseen] == 0).all()
    lses = [r[1].masked_fill(unseen, 0.0) for r in (ours, base, ref)]
    assert_close_to_float64(lses[:1], lses[2:], lses[1:2], torch.float32)
    assert_close_to_float64([ours[0], *ours[2:]], [ref[0], *ref[2:]], [base[0], *base[2:]],
                            q.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_forward(backend):
    """The FP8 forward (e4m3 q, k, v with descales) against float64 attention of the
    dequantized inputs, within test_attention_fp8's bound of e4m3's rounded weights."""
    b, heads, kv_heads, n_q, n_k, d, ev = 2, 4, 2, 29, 37, 32, 48
    q, k, v = (torch.randn(b, h, n, dim, device=DEVICE)
               for h, n, dim in ((heads, n_q, d), (kv_heads, n_k, d), (kv_heads, n_k, ev)))
    quantized = [attnmem.quantize_fp8(x, kv_heads=kv_heads) for x in (q, k, v)]
    q, k, v = (twin.dequantize(x, s).double() for x, s in quantized)
    lengths = torch.tensor([n_k, 11], device=DEVICE)
    masks = dict(causal=True, kv_lengths=lengths)
    descales = dict(zip(("q_descale", "k_descale", "v_descale"), (s for _, s in quantized)))
    with attnmem.use_backend(backend), torch.no_grad():
        out, lse = attnmem.attention(*(x for x, _ in quantized), **masks, **descales,
                                     out_dtype=torch.float32, return_lse=True)
    with attnmem.use_backend("torch"):
        ref, ref_lse = attnmem.attention(q, k, v, **masks, return_lse=True)
        ref_abs = attnmem.attention(q, k, v.abs(), **masks)
        _, score_abs = attnmem.attention(q.abs(), k.abs(), v, **masks, return_lse=True)
    assert out.shape == (b, heads, n_q, ev)
    assert_fp8_close(out, lse, ref, ref_lse, ref_abs, v, n_k, torch.float32, backend,
                     score_abs, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_varlen_forward(backend):
    """The packed FP8 forward (V^T laid out per sequence by the launcher) against float64
    attention of each sequence's dequantized inputs, within the same bound."""
    lengths_q, lengths_k = [5, 13], [9, 7]
    q = torch.randn(sum(lengths_q), 4, 32, device=DEVICE)
    k, v = (torch.randn(sum(lengths_k), 2, dim, device=DEVICE) for dim in (32, 48))
    cus = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    quantized = [attnmem.quantize_fp8(x, kv_heads=2, cu_seqlens=cu)
                 for x, cu in ((q, cus[0]), (k, cus[1]), (v, cus[1]))]
    descales = dict(zip(("q_descale", "k_descale", "v_descale"), (s for _, s in quantized)))
    with attnmem.use_backend(backend), torch.no_grad():
        out, lse = attnmem.attention_varlen(*(x for x, _ in quantized), *cus, 13, 9, causal=True,
                                            **descales, out_dtype=torch.float32,
                                            return_lse=True)

    def dequantized(absolute, q, k, v, b):
        """Float64 attention of sequence b's dequantized inputs, those named in `absolute`
        ("v" or "qk") taken in absolute value."""
        q, k, v = (twin.dequantize(x, s[b:b + 1]).double().abs() if name in absolute
                   else twin.dequantize(x, s[b:b + 1]).double()
                   for name, x, (_, s) in zip("qkv", (q, k, v), quantized))
        with attnmem.use_backend("torch"):
            return attnmem.attention(q, k, v, causal=True, return_lse=True)

    fp8 = [x for x, _ in quantized]
    ref, ref_lse = each_sequence(lambda *x: dequantized("", *x), *fp8, *cus)
    ref_abs, _ = each_sequence(lambda *x: dequantized("v", *x), *fp8, *cus)
    _, score_abs = each_sequence(lambda *x: dequantized("qk", *x), *fp8, *cus)
    assert out.shape == (q.shape[0], 4, 48)
    assert_fp8_close(out, lse.T, ref, ref_lse.T, ref_abs, v, 9, torch.float32, backend,
                     score_abs.T, q.shape[-1])


def _qkv(e=8, ev=12):
    return (torch.randn(2, 4, 5, e, device=DEVICE), torch.randn(2, 2, 7, e, device=DEVICE),
            torch.randn(2, 2, 7, ev, device=DEVICE))


@pytest.mark.parametrize("v, words", [
    (lambda v: v[:, :, :6], "v must have k's shape but for its head dim, (2, 2, 7, Ev)"),
    (lambda v: v[:, :1], "v must have k's shape but for its head dim"),
    (lambda v: v[..., :0], "with Ev >= 1"),
    (lambda v: v[0], "v must be (B, Hkv, Nk, Ev)"),
], ids=["keys", "heads", "no_columns", "3d"])
def test_bad_v_raises_naming_v(v, words):
    q, k, v_good = _qkv()
    with pytest.raises(ValueError, match=re.escape(words)):
        attnmem.attention(q, k, v(v_good))


@pytest.mark.parametrize("v, words", [
    (lambda v: v[:6], "v must have k's shape but for its head dim, (7, 2, Ev)"),
    (lambda v: v[..., :0], "with Ev >= 1"),
    (lambda v: v[None], "v must be (total_k, Hkv, Ev)"),
], ids=["keys", "no_columns", "4d"])
def test_bad_packed_v_raises_naming_v(v, words):
    q, k, v_good = (x[0].transpose(0, 1) for x in _qkv())
    with pytest.raises(ValueError, match=re.escape(words)):
        attnmem.attention_varlen(q, k, v(v_good), cu_seqlens([5]), cu_seqlens([7]), 5, 7)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
def test_value_head_dim_past_the_kernels_falls_back_to_the_twin():
    """Ev past 256: backend="triton" refuses naming why, "auto" runs the torch twin."""
    q, k, v = _qkv(ev=264)
    with attnmem.use_backend("triton"), pytest.raises(RuntimeError, match="v's head dim 264"):
        attnmem.attention(q, k, v)
    with attnmem.use_backend("auto"):
        out = attnmem.attention(q, k, v)
    expect, _ = twin.attention_forward(q.double(), k.double(), v.double(), None, 8 ** -0.5,
                                       -1, -1)
    torch.testing.assert_close(out, expect.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """The custom ops' outputs have their fakes' shapes (out and dv with v's head dim),
    strides and dtypes."""
    from attnmem import varlen
    from attnmem.attention import _attention_backward, _attention_forward

    q, k, v = _qkv()
    checks = dict(test_utils=("test_schema", "test_faketensor"))
    fwd_args = (q.requires_grad_(), k, v, torch.tensor([7, 3], device=DEVICE), 0.35, 4, 0,
                backend)
    torch.library.opcheck(_attention_forward.default, fwd_args, **checks)
    out, lse = _attention_forward(*fwd_args)
    torch.library.opcheck(_attention_backward.default, (
        torch.randn_like(out), q.detach(), k, v, out.detach(), lse.detach(), None, *fwd_args[3:]),
        **checks)
    packed = [x[0].transpose(0, 1) for x in (q.detach(), k, v)]
    torch.library.opcheck(varlen._varlen_forward.default, (
        *packed, cu_seqlens([5]), cu_seqlens([7]), 5, 7, 0.35, -1, 0, backend), **checks)


def test_configs_follow_the_larger_head_dim(monkeypatch):
    """v's tile goes to the kernels only where its head dim differs (so equal head dims compile
    and tune as before); the tables and budgets take the larger tile (at D = 192, q's and
    k's 128 + 64 staged columns); on sm_90, dQ at (256, 128) drops the tile that spills only
    there."""
    from attnmem.kernels import attention as kernel

    q, k, v = _qkv(e=224, ev=128)
    meta = kernel._common(q, k, None, -1, -1, v.shape[-1])[0]
    assert (meta["BLOCK_D"], meta["HEAD_DV"], meta["BLOCK_DV"]) == (256, 128, 128)
    assert kernel.tile_head_dim(meta) == 256
    assert "HEAD_DV" not in kernel._common(q, k, None, -1, -1, 224)[0]
    mla = kernel._common(q[..., :192], k[..., :192], None, -1, -1, 128)[0]
    assert kernel.tile_head_dim(mla) == 192
    assert kernel.tile_head_dim(kernel._common(q[..., :64], k, None, -1, -1, 96)[0]) == 128
    kept = _sm90_pruned("dq", monkeypatch, BLOCK_D=256, BLOCK_DV=128)
    assert kept and (128, 32, 8, 3) not in kept
    assert (128, 32, 8, 3) in _sm90_pruned("dq", monkeypatch, BLOCK_D=256)


def _sm90_pruned(name, monkeypatch, **meta):
    """The sm_90 16-bit configs the autotuner would time for a launch with these meta."""
    import types

    from attnmem.kernels import attention as kernel

    monkeypatch.setattr(kernel, "_arch", lambda device: 90)
    block_d, tail, block_dv = kernel.config_widths(meta)
    configs = kernel.triton_configs(kernel.configs_for(
        name, block_d, 2, kernel.SMEM_LIMIT[90], 90, tma=True, tail=tail, block_dv=block_dv))
    q = types.SimpleNamespace(is_cuda=True, device="cuda", element_size=lambda: 2)
    prune = kernel.TUNING[name]["prune"]
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
             *(f for f in ("USE_TMA", "WARP_SPECIALIZE") if c.kwargs.get(f)))
            for c in prune(configs, {"q_ptr": q}, **meta)]


# (D, Ev, kernel, variant): compiled at the first config the sm_90 pruning keeps.
COMPILE_JOBS = [(256, 128, "fwd", "ws"), (256, 128, "dkdv", "atomic"), (256, 128, "dq", ""),
                (128, 64, "dkdv", "det")]


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_kernels_compile_for_sm90_without_spills(monkeypatch):
    """At (D, Ev) = (256, 128) and (128, 64), 16-bit inputs, the warp-specialized forward,
    dK/dV (atomic and deterministic) and dQ use wgmma, TMA and warp specialization as their
    configs say, and spill nothing (the jobs carry their expectations, so
    tests/test_triton_versions.py checks them on the GPU machines' triton 3.6 too)."""
    pytest.importorskip("triton")
    from test_attention_targets import expecting, job

    from aot import compiled
    from attnmem.kernels._launch import block_width

    jobs = {}
    for d, ev, name, variant in COMPILE_JOBS:
        tiles = dict(BLOCK_D=block_width(d), BLOCK_DV=block_width(ev))
        masked = name != "fwd"
        meta = {"fwd": dict(MASK_KEYS=masked), "dq": {},
                "dkdv": dict(ATOMIC_DQ=variant == "atomic")}[name]
        configs = _sm90_pruned(name, monkeypatch, **tiles, **meta)
        if name == "fwd":
            configs = [c for c in configs if "WARP_SPECIALIZE" in c]
        spec = job(name, 90, "float16", tiles["BLOCK_D"], configs[0], masked=masked,
                   atomic_dq=variant == "atomic")
        spec["constexprs"].update(HEAD_DIM=d, HEAD_DV=ev, BLOCK_DV=tiles["BLOCK_DV"])
        jobs[f"{name}-{d}x{ev}-{variant}-{'x'.join(map(str, configs[0]))}"] = expecting(
            spec, wgmma=True, mma_sync=False, spill_stores=0, spill_loads=0,
            tma="USE_TMA" in configs[0], warp_specialized="WARP_SPECIALIZE" in configs[0])
    for name, result in compiled(jobs).items():
        got = {key: result[key] for key in jobs[name]["expect"]}
        assert got == jobs[name]["expect"], (name, result["registers"])
