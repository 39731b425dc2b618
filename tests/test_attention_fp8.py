"""attnmem.attention's FP8 forward (FlashAttention-3's): float8_e4m3fn q, k, v with (B, Hkv)
descales, against float64 attention of the dequantized inputs; quantize_fp8; bad inputs; and
what the sm_90 kernels compile to (slow).

Tolerance, from e4m3's precision: the kernel rounds its softmax weights, scaled into [0, 2^8],
to e4m3 (3 mantissa bits) for the PV product. A normal weight moves by at most 2^-4 of
itself, a subnormal one (below 2^-6) by at most 2^-10, and the row sum, which is not rounded,
is at least 2^8, so each output element is off by at most
    2^-4 * sum_j p_ij |v_jd| + 2^-18 * Nk * max |v|
(sum_j p_ij |v_jd|: attention of the dequantized inputs with |v|), plus float32 and output
rounding. lse never sees a rounded weight (the row sums add the weights before their cast),
so its error is the scores': under the interpreter, which sums the e4m3 products of QK^T in
float32, lse is held to float32's accuracy, as is the torch backend (dequantize, float32 twin).

On the GPU, the QK^T scores are not float32-accurate. Hopper's e4m3 wgmma accumulates with
about 13 fraction bits and truncates, where float32 keeps 23 and rounds (DeepSeek-V3's report,
sec. 3.3.2: "around 14 bits"; Khattak and Mikaitis, "Accurate Models of NVIDIA Tensor Cores",
arXiv:2512.07004, model H100's fp8 inner products bit for bit). The tests allow each block of
16 products (wgmma takes 32 an instruction) 2u, u = 2^-13, of the largest magnitude the sum
reaches, at most a_ij = scale * sum_d |q_id k_jd|: one truncation of the aligned products,
one of the sum. A score is then off by at most 2u * ceil(D / 16) * a_ij, and lse, whose
gradient in the scores is the softmax (weights summing to at most 1), by at most that over the
keys its row sees. The tests bound max_j a_ij from above by the lse of float64 attention of
|q| and |k| under the same mask (no score modification: softcap's tanh and ALiBi's bias only
shrink or shift an error), which exceeds the max by at most log(Nk). Simulated accumulation
(blocks of 8, 16 or 32 products, truncated to 13 bits with or without aligning each product
first; quantized inputs as these tests make them) stays within 0.37 of this bound at head dims
16 to 256 (within 1.07 with 12 bits). The H100 run's lse errors (up to 2e-4 to 4e-3 a test,
6e-5 to 3e-4 of lse where it is ~ 10, in most rows) are the simulation's size. Here the bound
comes to 4e-3 to 8e-2 (1e-3 to 3e-3 of lse, some ten times those errors): a descale or scale
misapplied, the row sums' 2^8 or a sink's weight mishandled, or a wrongly masked key with more
than a few percent of its row's weight still moves lse past it.

out's bound adds nothing for them: they move out by about twice lse's error relative to
ref_abs (under 1e-2 on the H100), which the weights' rounding term leaves room for (it takes
every weight off by 2^-4, while each row's largest, 2^8, is exact); the H100 run's out passed.

Under the interpreter: triton's interpreter runs e4m3 dots exactly (operands decoded, float32
accumulation), but its float32 -> e4m3 cast is wrong (triton 3.9's _convert_float ORs a
mantissa that rounds up past its binade into the exponent instead of carrying: 31.6 becomes
16; halfway cases round up). The tests put torch's cast in its place (round to nearest even,
what the GPU's cvt.rn.satfinite does for weights up to 2^8), so the kernel's own arithmetic
runs unchanged.
"""

import math
import os

import numpy as np
import pytest
import torch

import attnmem

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FP8 = torch.float8_e4m3fn


def _targets():
    out = [pytest.param("cpu", "torch", id="cpu-torch")]
    if INTERPRET:
        out.append(pytest.param("cpu", "triton", id="cpu-triton"))
    elif torch.cuda.is_available():
        out += [pytest.param("cuda", "torch", id="cuda-torch"),
                pytest.param("cuda", "triton", id="cuda-triton")]
    return out


TARGETS = _targets()
RUNS_KERNELS = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="needs the interpreter or a GPU")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


