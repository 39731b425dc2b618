"""The hardware tanh (PTX tanh.approx.f32) that additive attention and attention's softcap
take for float16 and bfloat16 inputs on CUDA (kernels/_math.py): when the launchers switch it
on, the exact forms it replaces, a numerics model of its error, and what it compiles to on
sm_90.

No GPU runs here, so the approximate path itself never runs: its accuracy is modelled
(test_additive_attention_error_model, test_softcap_error_model) and its code checked as
compiled.
"""

import types
from unittest import mock

import pytest
import torch
from test_additive_attention import CASES as ADDITIVE_CASES
from test_additive_attention import finite, float64_reference, ours
from test_additive_attention import make as make_additive
from test_additive_attention import run as run_additive
from test_attention import _window, make_inputs
from test_attention_scoremods import ATOL, make_mods, naive
from test_attention_scoremods import CASES as SCOREMOD_CASES
from test_attention_scoremods import run as run_attention

import attnmem
from attnmem.reference import attention as twin
from backends import DEVICE
from tolerance import assert_close_to_float64

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from attnmem.kernels._math import tanh  # noqa: E402

# PTX ISA 9.7.3.22 (tanh): "The maximum relative error over the entire floating point range
# is 2^-11."
HARDWARE_TANH_ERROR = 2.0 ** -11
EXACT_TANH = torch.tanh


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, n, SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, tanh(x, SYMMETRIC=SYMMETRIC), mask=offs < n)


# SYMMETRIC: (largest absolute error, largest relative error where |tanh x| >= 1e-3, largest
# absolute error for |x| < 1e-3) of the exact forms, about 1.5 times what was measured.
EXACT_FORMS = {True: (2e-7, 3e-5, 4e-8), False: (3e-7, 2e-4, 2e-7)}


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one_division"])
def test_exact_tanh_matches_float64(symmetric):
    """The exact forms (kernels._math.tanh, FAST off) against float64 from 0 and subnormals
    through float32's largest values to -+inf: within float32 rounding in absolute terms
    (EXACT_FORMS), -+1 at -+inf and NaN at NaN."""
    x = torch.cat([torch.tensor([0.0, 1e-40, 1e-30, 1e-10, 1e-7, 1e-5, 1e-3, 9.0, 44.0, 89.0,
                                 1e30, 3e38, float("inf")]),
                   torch.linspace(-12, 12, 20001), torch.logspace(-30, 1.3, 2001)])
    x = torch.cat([x, -x, torch.tensor([float("nan")])]).to(DEVICE)
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), symmetric, BLOCK=1024)
    expect = torch.tanh(x.double())
    assert y[-1].isnan() and not y[:-1].isnan().any()
    err = (y.double() - expect)[:-1].abs()
    largest, relative, near_zero = EXACT_FORMS[symmetric]
    assert err.max() <= largest, err.max()
    large = expect[:-1].abs() >= 1e-3
    assert (err[large] / expect[:-1][large].abs()).max() <= relative
    assert err[x[:-1].abs() < 1e-3].max() <= near_zero
    assert y[x == float("inf")].eq(1).all() and y[x == float("-inf")].eq(-1).all()


