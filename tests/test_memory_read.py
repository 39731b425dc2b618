"""memory_read on both backends against float64, both gradients, and sm_80/sm_90 builds;
the same for sparse weights (indices and weights (B, R, K)), opcheck and bad input."""


import pytest
import torch

import attnmem
from aot import TRITON_TYPES, compiled, sm90_spills, table_jobs
from attnmem.memory import SparseWeights
from attnmem.reference import memory as twin
from backends import BACKENDS, DEVICE, DTYPE_IDS, DTYPES, INTERPRET
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


# name: (B, N, D, R, K): an odd width over several chunks (16 wide under the interpreter) and
# K over two steps of 4; K = 1; K = 32 on few slots (many repeats).
SPARSE = {"odd": (3, 45, 37, 3, 5), "k1": (2, 20, 16, 4, 1), "k32": (2, 11, 24, 2, 32)}


def _sparse(b, n, d, r, k):
    """Slots (B, R, K) with repeats within a head and across heads, -1 entries (weights NaN
    there: never read) and a last batch entry that names no slot; memory (slot rows strided
    apart, as a slice of wider rows), weights, dread."""
    slots = torch.randint(0, n, (b, r, k), device=DEVICE)
    slots[0, 0, -1] = slots[0, 0, 0]
    slots[0, -1] = slots[0, 0]
    slots[-1] = -1
    if k > 1:
        slots[0, 0, 1] = -1
    weights = torch.rand(b, r, k, device=DEVICE)
    weights[slots < 0] = float("nan")
    return (slots, torch.randn(b, n, d + 3, device=DEVICE)[..., 3:], weights,
            torch.randn(b, r, d, device=DEVICE))


def _dense_weights(slots, weights, n):
    """Sparse weights scattered (summed) into (B, R, N), -1 entries left out."""
    weights = weights.masked_fill(slots < 0, 0)
    b, r, _ = slots.shape
    return weights.new_zeros(b, r, n + 1).scatter_add(
        -1, torch.where(slots < 0, n, slots), weights)[..., :n]


