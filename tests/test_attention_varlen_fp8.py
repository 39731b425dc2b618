"""attnmem.attention_varlen's FP8 forward (FlashAttention-3's flash_attn_varlen_func on
float8_e4m3fn inputs): against float64 attention of the dequantized inputs, one sequence at a
time, with the bound of tests/test_attention_fp8.py (the kernels round the softmax weights to
e4m3; the torch backend is held to float32's); empty sequences, GQA, causal and window masks,
score modifications; quantize_fp8 per sequence; bad inputs; the custom op's fake and trace;
and the sm_90 compile of the VARLEN FP8 forward (slow).

Keys that no query of their sequence sees hold e4m3 NaN: they must reach no output. Under the
interpreter, torch's float32 -> e4m3 cast stands in for triton 3.9's wrong one (the fixture
of tests/test_attention_fp8.py).
"""

import re
import types

import pytest
import torch
from test_attention_fp8 import (  # noqa: F401  (the fixture is autouse here too)
    FP8,
    _interpreter_e4m3_cast,
    assert_fp8_close,
)
from test_attention_varlen import cu_seqlens

import attnmem
from attnmem import varlen
from backends import BACKENDS, DEVICE

pytestmark = pytest.mark.usefixtures("poison_empty")

# name: (H, Hkv, D, query lengths, key lengths, causal, window, out_dtype). Under the
# interpreter the kernel runs 16 x 16 tiles: sequences end inside tiles and span several.
CASES = {
    # Empty query and key sequences; more queries than keys (the first see nothing) and fewer.
    "causal_gqa_empty": (4, 2, 40, [5, 0, 19, 1], [9, 3, 17, 0], True, None, torch.float32),
    "window": (2, 2, 32, [13, 7, 12], [20, 7, 3], False, (3, 2), torch.bfloat16),
    "causal_window_mqa": (3, 1, 16, [1, 30, 8], [30, 1, 8], True, (4, None), torch.float16),
}


def fp8_inputs(case):
    """Packed q, k, v quantized per (sequence, kv head) with scales of different sizes, their
    descales, and the dequantized inputs in float64; keys that no query of their sequence
    sees hold NaN."""
    heads, kv_heads, dim, lengths_q, lengths_k, causal, window, _ = case
    batch = len(lengths_q)

    def packed(lengths, n_heads):
        spread = (1 + 3 * torch.rand(batch, n_heads)).repeat_interleave(
            torch.tensor(lengths), 0)
        return torch.randn(sum(lengths), n_heads, dim) * spread[..., None]

    q, k, v = packed(lengths_q, heads), packed(lengths_k, kv_heads), packed(lengths_k, kv_heads)
    cu_q, cu_k = (cu_seqlens(x).cpu() for x in (lengths_q, lengths_k))
    (qf, qd), (kf, kd), (vf, vd) = (
        attnmem.quantize_fp8(x, kv_heads=kv_heads, cu_seqlens=cu)
        for x, cu in ((q, cu_q), (k, cu_k), (v, cu_k)))
    left = window[0] if window is not None and window[0] is not None else None
    unseen = torch.cat([torch.arange(n_k) < (n_k - n_q - left if left is not None else 0)
                        if n_q else torch.ones(n_k, dtype=torch.bool)
                        for n_q, n_k in zip(lengths_q, lengths_k)])[:, None, None]
    nan = torch.full((), float("nan")).to(FP8)
    kf, vf = (torch.where(unseen, nan, x) for x in (kf, vf))

    def dequantize(x, descale, lengths):
        rows = descale.double().repeat_interleave(torch.tensor(lengths), 0)
        return (x.double().unflatten(1, (kv_heads, -1)) * rows[:, :, None, None]).flatten(1, 2)

    dequant = [dequantize(x, s, n) for x, s, n in ((qf, qd, lengths_q), (kf, kd, lengths_k),
                                                   (vf, vd, lengths_k))]
    args = (cu_seqlens(lengths_q), cu_seqlens(lengths_k), max(lengths_q), max(lengths_k))
    to = lambda *xs: [x.to(DEVICE) for x in xs]  # noqa: E731
    return to(qf, kf, vf), to(qd, kd, vd), to(*dequant), args, dict(causal=causal,
                                                                   window=window)


