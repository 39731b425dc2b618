"""External-memory ops against element-wise float64 formulas, gradcheck, and their contract."""

import math
import os

import pytest
import torch

import attnmem
from backends import BACKENDS, DEVICE

f64 = dict(dtype=torch.float64)


def cos(u, v):
    return float(u @ v) / max(float(u.norm() * v.norm()), 1e-8)


def address_by_loops(memory, keys, strength, kind, mask):
    b_, r_, n_ = keys.shape[0], keys.shape[1], memory.shape[1]
    w = torch.zeros(b_, r_, n_, **f64)
    for b in range(b_):
        for r in range(r_):
            scores = []
            for n in range(n_):
                u, v = keys[b, r], memory[b, n]
                sim = {"cosine": cos(u, v), "dot": float(u @ v),
                       "scaled_dot": float(u @ v) / math.sqrt(len(u))}[kind]
                usable = mask is None or bool(mask[b, n])
                scores.append(sim * float(strength[b, r]) if usable else -math.inf)
            top = max(scores)
            if top == -math.inf:
                continue
            e = [math.exp(s - top) for s in scores]
            for n in range(n_):
                w[b, r, n] = e[n] / sum(e)
    return w


def inputs(b=2, r=3, n=11, d=5, zero_slot=True):
    memory = torch.randn(b, n, d, **f64)
    if zero_slot:
        memory[:, 4] = 0  # a zero slot: cosine similarity's 1e-8 floor
    return memory, torch.randn(b, r, d, **f64), torch.rand(b, r, **f64) * 3


@pytest.mark.parametrize("kind", ["cosine", "dot", "scaled_dot"])
@pytest.mark.parametrize("masked", [False, True])
def test_address_and_attend_match_the_formulas(kind, masked):
    memory, keys, strength = inputs()
    mask = None
    if masked:
        mask = torch.rand(memory.shape[:2]) > 0.4
        mask[1] = False  # batch 1 has no usable slot: zero weights, zero read
    expect = address_by_loops(memory, keys, strength, kind, mask)
    weights = attnmem.memory_address(memory, keys, strength=strength, similarity=kind, mask=mask)
    torch.testing.assert_close(weights, expect)
    values = torch.randn(2, 11, 7, **f64)
    read, w = attnmem.memory_attend(memory, keys, values=values, strength=strength,
                                    similarity=kind, mask=mask, return_weights=True)
    torch.testing.assert_close(w, expect)
    torch.testing.assert_close(read, expect @ values)
    torch.testing.assert_close(attnmem.memory_attend(memory, keys, strength=strength,
                                                     similarity=kind, mask=mask),
                               attnmem.memory_read(memory, expect))


def test_default_strength_is_one():
    memory, keys, _ = inputs()
    torch.testing.assert_close(attnmem.memory_address(memory, keys),
                               address_by_loops(memory, keys, torch.ones(2, 3, **f64), "cosine",
                                                None))


def test_write_matches_the_formula():
    memory = torch.randn(2, 9, 4, **f64)
    weights, erase, add = (torch.rand(2, 3, 9, **f64), torch.rand(2, 3, 4, **f64),
                           torch.randn(2, 3, 4, **f64))
    expect = memory.clone()
    for b in range(2):
        for n in range(9):
            for d in range(4):
                keep = math.prod(1 - float(weights[b, w, n] * erase[b, w, d]) for w in range(3))
                expect[b, n, d] = memory[b, n, d] * keep + sum(
                    float(weights[b, w, n] * add[b, w, d]) for w in range(3))
    torch.testing.assert_close(attnmem.memory_write(memory, weights, erase, add), expect)


def test_inplace_write():
    memory = torch.randn(2, 9, 4)
    weights, erase, add = torch.rand(2, 2, 9), torch.rand(2, 2, 4), torch.randn(2, 2, 4)
    expect = attnmem.memory_write(memory, weights, erase, add)
    out = attnmem.memory_write(memory, weights, erase, add, inplace=True)
    assert out.data_ptr() == memory.data_ptr()
    torch.testing.assert_close(memory, expect)
    with pytest.raises(RuntimeError, match="inplace=True\\) overwrites memory"):
        attnmem.memory_write(memory, weights.requires_grad_(), erase, add, inplace=True)
    with torch.no_grad():
        attnmem.memory_write(memory, weights, erase, add, inplace=True)


