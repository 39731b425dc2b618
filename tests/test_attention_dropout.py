"""attnmem.attention with dropout_p: forward and every gradient against the float64 twin run
with the very mask the backend applied (attnmem.attention.dropout_mask reads it back, as
FlashAttention's tests read their kernel's), both triton backward modes; the kept fraction;
p = 0 bit-identical to no dropout; p = 1 zeros; queries that see no key stay zero;
reproducibility from the generator's state; named errors; torch.library and torch.compile;
and the kernels' sm_90 code with dropout compiled in.

Tolerance (flash-attention's rule, as tests/test_attention.py): the error against float64 is
at most twice that of torch computing the same dropped attention naively in the input
dtype, plus a few rounding units of the largest value compared.
"""

import importlib

import pytest
import torch
from test_attention import _window, naive

import attnmem
from attnmem.reference import attention as twin
from backends import BACKENDS, DEVICE
from tolerance import ATOL

api = importlib.import_module("attnmem.attention")  # the module; attnmem.attention is the op

TARGETS = [pytest.param("torch", None, id="torch")] + [
    pytest.param("triton", mode, id=f"triton-{mode}")
    for mode in ("atomic", "deterministic") if "triton" in BACKENDS]

# name: (B, H, Hkv, Nq, Nk, D, causal, window, kv_lengths, dtype)
CASES = {
    # GQA, causal, a window and lengths together; batch 1 sees no key at all.
    "gqa_causal_window_lengths": (2, 4, 2, 21, 27, 24, True, (9, None), [27, 0],
                                  torch.float16),
    "cross_head_dim_40": (1, 2, 1, 17, 33, 40, False, None, [30], torch.float32),
    "causal_top_rows_see_nothing": (1, 2, 2, 30, 13, 16, True, None, None, torch.float32),
}


@pytest.fixture
def mode(request):
    """The triton backward's mode through torch's switch, restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param == "deterministic")
    yield request.param
    torch.use_deterministic_algorithms(before)


def make_inputs(case, device=DEVICE):
    b, h, hkv, nq, nk, d, causal, window, lengths, dtype = case
    q, k, v = (torch.randn(b, heads, n, d).to(device, dtype)
               for heads, n in ((h, nq), (hkv, nk), (hkv, nk)))
    kv_lengths = None if lengths is None else torch.tensor(lengths, device=device)
    return q, k, v, dict(causal=causal, window=window, kv_lengths=kv_lengths)


def run(fn, q, k, v, dout, dlse):
    """out, lse and the gradients of sum(out * dout) + sum(lse * dlse) over finite lse."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.float() * dout.float()).sum()
    loss = loss + torch.where(torch.isfinite(lse), lse, 0.0).mul(dlse.float()).sum()
    return [out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v))]


def with_seed(seed, device=DEVICE):
    return torch.Generator(device).manual_seed(seed)


