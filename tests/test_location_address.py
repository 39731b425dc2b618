"""location_address on both backends against float64, every gradient, and sm_80/sm_90 builds."""


import pytest
import torch

import attnmem
from aot import TRITON_TYPES, compiled, sm90_spills
from backends import BACKENDS, DEVICE, DTYPE_IDS, DTYPES
from tolerance import assert_close_to_float64

# (B, R, N, S): a single slot, S > N (shifts wrap more than once), no shift at all.
SHAPES = [(2, 3, 75, 3), (1, 1, 5, 7), (2, 2, 1, 3), (1, 2, 40, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_matches_float64(shape, dtype, backend):
    b, r, n, s = shape
    content = torch.softmax(torch.randn(b, r, n, device=DEVICE), -1)
    prev = torch.softmax(torch.randn(b, r, n, device=DEVICE), -1)
    if n > 3:  # zeros that the shift carries to other slots: w~ = 0 under sharpening
        content[0, 0, :3], prev[0, 0, :3] = 0, 0
    tensors = [content, prev, torch.rand(b, r, device=DEVICE),
               torch.softmax(torch.randn(b, r, s, device=DEVICE), -1),
               1 + 3 * torch.rand(b, r, device=DEVICE)]
    dout = torch.randn(b, r, n, device=DEVICE)

    def run(xs, use_backend):
        xs = [x.detach().requires_grad_() for x in xs]
        with attnmem.use_backend(use_backend):
            out = attnmem.location_address(*xs)
        return [out.detach(), *torch.autograd.grad((out.float() * dout).sum(), xs)]

    got = run([x.to(dtype) for x in tensors], backend)
    expect = run([x.double() for x in tensors], "torch")
    base = run([x.to(dtype) for x in tensors], "torch")
    assert_close_to_float64(got, expect, base, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [25.0, 200.0])
def test_sharp_gamma_keeps_rows_normalised(gamma, backend):
    """w^gamma of 128 near-uniform slots underflows float32 (128^-25 = 2^-175): the weights
    must still sum to 1 and match float64, gradients included."""
    b, r, n = 2, 2, 128
    content = torch.softmax(0.01 * torch.randn(b, r, n, device=DEVICE), -1)
    tensors = [content, content.roll(1, -1), torch.rand(b, r, device=DEVICE),
               torch.softmax(torch.randn(b, r, 3, device=DEVICE), -1),
               torch.full((b, r), gamma, device=DEVICE)]
    dout = torch.randn(b, r, n, device=DEVICE)

    def run(xs, use_backend):
        xs = [x.detach().requires_grad_() for x in xs]
        with attnmem.use_backend(use_backend):
            out = attnmem.location_address(*xs)
        return [out.detach(), *torch.autograd.grad((out * dout).sum(), xs)]

    got = run(tensors, backend)
    torch.testing.assert_close(got[0].sum(-1), torch.ones(b, r, device=DEVICE))
    # The logits gamma log w~ round gamma times as coarsely as w~: condition gamma.
    assert_close_to_float64(got, run([x.double() for x in tensors], "torch"),
                            run(tensors, "torch"), torch.float32, condition=gamma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_row_gives_zeros(backend):
    zeros = torch.zeros(1, 2, 9, device=DEVICE)
    xs = [x.requires_grad_() for x in (zeros.clone(), zeros.clone(),
                                       torch.full((1, 2), 0.5, device=DEVICE),
                                       torch.full((1, 2, 3), 1 / 3, device=DEVICE),
                                       torch.full((1, 2), 3.0, device=DEVICE))]
    with attnmem.use_backend(backend):
        out = attnmem.location_address(*xs)
    grads = torch.autograd.grad(out.sum(), xs)
    assert (out == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)


def compile_jobs():
    """Every autotuning config, every dtype on sm_90, 16- and 32-bit on sm_80."""
    from attnmem.kernels import location_address as kernel_module

    jobs = {}
    for kernel in ("_location_fwd", "_location_bwd"):
        for arch in (80, 90):
            for dtype in ("float16", "bfloat16", "float32"):
                if arch == 80 and dtype == "bfloat16":
                    continue
                t = TRITON_TYPES[dtype]
                pointers = {p: t for p in ("content_ptr", "prev_ptr", "gate_ptr", "shift_ptr",
                                           "gamma_ptr")}
                if kernel == "_location_fwd":
                    pointers.update(part_max_ptr="fp32", part_sum_ptr="fp32",
                                    row_max_ptr="fp32", row_sum_ptr="fp32", out_ptr=t)
                else:
                    pointers.update(row_max_ptr="fp32", row_sum_ptr="fp32", centre_ptr="fp32",
                                    dout_ptr=t, dcontent_ptr=t, dprev_ptr=t, part_dgate_ptr="fp32",
                                    part_dshift_ptr="fp32", part_dgamma_ptr="fp32")
                for block_n, warps, stages in kernel_module.CONFIGS:
                    for normalize in (True, False) if kernel == "_location_fwd" else (None,):
                        constexprs = dict(BLOCK_N=block_n)
                        if normalize is not None:
                            constexprs["NORMALIZE"] = normalize
                        jobs[f"{kernel}-sm{arch}-{dtype}-{block_n}x{warps}x{stages}-"
                             f"{normalize}"] = dict(
                            module="attnmem.kernels.location_address", kernel=kernel, arch=arch,
                            constexprs=constexprs, pointers=pointers, num_warps=warps,
                            num_stages=stages)
    return jobs


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_kernels_compile_for_sm80_and_sm90():
    """compile_jobs compile, without register spills on sm_90 (issue 15)."""
    spills = sm90_spills(compiled(compile_jobs()))
    assert not spills, spills