def _read_and_grads(read, memory, weights, dread):
    xs = [x.detach().requires_grad_() for x in (memory, weights)]
    out = read(*xs)
    return [out.detach(), *torch.autograd.grad((out.float() * dread).sum(), xs)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_matches_float64(name, dtype, backend):
    """The sparse read and both gradients against the dense float64 twin of the weights
    scattered into (B, R, N); dMemory is zero off the named rows, dWeights at -1."""
    b, n, d, r, k = SPARSE[name]
    slots, memory, weights, dread = _sparse(b, n, d, r, k)

    def ours(m, w):
        with attnmem.use_backend(backend):
            return attnmem.memory_read(m, SparseWeights(slots, w))

    def dense(m, w):
        return twin.memory_read(m, _dense_weights(slots, w, n))

    tensors = [memory.to(dtype), weights.to(dtype)]
    got = _read_and_grads(ours, *tensors, dread)
    expect = _read_and_grads(dense, memory.double(), weights.to(dtype).double(), dread)
    assert_close_to_float64(got, expect, _read_and_grads(dense, *tensors, dread), dtype)
    assert (got[0][-1] == 0).all() and (got[2][slots < 0] == 0).all()
    untouched = torch.ones(b, n + 1, dtype=torch.bool, device=DEVICE)
    untouched.scatter_(1, torch.where(slots < 0, n, slots).flatten(1), False)
    assert (got[1][untouched[:, :n]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_deterministic_backward(backend):
    """Under torch.use_deterministic_algorithms a float32 memory's gradient is summed per
    row in a fixed order (no atomics): the same bits twice, and the atomic result's value."""
    slots, memory, weights, dread = _sparse(*SPARSE["k1"])

    def grads():
        with attnmem.use_backend(backend):
            return _read_and_grads(lambda m, w: attnmem.memory_read(m, (slots, w)), memory,
                                   weights, dread)

    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y, z in zip(first, second, grads()):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter runs the kernels on CPU tensors")
def test_sparse_opcheck():
    from attnmem.memory import _memory_read_sparse_backward_op, _memory_read_sparse_op

    slots, memory, weights, dread = _sparse(*SPARSE["odd"])
    weights = weights.nan_to_num()
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for deterministic in (False, True):
        torch.library.opcheck(_memory_read_sparse_backward_op.default,
                              (dread, memory, slots, weights, deterministic), test_utils=utils)
    torch.library.opcheck(_memory_read_sparse_op.default,
                          (memory.requires_grad_(), slots, weights.requires_grad_()),
                          test_utils=utils)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_bad_input(backend):
    memory = torch.randn(2, 10, 4, device=DEVICE)
    slots = torch.zeros(2, 3, 5, dtype=torch.int64, device=DEVICE)
    weights = torch.rand(2, 3, 5, device=DEVICE)
    for bad, error, match in (
            ((slots, weights.double()), TypeError, "weights"),
            ((slots.float(), weights), TypeError, "indices must be an integer tensor"),
            ((slots, weights[:, :2]), ValueError, r"weights must be \(B, R, K\) like its"),
            ((slots[..., 0], weights), ValueError, r"indices must be \(B, R, K\) with B=2"),
            ((slots, weights, weights), ValueError, "a sequence of 3")):
        with attnmem.use_backend(backend), pytest.raises(error, match=match):
            attnmem.memory_read(memory, bad)


def _sparse_job(kernel, dtype, width, even=True, atomic=False):
    """A sparse kernel on sm_90 at the launcher's config for this width, 32 entries a head."""
    from attnmem.kernels import memory_read as kernel_module

    elem = 4 if dtype == "float32" else 2
    t = TRITON_TYPES[dtype]
    config = kernel_module.sparse_config(width, 32, elem)
    pointers = {"mem_ptr": t, "idx_ptr": "i64", "weights_ptr": t}
    pointers.update({"out_ptr": t} if kernel == "fwd" else
                    {"dread_ptr": "fp32", "dmem_ptr": t, "dweights_ptr": t})
    constexprs = dict(EVEN_D=even, BLOCK_D=config.pop("BLOCK_D"), BLOCK_K=config.pop("BLOCK_K"))
    if kernel == "bwd":
        constexprs["ATOMIC"] = atomic
    return dict(module="attnmem.kernels.memory_read", kernel=f"_memory_read_sparse_{kernel}",
                arch=90, pointers=pointers, constexprs=constexprs, **config,
                expect={"spill_stores": 0, "spill_loads": 0, "vector_loads": even})


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_sparse_compiles_without_spills():
    """Issue 15: the sparse read's kernels at the widest chunks (16-bit 256 = two of 128,
    float32 128 = two of 64; the backward with float32 atomics) keep their tiles in
    registers on sm_90 and load rows 16 bytes at a time, as do the row sums of dMemory
    (kernels.product_key); an odd width compiles masked."""
    jobs = {"fwd-bf16-d256": _sparse_job("fwd", "bfloat16", 256),
            "fwd-fp32-d128": _sparse_job("fwd", "float32", 128),
            "bwd-fp16-d256": _sparse_job("bwd", "float16", 256),
            "bwd-fp32-d128-atomic": _sparse_job("bwd", "float32", 128, atomic=True),
            "fwd-fp16-odd-width": _sparse_job("fwd", "float16", 200, even=False)}
    from attnmem.kernels.product_key import BLOCK_E

    for dtype in ("bfloat16", "float32"):  # dMemory's row sums, as the backward launches them
        t = TRITON_TYPES[dtype]
        jobs[f"row-sums-{t}"] = dict(
            module="attnmem.kernels.product_key", kernel="_pkm_row_sums", arch=90,
            pointers={"sorted_rows_ptr": "i64", "ends_ptr": "i64", "dest_ptr": "i64",
                      "order_ptr": "i64", "weights_ptr": t, "src_ptr": "fp32", "out_ptr": t},
            constexprs=dict(EVEN_D=True, BLOCK_E=BLOCK_E, BLOCK_D=128), num_warps=4, num_stages=1,
            expect={"spill_stores": 0, "spill_loads": 0, "vector_loads": True})
    results = compiled(jobs)
    got = {k: {key: results[k][key] for key in job["expect"]} for k, job in jobs.items()}
    assert got == {k: job["expect"] for k, job in jobs.items()}