def test_location_address_shift_and_sharpen():
    n = 7
    content = torch.softmax(torch.randn(1, 1, n, **f64), -1)
    prev = torch.softmax(torch.randn(1, 1, n, **f64), -1)
    gate = torch.tensor([[0.3]], **f64)
    gated = 0.3 * content + 0.7 * prev
    one = torch.ones(1, 1, **f64)
    # shift[..., j] moves the focus by j - S//2: with S = 3, index 2 moves it forward by one.
    forward = torch.tensor([[[0.0, 0.0, 1.0]]], **f64)
    w = attnmem.location_address(content, prev, gate, forward, one)
    torch.testing.assert_close(w[..., 1:], gated[..., :-1])
    torch.testing.assert_close(w[..., 0], gated[..., -1])
    # Sharpening with gamma = 2 squares and renormalises.
    w = attnmem.location_address(content, prev, gate, torch.tensor([[[0.0, 1.0, 0.0]]], **f64),
                                 2 * one)
    torch.testing.assert_close(w, gated**2 / (gated**2).sum(-1, keepdim=True))


@pytest.mark.parametrize("kind", ["cosine", "dot", "scaled_dot"])
def test_gradcheck_address_attend_read(kind):
    # Cosine similarity jumps at a zero vector, where finite differences cannot agree.
    memory, keys, strength = (x.requires_grad_() for x in inputs(b=2, r=2, n=6, d=3,
                                                                 zero_slot=False))
    values = torch.randn(2, 6, 4, **f64, requires_grad=True)
    mask = torch.tensor([[True] * 6, [True, False, True, True, False, False]])
    assert torch.autograd.gradcheck(
        lambda m, k, s, v: attnmem.memory_attend(m, k, values=v, strength=s, similarity=kind,
                                                 mask=mask, return_weights=True),
        (memory, keys, strength, values))
    weights = torch.rand(2, 3, 6, **f64, requires_grad=True)
    assert torch.autograd.gradcheck(attnmem.memory_read, (memory, weights))