class _HardwareTanh(torch.autograd.Function):
    """tanh(x) (1 + sign 2^-11), the documented bound of tanh.approx.f32's relative error;
    its derivative 1 - t^2 from that t, as the kernels' backwards compute it."""

    @staticmethod
    def forward(ctx, x, sign):
        if sign == "random":
            # A sign per element that recomputing the same x repeats: one mantissa bit.
            bits = x.detach().double().contiguous().view(torch.int64)
            sign = 1 - 2 * ((bits >> 20) & 1).to(x.dtype)
        t = EXACT_TANH(x) * (1 + sign * HARDWARE_TANH_ERROR)
        ctx.save_for_backward(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * (1 - t * t), None


def _hardware_tanh(sign):
    """torch.tanh as _HardwareTanh while the context lasts."""
    return mock.patch.object(torch, "tanh", lambda x: _HardwareTanh.apply(x, sign))


def _additive_model(sign):
    """additive_attention's out and weights through the hardware tanh, pointer_attention's
    log-probabilities through the exact one, as the launchers choose (_meta): without values
    the scores leave as float32 log-probabilities, which 2^-11 of the scores' range would
    move past their 4e-3 tolerance (this model, the tanh off in every element: 4e-3 to
    5e-3 at the odd case's range near 10)."""
    def model(q, k, values, v, lengths):
        with _hardware_tanh(sign):
            out, weights, _ = float64_reference(q, k, values, v, lengths)
        return out, weights, float64_reference(q, k, values, v, lengths)[2]
    return model


SIGNS = {"random": "random", "all_up": 1.0, "all_down": -1.0}
MODEL_PARAMS = [pytest.param(dtype, sign, id=f"{str(dtype)[6:]}-{sign}")
                for dtype in (torch.float16, torch.bfloat16) for sign in SIGNS]


@pytest.mark.parametrize("dtype, sign", MODEL_PARAMS)
@pytest.mark.parametrize("name", ["odd"])
def test_additive_attention_error_model(name, dtype, sign):
    """A model, not a run of the kernels: additive attention's float64 twin with every tanh
    off by tanh.approx.f32's documented relative bound, 2^-11 (signs random per element, or
    all one way, the worst case for a sum; _HardwareTanh), outputs rounded to the dtype as
    the kernels write them, pointer attention's log-probabilities through the exact tanh
    (_additive_model). Out, weights, log-probabilities and every gradient stay within the
    tolerances test_additive_attention applies to the kernels on a GPU in that dtype; and
    the tanh's own share of the error (the model before rounding) within the rounding-unit
    term of those tolerances alone, without torch's error beside it."""
    tensors, lengths = make_additive(ADDITIVE_CASES[name], dtype)
    b, nq, nk, _, dv, _ = ADDITIVE_CASES[name]
    grads_out = [torch.randn(b, nq, dv, device=DEVICE, dtype=torch.float64),
                 torch.randn(b, nq, nk, device=DEVICE, dtype=torch.float64),
                 torch.randn(b, nq, nk, device=DEVICE, dtype=torch.float64)]
    inputs64 = [x.double() for x in tensors]
    expect = run_additive(float64_reference, inputs64, lengths, grads_out)
    with attnmem.use_backend("torch"):
        base = run_additive(ours, [x.float() for x in tensors], lengths, grads_out)
    model = run_additive(_additive_model(SIGNS[sign]), inputs64, lengths, grads_out)
    log_probs, expect_log_probs, _ = model.pop(2), expect.pop(2), base.pop(2)
    masked = ~torch.isfinite(expect_log_probs)
    torch.testing.assert_close(finite(log_probs).float().double(), finite(expect_log_probs),
                               atol=20 * dtype.itemsize * 1e-4, rtol=0)
    condition = max(1.0, expect_log_probs[~masked].abs().max().item())
    assert_close_to_float64([x.to(dtype) for x in model], expect, [x.to(dtype) for x in base],
                            dtype, condition)
    for i, (m, e) in enumerate(zip(model, expect)):
        atol = ATOL[dtype] * max(1.0, e.abs().max().item()) * condition
        assert (m - e).abs().max() <= atol, (i, (m - e).abs().max().item(), atol)


@pytest.mark.parametrize("dtype, sign", MODEL_PARAMS)
@pytest.mark.parametrize("name", ["all_window_lengths_gqa"])
def test_softcap_error_model(name, dtype, sign):
    """A model, not a run of the kernels: softcapped attention's float64 twin (with sinks,
    ALiBi, a window, lengths and GQA) with every tanh off by 2^-11 as in
    test_additive_attention_error_model, out and the gradients rounded to the dtype, lse to
    float32. Each stays within test_attention_scoremods' tolerance in that dtype, and the
    tanh's own share within its rounding-unit term alone."""
    case = SCOREMOD_CASES[name]
    q, k, v, kwargs = make_inputs(case[0], dtype, "cpu")
    mods = make_mods(case, "cpu", dtype)
    scale, (left, right) = q.shape[-1] ** -0.5, _window(kwargs)
    softcap, sinks, slopes = mods["softcap"], mods["sinks"], mods["alibi_slopes"]
    dout, dlse = torch.randn(q.shape).to(dtype), torch.randn(q.shape[:3])

    def reference(q, k, v, s):
        return twin.attention_forward(q, k, v, kwargs["kv_lengths"], scale, left, right,
                                      softcap, s, None if slopes is None else slopes.double())

    inputs64 = [q.double(), k.double(), v.double(), None if sinks is None else sinks.double()]
    expect = run_attention(reference, *inputs64, dout.double(), dlse.double())
    base = run_attention(lambda q, k, v, s: naive(q, k, v, s, kwargs, scale, softcap, slopes),
                         q, k, v, sinks, dout, dlse)
    with _hardware_tanh(SIGNS[sign]):
        model = run_attention(reference, *inputs64, dout.double(), dlse.double())
    for i, (m, b, e) in enumerate(zip(model, base, expect)):
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(m), finite), i
        atol = ATOL[dtype] * max(1.0, e[finite].abs().max().item())
        written = m.to(torch.float32 if i == 1 else dtype).double()  # lse is float32
        err, base_err, tanh_err = ((x - e)[finite].abs().max().item()
                                   for x in (written, b.double(), m))
        assert err <= 2 * base_err + atol, (i, err, base_err)
        assert tanh_err <= atol, (i, tanh_err, atol)


