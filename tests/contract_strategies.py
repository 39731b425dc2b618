"""Hypothesis strategies and checks for the API contract (tests/test_contract.py).

Every tensor is drawn from a seed that hypothesis draws, so a failure's reproduction blob
reproduces its data too. A valid call is checked against a float64 reference on the same
rounded inputs: outputs and gradients finite where the reference is, within the tolerance
rule of tests/tolerance.py, and inputs left as they were.
"""

import copy
import os
import re

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import attnmem
from backends import DEVICE
from tolerance import ATOL

# Few examples per property: the Triton interpreter is slow, and the file runs in a couple
# of minutes in CI. ATTNMEM_CONTRACT_EXAMPLES=200 searches harder on a workstation.
settings.register_profile(
    "attnmem-contract", max_examples=int(os.environ.get("ATTNMEM_CONTRACT_EXAMPLES", "12")),
    deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
contract = settings.get_profile("attnmem-contract")

# float64 agrees with the float64 reference up to summation order.
TOLERANCE = {**ATOL, torch.float64: 1e-10}
ERRORS = (ValueError, TypeError)


def dtypes(backend):
    """float32 mostly; float64 only on torch (triton has no float64 kernels); float16."""
    extra = [torch.float64] if backend == "torch" else []
    return st.sampled_from([torch.float32, torch.float32, torch.float16, *extra])


layouts = st.sampled_from(["contiguous", "transposed", "padded_rows", "strided_last"])
# What padding (keys past kv_lengths, masked slots) holds: it must contribute nothing.
poisons = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30, 0.0])
seeds = st.integers(0, 2**31 - 1)


def arrange(x, layout):
    """A copy of x with the same values in another memory layout; the slack of a strided
    buffer is NaN, so reading past a view shows."""
    if layout == "transposed" and x.ndim >= 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout in ("padded_rows", "strided_last") and x.ndim >= 1:
        width = x.shape[-1]
        wide = width + 3 if layout == "padded_rows" else 2 * width
        buffer = x.new_full((*x.shape[:-1], wide), float("nan"))
        view = buffer[..., :width] if layout == "padded_rows" else buffer[..., ::2]
        view.copy_(x)
        return view
    return x.clone(memory_format=torch.contiguous_format)


class Data:
    """Random float64 tensors on DEVICE from one seed."""

    def __init__(self, seed):
        self.gen = torch.Generator(DEVICE).manual_seed(seed)

    def randn(self, *shape, scale=1.0):
        return torch.randn(shape, generator=self.gen, dtype=torch.float64, device=DEVICE) * scale

    def rand(self, *shape):
        return torch.rand(shape, generator=self.gen, dtype=torch.float64, device=DEVICE)

    def simplex(self, *shape, temperature=1.0):
        return torch.softmax(self.randn(*shape) / temperature, -1)

    def bools(self, *shape, p=0.7):
        return self.rand(*shape) < p


@st.composite
def lengths(draw, batch, n):
    """(kv_lengths tensor, the lengths it means, clamped to [0, n]): out-of-range values,
    int16, int32 or int64 beyond 2**31, contiguous, strided or expanded."""
    form = draw(st.sampled_from(["int64", "int32", "int16", "strided", "expanded"]))
    value = st.integers(-3, n + 3) | st.sampled_from([-2**40, 2**31 + 5, 2**32 + 1])
    if form in ("int32", "int16"):
        value = st.integers(-3, n + 3)
    if form == "expanded":
        values = [draw(value)] * batch
        tensor = torch.tensor([values[0] if batch else 0], device=DEVICE).expand(batch)
    else:
        values = draw(st.lists(value, min_size=batch, max_size=batch))
        dtype = {"int32": torch.int32, "int16": torch.int16}.get(form, torch.int64)
        tensor = torch.tensor(values, dtype=dtype, device=DEVICE)
        if form == "strided":
            tensor = torch.stack([tensor, torch.full_like(tensor, -7)], 1)[:, 0]
    return tensor, [min(max(v, 0), n) for v in values]


