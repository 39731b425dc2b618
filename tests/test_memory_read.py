"""memory_read on both backends against float64, both gradients, and sm_80/sm_90 builds."""


import pytest
import torch

import attnmem
from aot import TRITON_TYPES, compiled, sm90_spills, table_jobs
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


def _job(kernel, arch, dtype, block_d, config, even=True):
    from attnmem.kernels import memory_read as kernel_module

    t = TRITON_TYPES[dtype]
    pointers = {"mem_ptr": t, "weights_ptr": t}
    pointers.update({"part_ptr": "fp32"} if kernel == "fwd" else
                    {"dread_ptr": "fp32", "dmem_ptr": t, "dweights_ptr": t})
    return dict(module="attnmem.kernels.memory_read", kernel=f"_memory_read_{kernel}",
                arch=arch, pointers=pointers, num_warps=config["num_warps"],
                num_stages=config["num_stages"],
                constexprs=dict(DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
                                EVEN_D=even, BLOCK_R=kernel_module.BLOCK_R,
                                BLOCK_N=config["BLOCK_N"], BLOCK_D=block_d))


def _jobs():
    """Every config of the tables at every width chunk it serves, every dtype, on sm_90; on
    sm_80 at the widest chunk; and masked (odd) widths at the first config."""
    from attnmem.kernels import memory_read as kernel_module

    def widths(elem):
        return [d for d in (16, 32, 64, 128) if d <= kernel_module.MAX_BLOCK_D[elem]]

    return table_jobs(_job, kernel_module.configs_for, widths)


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_every_config_compiles_without_spills():
    """Issue 15: no register spills on sm_90 at any width (the launcher walks wider slots in
    chunks of MAX_BLOCK_D) or head count (blocks of BLOCK_R), and whole-block widths move
    memory tiles 16 bytes at a time."""
    jobs = _jobs()
    results = compiled(jobs)
    spills = sm90_spills(results)
    assert not spills, spills
    scalar = [k for k, r in results.items() if "odd" not in k and not r["vector_loads"]]
    assert not scalar, scalar