@pytest.mark.parametrize("backend, mode", TARGETS, indirect=["mode"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_with_the_same_mask(name, backend, mode):
    q, k, v, kwargs = make_inputs(CASES[name])
    p, scale = 0.3, q.shape[-1] ** -0.5
    dout = torch.randn(q.shape, device=q.device).to(q.dtype)
    dlse = torch.randn(q.shape[:3], device=q.device)
    with attnmem.use_backend(backend):
        keep = api.dropout_mask(q, k, p, with_seed(11))
        ours = run(lambda *x: attnmem.attention(*x, **kwargs, return_lse=True, dropout_p=p,
                                                generator=with_seed(11)), q, k, v, dout, dlse)
    left, right = _window(kwargs)
    ref = run(lambda *x: twin.attention_forward(*x, kwargs["kv_lengths"], scale, left, right,
                                                dropout_p=p, dropout_mask=keep),
              q.double(), k.double(), v.double(), dout.double(), dlse.double())
    base = run(lambda *x: naive(*x, kwargs, scale, keep, p), q, k, v, dout, dlse)

    for name, o, b, r in zip(["out", "lse", "dq", "dk", "dv"], ours, base, ref):
        assert not torch.isnan(o).any(), f"{name} has NaN"
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(o), finite), f"{name}: infinities differ"
        err = (o.double() - r)[finite].abs().max().item()
        base_err = (b.double() - r)[finite].abs().max().item()
        atol = ATOL[q.dtype] * max(1.0, r[finite].abs().max().item())
        assert err <= 2 * base_err + atol, f"{name}: error {err:.3g}, torch's {base_err:.3g}"
    unseen = torch.isinf(ref[1])  # queries that see no key: zero output and dq
    assert (ours[0][unseen] == 0).all() and (ours[2][unseen] == 0).all()


@pytest.mark.skipif("triton" not in BACKENDS or DEVICE != "cpu",
                    reason="drives the kernels through the interpreter")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("config", [(32, 16, 1, 1), (16, 64, 1, 1)])
def test_every_tile_shape_draws_the_same_mask(config, deterministic):
    """A pair's number depends on the pair alone: kernels tiled otherwise than the mask
    kernel apply its mask, forward and backward."""
    from attnmem.kernels import attention as kernel

    q, k, v = (torch.randn(1, heads, n, 16) for heads, n in ((2, 37), (1, 45), (1, 45)))
    seed, p = torch.tensor([987654321]), 0.3
    keep = kernel.dropout_keep_mask(seed, (1, 2, 37, 45), p)
    out, lse = kernel.attention_forward(q, k, v, None, 0.25, -1, 0, config=config,
                                        dropout_p=p, seed=seed)
    ref_out, ref_lse = twin.attention_forward(q.double(), k.double(), v.double(), None, 0.25,
                                              -1, 0, dropout_p=p, dropout_mask=keep)
    dout = torch.randn_like(out)
    got = kernel.attention_backward(dout, q, k, v, out, lse, None, None, 0.25, -1, 0,
                                    config=config, deterministic=deterministic, dropout_p=p,
                                    seed=seed)
    expect = twin.attention_backward(dout.double(), q.double(), k.double(), v.double(),
                                     ref_out, ref_lse, None, None, 0.25, -1, 0, dropout_p=p,
                                     dropout_mask=keep)
    tol = dict(atol=ATOL[torch.float32], rtol=ATOL[torch.float32])
    for g, e in zip([out, lse, *got], [ref_out, ref_lse, *expect]):
        torch.testing.assert_close(g.double(), e.double(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_fraction_is_one_minus_p(backend):
    """A mask keeps 1 - p of the weights within 5 sigma, and so does each (batch, head)
    slice; two calls draw independent masks (both keep (1 - p)^2), the slices different ones."""
    q, k = torch.randn(2, 3, 32, 8, device=DEVICE), torch.randn(2, 1, 80, 8, device=DEVICE)
    generator = with_seed(3)
    with attnmem.use_backend(backend):
        for p in (0.1, 0.75):
            first, second = (api.dropout_mask(q, k, p, generator).double() for _ in range(2))
            for kept, expect, n in [(first.mean(), 1 - p, first.numel()),
                                    (first.mean((2, 3)), 1 - p, first[0, 0].numel()),
                                    ((first * second).mean(), (1 - p) ** 2, first.numel())]:
                sigma = (expect * (1 - expect) / n) ** 0.5
                assert ((kept - expect).abs() < 5 * sigma).all(), (p, kept, expect)
            flat = first.flatten(0, 1)
            assert all(not torch.equal(flat[i], flat[j]) for i in range(6) for j in range(i))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_p_is_bit_identical_and_draws_nothing(backend):
    q, k, v, kwargs = make_inputs(CASES["gqa_causal_window_lengths"])
    q, k, v = (x.float() for x in (q, k, v))
    dout, dlse = torch.randn_like(q), torch.randn(q.shape[:3], device=q.device)
    generator = with_seed(5)
    state = generator.get_state()
    with attnmem.use_backend(backend):
        plain = run(lambda *x: attnmem.attention(*x, **kwargs, return_lse=True), q, k, v,
                    dout, dlse)
        zero = run(lambda *x: attnmem.attention(*x, **kwargs, return_lse=True, dropout_p=0.0,
                                                generator=generator), q, k, v, dout, dlse)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_one_drops_everything(backend):
    """Zero output and zero gradients through it; lse stays the undropped one."""
    q, k, v, kwargs = make_inputs(CASES["cross_head_dim_40"])
    q.requires_grad_()
    with attnmem.use_backend(backend):
        out, lse = attnmem.attention(q, k, v, **kwargs, dropout_p=1.0, return_lse=True)
        (dq,) = torch.autograd.grad(out.sum(), q)
        expect = attnmem.attention(q, k, v, **kwargs, return_lse=True)[1]
    assert (out == 0).all() and (dq == 0).all()
    torch.testing.assert_close(lse, expect)


@pytest.mark.parametrize("backend, mode", TARGETS[:1] + TARGETS[2:], indirect=["mode"])
def test_same_generator_state_repeats_bit_for_bit(backend, mode):
    """The deterministic triton backward and the torch backend repeat bit for bit from the
    same generator state, the default generator's included; another state drops others."""
    q, k, v, kwargs = make_inputs(CASES["causal_top_rows_see_nothing"])
    dout, dlse = torch.randn_like(q), torch.randn(q.shape[:3], device=q.device)

    def call(generator):
        return run(lambda *x: attnmem.attention(*x, **kwargs, return_lse=True, dropout_p=0.2,
                                                generator=generator), q, k, v, dout, dlse)

    with attnmem.use_backend(backend):
        first, second, other = call(with_seed(7)), call(with_seed(7)), call(with_seed(8))
        torch.manual_seed(9)
        default = call(None)
        torch.manual_seed(9)
        default_again = call(None)
    assert all(torch.equal(a, b) for a, b in zip(first + default, second + default_again))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[0], default[0])


BAD_DROPOUT = [
    ("dropout_p must be a number in \\[0, 1\\], got -0.1", dict(dropout_p=-0.1)),
    ("dropout_p must be a number in \\[0, 1\\], got 1.5", dict(dropout_p=1.5)),
    ("dropout_p must be a number in \\[0, 1\\], got nan", dict(dropout_p=float("nan"))),
    ("dropout_p must be a number in \\[0, 1\\], got True", dict(dropout_p=True)),
    ("dropout_p must be a number in \\[0, 1\\], got '0.1'", dict(dropout_p="0.1")),
    ("dropout_p must be a number", dict(dropout_p=torch.tensor(0.1))),
    ("generator must be a torch.Generator or None, got int", dict(dropout_p=0.1, generator=3)),
    ("generator is on cpu but q is on meta", dict(dropout_p=0.1, generator=torch.Generator())),
]


@pytest.mark.parametrize("message, kwargs", BAD_DROPOUT, ids=[m for m, _ in BAD_DROPOUT])
def test_bad_dropout_arguments_raise_named_errors(message, kwargs):
    device = "meta" if "meta" in message else "cpu"
    q = torch.randn(1, 2, 3, 4, device=device)
    with pytest.raises((ValueError, TypeError), match=message):
        attnmem.attention(q, q, q, **kwargs)


def test_a_device_without_index_is_the_current_one(monkeypatch):
    """torch.Generator("cuda") reports cuda and its tensors cuda:0: one device, which the
    generator check must accept (the first GPU run refused every CUDA generator)."""
    from attnmem import _checks

    current = type("Module", (), {"current_device": staticmethod(lambda: 1)})
    monkeypatch.setattr(torch, "get_device_module", lambda kind: current)
    assert _checks.same_device(torch.device("cuda"), torch.device("cuda", 1))
    assert _checks.same_device(torch.device("cuda", 1), torch.device("cuda"))
    assert not _checks.same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert not _checks.same_device(torch.device("cuda"), torch.device("cpu"))
    assert _checks.same_device(torch.device("cpu"), torch.device("cpu"))


def test_opcheck_with_dropout():
    """On the torch backend; the fake outputs are the same for both."""
    from attnmem.attention import _attention_backward, _attention_forward

    q, k, v = (torch.randn(2, heads, n, 8, requires_grad=True)
               for heads, n in ((4, 9), (2, 12), (2, 12)))
    seed = torch.tensor([1234])
    fwd_args = (q, k, v, torch.tensor([12, 5]), 0.35, 4, 0, "torch", 0.0, None, None, 0.25, seed)
    torch.library.opcheck(_attention_forward.default, fwd_args)
    out, lse = _attention_forward(*fwd_args)
    torch.library.opcheck(_attention_backward.default, (
        torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
        torch.randn_like(lse), *fwd_args[3:]))


def test_torch_compile_fullgraph_draws_the_eager_seed():
    """The seed's randint is traced with the rest of the graph; the default generator's
    state then gives the eager result."""
    q, k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return attnmem.attention(q, k, v, causal=True, dropout_p=0.4).sin().sum()

    torch.manual_seed(1)
    expect = torch.autograd.grad(f(q, k, v), (q, k, v))
    torch.manual_seed(1)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v),
                              (q, k, v))
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e)


