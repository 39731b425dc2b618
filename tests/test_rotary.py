"""attnmem.apply_rotary (FlashAttention's apply_rotary_emb) against float64 on fresh random
inputs: GPT-NeoX and GPT-J pairs, partial rotary dims, odd head dims, int and tensor offsets,
packed sequences (one of them empty), in place, float16; every gradient against float64
autograd through a rotation written out here (independent of the twin); positions past the
table; bad inputs; opcheck; torch.compile; the sm_90 builds (slow)."""

import math

import pytest
import torch

import attnmem
from aot import compiled
from attnmem import rotary as op
from backends import BACKENDS, DEVICE
from tolerance import assert_close_to_float64

FP16, FP32 = torch.float16, torch.float32

# name: (B or packed lengths, S (None: packed), H, D, R, interleaved, seqlen_offsets (an int,
# or a list: a tensor), dtype)
CASES = {
    "neox_d12_r8_int_offset": (2, 5, 3, 12, 8, False, 3, FP32),
    "gptj_d33_r32_offsets": (2, 6, 2, 33, 32, True, [0, 7], FP16),
    "packed_empty_sequence": ([4, 0, 9], None, 3, 16, 16, False, [2, 5, 0], FP32),
    "packed_gptj_int_offset": ([3, 0, 7], None, 2, 20, 12, True, 1, FP16),
}
SEQLEN_RO = 20


def _rotate_eager(x, cos, sin, pos, interleaved):
    """x rotated in its own dtype, written out: pairs (a, b) -> (a c - b s, a s + b c)."""
    half = cos.shape[1]
    c, s = cos[pos].to(x.dtype), sin[pos].to(x.dtype)
    if interleaved:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        rotated = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    else:
        a, b = x[..., :half], x[..., half:2 * half]
        rotated = torch.cat([a * c - b * s, a * s + b * c], -1)
    return torch.cat([rotated, x[..., 2 * half:]], -1)


