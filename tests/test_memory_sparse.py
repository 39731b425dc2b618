"""Sparse content addressing (memory_attend / memory_address with topk) and sparse writes
against float64, both backends; the selection's streaming pass; its sm_80/sm_90 builds.

The reference is the dense op with every slot but each head's K best masked out, in
float64 on the same rounded inputs. Inputs are drawn again while some head's K-th and
(K+1)-th scores lie closer than rounding could separate, so that the selection is defined.
"""

import pytest
import torch
from test_memory_attend import _job, draw, tolerance_conditions
from torch.utils._python_dispatch import TorchDispatchMode

import attnmem
from aot import compile_all, sm90_spills
from attnmem.memory import SparseWeights
from attnmem.nn import KeyValueMemory
from attnmem.reference import memory as twin
from attnmem.reference.attention import softmax_with_lse
from backends import BACKENDS, DEVICE, DTYPE_IDS, DTYPES, INTERPRET
from tolerance import assert_close_to_float64

# name: (B, N, D, R, Dv or None, with strength, with mask, K, similarity)
CASES = {
    "odd": (3, 45, 20, 3, None, True, True, 5, "cosine"),
    "key_value": (3, 50, 24, 5, 12, True, False, 3, "dot"),
    "narrow": (3, 40, 3, 2, 5, False, True, 7, "scaled_dot"),
}


def _scores64(memory, keys, strength, kind, mask):
    scores = twin.similarity(memory.double(), keys.double(), kind)
    if strength is not None:
        scores = scores * strength.double()[..., None]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return scores


def _separated(scores, k):
    """Every head's K-th best score stands apart from the next (or has no next)."""
    top = scores.topk(min(k + 1, scores.shape[-1]), -1).values
    if top.shape[-1] <= k:
        return True
    kth, nxt = top[..., k - 1], top[..., k]
    gap = (kth - nxt).abs()
    return bool(((gap > 1e-3 * kth.abs().clamp_min(1)) | torch.isinf(nxt)).all())


def _draw(case, dtype):
    """draw's inputs, the first batch entry with fewer than K usable slots, masked slots
    holding NaN, and every head's selection well defined."""
    *sizes, k, kind = case
    while True:
        tensors, mask = draw(*sizes, dtype)
        if mask is not None:
            mask[0, :sizes[1] - k + 2] = False
        if _separated(_scores64(*tensors[:3], kind, mask), k):
            if mask is not None:  # masked slots hold anything; they count for nothing
                tensors[0] = tensors[0].masked_fill(~mask[..., None], float("nan"))
            return tensors, mask


def _dense_topk(memory, keys, strength, values, kind, mask, k):
    """(read, weights (B, R, N)): the dense op restricted to each head's k best slots,
    computed as the torch twin computes (half precision in float32)."""
    dtype = memory.dtype
    if mask is not None:
        memory = memory.masked_fill(~mask[..., None], 0)
    memory, keys, strength, values = twin._upcast(memory, keys, strength, values)
    scores = twin.similarity(memory, keys, kind)
    if strength is not None:
        scores = scores * strength[..., None]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(
        -1, scores.detach().topk(k, -1).indices, True) & torch.isfinite(scores)
    weights = softmax_with_lse(scores.masked_fill(~keep, float("-inf")))[0]
    read = torch.matmul(weights, memory if values is None else values)
    return read.to(dtype), weights.to(dtype)