def check_against_float64(case, backend, **mods):
    (qf, kf, vf), (qd, kd, vd), (q, k, v), args, masks = fp8_inputs(case)
    out_dtype = case[-1]
    with attnmem.use_backend(backend), torch.no_grad():
        out, lse = attnmem.attention_varlen(qf, kf, vf, *args, **masks, **mods, q_descale=qd,
                                            k_descale=kd, v_descale=vd, out_dtype=out_dtype,
                                            return_lse=True)
    mods = {name: x.double() if isinstance(x, torch.Tensor) else x for name, x in mods.items()}
    with attnmem.use_backend("torch"):
        ref, ref_lse = attnmem.attention_varlen(q, k, v, *args, **masks, **mods, return_lse=True)
        ref_abs = attnmem.attention_varlen(q, k, v.abs().nan_to_num(), *args, **masks, **mods)
        _, score_abs = attnmem.attention_varlen(q.abs(), k.abs().nan_to_num(), v.nan_to_num(),
                                                *args, **masks, return_lse=True)
    assert_fp8_close(out.transpose(0, 1), lse, ref.transpose(0, 1), ref_lse,
                     ref_abs.transpose(0, 1), v, args[3], out_dtype, backend, score_abs,
                     q.shape[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_fp8_varlen_against_float64(name, backend):
    check_against_float64(CASES[name], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_varlen_score_modifications(backend):
    """softcap, sinks and (B, H) ALiBi slopes, a row per sequence."""
    heads, batch = 4, 3
    mods = dict(softcap=4.0, sinks=torch.randn(heads, device=DEVICE) * 2,
                alibi_slopes=torch.rand(batch, heads, device=DEVICE) * 0.3)
    check_against_float64((heads, 2, 32, [9, 0, 21], [17, 4, 21], True, None, torch.float32),
                          backend, **mods)


def test_fp8_varlen_tma_and_pointer_configs_agree():
    """q, k and out of each sequence through device-made TMA descriptors or pointers: the same
    bits under the interpreter, which runs the descriptors. On sm_90, where the masked kernel
    takes both, the compiled kernels differ in their bits (the H100 run; by how much it did
    not record): there they agree within 2^-7 of the outputs' scale, far under e4m3's
    rounding (2^-4) and far over what summing the same products in another order moves,
    while a tile loaded from the wrong rows or a mask misapplied moves outputs by O(1)."""
    from attnmem.kernels import attention as kernel

    if "triton" not in BACKENDS:
        pytest.skip("needs the interpreter or a GPU")
    (qf, kf, vf), descales, _, args, _ = fp8_inputs(CASES["window"])
    tiles = (16, 16, 1, 1) if DEVICE == "cpu" else (128, 64, 8, 3)
    outs = [kernel.attention_varlen_forward(qf, kf, vf, *args, 0.2, -1, 0, (*tiles, *flags),
                                            descales=torch.stack(descales, -1),
                                            out_dtype=torch.float32)
            for flags in ((), ("USE_TMA",))]
    if DEVICE == "cpu":
        assert all(torch.equal(a, b) for a, b in zip(*outs))
        return
    for pointers, tma in zip(*outs):
        scale = pointers.abs().nan_to_num(posinf=0, neginf=0).max().item()
        torch.testing.assert_close(tma, pointers, rtol=2**-7, atol=2**-7 * scale)


def test_quantize_fp8_per_sequence():
    """One descale per (sequence, kv head group), 1 for an empty sequence; each row scaled by
    its sequence's; per_tensor repeats the tensor's."""
    lengths = [3, 0, 6]
    x = torch.randn(9, 4, 8) * torch.tensor([1.0] * 3 + [20.0] * 6)[:, None, None]
    xf, descale = attnmem.quantize_fp8(x, kv_heads=2, cu_seqlens=cu_seqlens(lengths).cpu())
    assert xf.dtype == FP8 and xf.shape == x.shape and descale.shape == (3, 2)
    groups = torch.stack([x[:3].unflatten(1, (2, 2)).abs().amax((0, 2, 3)), torch.ones(2) * 448,
                          x[3:].unflatten(1, (2, 2)).abs().amax((0, 2, 3))])
    torch.testing.assert_close(descale, groups / 448)
    rows = descale.repeat_interleave(torch.tensor(lengths), 0).repeat_interleave(2, 1)
    back = xf.float() * rows[..., None]
    assert ((back - x).abs() <= 2**-4 * x.abs() + 2**-10 * rows[..., None]).all()
    _, descale = attnmem.quantize_fp8(x, per_tensor=True, cu_seqlens=cu_seqlens(lengths).cpu())
    assert descale.shape == (3, 4) and (descale == x.abs().max() / 448).all()


def _bad_calls():
    q = torch.randn(9, 4, 16).to(FP8)
    k, v = (torch.randn(7, 2, 16).to(FP8) for _ in range(2))
    lengths = (cu_seqlens([4, 5]).cpu(), cu_seqlens([7, 0]).cpu(), 5, 7)
    ones = torch.ones(2, 2)
    return {
        "e5m2": (TypeError, "float8_e4m3fn", (q.to(torch.float8_e5m2), k, v), {}),
        "k_dtype": (TypeError, "k must have q's dtype", (q, k.float(), v), {}),
        "descale_shape": (ValueError, "k_descale must be (B, Hkv) = (2, 2)", (q, k, v),
                          {"k_descale": torch.ones(3, 2)}),
        "descale_float8": (TypeError, "q_descale must be a floating-point tensor", (q, k, v),
                           {"q_descale": ones.to(FP8)}),
        "descale_16bit_q": (ValueError, "v_descale applies to float8_e4m3fn inputs only",
                            (q.float(), k.float(), v.float()), {"v_descale": ones}),
        "out_dtype": (TypeError, "out_dtype must be", (q, k, v), {"out_dtype": torch.int8}),
        "dropout": (ValueError, "dropout_p must be 0 with float8", (q, k, v),
                    {"dropout_p": 0.1}),
        "grad": (ValueError, "has no backward (as FlashAttention-3's), but q require grad",
                 (q.clone().requires_grad_(), k, v), {}),
        "cu_end": (ValueError, "cu_seqlens_k must end at the 6 packed rows", (q, k[:6], v[:6]),
                   {}),
    }, lengths


@pytest.mark.parametrize("name", list(_bad_calls()[0]))
def test_fp8_varlen_bad_inputs_raise(name):
    calls, lengths = _bad_calls()
    error, words, args, kwargs = calls[name]
    with pytest.raises(error, match=re.escape(words)):
        attnmem.attention_varlen(*args, *lengths, **kwargs)


@pytest.mark.parametrize("cu, error, words", [
    (cu_seqlens([4, 5]).cpu().long(), TypeError, "cu_seqlens must be int32"),
    (cu_seqlens([4, 4]).cpu(), ValueError, "cu_seqlens must end at the 9 packed rows"),
    ("shape", ValueError, "x must be a (total, H, D) tensor"),
])
def test_quantize_fp8_packed_bad_inputs_raise(cu, error, words):
    x = torch.randn(9, 4, 8)
    if isinstance(cu, str):
        x, cu = x[None], cu_seqlens([4, 5]).cpu()
    with pytest.raises(error, match=re.escape(words)):
        attnmem.quantize_fp8(x, cu_seqlens=cu)


def test_fp8_varlen_op_traces():
    """The custom op's fake and real outputs agree (opcheck, as the dense FP8 op's: its
    schema test would multiply float8 tensors, which torch's CPU kernels cannot; on the
    triton backend the fake's shapes, strides and dtypes), and torch.compile(fullgraph=True)
    traces attention_varlen on float8."""
    (qf, kf, vf), descales, _, args, _ = fp8_inputs(CASES["causal_window_mqa"])
    descales = torch.stack(descales, -1)
    for backend in BACKENDS:
        checks = ("test_faketensor",) + (("test_aot_dispatch_dynamic",) if backend == "torch"
                                         else ())
        torch.library.opcheck(varlen._varlen_forward_fp8.default, (
            qf, kf, vf, descales, *args, 0.25, 4, 0, torch.bfloat16, backend), test_utils=checks)
    scales = dict(q_descale=descales[..., 0], k_descale=descales[..., 1],
                  v_descale=descales[..., 2])
    masks = dict(causal=True, window=(4, None))
    traced = torch.compile(lambda *x: attnmem.attention_varlen(*x, **masks, **scales),
                           fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(traced(qf, kf, vf, *args),
                           attnmem.attention_varlen(qf, kf, vf, *args, **masks, **scales))


# ---------------------------------------------------------------------------------------
# Compiled for sm_90 (tests/aot.py; tests/test_triton_versions.py repeats the expectation on
# the GPU machines' triton, 3.6)
# ---------------------------------------------------------------------------------------


def varlen_fp8_job(block_d, config):
    """tests/test_attention_fp8.py's masked FP8 forward job with VARLEN on: e4m3 wgmma for
    both products, no spill, TMA as the config says."""
    from test_attention_fp8 import fp8_job

    job = fp8_job(block_d, config, True)
    job["constexprs"].update(VARLEN=True, HAS_KV_LENGTHS=False)
    job["pointers"].update(cu_seqlens_q_ptr="i32", cu_seqlens_k_ptr="i32")
    return job


def _tuned_configs(block_d):
    """The sm_90 configs a packed FP8 call tunes at block_d (on an H100's shared memory)."""
    from attnmem.kernels import attention as kernel

    configs = kernel.triton_configs(
        kernel.configs_for("fwd", block_d, 1, kernel.SMEM_LIMIT[90], 90, tma=True))
    q = types.SimpleNamespace(is_cuda=True, device="cuda", element_size=lambda: 1)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
             *(f for f in ("USE_TMA", "WARP_SPECIALIZE") if c.kwargs.get(f)))
            for c in kernel._forward_prune(configs, {"q_ptr": q}, FP8=True, VARLEN=True,
                                           MASK_KEYS=True, BLOCK_D=block_d)]


def test_sm90_varlen_fp8_tunes_no_spilling_config(monkeypatch):
    """At head dim 128 the configs that spill with VARLEN (FWD_FP8_VARLEN_SPILLS_SM90) and the
    warp-specialized ones (masked FP8) are left out; elsewhere only the latter."""
    from attnmem.kernels import attention as kernel

    monkeypatch.setattr(kernel, "_arch", lambda device: 90)
    for block_d in (64, 128):
        table = kernel.FWD_FP8_CONFIGS_SM90[block_d]
        dropped = kernel.FWD_FP8_VARLEN_SPILLS_SM90.get(block_d, [])
        assert _tuned_configs(block_d) == [
            c for c in table if "WARP_SPECIALIZE" not in c and c not in dropped]
    assert len(_tuned_configs(128)) == 3


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_sm90_varlen_fp8_forward_uses_e4m3_wgmma_without_spills(monkeypatch):
    """The first config a packed FP8 call tunes at head dim 128 (q, k and out through TMA,
    V^T through pointers)."""
    from aot import compile_all
    from attnmem.kernels import attention as kernel

    monkeypatch.setattr(kernel, "_arch", lambda device: 90)
    job = varlen_fp8_job(128, _tuned_configs(128)[0])
    assert job["expect"]["tma"]
    result, = compile_all([job])
    assert result["error"] is None, result["error"]
    assert {key: result[key] for key in job["expect"]} == job["expect"], result["registers"]