def same(a, b):
    """Equal values, NaN equal to NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        ((a == b) | (a.isnan() & b.isnan()) if a.dtype.is_floating_point else a == b).all())


def compare(what, got, expect, base, dtype, condition=1.0):
    """got (in dtype) is finite exactly where the float64 expect is, equal to it where it is
    +-inf, and elsewhere within twice base's error (the reference computed in dtype) plus
    rounding units scaled by the largest value and by condition."""
    assert got.shape == expect.shape, f"{what}: shape {tuple(got.shape)}, " \
                                      f"expected {tuple(expect.shape)}"
    got = got.detach().double()
    assert not got.isnan().any(), f"{what}: NaN at {got.isnan().nonzero()[:4].tolist()}"
    finite = torch.isfinite(expect)
    bad = torch.isfinite(got) != finite
    assert not bad.any(), f"{what}: {got[bad][:4].tolist()} where float64 gives " \
                          f"{expect[bad][:4].tolist()}"
    assert torch.equal(got[~finite], expect[~finite]), f"{what}: wrong infinities"
    if not finite.any():
        return
    err = (got - expect)[finite].abs().max().item()
    base_err = torch.nan_to_num((base.detach().double() - expect)[finite].abs(), 0.0)
    base_err = base_err.max().item()
    atol = TOLERANCE[dtype] * max(1.0, expect[finite].abs().max().item()) * condition
    assert err <= 2 * base_err + atol, f"{what}: error {err:.3g} (torch in {dtype}: " \
                                       f"{base_err:.3g}, atol {atol:.3g})"


def _leaves(tensors):
    return {n: t.detach().requires_grad_() if isinstance(t, torch.Tensor)
            and t.dtype.is_floating_point else t for n, t in tensors.items()}


def _grads(outs, leaves, grad_outputs, what, constants=()):
    """Gradients of sum(out * grad_output) for every float leaf (zeros where unused). Every
    output is differentiable but those whose indices are in constants."""
    inputs = [t for t in leaves.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    pairs = [(o, g) for i, (o, g) in enumerate(zip(outs, grad_outputs))
             if g is not None and i not in constants]
    assert all(o.requires_grad for o, _ in pairs), f"{what}: an output is not differentiable"
    grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                allow_unused=True) if pairs and inputs else [None] * len(inputs)
    names = [n for n, t in leaves.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    return {n: torch.zeros_like(t) if g is None else g for n, t, g in zip(names, inputs, grads)}


def check_call(backend, op, ref, given, clean, data, differentiable, out_dtypes=None,
               condition=1.0):
    """op(**given) on backend against ref(**clean) in float64 and in given's dtype.

    given: the op's arguments (tensors may be strided and hold poison in padding); clean:
    the same arguments with padding replaced by finite values (float64 tensors); ref returns
    a tuple of outputs like op's; differentiable[i] says whether output i has a gradient.
    Float inputs' gradients are compared for a random upstream gradient (zero where the
    reference output is infinite, e.g. lse -inf: d(-inf) has no meaning).
    """
    dtype = next(t.dtype for t in given.values()
                 if isinstance(t, torch.Tensor) and t.dtype.is_floating_point)
    snapshot = {n: t.clone() for n, t in given.items() if isinstance(t, torch.Tensor)}
    leaves = _leaves(given)
    with attnmem.use_backend(backend):
        outs = op(**leaves)
    expect_leaves = _leaves({n: t.to(dtype).double() if isinstance(t, torch.Tensor)
                             and t.dtype.is_floating_point else t for n, t in clean.items()})
    base_leaves = _leaves({n: t.to(dtype) if isinstance(t, torch.Tensor)
                           and t.dtype.is_floating_point else t for n, t in clean.items()})
    with attnmem.use_backend("torch"):
        expect, base = ref(**expect_leaves), ref(**base_leaves)
    assert len(outs) == len(expect)
    for i, (o, e, b) in enumerate(zip(outs, expect, base)):
        if out_dtypes is not None and out_dtypes[i] is not None:
            assert o.dtype == out_dtypes[i], f"output {i} is {o.dtype}, not {out_dtypes[i]}"
        if o.dtype.is_floating_point:
            compare(f"output {i}", o, e, b, dtype, condition)
        else:
            assert torch.equal(o, e), f"output {i}: {o.tolist()} != {e.tolist()}"
    upstream = [data.randn(*e.shape).masked_fill(~torch.isfinite(e), 0.0) if d else None
                for e, d in zip(expect, differentiable)]
    got = _grads(outs, leaves, [None if u is None else u.to(o.dtype)
                                for u, o in zip(upstream, outs)], "op")
    want = _grads(expect, expect_leaves, upstream, "float64 reference")
    base_grads = _grads(base, base_leaves, [None if u is None else u.to(b.dtype)
                                            for u, b in zip(upstream, base)], "reference")
    for name in got:
        compare(f"d{name}", got[name], want[name], base_grads[name], dtype, condition)
    for name, before in snapshot.items():
        assert same(given[name], before), f"{name} was modified"
    return outs


def named(error, *names):
    """The error's message names one of names (as a word)."""
    message = str(error)
    assert any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in names), \
        f"{type(error).__name__}({message!r}) names none of {names}"