def _compile_jobs():
    """sm_90 float16 jobs at head dim 128 with dropout compiled in, each expected to use wgmma
    and spill nothing: a masked TMA forward, dK/dV in both backward modes and the dQ kernel
    (32 x 64 and 64 x 32 tiles, 8 warps: the backward's larger tiles spill a few bytes with
    dropout); and the mask kernel on sm_80 and sm_90."""
    from test_attention_targets import expecting, job

    jobs = {}
    for name, kernel_name, config, atomic_dq, expect in [
            ("fwd", "fwd", (128, 64, 8, 3, "USE_TMA"), True, dict(tma=True)),
            ("dkdv", "dkdv", (32, 64, 8, 2), True, {}),
            ("dkdv-det", "dkdv", (32, 64, 8, 2), False, {}),
            ("dq", "dq", (64, 32, 8, 2), True, {})]:
        spec = job(kernel_name, 90, "float16", 128, config, atomic_dq=atomic_dq)
        spec["constexprs"]["DROPOUT"] = True
        spec["pointers"]["seed_ptr"] = "i64"
        jobs[name] = expecting(spec, wgmma=True, spill_stores=0, spill_loads=0, **expect)
    for arch in (80, 90):
        jobs[f"mask-sm{arch}"] = dict(
            module="attnmem.kernels.attention", kernel="_dropout_keep_mask", arch=arch,
            constexprs=dict(BLOCK_M=64, BLOCK_N=64), pointers=dict(seed_ptr="i64", keep_ptr="i8"),
            num_warps=4, num_stages=3)
    return jobs


@pytest.mark.slow
def test_kernels_with_dropout_compile_for_sm90_without_spills():
    """With Philox compiled in, these configs keep wgmma and spill nothing (tests/aot.py:
    ptxas -v); the mask kernel compiles."""
    pytest.importorskip("triton")
    from aot import compile_all

    jobs = _compile_jobs()
    results = dict(zip(jobs, compile_all(list(jobs.values()))))
    failures = {name: result["error"] or {key: result[key] for key in jobs[name]["expect"]}
                for name, result in results.items() if result["error"] or any(
                    result[key] != value for key, value in jobs[name].get("expect", {}).items())}
    assert not failures, failures