def _inputs(name, device=DEVICE):
    """x, cos, sin (in float32), the keyword arguments, and each row's position (broadcasting
    to x.shape[:-1]) as _rotate_eager takes it, on device."""
    batch, seqlen, heads, d, r, interleaved, offsets, dtype = CASES[name]
    angle = torch.rand(SEQLEN_RO, r // 2, dtype=torch.float64, device=device) * 2 * math.pi
    cos, sin = angle.cos().float(), angle.sin().float()
    kwargs = dict(interleaved=interleaved, seqlen_offsets=offsets)
    if isinstance(offsets, list):
        kwargs["seqlen_offsets"] = offsets = torch.tensor(offsets, device=device)
    if seqlen is None:
        lengths = torch.tensor(batch, device=device)
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32, device=device),
                                lengths.cumsum(0)]).int()
        x = torch.randn(int(lengths.sum()), heads, d, dtype=dtype, device=device)
        kwargs.update(cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()))
        sequence = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        token = torch.arange(x.shape[0], device=device) - cu_seqlens[sequence]
        first = offsets[sequence] if isinstance(offsets, torch.Tensor) else offsets
        pos = (token + first)[:, None]
    else:
        x = torch.randn(batch, seqlen, heads, d, dtype=dtype, device=device)
        first = offsets[:, None] if isinstance(offsets, torch.Tensor) else offsets
        pos = (torch.arange(seqlen, device=device)[None, :] + first)[..., None]
    return x, cos, sin, kwargs, pos


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_forward_and_gradient_match_float64(name, backend):
    """Output and the gradient w.r.t. x within flash-attention's tolerance of float64; the
    gradient checked against autograd through the rotation, so the conjugate rotation of
    the backward is checked, not assumed."""
    x, cos, sin, kwargs, pos = _inputs(name)
    dtype = x.dtype
    x64 = x.double().requires_grad_()
    expect = _rotate_eager(x64, cos.double(), sin.double(), pos, kwargs["interleaved"])
    dout = torch.randn_like(x)
    (expect_dx,) = torch.autograd.grad(expect, x64, dout.double())
    x_base = x.clone().requires_grad_()
    base = _rotate_eager(x_base, cos, sin, pos, kwargs["interleaved"])
    (base_dx,) = torch.autograd.grad(base, x_base, dout)
    x = x.requires_grad_()
    with attnmem.use_backend(backend):
        out = attnmem.apply_rotary(x, cos, sin, **kwargs)
        (dx,) = torch.autograd.grad(out, x, dout)
    assert_close_to_float64([out, dx], [expect, expect_dx], [base, base_dx], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gptj_d33_r32_offsets", "packed_empty_sequence"])
def test_inplace(name, backend):
    """inplace=True returns x rotated in place, equal to the new tensor's values bit for bit,
    also where x's last dimension is strided; under autograd the rotation is copied into a
    non-leaf x and the gradient flows through it, and a leaf that requires grad is refused."""
    x, cos, sin, kwargs, _ = _inputs(name)
    with attnmem.use_backend(backend):
        expect = attnmem.apply_rotary(x, cos, sin, **kwargs)
        own = x.clone()
        assert attnmem.apply_rotary(own, cos, sin, inplace=True, **kwargs) is own
        torch.testing.assert_close(own, expect, rtol=0, atol=0)
        strided = torch.stack([x, x], -1)[..., 0]
        attnmem.apply_rotary(strided, cos, sin, inplace=True, **kwargs)
        torch.testing.assert_close(strided, expect, rtol=0, atol=0)

        leaf = x.clone().requires_grad_()
        inner = leaf * 1
        out = attnmem.apply_rotary(inner, cos, sin, inplace=True, **kwargs)
        assert out is inner
        dout = torch.randn_like(x)
        (dx,) = torch.autograd.grad(out, leaf, dout)
        x2 = x.clone().requires_grad_()
        (expect_dx,) = torch.autograd.grad(attnmem.apply_rotary(x2, cos, sin, **kwargs), x2,
                                           dout)
        torch.testing.assert_close(dx, expect_dx, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="leaf Variable"):
            attnmem.apply_rotary(leaf, cos, sin, inplace=True, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_past_the_table_pass_through(backend):
    """Tensor offsets are not checked on the device: the op itself (under the public
    function's CPU checks) leaves tokens at positions outside [0, seqlen_ro) as they are and
    rotates the others, as FlashAttention's kernel does."""
    x, cos, sin, kwargs, _ = _inputs("neox_d12_r8_int_offset")
    offsets = torch.tensor([-2, SEQLEN_RO - 3], device=DEVICE)
    out = torch.ops.attnmem.apply_rotary(x, cos, sin, offsets, 0, None, 0, False, False,
                                         backend)
    pos = torch.arange(x.shape[1], device=DEVICE)[None, :] + offsets[:, None]
    inside = (pos >= 0) & (pos < SEQLEN_RO)
    torch.testing.assert_close(out[~inside], x[~inside], rtol=0, atol=0)
    expect = _rotate_eager(x.double(), cos.double(), sin.double(),
                           pos.clamp(0, SEQLEN_RO - 1)[..., None], False)
    torch.testing.assert_close(out[inside].double(), expect[inside], rtol=0, atol=1e-6)


def _good():
    x, cos, sin, kwargs, _ = _inputs("packed_empty_sequence", "cpu")
    return dict(x=x, cos=cos, sin=sin, **kwargs)


BAD = {
    "x_rank": (dict(cu_seqlens=None, max_seqlen=None), ValueError, "x must be (B, S, H, D)"),
    "cos_rank": (dict(cos=torch.ones(20, 8, 1)), ValueError, "cos must be (seqlen_ro"),
    "cos_dtype": (dict(cos=torch.ones(20, 8, dtype=torch.int32)), TypeError, "cos must be a"),
    "sin_shape": (dict(sin=torch.ones(20, 4)), ValueError, "sin must have cos's shape"),
    "rotary_dim_too_large": (dict(cos=torch.ones(20, 9), sin=torch.ones(20, 9)), ValueError,
                             "rotary_dim <= the head dim 16"),
    "table_too_short": (dict(cos=torch.ones(8, 8), sin=torch.ones(8, 8)), ValueError,
                        "cos has 8 positions"),
    "int_offset_past_table": (dict(seqlen_offsets=12), ValueError, "cos has 20 positions"),
    "negative_offset": (dict(seqlen_offsets=-1), ValueError, "seqlen_offsets must be an int >="),
    "offsets_float": (dict(seqlen_offsets=torch.zeros(3)), TypeError, "seqlen_offsets must be"),
    "offsets_shape": (dict(seqlen_offsets=torch.zeros(2, dtype=torch.int32)), ValueError,
                      "seqlen_offsets must have shape (B,) = (3,)"),
    "offsets_past_table": (dict(seqlen_offsets=torch.tensor([2, 20, 12])), ValueError,
                           "cos has 20 positions but sequence 2 needs 21"),
    "offsets_negative": (dict(seqlen_offsets=torch.tensor([0, -1, 0])), ValueError,
                         "seqlen_offsets must be >= 0"),
    "cu_seqlens_dtype": (dict(cu_seqlens=torch.tensor([0, 4, 4, 13])), TypeError,
                         "cu_seqlens must be int32"),
    "cu_seqlens_end": (dict(cu_seqlens=torch.tensor([0, 4, 4, 12], dtype=torch.int32)),
                       ValueError, "cu_seqlens must end at the 13 packed rows"),
    "no_max_seqlen": (dict(max_seqlen=None), ValueError, "max_seqlen must be given"),
    "max_seqlen_short": (dict(max_seqlen=8), ValueError, "max_seqlen = 8 is less than"),
    "interleaved_not_bool": (dict(interleaved=1), TypeError, "interleaved must be a bool"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_inputs_name_the_argument(name):
    changes, error, match = BAD[name]
    args = {**_good(), **changes}
    with pytest.raises(error, match=match.replace("(", r"\(").replace(")", r"\)")):
        attnmem.apply_rotary(**args)


def test_opcheck_and_torch_compile():
    """The custom ops' schemas, fakes and autograd registration, and a
    torch.compile(fullgraph=True) trace of a function that rotates and differentiates."""
    x, cos, sin, kwargs, _ = _inputs("neox_d12_r8_int_offset")
    offsets = torch.tensor([1, 4], device=DEVICE)
    backend = BACKENDS[-1]
    torch.library.opcheck(op._rotary.default, (x.requires_grad_(), cos, sin, offsets, 0, None, 0,
                                               True, False, backend))
    torch.library.opcheck(op._rotary_.default, (x.detach().clone(), cos, sin, None, 3, None, 0,
                                                False, backend))

    def rotate(x):
        with attnmem.use_backend(backend):
            return attnmem.apply_rotary(x, cos, sin, seqlen_offsets=offsets) * 2

    results = []
    for fn in (rotate, torch.compile(rotate, backend="eager", fullgraph=True)):
        own = x.detach().clone().requires_grad_()
        out = fn(own)
        out.sum().backward()
        results.append((out, own.grad))
    for got, expect in zip(*results):
        torch.testing.assert_close(got, expect, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Compiled for sm_90 (no GPU needed; see tests/aot.py)
# ---------------------------------------------------------------------------------------


# What every build must show (also checked on the GPU machines' triton by
# tests/test_triton_versions.py).
EXPECT = dict(vector_loads=True, vector_stores=True, spill_stores=0, spill_loads=0)


def _job(dtype, d, r, interleaved, inplace=False):
    from attnmem.kernels import rotary as kernel

    config = kernel.configs_for(d)[1]
    return dict(module="attnmem.kernels.rotary", kernel="_rotary_kernel", arch=90,
                constexprs=dict(HEAD_DIM=d, BLOCK_D=d, ROTARY_DIM=r, INTERLEAVED=interleaved,
                                CONJUGATE=False, HAS_OFFSETS=True, VARLEN=inplace,
                                INPLACE=inplace, ROWS=config["ROWS"]),
                pointers=dict(x_ptr=dtype, out_ptr=dtype, cos_ptr="fp32", sin_ptr="fp32",
                              offsets_ptr="i32", cu_seqlens_ptr="i32"),
                num_warps=config["num_warps"], num_stages=1, expect=EXPECT)


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_kernel_loads_16_bytes_without_spills():
    """sm_90 builds, GPT-NeoX and GPT-J pairs, whole and partial rotary dims, packed and in
    place: every variant loads and stores 16 bytes at a time and spills nothing."""
    results = compiled({
        "fp16-d128-r128-neox": _job("fp16", 128, 128, False),
        "bf16-d128-r64-gptj": _job("bf16", 128, 64, True),
        "fp32-d64-r64-gptj-packed-inplace": _job("fp32", 64, 64, True, inplace=True),
        "fp16-d256-r32-neox-packed-inplace": _job("fp16", 256, 32, False, inplace=True),
    })
    for name, result in results.items():
        assert {key: result[key] for key in EXPECT} == EXPECT, (name, result)


def test_grid_rows_bound_holds_for_every_config():
    """The wrapper bounds the launch grid by tiles of op.MIN_ROWS rows: no config of a head
    dim the triton path takes has fewer."""
    from attnmem.kernels import rotary as kernel

    assert all(c["ROWS"] >= op.MIN_ROWS for d in (16, 64, op.MAX_TRITON_HEAD_DIM)
               for c in kernel.configs_for(d))
