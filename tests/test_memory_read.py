"""memory_read on both backends against float64, both gradients, and sm_80/sm_90 builds."""


import pytest
import torch

import attnmem
from aot import TRITON_TYPES, compile_all
from backends import BACKENDS, DEVICE, DTYPE_IDS, DTYPES
from tolerance import assert_close_to_float64

# (B, N, D, R): one slot, several width chunks (D > 32 under the interpreter), many heads.
SHAPES = [(2, 1, 5, 2), (2, 75, 20, 3), (1, 40, 70, 1), (2, 130, 16, 17)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_matches_float64(shape, dtype, backend):
    b, n, d, r = shape
    memory = torch.randn(b, n, d, device=DEVICE)
    weights = torch.softmax(torch.randn(b, r, n, device=DEVICE), -1)
    dread = torch.randn(b, r, d, device=DEVICE)

    def run(xs, use_backend):
        xs = [x.detach().requires_grad_() for x in xs]
        with attnmem.use_backend(use_backend):
            out = attnmem.memory_read(*xs)
        return [out.detach(), *torch.autograd.grad((out.float() * dread).sum(), xs)]

    got = run([memory.to(dtype), weights.to(dtype)], backend)
    expect = run([memory.double(), weights.double()], "torch")
    base = run([memory.to(dtype), weights.to(dtype)], "torch")
    assert_close_to_float64(got, expect, base, dtype)


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_kernels_compile_for_sm80_and_sm90():
    jobs = {}
    variants = [(arch, dtype, True) for arch in (80, 90)
                for dtype in ("float16", "bfloat16", "float32")] + [(90, "float16", False)]
    for kernel in ("_memory_read_fwd", "_memory_read_bwd"):
        for arch, dtype, even in variants:
            t = TRITON_TYPES[dtype]
            pointers = {"mem_ptr": t, "weights_ptr": t}
            pointers.update({"part_ptr": "fp32"} if kernel.endswith("fwd") else
                            {"dread_ptr": "fp32", "dmem_ptr": t, "dweights_ptr": t})
            jobs[f"{kernel}-sm{arch}-{dtype}{'' if even else '-odd-width'}"] = dict(
                module="attnmem.kernels.memory_read", kernel=kernel, arch=arch,
                constexprs=dict(DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
                                EVEN_D=even, BLOCK_R=16, BLOCK_N=64, BLOCK_D=128),
                pointers=pointers, num_warps=4, num_stages=3)
    results = dict(zip(jobs, compile_all(list(jobs.values()))))
    failures = {k: r["error"] for k, r in results.items() if r["error"]}
    assert not failures, failures
    # Whole-block widths load memory tiles 16 bytes at a time (issue 15).
    scalar = [k for k, r in results.items() if "odd" not in k and not r["vector_loads"]]
    assert not scalar, scalar
