"""memory_write on both backends against float64, every gradient, in place, sm_80/sm_90."""


import pytest
import torch

import attnmem
from aot import TRITON_TYPES, compile_all
from attnmem.reference import memory as twin
from backends import BACKENDS, DEVICE, DTYPE_IDS, DTYPES
from tolerance import assert_close_to_float64

# (B, N, D, W): one slot, several width chunks (D > 32 under the interpreter), many heads.
SHAPES = [(2, 1, 5, 2), (2, 75, 20, 1), (1, 40, 70, 3), (3, 33, 16, 4)]


def make(b, n, d, w, dtype):
    memory, weights = torch.randn(b, n, d, device=DEVICE), torch.rand(b, w, n, device=DEVICE)
    erase, add = torch.rand(b, w, d, device=DEVICE), torch.randn(b, w, d, device=DEVICE)
    weights[0, 0, 0], erase[0, 0] = 1.0, 1.0  # a full erase: 1 - w e is exactly 0
    return [x.to(dtype) for x in (memory, weights, erase, add)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_matches_float64(shape, dtype, backend):
    tensors = make(*shape, dtype)
    dout = torch.randn(shape[:3], device=DEVICE)

    def run(fn, xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = fn(*xs)
        return [out.detach(), *torch.autograd.grad((out.float() * dout.float()).sum(), xs)]

    with attnmem.use_backend(backend):
        got = run(attnmem.memory_write, tensors)
    expect = run(twin.memory_write, [x.double() for x in tensors])
    base = run(twin.memory_write, tensors)
    assert_close_to_float64(got, expect, base, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_matches(backend):
    memory, weights, erase, add = make(2, 50, 40, 2, torch.float32)
    expect = twin.memory_write(memory, weights, erase, add)
    with torch.no_grad(), attnmem.use_backend(backend):
        out = attnmem.memory_write(memory, weights, erase, add, inplace=True)
    assert out.data_ptr() == memory.data_ptr()
    torch.testing.assert_close(memory, expect)


def _job(kernel, arch, dtype, even=True):
    pointers = {"mem_ptr": dtype, "weights_ptr": dtype, "erase_ptr": dtype, "add_ptr": dtype}
    if kernel == "_memory_write_fwd":
        pointers["out_ptr"] = dtype
    else:
        pointers.update({"dout_ptr": dtype, "dmem_ptr": dtype, "dweights_ptr": "fp32",
                         "part_derase_ptr": "fp32", "part_dadd_ptr": "fp32"})
    return dict(module="attnmem.kernels.memory_write", kernel=kernel, arch=arch,
                constexprs=dict(EVEN_D=even, BLOCK_N=64, BLOCK_D=128), pointers=pointers,
                num_warps=4, num_stages=3)


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_kernels_compile_for_sm80_and_sm90():
    jobs = {f"{k}-sm{arch}-{dt}": _job(k, arch, TRITON_TYPES[dt])
            for k in ("_memory_write_fwd", "_memory_write_bwd") for arch in (80, 90)
            for dt in ("float16", "bfloat16", "float32")}
    jobs.update({f"{k}-sm90-float16-odd-width": _job(k, 90, "fp16", even=False)
                 for k in ("_memory_write_fwd", "_memory_write_bwd")})
    results = dict(zip(jobs, compile_all(list(jobs.values()))))
    failures = {k: r["error"] for k, r in results.items() if r["error"]}
    assert not failures, failures
    # Whole-block widths move memory tiles 16 bytes at a time (issue 15).
    scalar = [k for k, r in results.items() if "odd" not in k
              and not (r["vector_loads"] and r["vector_stores"])]
    assert not scalar, scalar