def test_gradcheck_write_and_location():
    memory = torch.randn(2, 6, 3, **f64, requires_grad=True)
    weights, erase, add = (torch.rand(2, 2, 6, **f64).requires_grad_(),
                           torch.rand(2, 2, 3, **f64).requires_grad_(),
                           torch.randn(2, 2, 3, **f64).requires_grad_())
    assert torch.autograd.gradcheck(attnmem.memory_write, (memory, weights, erase, add))
    content = torch.softmax(torch.randn(2, 2, 6, **f64), -1).requires_grad_()
    prev = torch.softmax(torch.randn(2, 2, 6, **f64), -1).requires_grad_()
    gate = torch.rand(2, 2, **f64).requires_grad_()
    shift = torch.softmax(torch.randn(2, 2, 3, **f64), -1).requires_grad_()
    gamma = (1 + torch.rand(2, 2, **f64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(attnmem.location_address, (content, prev, gate, shift, gamma))


def test_gradients_stay_finite_at_zeros():
    """Zero memory (DNC's initial state), zero keys, unusable slots, all-zero weights."""
    memory = torch.zeros(1, 5, 4, requires_grad=True)
    keys = torch.zeros(1, 2, 4, requires_grad=True)
    mask = torch.tensor([[False] * 5])
    read = attnmem.memory_attend(memory, keys) + attnmem.memory_attend(memory, keys, mask=mask)
    read.sum().backward()
    assert torch.isfinite(memory.grad).all() and torch.isfinite(keys.grad).all()
    content = torch.zeros(1, 1, 5, requires_grad=True)
    gamma = torch.full((1, 1), 2.0, requires_grad=True)
    w = attnmem.location_address(content, torch.zeros(1, 1, 5), torch.ones(1, 1),
                                 torch.tensor([[[0.2, 0.6, 0.2]]]), gamma)
    w.sum().backward()
    assert (w == 0).all()
    assert torch.isfinite(content.grad).all() and torch.isfinite(gamma.grad).all()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                    reason="needs the interpreter for CPU tensors")
def test_triton_backend_says_what_it_lacks():
    memory, keys, _ = inputs()  # float64
    calls = [lambda: attnmem.memory_address(memory, keys),
             lambda: attnmem.memory_attend(memory, keys),
             lambda: attnmem.memory_read(memory, torch.rand(2, 3, 11, **f64)),
             lambda: attnmem.memory_write(memory, torch.rand(2, 1, 11, **f64),
                                          torch.rand(2, 1, 5, **f64), torch.rand(2, 1, 5, **f64)),
             lambda: attnmem.location_address(torch.rand(1, 1, 5, **f64),
                                              torch.rand(1, 1, 5, **f64), torch.rand(1, 1, **f64),
                                              torch.rand(1, 1, 3, **f64), torch.ones(1, 1, **f64))]
    for call in calls:
        with attnmem.use_backend("triton"), pytest.raises(RuntimeError,
                                                          match="dtype torch.float64"):
            call()
        with attnmem.use_backend("auto"):
            call()
    memory = torch.randn(1, 6, 300)
    for message, call in (
            ("129 heads > 128", lambda: attnmem.memory_read(memory, torch.rand(1, 129, 6))),
            ("slot width 300 > 256", lambda: attnmem.memory_attend(memory,
                                                                   torch.randn(1, 2, 300))),
            ("65536 batch entries > 65535", lambda: attnmem.memory_read(torch.randn(65536, 2, 4),
                                                                torch.rand(65536, 1, 2)))):
        with attnmem.use_backend("triton"), pytest.raises(RuntimeError, match=message):
            call()
        with attnmem.use_backend("auto"):
            call()


M, K = torch.randn(2, 8, 4), torch.randn(2, 3, 4)
BAD = [
    ("memory must be \\(B, N, D\\)", lambda: attnmem.memory_read(M[0], torch.rand(2, 3, 8))),
    ("memory must be a floating-point", lambda: attnmem.memory_read(M.int(), torch.rand(2, 3, 8))),
    ("weights must be \\(B, R, N\\) with B=2, N=8", lambda: attnmem.memory_read(
        M, torch.rand(2, 3, 7))),
    ("keys must be \\(B, R, D\\) with B=2, D=4", lambda: attnmem.memory_address(
        M, torch.randn(2, 3, 5))),
    ("keys must have memory's dtype", lambda: attnmem.memory_address(M, K.double())),
    ("strength must be \\(B, R\\)", lambda: attnmem.memory_address(M, K,
                                                                    strength=torch.rand(2, 4))),
    ("similarity must be one of", lambda: attnmem.memory_address(M, K, similarity="l2")),
    ("mask must be a bool tensor", lambda: attnmem.memory_address(M, K, mask=torch.ones(2, 8))),
    ("mask must be \\(B, N\\)", lambda: attnmem.memory_address(
        M, K, mask=torch.ones(2, 7, dtype=torch.bool))),
    ("values must be \\(B, N, Dv\\)", lambda: attnmem.memory_attend(
        M, K, values=torch.randn(2, 9, 3))),
    ("erase must be \\(B, W, D\\)", lambda: attnmem.memory_write(
        M, torch.rand(2, 2, 8), torch.rand(2, 3, 4), torch.rand(2, 2, 4))),
    ("add must have memory's dtype", lambda: attnmem.memory_write(
        M, torch.rand(2, 2, 8), torch.rand(2, 2, 4), torch.rand(2, 2, 4).double())),
    ("inplace must be a bool, got str", lambda: attnmem.memory_write(
        M.clone(), torch.rand(2, 2, 8), torch.rand(2, 2, 4), torch.rand(2, 2, 4),
        inplace="False")),
    ("return_weights must be a bool, got int", lambda: attnmem.memory_attend(
        M, K, return_weights=1)),
    ("shift must be \\(B, R, S\\) with \\(B, R\\) = \\(2, 3\\) and S odd",
     lambda: attnmem.location_address(torch.rand(2, 3, 8), torch.rand(2, 3, 8), torch.rand(2, 3),
                                      torch.rand(2, 3, 4), torch.ones(2, 3))),
    ("gamma must be \\(B, R\\)", lambda: attnmem.location_address(
        torch.rand(2, 3, 8), torch.rand(2, 3, 8), torch.rand(2, 3), torch.rand(2, 3, 3),
        torch.ones(3))),
    ("prev_weights must be \\(B, R, N\\) = \\(2, 3, 8\\)", lambda: attnmem.location_address(
        torch.rand(2, 3, 8), torch.rand(2, 3, 9), torch.rand(2, 3), torch.rand(2, 3, 3),
        torch.ones(2, 3))),
]


@pytest.mark.parametrize("message, call", BAD, ids=[m for m, _ in BAD])
def test_bad_input_raises_a_named_error(message, call):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["cosine", "dot"])
@pytest.mark.parametrize("with_values", [False, True], ids=["memory", "values"])
def test_masked_slots_count_for_nothing_whatever_they_hold(with_values, kind, backend):
    """NaN and inf stored in masked slots (and their values) change nothing: the same
    read, weights and gradients as finite contents, and zero gradients there."""
    memory = torch.randn(2, 37, 6, device=DEVICE)
    values = torch.randn(2, 37, 3, device=DEVICE) if with_values else None
    keys, strength = torch.randn(2, 3, 6, device=DEVICE), torch.rand(2, 3, device=DEVICE) + 1
    mask = torch.rand(2, 37, device=DEVICE) > 0.3
    poisoned = [memory.masked_fill(~mask[..., None], float("nan"))]
    if with_values:
        poisoned.append(values.masked_fill(~mask[..., None], float("inf")))

    def run(memory, values):
        tensors = [x.detach().requires_grad_() for x in (memory, keys, strength, values)
                   if x is not None]
        with attnmem.use_backend(backend):
            read, weights = attnmem.memory_attend(
                tensors[0], tensors[1], strength=tensors[2],
                values=tensors[3] if with_values else None, similarity=kind, mask=mask,
                return_weights=True)
        grads = torch.autograd.grad((read.sum(), weights[..., ::2].sum()), tensors)
        return read, weights, grads

    read, weights, grads = run(*poisoned) if with_values else run(poisoned[0], None)
    clean = run(memory, values)
    torch.testing.assert_close(read, clean[0])
    torch.testing.assert_close(weights, clean[1])
    for got, expect in zip(grads, clean[2]):
        torch.testing.assert_close(got, expect)
    assert (grads[0][~mask] == 0).all()
    if with_values:
        assert (grads[3][~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["cosine", "dot"])
def test_weights_sum_to_one_at_huge_strengths(kind, backend):
    """At strength 1e8 scores are ~1e8, where float32 steps by 8: weights recomputed from a
    logsumexp rounded there summed to 0.02 for some heads."""
    memory, keys = torch.randn(2, 1000, 16, device=DEVICE), torch.randn(2, 4, 16, device=DEVICE)
    strength = torch.full((2, 4), 1e8, device=DEVICE)
    with attnmem.use_backend(backend):
        weights = attnmem.memory_address(memory, keys, strength=strength, similarity=kind)
        read = attnmem.memory_attend(memory, keys, strength=strength, similarity=kind)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, device=DEVICE))
    # One slot wins outright: the read is that slot.
    expect = torch.gather(memory, 1, weights.argmax(-1)[..., None].expand(-1, -1, 16))
    torch.testing.assert_close(read, expect)