def bad_tensors(x):
    """(description, bad value) pairs for a tensor argument: not a tensor, wrong ndim, wrong
    dtype kind, another device ("meta"), a wrong first size."""
    other = torch.float64 if x.dtype != torch.float64 else torch.float32
    cases = [("list", x.tolist()), ("extra dim", x[None]), ("meta device", x.to("meta")),
             ("fewer dims", x.flatten(0, 1) if x.ndim >= 2 else x.new_zeros(()))]
    if x.dtype.is_floating_point:
        cases += [("int64", x.to(torch.int64)), ("bool", x != 0), ("other float dtype",
                                                                   x.to(other))]
    elif x.dtype == torch.bool:
        cases += [("float", x.double()), ("int64", x.long())]
    else:
        cases += [("float", x.double()), ("bool", x != 0)]
    cases.append(("first size + 1", torch.cat([x, x[:1]]) if x.shape[0] else
                  x.new_zeros((1, *x.shape[1:]))))
    return cases


def _cast(inputs, dtype):
    return {n: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point
            else t for n, t in inputs.items()}


def check_module(backend, module, inputs, forward, data, dtype, condition=1.0):
    """forward(module, **inputs) -> a tuple of float outputs on backend, against the module
    in float64 on the torch backend (the twins, on the same rounded parameters and inputs):
    outputs, gradients of every parameter and float input, inputs, parameters and buffers
    unchanged. An output that depends on no parameter or input (an NTM's constant initial
    memory) has no gradient."""
    state = {n: t.clone() for n, t in module.state_dict().items()}
    snapshot = {n: t.clone() for n, t in inputs.items() if isinstance(t, torch.Tensor)}
    runs = {}
    for what, m, cast, chosen in (("op", module, dtype, backend),
                                  ("float64 reference", copy.deepcopy(module).double(),
                                   torch.float64, "torch"),
                                  ("reference", copy.deepcopy(module), dtype, "torch")):
        leaves = _leaves(_cast(inputs, cast))
        with attnmem.use_backend(chosen):
            outs = forward(m, **leaves)
        runs[what] = (outs, {**leaves, **dict(m.named_parameters())})
    (outs, leaves), (expect, expect_leaves), (base, base_leaves) = runs.values()
    assert len(outs) == len(expect)
    for i, (o, e, b) in enumerate(zip(outs, expect, base)):
        assert o.dtype == b.dtype, f"output {i} is {o.dtype}, not {b.dtype}"
        compare(f"output {i}", o, e, b, dtype, condition)
    upstream = [data.randn(*e.shape).masked_fill(~torch.isfinite(e), 0.0) for e in expect]
    constants = [i for i, e in enumerate(expect) if not e.requires_grad]
    got = _grads(outs, leaves, [u.to(o.dtype) for u, o in zip(upstream, outs)], "module",
                 constants)
    want = _grads(expect, expect_leaves, upstream, "float64 reference", constants)
    base_grads = _grads(base, base_leaves, [u.to(b.dtype) for u, b in zip(upstream, base)],
                        "reference", constants)
    for name in got:
        compare(f"d{name}", got[name], want[name], base_grads[name], dtype, condition)
    for name, before in snapshot.items():
        assert same(inputs[name], before), f"{name} was modified"
    for name, before in state.items():
        assert same(module.state_dict()[name], before), f"the module's {name} was modified"
    return outs