def _run(fn, tensors, grads_out):
    tensors = [None if x is None else x.detach().requires_grad_() for x in tensors]
    read, weights = fn(*tensors)
    loss = (read.float() * grads_out[0]).sum() + (weights.float() * grads_out[1]).sum()
    present = [x for x in tensors if x is not None]
    return [read.detach(), weights.detach(), *torch.autograd.grad(loss, present)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_attend_matches_dense_topk_float64(name, dtype, backend):
    b, n, d, r, dv, _, _, k, kind = CASES[name]
    tensors, mask = _draw(CASES[name], dtype)
    grads_out = (torch.randn(b, r, d if dv is None else dv, device=DEVICE),
                 torch.randn(b, r, n, device=DEVICE))
    chosen = {}

    def ours(m, q, s, v):
        with attnmem.use_backend(backend):
            read, (slots, weights) = attnmem.memory_attend(
                m, q, values=v, strength=s, similarity=kind, mask=mask, topk=k,
                return_weights=True)
        chosen["slots"] = slots
        dense = weights.new_zeros(b, r, n + 1).scatter(-1, torch.where(slots < 0, n, slots),
                                                       weights)
        return read, dense[..., :n]

    def reference(m, q, s, v):
        return _dense_topk(m, q, s, v, kind, mask, k)

    got = _run(ours, tensors, grads_out)
    expect = _run(reference, [None if x is None else x.double() for x in tensors], grads_out)
    base = _run(reference, tensors, grads_out)
    scores = _scores64(*tensors[:3], kind, mask)
    best = scores.topk(k, -1)
    torch.testing.assert_close(chosen["slots"], torch.where(torch.isinf(best.values), -1,
                                                            best.indices))
    # Gradients reach the chosen slots' rows only (NaN-holding masked rows get zeros).
    untouched = torch.ones(b, n + 1, dtype=torch.bool, device=DEVICE)
    untouched.scatter_(1, torch.where(chosen["slots"] < 0, n, chosen["slots"]).flatten(1),
                       False)
    assert (got[2][untouched[:, :n]] == 0).all()
    conditions = tolerance_conditions(*tensors[:3], kind, len(got))
    assert_close_to_float64(got, expect, base, dtype, conditions)
    if mask is not None:
        assert (got[0][-1] == 0).all() and (chosen["slots"][-1] == -1).all()
        assert (chosen["slots"][0, :, k - 2:] == -1).all()  # the first: K - 2 usable slots


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_n_equals_dense(backend):
    """K = N keeps every slot: memory_address and memory_attend are the dense ops."""
    memory, keys = torch.randn(2, 30, 10, device=DEVICE), torch.randn(2, 3, 10, device=DEVICE)
    strength = torch.rand(2, 3, device=DEVICE) * 2
    with attnmem.use_backend(backend):
        slots, weights = attnmem.memory_address(memory, keys, strength=strength, topk=30)
        read = attnmem.memory_attend(memory, keys, strength=strength, topk=30)
    dense = torch.zeros(2, 3, 30, device=DEVICE).scatter(-1, slots, weights)
    with attnmem.use_backend("torch"):
        torch.testing.assert_close(dense, attnmem.memory_address(memory, keys,
                                                                 strength=strength))
        torch.testing.assert_close(read, attnmem.memory_attend(memory, keys, strength=strength))
    assert (slots.sort(-1).values == torch.arange(30, device=DEVICE)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_slot(backend):
    memory = torch.randn(1, 40, 8, device=DEVICE)
    memory[0, [30, 7, 19]] = memory[0, 2].clone()  # four equal best slots for a key along slot 2
    keys = memory[:, 2:3] * 3
    with attnmem.use_backend(backend):
        slots, weights = attnmem.memory_address(memory, keys, topk=3)
    assert slots.tolist() == [[[2, 7, 19]]]
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 3))