def test_launchers_switch_it_on_for_compiled_16bit_cuda_only(monkeypatch):
    """fast_tanh: float16 and bfloat16 on an NVIDIA GPU from sm_75, compiled; never float32,
    a CPU tensor, an older GPU, ROCm or the interpreter (which runs no inline assembly). The
    launchers pass FAST_TANH where it holds: attention's (the KV-cache kernel's too) only with
    a softcap and a q, additive attention's only with values (pointer attention's float32
    log-probabilities keep the exact form)."""
    from attnmem.kernels import _math, attention
    from attnmem.kernels import additive_attention as additive

    def on_gpu(dtype):
        return types.SimpleNamespace(dtype=dtype, is_cuda=True, device="cuda:0")

    monkeypatch.setattr(_math, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    assert _math.fast_tanh(on_gpu(torch.float16)) and _math.fast_tanh(on_gpu(torch.bfloat16))
    assert not _math.fast_tanh(on_gpu(torch.float32))
    assert not _math.fast_tanh(torch.zeros(1, dtype=torch.float16))
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 0))
        assert not _math.fast_tanh(on_gpu(torch.float16))
    with monkeypatch.context() as patch:
        patch.setattr(torch.version, "hip", "6.2")
        assert not _math.fast_tanh(on_gpu(torch.float16))
    with monkeypatch.context() as patch:
        patch.setattr(_math, "interpreting", lambda: True)
        assert not _math.fast_tanh(on_gpu(torch.float16))

    q = on_gpu(torch.bfloat16)
    assert attention._score_mods(0.1, 30.0, None, None, q)[1]["FAST_TANH"] is True
    assert "FAST_TANH" not in attention._score_mods(0.1, 0.0, None, None, q)[1]
    assert "FAST_TANH" not in attention._score_mods(0.1, 30.0, None, None)[1]
    assert "FAST_TANH" not in attention._score_mods(0.1, 30.0, None, None, on_gpu(
        torch.float32))[1]
    values = types.SimpleNamespace(shape=(2, 5, 24))
    assert additive._meta(q, values)["FAST_TANH"] is True
    assert additive._meta(q, None)["FAST_TANH"] is False


COUNTED = ["tanh.approx.f32", "div.full.f32", "ex2.approx"]


def _counted(spec, fast):
    """spec counting the tanh's instructions; with fast, FAST_TANH on and expected to spill
    nothing, on the GPU machines' triton too (tests/test_triton_versions.py)."""
    spec = {**spec, "constexprs": {**spec["constexprs"]}, "count": COUNTED}
    if fast:
        spec["constexprs"]["FAST_TANH"] = True
        spec["expect"] = {"spill_stores": 0, "spill_loads": 0}
    return spec


def _compile_jobs():
    """sm_90, float16 (bfloat16 for additive dQ): the additive forward and dQ at their
    tables' first config of the widest value bucket (256), the softcapped attention forward
    and dQ at the first config of head dim 128 (test_attention_scoremods' jobs), the
    softcapped KV-cache attention at head dim 128, 8 rows, paged and split; the additive
    forward, softcapped dQ and KV-cache attention also with the flag off, to count what the
    tanh took. The
    dK/dV kernels are left out for time (the sweep of reports/additive-tuning.md compiled
    them)."""
    from test_additive_attention import _job as additive_job
    from test_attention_kvcache import _attend_job
    from test_attention_scoremods import _sm90_job

    from attnmem.kernels import additive_attention as additive

    def additive_spec(name, dtype):
        return additive_job(name, 90, dtype, 256, additive.configs_for(name, 2, 256)[0])

    kvcache = _attend_job(90, "float16", 128, 8, True, True)
    kvcache["constexprs"]["SOFTCAP"] = True
    return {"kvcache-fwd": _counted(kvcache, True),
            "kvcache-fwd-exact": _counted(kvcache, False),
            "additive-fwd": _counted(additive_spec("fwd", "float16"), True),
            "additive-fwd-exact": _counted(additive_spec("fwd", "float16"), False),
            "additive-dq": _counted(additive_spec("dq", "bfloat16"), True),
            "softcap-fwd": _counted(_sm90_job("fwd", SOFTCAP=True), True),
            "softcap-dq": _counted(_sm90_job("dq", SOFTCAP=True), True),
            "softcap-dq-exact": _counted(_sm90_job("dq", SOFTCAP=True), False)}


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_hardware_tanh_compiles_for_sm90():
    """With FAST_TANH the kernels' PTX evaluates tanh with tanh.approx.f32, and each one
    replaces a division and an exp2 of the exact form (counted against the flag off: nothing
    else changes); no job spills registers. Every 16-bit config of the additive tables (36
    jobs) and of the softcapped attention kernels (reports/additive-tuning.md) was compiled
    so on triton 3.9 and 3.6 without spills; these are a handful."""
    from aot import compiled

    results = compiled(_compile_jobs())
    for name, result in results.items():
        counts = result["ptx_counts"]
        assert (counts["tanh.approx.f32"] > 0) == (not name.endswith("exact")), (name, counts)
        assert result["spill_stores"] == result["spill_loads"] == 0, (name, result)
    for fast, exact in (("additive-fwd", "additive-fwd-exact"),
                        ("softcap-dq", "softcap-dq-exact"),
                        ("kvcache-fwd", "kvcache-fwd-exact")):
        on, off = results[fast]["ptx_counts"], results[exact]["ptx_counts"]
        tanhs = on["tanh.approx.f32"]
        assert off["div.full.f32"] - on["div.full.f32"] == tanhs, (fast, on, off)
        assert off["ex2.approx"] - on["ex2.approx"] == tanhs, (fast, on, off)