@pytest.fixture(autouse=True)
def _interpreter_e4m3_cast(monkeypatch):
    """Under the interpreter, torch's float32 -> e4m3 cast in place of triton's (see above)."""
    if not INTERPRET:
        return
    tl = pytest.importorskip("triton.language")
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    original = interpreter._convert_float

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.float8e4nv:
            x = torch.from_numpy(np.ascontiguousarray(data).view(np.float32))
            return x.to(FP8).view(torch.uint8).numpy().reshape(data.shape)
        return original(data, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


# name: (B, H, Hkv, Nq, Nk, D, causal, window, kv_lengths, out_dtype)
CASES = {
    "gqa_odd": (2, 4, 2, 37, 53, 40, False, None, None, torch.float32),
    "causal_lengths_bf16": (2, 2, 1, 45, 61, 64, True, None, [61, 20], torch.bfloat16),
    "window": (1, 2, 2, 33, 70, 32, False, (9, 4), None, torch.float32),
    "rows_see_no_key_d16": (1, 2, 2, 40, 17, 16, True, None, None, torch.float16),
    "unmasked": (1, 2, 1, 20, 128, 32, False, None, None, torch.float32),
}


def fp8_inputs(case, device):
    """Quantized q, k, v (per (batch, kv head) scales of different sizes), their descales, and
    the float64 dequantized inputs; keys that no query sees hold e4m3 NaN."""
    b, h, hkv, nq, nk, d, causal, window, lengths, _ = case
    spread = lambda heads: 1 + 3 * torch.rand(b, heads, 1, 1)  # noqa: E731
    q = torch.randn(b, h, nq, d) * spread(h)
    k, v = (torch.randn(b, hkv, nk, d) * spread(hkv) for _ in range(2))
    (qf, qd), (kf, kd), (vf, vd) = (attnmem.quantize_fp8(x, kv_heads=hkv) for x in (q, k, v))
    unseen = torch.zeros(b, 1, nk, 1, dtype=torch.bool)
    if lengths is not None:
        unseen |= (torch.arange(nk)[None, :] >= torch.tensor(lengths)[:, None])[:, None, :, None]
    if window is not None and window[0] is not None:
        unseen |= (torch.arange(nk) < nk - nq - window[0])[None, None, :, None]
    nan = torch.full((), float("nan")).to(FP8)
    kf, vf = (torch.where(unseen, nan, x) for x in (kf, vf))
    dequant = [(x.double().unflatten(1, (hkv, -1)) * s.double()[:, :, None, None, None])
               .flatten(1, 2) for x, s in ((qf, qd), (kf, kd), (vf, vd))]
    to = lambda *xs: [x.to(device) for x in xs]  # noqa: E731
    lengths = None if lengths is None else torch.tensor(lengths, device=device)
    return to(qf, kf, vf), to(qd, kd, vd), to(*dequant), lengths


def check_against_float64(case, device, backend, **mods):
    """The FP8 forward of case's inputs (and score modifications `mods`) against float64."""
    causal, window, out_dtype = case[6], case[7], case[9]
    (qf, kf, vf), (qd, kd, vd), (q, k, v), lengths = fp8_inputs(case, device)
    masks = dict(causal=causal, window=window, kv_lengths=lengths)
    with attnmem.use_backend(backend), torch.no_grad():
        out, lse = attnmem.attention(qf, kf, vf, **masks, **mods, q_descale=qd, k_descale=kd,
                                     v_descale=vd, out_dtype=out_dtype, return_lse=True)
    mods = {name: x.double() if isinstance(x, torch.Tensor) else x for name, x in mods.items()}
    with attnmem.use_backend("torch"):
        ref, ref_lse = attnmem.attention(q, k, v, **masks, **mods, return_lse=True)
        ref_abs = attnmem.attention(q, k, v.abs().nan_to_num(), **masks, **mods)
        _, score_abs = attnmem.attention(q.abs(), k.abs().nan_to_num(), v.nan_to_num(),
                                         **masks, return_lse=True)
    assert_fp8_close(out, lse, ref, ref_lse, ref_abs, v, k.shape[2], out_dtype, backend,
                     score_abs, q.shape[-1])


# Hopper's e4m3 wgmma accumulates with about 13 fraction bits, truncating: 2u a block of 16
# products (module docstring).
FP8_ACCUMULATION_UNIT = 2.0**-13


def assert_fp8_close(out, lse, ref, ref_lse, ref_abs, v, n_k, out_dtype, backend, score_abs,
                     head_dim):
    """out and lse of the FP8 forward against float64 attention of the dequantized inputs
    (ref, ref_lse; ref_abs with |v|): the bound of this module's docstring on the kernels, at
    most n_k keys a row; float32's on the torch backend. out's dims but the last are lse's.
    score_abs (lse's shape): the lse of float64 attention of |q| and |k| (q's and k's head dim
    head_dim) under the same mask, which bounds each row's scale * sum_d |q_d k_d| over the
    keys it sees: compiled kernels add the error of the GPU's e4m3 accumulation to lse's."""
    assert out.dtype == out_dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    v_max = v.nan_to_num().abs().max().item() if v.numel() else 0.0
    bound = (1e-5 + torch.finfo(out_dtype).eps) * ref.abs() + 1e-5 * max(1.0, v_max)
    if backend == "triton":
        bound = bound + 2**-4 * ref_abs + 2**-18 * n_k * v_max
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"error {err.max():.3g} where the bound is {bound.min():.3g}"
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert (lse[~seen] == float("-inf")).all() and (out[~seen] == 0).all()
    lse_bound = 1e-5 + 1e-5 * ref_lse[seen].abs()
    if backend == "triton" and not INTERPRET:
        unit = 2 * FP8_ACCUMULATION_UNIT * math.ceil(head_dim / 16)
        lse_bound = lse_bound + unit * score_abs.double()[seen].clamp(min=0)
    lse_err = (lse.double()[seen] - ref_lse[seen]).abs()
    worst = int(torch.argmax(lse_err / lse_bound)) if lse_err.numel() else 0
    assert (lse_err <= lse_bound).all(), (
        f"lse error {lse_err[worst]:.3g} where the bound is {lse_bound[worst]:.3g} "
        f"({int((lse_err > lse_bound).sum())} of {lse_err.numel()} rows over)")


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("name", list(CASES))
def test_fp8_forward_against_float64(name, device, backend, poison_empty):
    check_against_float64(CASES[name], device, backend)


@pytest.mark.parametrize("device, backend", TARGETS)
def test_fp8_score_modifications(device, backend, poison_empty):
    """softcap, ALiBi and sinks on the FP8 forward: the sink's weight in the row sums is
    scaled with the keys' (rows that see no key put all their weight on it)."""
    heads = 4
    mods = dict(softcap=4.0, sinks=torch.randn(heads, device=device) * 2,
                alibi_slopes=torch.rand(heads, device=device) * 0.3)
    check_against_float64((1, heads, 2, 29, 23, 32, True, None, [23], torch.float32), device,
                          backend, **mods)


@RUNS_KERNELS
@pytest.mark.parametrize("name", ["unmasked", "window"])
def test_fp8_tma_and_pointer_configs_agree(name):
    """V^T through a TMA descriptor (the unmasked kernel) or pointers, q, k and out through
    descriptors or pointers: the same bits. The interpreter runs device-made descriptors."""
    from attnmem.kernels import attention as kernel

    (qf, kf, vf), descales, _, _ = fp8_inputs(CASES[name], DEVICE)
    left, right = (9, 4) if name == "window" else (-1, -1)
    tiles = (16, 16, 1, 1) if INTERPRET else (128, 64, 8, 3)
    descales = torch.stack(descales, -1)
    outs = [kernel.attention_forward(qf, kf, vf, None, 0.2, left, right, (*tiles, *flags),
                                     descales=descales, out_dtype=torch.float32)
            for flags in ((), ("USE_TMA",))]
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@RUNS_KERNELS
def test_fp8_takes_keys_contiguous_v_as_it_is():
    """v laid out (B, Hkv, D, Nk) and viewed transposed goes to the kernel without a copy:
    the same bits as a contiguous v."""
    from attnmem.kernels import attention as kernel

    (qf, kf, vf), descales, _, lengths = fp8_inputs(CASES["causal_lengths_bf16"], DEVICE)
    v_keys_major = vf.transpose(2, 3).contiguous().transpose(2, 3)
    outs = [kernel.attention_forward(qf, kf, v, lengths, 0.2, -1, 0,
                                     descales=torch.stack(descales, -1),
                                     out_dtype=torch.bfloat16) for v in (vf, v_keys_major)]
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_quantize_fp8_per_group_and_per_tensor():
    x = torch.randn(2, 6, 9, 24) * torch.tensor([1.0, 5, 0.1])[None, :, None, None].repeat(
        1, 2, 1, 1)
    x[1, 4:] = 0
    xf, descale = attnmem.quantize_fp8(x, kv_heads=3)
    assert xf.dtype == FP8 and xf.shape == x.shape and descale.shape == (2, 3)
    groups = x.unflatten(1, (3, 2)).abs().amax((2, 3, 4))
    expect = torch.where(groups > 0, groups / 448, 1.0)
    torch.testing.assert_close(descale, expect)
    back = (xf.float().unflatten(1, (3, 2)) * descale[:, :, None, None, None]).flatten(1, 2)
    scale = descale.repeat_interleave(2, 1)[:, :, None, None]
    assert ((back - x).abs() <= 2**-4 * x.abs() + 2**-10 * scale).all()
    xf, descale = attnmem.quantize_fp8(x, per_tensor=True)
    assert descale.shape == (2, 6) and (descale == x.abs().max() / 448).all()
    assert xf.float().abs().max() == 448


def _bad_calls():
    q, k, v = (torch.randn(2, 4, 8, 16).to(FP8) for _ in range(3))
    k2, v2 = k[:, :2], v[:, :2]
    ones = torch.ones(2, 2)
    return [
        (TypeError, "float8_e4m3fn", (q.to(torch.float8_e5m2), k, v), {}),
        (TypeError, "k must have q's dtype", (q, k.float(), v), {}),
        (ValueError, r"k_descale must be \(B, Hkv\) = \(2, 2\)", (q, k2, v2),
         {"k_descale": torch.ones(2, 4)}),
        (TypeError, "q_descale must be a floating-point tensor", (q, k2, v2),
         {"q_descale": torch.ones(2, 2, dtype=torch.int32)}),
        (TypeError, "v_descale must be a torch.Tensor", (q, k2, v2), {"v_descale": 1.0}),
        (ValueError, "q_descale applies to float8_e4m3fn inputs only",
         (q.float(), k.float(), v.float()), {"q_descale": ones}),
        (ValueError, "out_dtype applies to float8_e4m3fn inputs only",
         (q.float(), k.float(), v.float()), {"out_dtype": torch.float16}),
        (TypeError, "out_dtype must be", (q, k, v), {"out_dtype": FP8}),
        (ValueError, "dropout_p must be 0 with float8", (q, k, v), {"dropout_p": 0.1}),
        (ValueError, "has no backward.*q require grad", (q.requires_grad_(), k, v), {}),
        (ValueError, "has no backward.*v_descale require grad", (q.detach(), k2, v2),
         {"v_descale": ones.requires_grad_()}),
    ]


@pytest.mark.parametrize("error, match, args, kwargs", _bad_calls())
def test_fp8_bad_inputs_raise(error, match, args, kwargs):
    with pytest.raises(error, match=match):
        attnmem.attention(*args, **kwargs)


def test_fp8_with_grad_off_and_quantize_bad_inputs():
    q = torch.randn(1, 2, 5, 16).to(FP8).requires_grad_()
    with torch.no_grad():
        assert attnmem.attention(q, q, q).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kv_heads must be an int that divides"):
        attnmem.quantize_fp8(torch.randn(1, 4, 3, 8), kv_heads=3)
    with pytest.raises(TypeError, match="x must be float16"):
        attnmem.quantize_fp8(q.detach())
    with pytest.raises(ValueError, match=r"x must be a \(B, H, N, D\)"):
        attnmem.quantize_fp8(torch.randn(3, 8))


def test_fp8_op_traces():
    """The custom op's fake and real outputs agree (torch.library.opcheck, torch backend;
    its schema test would multiply float8 tensors, which torch's CPU kernels cannot), and
    torch.compile(fullgraph=True) traces attention() on float8 inputs."""
    from attnmem.attention import _attention_forward_fp8

    q, k, v = (torch.randn(1, 2, 6, 16).to(FP8) for _ in range(3))
    descales = torch.rand(1, 2, 3) + 0.5
    torch.library.opcheck(_attention_forward_fp8.default, (
        q, k, v, descales, None, 0.25, -1, 0, torch.bfloat16, "torch"),
        test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
    kd = descales[..., 1]
    traced = torch.compile(lambda q, k, qd, kd: attnmem.attention(
        q, k, k, causal=True, q_descale=qd, k_descale=kd, v_descale=kd), fullgraph=True,
        backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(traced(q, k, descales[..., 0], kd), attnmem.attention(
            q, k, k, causal=True, q_descale=descales[..., 0], k_descale=kd, v_descale=kd))


# ---------------------------------------------------------------------------------------
# sm_90 compile checks (tests/aot.py): e4m3 wgmma for both products, no spill, TMA and warp
# specialization as each config says. tests/test_triton_versions.py repeats these
# expectations on the GPU machines' triton (3.6).
# ---------------------------------------------------------------------------------------


def fp8_job(block_d, config, masked, head_dim=None):
    from attnmem.kernels import attention as kernel

    block_m, block_n, warps, stages, *flags = config
    constexprs = dict(HEAD_DIM=head_dim or block_d, BLOCK_D=block_d, HAS_KV_LENGTHS=masked,
                      DOT_PRECISION="tf32", BLOCK_M=block_m, BLOCK_N=block_n,
                      MASK_KEYS=masked, EVEN_M=not masked, FP8=True,
                      USE_TMA="USE_TMA" in flags, WARP_SPECIALIZE="WARP_SPECIALIZE" in flags)
    pointers = {"q_ptr": "fp8e4nv", "k_ptr": "fp8e4nv", "v_ptr": "fp8e4nv", "o_ptr": "bf16",
                "lse_ptr": "fp32", "kv_lengths_ptr": "i32", "descale_ptr": "fp32"}
    assert config in kernel.FWD_FP8_CONFIGS_SM90[block_d]
    return dict(module="attnmem.kernels.attention", kernel="_attn_fwd", arch=90,
                constexprs=constexprs, pointers=pointers, num_warps=warps, num_stages=stages,
                expect=dict(wgmma_e4m3=True, spill_stores=0, spill_loads=0,
                            tma="USE_TMA" in flags,
                            warp_specialized="WARP_SPECIALIZE" in flags))


def _compile_cases():
    """A handful of the FP8 sm_90 table: the masked kernel (the most registers) for plain and
    TMA configs, the unmasked one for warp-specialized configs (the only one they specialize),
    head dim 16 padded to 32 columns."""
    tma, ws = "USE_TMA", "WARP_SPECIALIZE"
    return {"d128-128x256x4x2-tma-ws": fp8_job(128, (128, 256, 4, 2, tma, ws), False),
            "d128-128x128x8x3-tma": fp8_job(128, (128, 128, 8, 3, tma), True),
            "d128-128x128x8x2": fp8_job(128, (128, 128, 8, 2), True),
            "d64-128x64x4x3-tma": fp8_job(64, (128, 64, 4, 3, tma), True),
            "d256-128x32x8x3-tma": fp8_job(256, (128, 32, 8, 3, tma), True),
            "d16-64x64x4x3": fp8_job(32, (64, 64, 4, 3), True, head_dim=16)}


@pytest.fixture(scope="module")
def compiled_fp8():
    pytest.importorskip("triton")
    from aot import compile_all

    cases = _compile_cases()
    return dict(zip(cases, compile_all(list(cases.values())))), cases


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
@pytest.mark.parametrize("case", list(_compile_cases()))
def test_fp8_sm90_kernel_uses_e4m3_wgmma_without_spills(compiled_fp8, case):
    from attnmem.kernels import attention as kernel

    results, cases = compiled_fp8
    result = results[case]
    assert result["error"] is None, result["error"]
    got = {key: result[key] for key in cases[case]["expect"]}
    assert got == cases[case]["expect"], f"{result['registers']} registers"
    assert result["shared"] <= kernel.SMEM_LIMIT[90]


def test_fp8_sm90_table_keeps_tma_and_warp_specialized_configs():
    from attnmem.kernels import attention as kernel

    for block_d in (32, 64, 128, 256):
        configs = kernel.configs_for("fwd", block_d, 1, kernel.SMEM_LIMIT[90], 90, tma=True)
        assert configs == [tuple(c) for c in kernel.FWD_FP8_CONFIGS_SM90[block_d]], block_d
        assert any("WARP_SPECIALIZE" in c for c in configs), block_d
        plain = kernel.configs_for("fwd", block_d, 1, kernel.SMEM_LIMIT[90], 90, tma=False)
        assert plain and not any("USE_TMA" in c for c in plain), block_d
    assert math.isclose(2.0 ** kernel.FP8_P_OFFSET.value, kernel.FP8_P_SCALE.value)