def _grads_or_zeros(outputs, tensors):
    grads = torch.autograd.grad([o.sum() for o in outputs], tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


EMPTY = {  # name: (B, R or W, N, D)
    "no slots": (2, 3, 0, 4), "no heads": (2, 0, 5, 4), "no batch": (0, 3, 5, 4),
    "no width": (2, 3, 5, 0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY.values(), ids=EMPTY.keys())
def test_empty_inputs_are_valid(shape, backend):
    """Zero slots, heads, batch or width: the right shapes, zeros where nothing is seen,
    and finite zero gradients, forward and backward, for every memory op."""
    b, r, n, d = shape
    memory = torch.randn(b, n, d, device=DEVICE, requires_grad=True)
    keys = torch.randn(b, r, d, device=DEVICE, requires_grad=True)
    strength = torch.rand(b, r, device=DEVICE, requires_grad=True)
    weights = torch.rand(b, r, n, device=DEVICE, requires_grad=True)
    erase = torch.rand(b, r, d, device=DEVICE, requires_grad=True)
    add = torch.randn(b, r, d, device=DEVICE, requires_grad=True)
    gate, gamma = torch.rand(b, r, device=DEVICE), torch.ones(b, r, device=DEVICE)
    shift = torch.full((b, r, 3), 1 / 3, device=DEVICE)
    with attnmem.use_backend(backend):
        address = attnmem.memory_address(memory, keys, strength=strength)
        read = attnmem.memory_attend(memory, keys, strength=strength)
        plain_read = attnmem.memory_read(memory, weights)
        written = attnmem.memory_write(memory, weights, erase, add)
        located = attnmem.location_address(weights, weights, gate, shift, gamma)
    assert address.shape == (b, r, n) and located.shape == (b, r, n)
    assert read.shape == plain_read.shape == (b, r, d) and written.shape == (b, n, d)
    assert (read == 0).all() if n == 0 else torch.isfinite(read).all()
    torch.testing.assert_close(written, memory * torch.prod(
        1 - weights[..., None] * erase[:, :, None], 1) + weights.transpose(1, 2) @ add)
    grads = _grads_or_zeros([address, read, plain_read, written, located],
                            [memory, keys, strength, weights, erase, add])
    assert all(torch.isfinite(g).all() for g in grads)
    if n == 0:
        assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_write_refuses_overlapping_memory(backend):
    memory = torch.randn(1, 6, 4, device=DEVICE).expand(2, 6, 4)
    weights, erase = torch.rand(2, 1, 6, device=DEVICE), torch.rand(2, 1, 4, device=DEVICE)
    with attnmem.use_backend(backend), pytest.raises(ValueError, match="overlap"):
        attnmem.memory_write(memory, weights, erase, torch.randn(2, 1, 4, device=DEVICE),
                             inplace=True)
    own = torch.randn(2, 6, 4, device=DEVICE)
    with attnmem.use_backend(backend), pytest.raises(ValueError, match="add shares storage"):
        attnmem.memory_write(own, weights, erase, own[:, :1], inplace=True)
