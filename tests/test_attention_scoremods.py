"""attnmem.attention's score modifications against float64: softcap (Gemma 2), learnable
attention sinks (gpt-oss) and ALiBi slopes (FlashAttention's definition), alone and together
with causal masks, windows, kv_lengths and GQA; out, lse and the gradients of q, k, v and the
sinks, on both backends and in both triton backward modes. Tolerance as in test_attention:
twice the error of torch computing the same thing naively in the input dtype, plus a few
rounding units. Also: the arguments' checks, opcheck, and the flags compiled for sm_90.
"""

import pytest
import torch
from test_attention import BACKWARD_TARGETS, INTERPRET, TARGETS, _window, make_inputs, mode

import attnmem
from attnmem.reference import attention as twin

assert mode  # the fixture test_attention defines, used through BACKWARD_TARGETS

pytestmark = pytest.mark.usefixtures("poison_empty")

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# name: ((B, H, Hkv, Nq, Nk, D, causal, window, kv_lengths), softcap, sinks, alibi slopes'
# shape: "h" (H,), "bh" (B, H) or None)
CASES = {
    "softcap": ((1, 2, 2, 37, 29, 40, False, None, None), 1.5, False, None),
    "sinks_causal_gqa": ((1, 4, 2, 33, 33, 24, True, None, None), None, True, None),
    "alibi_cross": ((2, 2, 2, 23, 45, 16, False, None, None), None, False, "bh"),
    "all_window_lengths_gqa": ((2, 4, 2, 25, 33, 24, True, (9, 0), [21, 33]), 2.0, True, "h"),
    "all_unseen_rows": ((2, 2, 1, 30, 14, 16, True, None, [14, 0]), 1.0, True, "h"),
    "all_decode": ((3, 4, 2, 1, 45, 80, True, None, [45, 13, 1]), 3.0, True, "bh"),
    # No mask and Nk a multiple of KEY_TILE_MULTIPLE: the forward's unmasked loop.
    "all_unmasked": ((1, 2, 1, 17, 128, 16, False, None, None), 1.0, True, "bh"),
}


def make_mods(case, device, dtype=torch.float32):
    """softcap, sinks in `dtype` (a model's parameters are in its dtype) and float32 ALiBi
    slopes (FlashAttention's dtype for them)."""
    (b, h, *_), softcap, sinks, alibi = case
    return dict(softcap=softcap,
                sinks=(torch.randn(h, device=device) * 2).to(dtype) if sinks else None,
                alibi_slopes=None if alibi is None else
                torch.rand((h,) if alibi == "h" else (b, h), device=device))


def naive(q, k, v, sinks, kwargs, scale, softcap, alibi_slopes):
    """Attention in q's dtype with the whole score matrix, the sink as an extra column
    (gpt-oss's eager attention): torch's own error baseline."""
    left, right = _window(kwargs)
    n_q, n_k = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if alibi_slopes is not None:
        rows = torch.arange(n_q, device=q.device)[:, None] + n_k - n_q
        distance = (rows - torch.arange(n_k, device=q.device)).abs()
        s = s - alibi_slopes.reshape(-1, q.shape[1], 1, 1).to(s.dtype) * distance
    keep = twin.visible(torch.arange(n_q, device=q.device), n_q, n_k, left, right,
                        kwargs["kv_lengths"])
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    lse = torch.logsumexp(s.float(), -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if sinks is not None:
        p = p[..., :-1]
    return p @ v, lse


def run(fn, q, k, v, sinks, dout, dlse):
    """[out, lse, dq, dk, dv(, dsinks)] of sum(out * dout) + sum(lse * dlse) over finite lse."""
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    if sinks is not None:
        inputs.append(sinks.detach().requires_grad_())
    out, lse = fn(*inputs[:3], inputs[3] if sinks is not None else None)
    loss = (out.float() * dout.float()).sum()
    loss = loss + torch.where(torch.isfinite(lse), lse, 0.0).mul(dlse.float()).sum()
    return [out.detach(), lse.detach(), *torch.autograd.grad(loss, inputs)]


def check(name, dtype, device, backend):
    case = CASES[name]
    q, k, v, kwargs = make_inputs(case[0], dtype, device)
    mods = make_mods(case, device, dtype)
    scale = q.shape[-1] ** -0.5
    left, right = _window(kwargs)
    dout = torch.randn(q.shape, device=device).to(dtype)
    dlse = torch.randn(q.shape[:3], device=device)
    softcap, sinks, slopes = mods["softcap"], mods["sinks"], mods["alibi_slopes"]

    ref = run(lambda q, k, v, s: twin.attention_forward(
        q, k, v, kwargs["kv_lengths"], scale, left, right, softcap or 0.0, s,
        None if slopes is None else slopes.double()), q.double(), k.double(), v.double(),
        None if sinks is None else sinks.double(), dout.double(), dlse.double())
    base = run(lambda q, k, v, s: naive(q, k, v, s, kwargs, scale, softcap, slopes),
               q, k, v, sinks, dout, dlse)
    with attnmem.use_backend(backend):
        ours = run(lambda q, k, v, s: attnmem.attention(
            q, k, v, **kwargs, softcap=softcap, sinks=s, alibi_slopes=slopes, return_lse=True),
            q, k, v, sinks, dout, dlse)

    names = ["out", "lse", "dq", "dk", "dv", "dsinks"]
    for what, o, b, r in zip(names, ours, base, ref):
        assert o.shape == r.shape, what
        assert o.dtype == (torch.float32 if what == "lse" else dtype), what
        assert not torch.isnan(o).any(), f"{what} has NaN"
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(o), finite), f"{what}: infinities differ"
        if not finite.any():
            continue
        err = (o.double() - r)[finite].abs().max().item()
        base_err = (b.double() - r)[finite].abs().max().item()
        atol = ATOL[dtype] * max(1.0, r[finite].abs().max().item())
        assert err <= 2 * base_err + atol, f"{what}: error {err:.3g}, torch's {base_err:.3g}"

    # Queries that see no key: zero output and dq; lse is the sink (-inf without one).
    seen = twin.visible(torch.arange(q.shape[2], device=device), q.shape[2], k.shape[2],
                        left, right, kwargs["kv_lengths"])
    if seen is not None:
        unseen = ~seen.any(-1).expand(q.shape[:3])
        assert (ours[0][unseen] == 0).all() and (ours[2][unseen] == 0).all()
        expect = (torch.full(q.shape[:3], float("-inf"), device=device) if sinks is None
                  else sinks.view(1, -1, 1).expand(q.shape[:3]).float())
        torch.testing.assert_close(ours[1][unseen], expect[unseen])