def _dense_write_weights(slots, weights, n):
    """Sparse write weights scattered (summed) into (B, W, N)."""
    b, w, _ = slots.shape
    return weights.new_zeros(b, w, n + 1).scatter_add(
        -1, torch.where(slots < 0, n, slots), weights)[..., :n]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_write_matches_dense_float64(dtype, backend):
    """Heads sharing slots, a slot twice in one head, -1 entries and a full erase."""
    b, n, d, w, k = 3, 45, 20, 3, 4
    slots = _sparse_entries(b, w, k)
    memory, weights = torch.randn(b, n, d, device=DEVICE), torch.rand(b, w, k, device=DEVICE)
    erase, add = torch.rand(b, w, d, device=DEVICE), torch.randn(b, w, d, device=DEVICE)
    weights[0, 0, 0], erase[0, 0] = 1.0, 1.0
    tensors = [x.to(dtype) for x in (memory, weights, erase, add)]
    dout = torch.randn(b, n, d, device=DEVICE)

    def run(fn, xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = fn(*xs)
        return [out.detach(), *torch.autograd.grad((out.float() * dout).sum(), xs)]

    def ours(m, wt, e, a):
        with attnmem.use_backend(backend):
            return attnmem.memory_write(m, SparseWeights(slots, wt), e, a)

    def reference(m, wt, e, a):
        return twin.memory_write(m, _dense_write_weights(slots, wt, n), e, a)

    got = run(ours, tensors)
    assert_close_to_float64(got, run(reference, [x.double() for x in tensors]),
                            run(reference, tensors), dtype)
    assert torch.equal(got[0][2], tensors[0][2])  # untouched rows are memory's own
    with torch.no_grad(), attnmem.use_backend(backend):
        inplace = tensors[0].clone()
        out = attnmem.memory_write(inplace, (slots, tensors[1]), *tensors[2:], inplace=True)
    assert out.data_ptr() == inplace.data_ptr()
    torch.testing.assert_close(inplace, got[0], atol=0, rtol=0)


def _sparse_entries(b, w, k):
    """Slots (B, W, K) with repeats across heads and within one, -1 entries, and a last
    batch entry that names no slot."""
    slots = torch.randint(0, 12, (b, w, k), device=DEVICE)  # few slots: many repeats
    slots[0, 1, 1] = slots[0, 1, 0]
    slots[1, :, -1] = -1
    slots[-1] = -1
    return slots


@pytest.mark.parametrize("backend", BACKENDS)
def test_address_then_write_is_deterministic(backend):
    """A sparse-access step (address the top K, write there, read there and by content)
    repeats bit for bit under torch's deterministic mode, gradients included."""
    def step():
        torch.manual_seed(0)
        memory = torch.randn(2, 40, 16, device=DEVICE, requires_grad=True)
        keys = torch.randn(2, 2, 16, device=DEVICE, requires_grad=True)
        erase, add = torch.rand(2, 2, 16, device=DEVICE), torch.randn(2, 2, 16, device=DEVICE)
        with attnmem.use_backend(backend):
            where = attnmem.memory_address(memory, keys, topk=3)
            written = attnmem.memory_write(memory, where, erase, add)
            read = attnmem.memory_attend(written, keys, topk=3) + attnmem.memory_read(written,
                                                                                       where)
        return [read, *torch.autograd.grad(read.square().sum(), (memory, keys))]

    torch.use_deterministic_algorithms(True)
    try:
        first, second = step(), step()
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def _storages(tensors):
    return {x.untyped_storage().data_ptr() for x in tensors
            if isinstance(x, torch.Tensor) and x.layout == torch.strided}


class _LargestOutput(TorchDispatchMode):
    """Records the most bytes any torch op allocates for an output, inside attnmem's custom
    ops too (views of its inputs, such as an expand, allocate nothing)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "attnmem":  # run its implementation under this mode
            key = torch._C.DispatchKey.CUDA if DEVICE == "cuda" else torch._C.DispatchKey.CPU
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(key), *args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        given = _storages(torch.utils._pytree.tree_leaves((args, kwargs)))
        for x in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(x, torch.Tensor) and x.layout == torch.strided and \
                    x.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, x.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_streams_memory(backend):
    """No (B, R, N) scores: no op outputs more bytes than memory holds (R > D here), on a
    memory of 100k slots (3k through the interpreter, whose sorting networks are slow)."""
    n = 600 if backend == "triton" and INTERPRET else 100_000
    memory, keys = torch.randn(1, n, 2, device=DEVICE), torch.randn(1, 3, 2, device=DEVICE)
    mask = torch.rand(1, n, device=DEVICE) > 0.1
    with _LargestOutput() as record, attnmem.use_backend(backend):
        slots, _ = attnmem.memory_address(memory, keys, similarity="dot", mask=mask, topk=3)
    assert 0 < record.largest <= memory.numel() * 4 < keys.shape[1] * n * 4, record.largest
    expect = _scores64(memory, keys, None, "dot", mask).topk(3, -1).indices
    assert torch.equal(slots, expect)


def test_validation():
    memory, keys = torch.randn(2, 10, 4), torch.randn(2, 3, 4)
    for topk, error, match in ((0, ValueError, r"topk must be an int in \[1, N\] = \[1, 10\]"),
                               (11, ValueError, "topk must be an int in"),
                               (2.0, TypeError, "topk must be an int, got float"),
                               (True, TypeError, "topk must be an int, got bool")):
        with pytest.raises(error, match=match):
            attnmem.memory_attend(memory, keys, topk=topk)
        with pytest.raises(error, match=match):
            attnmem.memory_address(memory, keys, topk=topk)
    erase, add = torch.rand(2, 3, 4), torch.randn(2, 3, 4)
    slots, weights = torch.zeros(2, 3, 5, dtype=torch.int64), torch.rand(2, 3, 5)
    for bad, error, match in (
            ((slots + 10, weights), ValueError, r"slots in \[-1, N\) = \[-1, 10\), got values "
                                                r"in \[10, 10\]"),
            ((slots - 2, weights), ValueError, "slots in"),
            ((slots.float(), weights), TypeError, "indices must be an integer tensor"),
            ((slots, weights[..., :4]), ValueError, "weights must be \\(B, W, K\\) like its"),
            ((slots[:1], weights), ValueError, "indices must be \\(B, W, K\\) with B=2"),
            ((slots,), ValueError, "a sequence of 1")):
        with pytest.raises(error, match=match):
            attnmem.memory_write(memory, bad, erase, add)
        with pytest.raises(error, match=match.replace("W", "R")):
            attnmem.memory_read(memory, bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_on_a_memory_without_slots(backend):
    """N = 0 leaves only -1 indices: the read is zeros, the write memory's own."""
    memory = torch.randn(2, 0, 4, device=DEVICE, requires_grad=True)
    where = SparseWeights(torch.full((2, 3, 2), -1, device=DEVICE),
                          torch.rand(2, 3, 2, device=DEVICE, requires_grad=True))
    erase, add = torch.rand(2, 3, 4, device=DEVICE), torch.randn(2, 3, 4, device=DEVICE)
    with attnmem.use_backend(backend):
        read = attnmem.memory_read(memory, where)
        written = attnmem.memory_write(memory, where, erase, add)
    assert read.shape == (2, 3, 4) and (read == 0).all() and written.shape == (2, 0, 4)
    assert (torch.autograd.grad(read.sum(), where.weights)[0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,k", [(0, 2), (3, 0), (0, 0)])
def test_sparse_write_without_entries_keeps_memory(heads, k, backend):
    """No write heads (W = 0) or no entries per head (K = 0) write nothing, as the dense
    write with W = 0 does: memory's own values, in place too, and its gradient."""
    memory = torch.randn(2, 5, 4, device=DEVICE, requires_grad=True)
    where = SparseWeights(torch.zeros((2, heads, k), dtype=torch.int64, device=DEVICE),
                          torch.rand(2, heads, k, device=DEVICE))
    erase, add = torch.rand(2, heads, 4, device=DEVICE), torch.randn(2, heads, 4, device=DEVICE)
    with attnmem.use_backend(backend):
        written = attnmem.memory_write(memory, where, erase, add)
        inplace = memory.detach().clone()
        with torch.no_grad():
            attnmem.memory_write(inplace, where, erase, add, inplace=True)
    assert torch.equal(written, memory) and torch.equal(inplace, memory)
    (grad,) = torch.autograd.grad(written.sum(), memory)
    assert (grad == 1).all()


def test_sparse_write_and_read_trace_whole():
    """A sparse write and read trace into one graph under torch.compile(fullgraph=True):
    no host sync. Unchecked there, as on CUDA, an index outside [-1, N) reads and writes
    nothing, as -1 does."""
    torch._dynamo.reset()
    memory = torch.randn(2, 30, 8, device=DEVICE)
    erase, add = torch.rand(2, 2, 8, device=DEVICE), torch.randn(2, 2, 8, device=DEVICE)
    slots, weights = _sparse_entries(2, 2, 3), torch.rand(2, 2, 3, device=DEVICE)
    wild = slots.clone()
    wild[0, 0, 0], wild[0, 1, 2] = 30, -7

    def step(s):
        written = attnmem.memory_write(memory, SparseWeights(s, weights), erase, add)
        return written, attnmem.memory_read(written, SparseWeights(s, weights))

    with attnmem.use_backend("torch"):
        got = torch.compile(step, fullgraph=True, backend="eager")(wild)
        expect = step(torch.where((wild >= 0) & (wild < 30), wild, -1))
    for x, y in zip(got, expect):
        assert torch.equal(x, y)


@pytest.mark.skipif(not INTERPRET, reason="the triton limit is what the interpreter checks")
def test_topk_past_the_kernel_limit_says_why():
    from attnmem.memory import MAX_TRITON_TOPK

    memory, keys = torch.randn(1, 50, 4), torch.randn(1, 2, 4)
    too_many = MAX_TRITON_TOPK + 1
    with attnmem.use_backend("triton"), pytest.raises(Exception, match=f"topk {too_many} > "):
        attnmem.memory_address(memory, keys, topk=too_many)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_value_memory_topk(backend):
    torch.manual_seed(1)
    kv = KeyValueMemory(state_dim=8, num_slots=40, key_dim=16, value_dim=12, topk=3).to(DEVICE)
    dense = KeyValueMemory(state_dim=8, num_slots=40, key_dim=16, value_dim=12).to(DEVICE)
    dense.load_state_dict(kv.state_dict())
    h = torch.randn(2, 8, device=DEVICE)
    with attnmem.use_backend(backend):
        out, (slots, weights) = kv(h, return_weights=True)
    assert slots.shape == weights.shape == (2, 3)
    out.square().sum().backward()
    touched = (kv.values.grad != 0).any(-1)
    assert touched.sum() <= 6 and touched[slots.flatten()].all()
    # The dense module restricted to those slots reads the same.
    mask = torch.zeros(2, 40, dtype=torch.bool, device=DEVICE).scatter_(1, slots, True)
    torch.testing.assert_close(out, dense(h, mask=mask))
    with pytest.raises(ValueError, match="topk=5 is more than the memory's 4 slots"):
        KeyValueMemory(8, num_slots=4, topk=5)
    with pytest.raises(TypeError, match="topk must be an int"):
        KeyValueMemory(8, num_slots=4, topk=2.0)


def _topk_jobs():
    """The selection's config on sm_90 at the widest width with 32 candidates per head
    (16-bit and float32), with 2 at a narrower width; an odd width; sm_80."""
    from attnmem.kernels import memory_attend as kernel

    def job(arch, dtype, width, topk, even=True):
        elem = 4 if dtype == "fp32" else 2
        return _job("_memory_attend_fwd", arch, dtype, width, kernel.FWD_BLOCK_R, read=False,
                    even=even, config=kernel.TOPK_CONFIGS[(elem, width)][0], topk=topk)

    most = kernel.topk_block(attnmem.memory.MAX_TRITON_TOPK)
    jobs = {"sm90-fp16-d256": job(90, "fp16", 256, most),
            "sm90-fp32-d256": job(90, "fp32", 256, most),
            "sm90-bf16-d64-k2": job(90, "bf16", 64, 2),
            "sm90-fp16-odd-width": job(90, "fp16", 256, most, even=False)}
    for name in jobs:  # also checked on the GPU machines' triton (test_triton_versions)
        jobs[name]["expect"] = {"spill_stores": 0, "spill_loads": 0}
    jobs["sm80-fp16-d256"] = job(80, "fp16", 256, most)
    return jobs


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_selection_compiles_without_spills():
    """The top-k selection (TOPK > 0) keeps its candidates in registers: no sm_90 spill at
    any width, 16-byte loads of whole-width tiles, shared memory within sm_80/sm_90's."""
    jobs = _topk_jobs()
    results = dict(zip(jobs, compile_all(list(jobs.values()))))
    limits = {80: 166912, 90: 232448}
    failures = {k: r["error"] or f"shared {r['shared']}" for k, r in results.items()
                if r["error"] or r["shared"] > limits[jobs[k]["arch"]]}
    assert not failures, failures
    spills = sm90_spills(results)
    assert not spills, spills
    scalar = [k for k, r in results.items() if "odd" not in k and not r["vector_loads"]]
    assert not scalar, scalar
    assert all(r["mma_sync"] for k, r in results.items() if "fp32" not in k)


# Shared memories: (B, N, D, R, Dv or None, with strength, with mask, K, similarity).
SHARED = {
    "odd_masked": (3, 45, 19, 3, None, True, True, 5, "cosine"),
    "key_value": (2, 50, 24, 2, 13, False, False, 3, "dot"),
}


def _draw_shared(case, dtype):
    """Inputs with memory (N, D) and values (N, Dv) shared by the batch, batch entry 1's
    first head a copy of entry 0's (the same slots, from two entries), every head's
    selection well defined; masked: entries 0 and 1 have K - 2 usable slots, the last none."""
    b, n, d, r, dv, with_strength, with_mask, k, kind = case
    while True:
        memory, keys = torch.randn(n, d, device=DEVICE), torch.randn(b, r, d, device=DEVICE)
        keys[1, 0] = keys[0, 0]
        values = None if dv is None else torch.randn(n, dv, device=DEVICE)
        strength = torch.rand(b, r, device=DEVICE) * 3 if with_strength else None
        if strength is not None:
            strength[1, 0] = strength[0, 0]
        mask = None
        if with_mask:
            mask = torch.rand(b, n, device=DEVICE) > 0.3
            mask[0, :n - k + 2], mask[0, n - k + 2:], mask[-1] = False, True, False
            mask[1] = mask[0]
        tensors = [None if x is None else x.to(dtype) for x in (memory, keys, strength, values)]
        expanded = tensors[0].expand(b, -1, -1)
        if _separated(_scores64(expanded, tensors[1], tensors[2], kind, mask), k):
            return tensors, mask


def _attend_and_grads(backend, tensors, mask, case, grads_out, expand, **options):
    """memory_attend(topk) -> [read, weights, slots, gradients of memory, keys, strength,
    values (those given)], the memory and values shared or (expand) expanded to (B, N, D)."""
    b, *_, k, kind = case
    leaves = [None if x is None else x.detach().requires_grad_() for x in tensors]
    memory, keys, strength, values = leaves
    if expand:
        memory = memory.expand(b, -1, -1)
        values = None if values is None else values.expand(b, -1, -1)
    with attnmem.use_backend(backend):
        read, (slots, weights) = attnmem.memory_attend(
            memory, keys, values=values, strength=strength, similarity=kind, mask=mask,
            topk=k, return_weights=True, **options)
    loss = (read.double() * grads_out[0]).sum() + (weights.double() * grads_out[1]).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return [read.detach(), weights.detach(), slots, *grads]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SHARED))
def test_shared_memory_matches_expanded_float64(name, backend):
    """A memory (N, D) shared by the batch reads as its expansion to (B, N, D) does, with
    the expansion's summed gradient: float64 on the torch backend, float32 on triton against
    the float64 expansion; slots repeat across batch entries, -1 slots included. Its
    sparse gradients (sparse_grad=True) densify to the dense ones: bit for bit on the CPU,
    within the dense ones' tolerance of float64 on CUDA. Either way the rows' gradients are
    torch's (F.embedding's backward, dense or sparse; the kernel only picks the slots), and a
    slot that three or more rows name sums their gradients in an order that CUDA's dense
    embedding backward and its sparse tensors' coalescing (to_dense) do not share."""
    case = SHARED[name]
    b, n, d, r, dv, *_, k, _ = case
    dtype = torch.float64 if backend == "torch" else torch.float32
    tensors, mask = _draw_shared(case, dtype)
    grads_out = (torch.randn(b, r, d if dv is None else dv, device=DEVICE, dtype=torch.float64),
                 torch.randn(b, r, k, device=DEVICE, dtype=torch.float64))
    got = _attend_and_grads(backend, tensors, mask, case, grads_out, expand=False)
    expect = _attend_and_grads("torch", [None if x is None else x.double() for x in tensors],
                               mask, case, grads_out, expand=True)
    assert torch.equal(got[2], expect[2])
    repeated = got[2][0, 0]
    assert torch.equal(got[2][1, 0], repeated) and (repeated >= 0).any()
    tol = {} if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for x, y in zip(got[:2] + got[3:], expect[:2] + expect[3:]):
        torch.testing.assert_close(x.double(), y, **tol)
    if mask is not None:
        assert (got[2][0, :, k - 2:] == -1).all() and (got[2][-1] == -1).all()
    sparse = _attend_and_grads(backend, tensors, mask, case, grads_out, expand=False,
                               sparse_grad=True)
    shared = [3, -1] if dv is not None else [3]  # the gradients of memory and values
    for i in shared:
        assert sparse[i].layout == torch.sparse_coo
        if DEVICE == "cpu":
            torch.testing.assert_close(sparse[i].to_dense(), got[i], rtol=0, atol=0)
        else:
            torch.testing.assert_close(sparse[i].to_dense().double(), expect[i], **tol)
    # memory_address takes a shared memory alike.
    with attnmem.use_backend(backend):
        slots, weights = attnmem.memory_address(tensors[0], tensors[1], strength=tensors[2],
                                                similarity=case[-1], mask=mask, topk=k)
    assert torch.equal(slots, got[2])
    torch.testing.assert_close(weights, got[1].to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_sparse_read(backend):
    """memory_read(memory (N, D), SparseWeights) against the expanded memory in float64:
    -1 entries, slots repeated within a head and across entries; its gradient (N, D) by
    atomics, under torch.use_deterministic_algorithms by row sums (the same bits twice; the
    path 16-bit memories take), and sparse_grad's coalesced (triton) or uncoalesced (torch)
    COO gradient."""
    b, n, d, r, k, dtype = 3, 40, 21, 2, 6, torch.float32
    memory = torch.randn(n, d, device=DEVICE).to(dtype)
    slots = torch.randint(-1, n, (b, r, k), device=DEVICE)
    slots[1, 1, :3] = slots[0, 0, 0].clamp_min(1)
    slots[slots == 0] = 1
    slots[2, 1, -1] = -1  # row 0 untouched: a -1 entry must not enter the sparse gradient
    weights = torch.randn(b, r, k, device=DEVICE).to(dtype)
    dread = torch.randn(b, r, d, device=DEVICE, dtype=torch.float64)

    def read(m, w, expand=False, backend=backend, **options):
        m, w = m.detach().requires_grad_(), w.detach().requires_grad_()
        with attnmem.use_backend(backend):
            out = attnmem.memory_read(m.expand(b, -1, -1) if expand else m,
                                      SparseWeights(slots, w), **options)
        return [out, *torch.autograd.grad((out.double() * dread).sum(), (m, w))]

    got = read(memory, weights)
    expect = read(memory.double(), weights.double(), expand=True, backend="torch")
    base = read(memory, weights, expand=True, backend="torch")
    assert_close_to_float64(got, expect, base, dtype)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = read(memory, weights), read(memory, weights)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    torch.testing.assert_close(first[1], got[1])
    sparse = read(memory, weights, sparse_grad=True)[1]
    assert sparse.layout == torch.sparse_coo and sparse.shape == (n, d)
    assert sparse.is_coalesced() == (backend == "triton")
    touched = slots[slots >= 0].unique()
    assert torch.equal(sparse.coalesce().indices()[0], touched)
    torch.testing.assert_close(sparse.to_dense(), got[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_backward_builds_no_batch_sized_gradient(backend):
    """The shared memory's backward makes no tensor of B * N * D elements (its gradients
    are (N, D)), nor does its forward; the expanded memory's backward does, so the check
    can see one. memory_attend's backward is torch's on both backends (the selection is
    not differentiated): it runs on torch, memory_read on the backend, and the selection
    on the backend for 2 batch entries (the interpreter is slow)."""
    b, n, d, r, k = 8, 300, 8, 2, 3
    memory, values = torch.randn(n, d, device=DEVICE), torch.randn(n, d, device=DEVICE)
    keys = torch.randn(b, r, d, device=DEVICE)

    def largest(expand):
        """The most bytes an op outputs, forward and backward."""
        m, v = memory.clone().requires_grad_(), values.clone().requires_grad_()
        with _LargestOutput() as forward:
            with attnmem.use_backend("torch"):
                read, (slots, weights) = attnmem.memory_attend(
                    m.expand(b, -1, -1) if expand else m, keys,
                    values=v.expand(b, -1, -1) if expand else v, topk=k, return_weights=True)
            with attnmem.use_backend(backend):
                again = attnmem.memory_read(m.expand(b, -1, -1) if expand else m,
                                            SparseWeights(slots, weights))
        with _LargestOutput() as backward:
            (read.square().sum() + again.square().sum()).backward()
        return forward.largest, backward.largest

    forward, backward = largest(False)
    assert forward < b * n * d * 4, forward
    assert backward <= n * d * 4 < b * n * d * 4 <= largest(True)[1]
    with _LargestOutput() as selection, attnmem.use_backend(backend):  # a stride-0 view
        attnmem.memory_address(memory, keys[:2], topk=k)
    assert selection.largest < 2 * n * d * 4, selection.largest


def test_shared_memory_bad_inputs():
    memory, keys, values = torch.randn(10, 4), torch.randn(2, 3, 4), torch.randn(10, 6)
    where = SparseWeights(torch.zeros(2, 3, 5, dtype=torch.int64), torch.rand(2, 3, 5))
    for call, error, match in (
            (lambda: attnmem.memory_attend(memory, keys[..., :3], topk=2), ValueError,
             r"keys must be \(B, R, D\) with D=4, got \(2, 3, 3\)"),
            (lambda: attnmem.memory_attend(memory, keys, values=values[:9], topk=2), ValueError,
             r"values must be \(N, Dv\) with N = \(10,\), got \(9, 6\)"),
            (lambda: attnmem.memory_attend(memory, keys, values=values.expand(2, -1, -1),
                                           topk=2), ValueError, r"values must be \(N, Dv\)"),
            (lambda: attnmem.memory_address(memory, keys, mask=torch.ones(1, 10, dtype=bool),
                                            topk=2), ValueError, r"mask must be \(B, N\) = "
                                                                 r"\(2, 10\)"),
            (lambda: attnmem.memory_attend(memory, keys), ValueError,
             r"memory must be \(B, N, D\) here: a memory \(N, D\) shared by the batch is read "
             r"with topk=K"),
            (lambda: attnmem.memory_read(memory, torch.rand(2, 3, 10)), ValueError,
             r"shared by the batch is read with sparse weights"),
            (lambda: attnmem.memory_read(memory, (where[0][..., :4], where[1])), ValueError,
             r"weights must be \(B, R, K\) like its indices"),
            (lambda: attnmem.memory_read(memory, (where[0] + 10, where[1])), ValueError,
             r"slots in \[-1, N\) = \[-1, 10\)"),
            (lambda: attnmem.memory_attend(memory.expand(2, -1, -1), keys, topk=2,
                                           sparse_grad=True), ValueError,
             r"sparse_grad=True needs a memory \(N, D\) shared by the batch and topk=K, got "
             r"memory \(2, 10, 4\)$"),
            (lambda: attnmem.memory_address(memory.expand(2, -1, -1), keys, sparse_grad=True),
             ValueError, "sparse_grad=True needs .* without topk=K"),
            (lambda: attnmem.memory_read(memory.expand(2, -1, -1), torch.rand(2, 3, 10),
                                         sparse_grad=True), ValueError,
             "without sparse weights"),
            (lambda: attnmem.memory_read(memory, where, sparse_grad=1), TypeError,
             "sparse_grad must be a bool, got int"),
            (lambda: attnmem.memory_write(memory, where, torch.rand(2, 3, 4),
                                          torch.rand(2, 3, 4)), ValueError,
             r"memory must be \(B, N, D\), got shape \(10, 4\)"),
            (lambda: KeyValueMemory(8, num_slots=10, sparse=True), ValueError,
             "sparse=True needs topk")):
        with pytest.raises(error, match=match):
            call()


@pytest.mark.skipif(not INTERPRET, reason="the interpreter runs the kernels on CPU tensors")
def test_shared_sparse_opcheck():
    from attnmem.memory import _memory_read_sparse_backward_op, _memory_read_sparse_op

    memory = torch.randn(30, 7)
    slots, weights = torch.randint(-1, 30, (2, 3, 4)), torch.rand(2, 3, 4)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for sparse_grad in (False, True):
        torch.library.opcheck(_memory_read_sparse_backward_op.default,
                              (torch.randn(2, 3, 7), memory, slots, weights, False,
                               sparse_grad), test_utils=utils)
        torch.library.opcheck(_memory_read_sparse_op.default,
                              (memory.requires_grad_(), slots, weights.requires_grad_(),
                               sparse_grad), test_utils=utils)
