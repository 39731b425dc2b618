"""memory_write on both backends against float64, every gradient, in place, sm_80/sm_90."""


import pytest
import torch

import attnmem
from aot import TRITON_TYPES, compiled, sm90_spills, table_jobs
from attnmem.reference import memory as twin
from backends import BACKENDS, DEVICE, DTYPE_IDS, DTYPES, INTERPRET
from tolerance import assert_close_to_float64

# (B, N, D, W): one slot, several width chunks (D > 32 under the interpreter), many heads
# (the interpreter's forward config walks two tiles a program, as the pipelined ones do).
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_write_of_a_memory_saved_for_backward_raises_there(backend):
    """An earlier op saved memory for its backward; writing it in place under no_grad must
    make that backward raise, as torch's own in-place ops do, not compute the gradient from
    the written memory."""
    memory, weights, erase, add = make(2, 9, 4, 1, torch.float32)
    read = attnmem.memory_read(memory, weights.clone().requires_grad_())  # saves memory
    with torch.no_grad(), attnmem.use_backend(backend):
        attnmem.memory_write(memory, weights, erase, add, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        read.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_write_heads_keep_memory(backend):
    memory = torch.randn(2, 9, 4, device=DEVICE, requires_grad=True)
    nothing = torch.rand(2, 0, 9, device=DEVICE), torch.rand(2, 0, 4, device=DEVICE)
    with attnmem.use_backend(backend):
        out = attnmem.memory_write(memory, nothing[0], nothing[1], nothing[1])
    assert torch.equal(out, memory)
    assert (torch.autograd.grad(out.sum(), memory)[0] == 1).all()


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's config is what it forces")
@pytest.mark.parametrize("tiles", [1, 3], ids=["one_tile", "three_tiles"])
def test_forward_configs_match(tiles, monkeypatch):
    """The forward's other config shapes under the interpreter (the default walks two tiles
    a program): one tile, and three tiles a program over a memory whose last program has
    fewer than three, with three write heads."""
    from attnmem.kernels import memory_write as kernel

    monkeypatch.setattr(kernel, "FWD_INTERPRET_CONFIG",
                        dict(kernel.INTERPRET_CONFIG, TILES=tiles, LOAD_STAGES=min(tiles, 2)))
    memory, weights, erase, add = make(2, 75, 40, 3, torch.float32)
    expect = twin.memory_write(*(x.double() for x in (memory, weights, erase, add)))
    with attnmem.use_backend("triton"):
        got = attnmem.memory_write(memory, weights, erase, add)
    torch.testing.assert_close(got, expect.float())


def _job(kernel, arch, dtype, block_d, config, even=True, n_writes=None):
    t = TRITON_TYPES[dtype]
    pointers = {"mem_ptr": t, "weights_ptr": t, "erase_ptr": t, "add_ptr": t}
    constexprs = dict(EVEN_D=even, BLOCK_D=block_d,
                      **{k: v for k, v in config.items() if not k.startswith("num_")})
    if kernel == "fwd":
        pointers["out_ptr"] = t
        constexprs["N_WRITES"] = n_writes or TABLE_HEADS
    else:
        pointers.update({"dout_ptr": t, "dmem_ptr": t, "dweights_ptr": "fp32",
                         "part_derase_ptr": "fp32", "part_dadd_ptr": "fp32"})
    return dict(module="attnmem.kernels.memory_write", kernel=f"_memory_write_{kernel}",
                arch=arch, constexprs=constexprs, pointers=pointers,
                num_warps=config["num_warps"], num_stages=config["num_stages"])


# Write heads of the table's forward jobs: not a power of two, so the head index divides.
TABLE_HEADS = 3


def _kernel():
    from attnmem.kernels import memory_write

    return memory_write


def _jobs():
    """Every config of the tables at its width chunk in every dtype on sm_90 (the forward
    at TABLE_HEADS write heads), at the widest chunk on sm_80, and masked (odd) widths at
    the first config; the pipelined forward configs at one head as well, and the first at
    an odd width."""
    kernel_module = _kernel()
    widths = [d for d in (16, 32, 64) if d <= kernel_module.MAX_BLOCK_D]
    jobs = table_jobs(_job, kernel_module.configs_for, lambda elem: widths)
    for (elem, block_d), rows in kernel_module.PIPELINED.items():
        dtype = "float32" if elem == 4 else "float16"
        for i, (n, w, s, t) in enumerate(rows):
            config = dict(BLOCK_N=n, TILES=t, LOAD_STAGES=s, num_warps=w, num_stages=s)
            name = f"fwd-sm90-{dtype}-d{block_d}-BLOCK_N{n}-TILES{t}-stages{s}"
            jobs[f"{name}-one-head"] = _job("fwd", 90, dtype, block_d, config, n_writes=1)
            if i == 0 and block_d == widths[-1]:
                # also checked on the GPU machines' triton (test_triton_versions)
                expect = {"spill_stores": 0, "spill_loads": 0, "async_copies": True}
                jobs[f"{name}-one-head"]["expect"] = expect
                jobs[f"{name}-{TABLE_HEADS}-heads"] = dict(
                    _job("fwd", 90, dtype, block_d, config), expect=expect)
                jobs[f"{name}-odd-width"] = _job("fwd", 90, dtype, block_d, config, even=False)
    return jobs


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_every_config_compiles_without_spills():
    """Issue 15: no register spills on sm_90 at any width (wider slots are walked in chunks
    of MAX_BLOCK_D; the forward's one loop walks tiles and write heads, for any number of
    heads), whole-block widths move memory tiles 16 bytes at a time, and the multi-tile
    forward configs load them with cp.async, several tiles in flight."""
    jobs = _jobs()
    results = compiled(jobs)
    spills = sm90_spills(results)
    assert not spills, spills
    scalar = [k for k, r in results.items() if "odd" not in k
              and not (r["vector_loads"] and r["vector_stores"])]
    assert not scalar, scalar
    pipelined = [k for k, j in jobs.items()
                 if "odd" not in k and j["constexprs"].get("LOAD_STAGES", 1) > 1]
    assert pipelined and all(results[k]["async_copies"] for k in pipelined), \
        [k for k in pipelined if not results[k]["async_copies"]]