# Every case on every target, but the deterministic dQ kernel only where it meets a flag it
# has (softcap, ALiBi) for the first time or with the others.
FLOAT64_PARAMS = [pytest.param(name, *t.values, id=f"{name}-{t.id}") for name in CASES
                  for t in BACKWARD_TARGETS
                  if t.values[2] != "deterministic" or name not in ("sinks_causal_gqa",
                                                                    "alibi_cross",
                                                                    "all_unmasked")]


@pytest.mark.parametrize("name, device, backend, mode", FLOAT64_PARAMS, indirect=["mode"])
def test_matches_float64(name, device, backend, mode):
    check(name, torch.float32, device, backend)


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("name", ["all_window_lengths_gqa"])
def test_float16(name, device, backend):
    check(name, torch.float16, device, backend)


@pytest.mark.parametrize("device, backend", TARGETS)
def test_off_values(device, backend):
    """softcap 0 (FlashAttention's off value) is no cap and a sink of -inf is no sink; the
    plain op then gives the same numbers."""
    q, k, v, kwargs = make_inputs((1, 2, 1, 19, 21, 8, True, None, None), torch.float32,
                                  device)
    no_sinks = torch.full((q.shape[1],), float("-inf"), device=device, requires_grad=True)
    with attnmem.use_backend(backend):
        plain = attnmem.attention(q, k, v, **kwargs, return_lse=True)
        off = attnmem.attention(q, k, v, **kwargs, softcap=0, sinks=no_sinks, return_lse=True)
        off[0].sum().backward()
    for a, b in zip(plain, off):
        torch.testing.assert_close(a, b)
    assert torch.equal(no_sinks.grad, torch.zeros_like(no_sinks))


def test_checks_name_the_argument():
    q, k, v, _ = make_inputs(CASES["softcap"][0], torch.float32, "cpu")
    batch, heads = q.shape[:2]
    bad = [
        (dict(softcap=-1.0), ValueError, "softcap must be a finite number > 0"),
        (dict(softcap=float("inf")), ValueError, "softcap must be"),
        (dict(softcap=True), ValueError, "softcap must be"),
        (dict(softcap=1e-300), ValueError, "softcap 1e-300 is too small for scale"),
        (dict(sinks=[0.0] * heads), TypeError, "sinks must be a torch.Tensor"),
        (dict(sinks=torch.zeros(heads, dtype=torch.int64)), TypeError, "sinks must be a float"),
        (dict(sinks=torch.zeros(heads + 1)), ValueError, rf"sinks must be \(H,\) = \({heads},\)"),
        (dict(sinks=torch.zeros(2, heads)), ValueError, "sinks must be"),
        (dict(sinks=torch.zeros(heads, device="meta")), ValueError, "sinks is on meta"),
        (dict(alibi_slopes=torch.zeros(heads + 1)), ValueError,
         rf"alibi_slopes must be \(H,\) = \({heads},\) or \(B, H\) = \({batch}, {heads}\)"),
        (dict(alibi_slopes=torch.zeros(batch + 1, heads)), ValueError, "alibi_slopes must be"),
        (dict(alibi_slopes=torch.zeros(heads, requires_grad=True)), ValueError,
         "alibi_slopes get no gradient"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            attnmem.attention(q, k, v, **kwargs)
    with torch.no_grad():  # no gradient asked for: slopes that require grad are fine
        attnmem.attention(q, k, v, alibi_slopes=torch.zeros(heads, requires_grad=True))


@pytest.mark.parametrize("name", ["torch"] + (["triton"] if INTERPRET else []))
def test_opcheck(name):
    from attnmem.attention import _attention_backward, _attention_forward

    q, k, v, _ = make_inputs((2, 2, 1, 9, 11, 8, False, None, None), torch.float32, "cpu")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    lengths = torch.tensor([11, 6])
    sinks = torch.randn(q.shape[1], requires_grad=True)
    slopes = torch.rand(q.shape[1])
    fwd_args = (q, k, v, lengths, 0.35, 4, 0, name, 1.5, sinks, slopes)
    torch.library.opcheck(_attention_forward.default, fwd_args)
    out, lse = _attention_forward(*fwd_args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
                lse.detach(), torch.randn_like(lse), lengths, 0.35, 4, 0, name, 1.5,
                sinks.detach(), slopes)
    torch.library.opcheck(_attention_backward.default, bwd_args)


def _sm90_job(name, tma=False, **flags):
    """A compile job of test_attention_targets at head dim 128, 16-bit, with the flags on,
    at the first config (with tma, the first TMA config, warp-specialized, unmasked)."""
    from test_attention_targets import job

    spec = job(name, 90, "float16", 128, kernel_config(name, tma), masked=not tma,
               atomic_dq=name == "dkdv")
    spec["constexprs"].update(flags)
    spec["pointers"].update(alibi_ptr="fp32", **({"sinks_ptr": "fp32"} if "HAS_SINKS" in flags
                                                  else {}))
    return spec


def kernel_config(name, tma=False):
    from attnmem.kernels import attention as kernel

    return kernel.configs_for(name, 128, 2, kernel.SMEM_LIMIT[90], 90, tma)[0]


def test_autotuning_keys_hold_the_flags(monkeypatch):
    """Each kernel tunes its score-modified variants apart from the plain one, keyed by the
    flags it has (the backward's kernels have no HAS_SINKS). Built here without a GPU."""
    pytest.importorskip("triton")
    from attnmem.kernels import attention as kernel

    monkeypatch.setattr(kernel, "_autotuned", {})
    monkeypatch.setattr(kernel, "_smem_limit", lambda device: kernel.SMEM_LIMIT[90])
    for name, fn, flags in (("fwd", kernel._attn_fwd, {"SOFTCAP", "HAS_SINKS", "HAS_ALIBI"}),
                            ("dkdv", kernel._attn_bwd_dkdv, {"SOFTCAP", "HAS_ALIBI"}),
                            ("dq", kernel._attn_bwd_dq, {"SOFTCAP", "HAS_ALIBI"})):
        keys = kernel._launcher(name, fn, "cuda", 128, 2).keys
        assert flags <= set(keys) and "HAS_SINKS" not in set(keys) - flags, name


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_flags_compile_for_sm90_without_spills():
    """The forward with every flag (pointer loads with masks; TMA and warp specialization
    without), and the atomic dK/dV kernel with softcap and ALiBi (sinks need nothing there;
    the deterministic dQ kernel is left out for time), at the first sm_90 configs of head
    dim 128: wgmma, no spill; the KV-cache kernel with every flag, decoding at GQA 8:1 with
    splits: no spill. With the flags off the kernels compile as before
    (test_attention_targets and test_attention_kvcache check them)."""
    pytest.importorskip("triton")
    from test_attention_kvcache import _attend_job

    from aot import compile_all

    flags = dict(SOFTCAP=True, HAS_SINKS=True, HAS_ALIBI=True)
    decode = _attend_job(90, "float16", 128, 8, False, True)
    decode["constexprs"].update(flags)
    decode["pointers"].update(sinks_ptr="fp32", alibi_ptr="fp32")
    jobs = {"fwd": _sm90_job("fwd", **flags), "fwd-tma-ws": _sm90_job("fwd", True, **flags),
            "dkdv": _sm90_job("dkdv", SOFTCAP=True, HAS_ALIBI=True), "kvcache": decode}
    results = dict(zip(jobs, compile_all(list(jobs.values()))))
    for name, result in results.items():
        assert result["error"] is None, f"{name}: {result['error']}"
        assert result["wgmma"] or name == "kvcache", name  # 16 rows: below wgmma's 64
        assert result["spill_stores"] == result["spill_loads"] == 0, (name, result)
    assert results["fwd-tma-ws"]["tma"] and results["fwd-tma-ws"]["warp_specialized"]

