"""attnmem.attention against float64 on fresh random inputs: values, lse and every gradient.

Tolerance (flash-attention's rule): the error against float64 is at most twice the error of
torch computing the same attention naively in the input dtype, plus a few rounding units of
the largest value compared (the backward's rowsum(dO * O) cancels against dO . v, which
torch's softmax backward can get exactly right where p is 0 or 1).
Kernel outputs are poisoned with NaN before they are written (fill_uninitialized_memory),
so an element a kernel forgets to write fails the test.

The triton backward runs in two modes, both tested: by default its dK/dV kernel adds dQ with
atomics; under torch.use_deterministic_algorithms(True) a separate dQ kernel computes it.
torch poisons memory only in its deterministic mode, so the atomic mode runs unpoisoned
through the public function (its dQ buffer starts from zeros by design; dK and dV are written
by the same code in both modes) and poisoned through the kernel's own switch in
test_kernel_tile_shapes.
"""

import os

import pytest
import torch

import attnmem
from attnmem.reference import attention as twin

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()


def _targets():
    out = [("cpu", "torch")]
    if INTERPRET:
        out.append(("cpu", "triton"))
    if HAS_CUDA:
        out.append(("cuda", "torch"))
        if not INTERPRET:
            out.append(("cuda", "triton"))
    return [pytest.param(d, b, id=f"{d}-{b}") for d, b in out]


TARGETS = _targets()
BACKWARD_MODES = ["atomic", "deterministic"]


def _backward_targets():
    """TARGETS with the backward mode: both for the triton backend, None for the torch one."""
    out = []
    for target in TARGETS:
        device, backend = target.values
        if backend == "triton":
            out += [pytest.param(device, backend, mode, id=f"{target.id}-{mode}")
                    for mode in BACKWARD_MODES]
        else:
            out.append(pytest.param(device, backend, None, id=target.id))
    return out


BACKWARD_TARGETS = _backward_targets()
TRITON_TARGETS = [t for t in TARGETS if t.values[1] == "triton"]

# name: (B, H, Hkv, Nq, Nk, D, causal, window, kv_lengths)
CASES = {
    "plain": (2, 3, 3, 37, 37, 40, False, None, None),
    "causal_gqa": (2, 4, 2, 45, 45, 24, True, None, None),
    "window_right_top_left": (1, 2, 1, 61, 23, 32, False, (None, 38), None),  # j <= i
    "cross": (1, 2, 2, 23, 61, 16, False, None, None),
    "causal_nq_lt_nk": (1, 2, 2, 23, 61, 64, True, None, None),
    "causal_nq_gt_nk": (1, 2, 1, 61, 23, 32, True, None, None),  # top rows see no key
    "decode": (3, 8, 2, 1, 77, 80, True, None, [77, 13, 1]),
    "head_dim_1": (1, 2, 2, 19, 21, 1, False, None, None),
    "head_dim_3_mqa": (2, 4, 1, 17, 33, 3, True, None, None),
    "head_dim_96_local": (1, 2, 2, 45, 45, 96, False, (7, 0), None),
    "head_dim_112_window": (1, 1, 1, 20, 50, 112, False, (3, 5), None),
    "head_dim_256": (1, 1, 1, 18, 34, 256, True, None, None),
    "window_causal": (1, 2, 2, 50, 70, 16, True, (9, 4), None),
    "window_left_unbounded": (1, 2, 2, 40, 40, 16, False, (None, 3), None),
    "window_right_unbounded": (1, 2, 2, 40, 35, 16, False, (2, -1), None),
    "window_zero": (1, 2, 2, 33, 33, 16, False, (0, 0), None),
    "lengths": (3, 4, 2, 29, 47, 24, False, None, [47, 0, 16]),
    "lengths_clamped": (2, 2, 2, 20, 31, 16, True, None, [99, -3]),
    "lengths_window_gqa": (2, 6, 3, 50, 50, 32, True, (12, 0), [33, 50]),
    "all_masked": (2, 2, 1, 9, 14, 16, False, None, [0, 0]),
    "empty_kv": (1, 2, 2, 5, 0, 16, False, None, None),
    "empty_q": (1, 2, 2, 0, 5, 16, True, None, None),
}
FAST_CASES = ["plain", "causal_nq_gt_nk", "decode", "lengths_window_gqa", "head_dim_3_mqa"]

# A few rounding units of each dtype at magnitude 1.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


pytestmark = pytest.mark.usefixtures("poison_empty")


@pytest.fixture
def mode(request):
    """The triton backward's mode (parametrized indirectly), chosen through torch's switch:
    "atomic", the default, or "deterministic"; None leaves the switch as it is. The switch
    is restored afterwards."""
    mode = getattr(request, "param", None)
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    if mode is not None:
        torch.use_deterministic_algorithms(mode == "deterministic")
    yield mode
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def make_inputs(case, dtype, device, layout="contiguous"):
    b, h, hkv, nq, nk, d, causal, window, lengths = case

    def make(heads, n):
        if layout == "bshd":  # (B, N, H, D) memory viewed as (B, H, N, D)
            return torch.randn(b, n, heads, d).to(device, dtype).transpose(1, 2)
        if layout == "sliced":  # rows padded past D: last dim contiguous, rows strided
            return torch.randn(b, heads, n, d + 8).to(device, dtype)[..., 3:d + 3]
        return torch.randn(b, heads, n, d).to(device, dtype)

    q, k, v = make(h, nq), make(hkv, nk), make(hkv, nk)
    kv_lengths = None if lengths is None else torch.tensor(lengths, device=device)
    kwargs = dict(causal=causal, window=window, kv_lengths=kv_lengths)
    return q, k, v, kwargs


def _window(kwargs):
    left, right = kwargs["window"] or (-1, -1)
    left, right = (-1 if x is None else x for x in (left, right))
    if kwargs["causal"]:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def naive(q, k, v, kwargs, scale, keep=None, dropout_p=0.0):
    """Attention in q's dtype with the whole score matrix: torch's own error baseline. With
    a dropout keep mask, the weights it drops are zeroed and the rest scaled."""
    left, right = _window(kwargs)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    visible = twin.visible(torch.arange(q.shape[2], device=q.device), q.shape[2], k.shape[2],
                           left, right, kwargs["kv_lengths"])
    s = q @ k.transpose(-1, -2) * scale
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s.float(), -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if keep is not None:
        p = torch.where(keep, p, 0.0) / (1 - dropout_p)
    return p @ v, lse


def run(fn, q, k, v, dout, dlse):
    """Out, lse and the gradients of sum(out * dout) + sum(lse * dlse) over finite lse (lse
    left out of the loss when dlse is None)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.float() * dout.float()).sum()
    if dlse is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse, 0.0).mul(dlse.float()).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q, k, v))]
    return out.detach(), lse.detach(), grads


def check_against_float64(q, k, v, kwargs, backend, lse_grad=True):
    """kwargs: causal, window, kv_lengths and optionally scale, as attnmem.attention takes;
    v may have a head dim Ev of its own. lse_grad=False leaves lse out of the loss: its
    gradient is None, not zeros."""
    scale = kwargs.get("scale") or q.shape[-1] ** -0.5
    kwargs = {**kwargs, "scale": scale}
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device=q.device).to(q.dtype)
    dlse = torch.randn(q.shape[:3], device=q.device) if lse_grad else None
    left, right = _window(kwargs)

    ref = run(lambda *x: twin.attention_forward(*x, kwargs["kv_lengths"], scale, left, right),
              q.double(), k.double(), v.double(), dout.double(),
              None if dlse is None else dlse.double())
    base = run(lambda *x: naive(*x, kwargs, scale), q, k, v, dout, dlse)
    with attnmem.use_backend(backend):
        ours = run(lambda *x: attnmem.attention(*x, **kwargs, return_lse=True), q, k, v, dout,
                   dlse)

    names = ["out", "lse", "dq", "dk", "dv"]
    flat = lambda r: [r[0], r[1], *r[2]]  # noqa: E731
    for name, o, b, r in zip(names, flat(ours), flat(base), flat(ref)):
        assert o.shape == r.shape and o.dtype == (torch.float32 if name == "lse" else q.dtype)
        assert not torch.isnan(o).any(), f"{name} has NaN"
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(o), finite), f"{name}: infinities differ"
        if not finite.any():
            continue
        err = (o.double() - r)[finite].abs().max().item()
        base_err = (b.double() - r)[finite].abs().max().item()
        atol = ATOL[q.dtype] * max(1.0, r[finite].abs().max().item())
        assert err <= 2 * base_err + atol, f"{name}: error {err:.3g}, torch's {base_err:.3g}"

    # Queries that see no key: zero output, lse -inf, zero dq.
    unseen = torch.isinf(ref[1])
    if unseen.any():
        assert (ours[0][unseen] == 0).all() and (ours[1][unseen] == float("-inf")).all()
        assert (ours[2][0][unseen] == 0).all()


@pytest.mark.parametrize("device, backend, mode", BACKWARD_TARGETS, indirect=["mode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, dtype, device, backend, mode):
    check_against_float64(*make_inputs(CASES[name], dtype, device), backend)


@pytest.mark.parametrize("device, backend, mode", BACKWARD_TARGETS, indirect=["mode"])
@pytest.mark.parametrize("layout", ["bshd", "sliced"])
@pytest.mark.parametrize("name", FAST_CASES)
def test_strided_inputs(name, layout, device, backend, mode):
    check_against_float64(*make_inputs(CASES[name], torch.float32, device, layout), backend)


@pytest.mark.parametrize("device, backend, mode", BACKWARD_TARGETS, indirect=["mode"])
@pytest.mark.parametrize("name", FAST_CASES)
def test_bfloat16(name, device, backend, mode):
    if backend == "triton" and device == "cpu":
        pytest.skip("the interpreter's tl.dot is wrong on bfloat16 (triton issue 11584)")
    check_against_float64(*make_inputs(CASES[name], torch.bfloat16, device), backend)


@pytest.mark.skipif(not INTERPRET, reason="drives the kernels through the interpreter")
@pytest.mark.parametrize("deterministic", [False, True], ids=BACKWARD_MODES)
@pytest.mark.parametrize("config", [(16, 32, 1, 1), (32, 16, 1, 1), (64, 64, 1, 1)])
@pytest.mark.parametrize("name", ["causal_nq_lt_nk", "window_causal", "lengths_window_gqa"])
def test_kernel_tile_shapes(name, config, deterministic):
    """Tile boundaries fall elsewhere when BLOCK_M != BLOCK_N or tiles outgrow the sequence.
    Both backward modes, chosen by the kernel's own switch, so torch keeps poisoning."""
    from attnmem.kernels import attention as kernel

    q, k, v, kwargs = make_inputs(CASES[name], torch.float32, "cpu")
    left, right = _window(kwargs)
    lengths, scale = kwargs["kv_lengths"], 0.3
    ref_out, ref_lse = twin.attention_forward(q.double(), k.double(), v.double(), lengths,
                                              scale, left, right)
    out, lse = kernel.attention_forward(q, k, v, lengths, scale, left, right, config=config)
    # fp32 rounding: ATOL's allowance, relative to the size of the values.
    tol = dict(atol=ATOL[torch.float32], rtol=ATOL[torch.float32])
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), **tol)

    dout = torch.randn_like(out)
    expect = twin.attention_backward(dout.double(), q.double(), k.double(), v.double(),
                                     ref_out, ref_lse, None, lengths, scale, left, right)
    got = kernel.attention_backward(dout, q, k, v, out, lse, None, lengths, scale, left, right,
                                    config=config, deterministic=deterministic)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g.double(), e, **tol)


@pytest.mark.parametrize("device, backend, mode",
                         [t for t in BACKWARD_TARGETS if t.values[1] == "triton"],
                         indirect=["mode"])
def test_backward_mode_follows_torch(device, backend, mode, monkeypatch):
    """By default one dK/dV launch also adds dQ with atomics (5 GEMMs); with torch's
    deterministic switch on, a dQ kernel follows it (7 GEMMs). The interpreter runs atomics
    one after another, so the results alone cannot tell the two apart: the launches do."""
    from attnmem.kernels import attention as kernel

    launches = []
    real_run = kernel._run

    def spy(name, fn, grid, args, meta, *rest, **options):
        launches.append((name, meta.get("ATOMIC_DQ")))
        return real_run(name, fn, grid, args, meta, *rest, **options)

    monkeypatch.setattr(kernel, "_run", spy)
    q, k, v, kwargs = make_inputs(CASES["lengths_window_gqa"], torch.float32, device)
    with attnmem.use_backend(backend):
        attnmem.attention(q.requires_grad_(), k, v, **kwargs).sum().backward()
    assert launches == {"atomic": [("fwd", None), ("dkdv", True)],
                        "deterministic": [("fwd", None), ("dkdv", False), ("dq", None)]}[mode]


@pytest.mark.parametrize("device, backend, mode", [
    pytest.param(*t.values, "deterministic", id=t.id) for t in TRITON_TARGETS],
    indirect=["mode"])
@pytest.mark.parametrize("name", ["lengths_window_gqa", "head_dim_3_mqa"])
def test_deterministic_backward_repeats_bit_for_bit(name, device, backend, mode):
    q, k, v, kwargs = make_inputs(CASES[name], torch.float16, device)
    dout = torch.randn(q.shape, device=device).to(q.dtype)
    dlse = torch.randn(q.shape[:3], device=device)
    with attnmem.use_backend(backend):
        first, second = (run(lambda *x: attnmem.attention(*x, **kwargs, return_lse=True),
                             q, k, v, dout, dlse)[2] for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_twin_matches_sdpa_with_explicit_mask():
    """The twin's mask rules, checked against SDPA given a mask spelled out element by element."""
    b, h, hkv, nq, nk, d = 2, 4, 2, 13, 21, 8
    q, k, v = (torch.randn(b, n_h, n, d, dtype=torch.float64)
               for n_h, n in ((h, nq), (hkv, nk), (hkv, nk)))
    lengths = torch.tensor([21, 9])
    for causal, window in [(True, None), (False, (3, 2)), (True, (4, None)), (False, None)]:
        left, right = (window or (None, None))
        mask = torch.zeros(b, 1, nq, nk, dtype=torch.bool)
        for bi in range(b):
            for i in range(nq):
                for j in range(nk):
                    a = i + nk - nq
                    mask[bi, 0, i, j] = (j < lengths[bi] and (not causal or j <= a)
                                         and (left is None or j >= a - left)
                                         and (right is None or j <= a + right))
        out = attnmem.attention(q, k, v, causal=causal, window=window, kv_lengths=lengths)
        expect = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
        seen = mask.any(-1, keepdim=True).expand_as(out)
        torch.testing.assert_close(out[seen], expect[seen])
        assert (out[~seen] == 0).all()


def test_float64_gradcheck_on_the_torch_backend():
    q = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 7, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 7, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6])
    with attnmem.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: attnmem.attention(q, k, v, causal=True, window=(3, None),
                                              kv_lengths=lengths, return_lse=True),
            (q, k, v))


def test_twin_chunks_long_sequences(monkeypatch):
    """The twin holds one chunk of scores at a time, forward and backward, and the results
    do not change."""
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    dout = torch.randn_like(q)

    def forward_backward():
        out, lse = twin.attention_forward(q, k, v, None, 0.25, -1, 0)
        grads = twin.attention_backward(dout, q, k, v, out, lse, None, None, 0.25, -1, 0)
        return out, lse, *grads

    whole = forward_backward()
    sizes = []
    real_matmul = torch.matmul

    def spy(a, b):
        product = real_matmul(a, b)
        sizes.append(product.numel())
        return product

    monkeypatch.setattr(twin, "CHUNK_ELEMENTS", 2 * 300 * 64)  # 64 rows of scores
    monkeypatch.setattr(twin.torch, "matmul", spy)
    chunked = forward_backward()
    monkeypatch.undo()
    assert sizes and max(sizes) <= 2 * 300 * 64
    for c, w in zip(chunked, whole):
        torch.testing.assert_close(c, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_cpu_backward_matches_float64(name, dtype):
    """Without a gradient of lse, the torch backend's CPU backward is torch's fused kernel."""
    check_against_float64(*make_inputs(CASES[name], dtype, "cpu"), "torch", lse_grad=False)


@pytest.mark.parametrize("layout", ["bshd", "sliced"])
@pytest.mark.parametrize("name", FAST_CASES)
def test_fused_cpu_backward_strided_inputs(name, layout):
    check_against_float64(*make_inputs(CASES[name], torch.float32, "cpu", layout), "torch",
                          lse_grad=False)


@pytest.mark.parametrize("name", ["lengths", "lengths_window_gqa", "causal_nq_gt_nk"])
def test_fused_cpu_masks_in_chunks(name, monkeypatch):
    """Additive masks are built for a few query rows at a time, as the twin's scores are."""
    q, k, v, kwargs = make_inputs(CASES[name], torch.float32, "cpu")
    monkeypatch.setattr(twin, "CHUNK_ELEMENTS", q.shape[0] * k.shape[2] * 8)  # 8 rows
    calls = spy_fused_cpu(monkeypatch)
    check_against_float64(q, k, v, kwargs, "torch", lse_grad=False)
    chunks = -(-q.shape[2] // 8)
    assert calls == [("fwd", False, True)] * chunks + [("bwd", False, True)] * chunks


@pytest.mark.parametrize("device, backend, mode", BACKWARD_TARGETS, indirect=["mode"])
@pytest.mark.parametrize("name", ["causal_nq_gt_nk", "head_dim_3_mqa"])
def test_without_lse_gradient(name, device, backend, mode):
    """No dlse pass in the kernels' backward; the padding test covers lengths and windows."""
    check_against_float64(*make_inputs(CASES[name], torch.float32, device), backend,
                          lse_grad=False)


def spy_fused_cpu(monkeypatch):
    """The list that records each call of torch's fused CPU kernel: ("fwd" or "bwd",
    is_causal, whether an attn_mask was given)."""
    calls = []

    def spy(name, op):
        def call(*args, **kwargs):
            calls.append((name, args[4 if name == "fwd" else 7], "attn_mask" in kwargs))
            return op(*args, **kwargs)
        return call

    for name, suffix in (("fwd", ""), ("bwd", "_backward")):
        op_name = "_scaled_dot_product_flash_attention_for_cpu" + suffix
        monkeypatch.setattr(torch.ops.aten, op_name, spy(name, getattr(torch.ops.aten, op_name)))
    return calls


def test_torch_backend_runs_the_fused_cpu_kernel(monkeypatch):
    """On CPU tensors torch's fused kernel runs forward and backward, with is_causal and no
    mask where its top-left causal mask is ours; the twin runs only for a gradient of lse."""
    calls = spy_fused_cpu(monkeypatch)
    twin_backward = twin.attention_backward
    monkeypatch.setattr(twin, "attention_forward", None)  # any call fails
    monkeypatch.setattr(twin, "attention_backward", lambda *args, **kwargs: (
        calls.append("twin"), twin_backward(*args, **kwargs))[1])
    q, k, v = (torch.randn(2, heads, 12, 8, requires_grad=True) for heads in (4, 2, 2))
    expect = {
        (): [("fwd", False, False), ("bwd", False, False)],
        (("causal", True),): [("fwd", True, False), ("bwd", True, False)],
        (("causal", True), ("window", (3, 0))): [("fwd", False, True), ("bwd", False, True)],
        (("kv_lengths", torch.tensor([12, 5])),): [("fwd", False, True), ("bwd", False, True)],
    }
    with attnmem.use_backend("torch"):
        for kwargs, expected in expect.items():
            calls.clear()
            attnmem.attention(q, k, v, **dict(kwargs)).sum().backward()
            assert calls == expected, kwargs
        calls.clear()
        out, lse = attnmem.attention(q, k, v, causal=True, return_lse=True)
        (out.sum() + lse.sum()).backward()
        assert calls == [("fwd", True, False), "twin"]


# Keys that no query sees: at or past kv_lengths, and before every query's window.
POISON_CASES = {
    "lengths": (2, 4, 2, 20, 45, 16, False, None, [30, 7]),
    "window_lengths": (2, 2, 1, 20, 45, 16, True, (10, 0), [40, 45]),  # keys < 15 unseen
}


@pytest.mark.parametrize("device, backend, mode",
                         BACKWARD_TARGETS + [pytest.param("cpu", "twin", None, id="twin")],
                         indirect=["mode"])
@pytest.mark.parametrize("lse_grad", [False, True], ids=["out", "out_lse"])
@pytest.mark.parametrize("name", list(POISON_CASES))
def test_padding_never_leaks(name, lse_grad, device, backend, mode):
    """NaN and inf in keys and values that no query sees change no bit of any result (nor
    dq beyond the rounding of atomics, whose order varies on a GPU), and their gradients are
    zero; the results on clean inputs match float64."""
    case = POISON_CASES[name]
    q, k, v, kwargs = make_inputs(case, torch.float32, device)
    left, right = _window(kwargs)
    j = torch.arange(k.shape[2], device=device)
    first = k.shape[2] - q.shape[2] - left if left >= 0 else 0
    unseen = ((j < first) | (j >= kwargs["kv_lengths"][:, None]))[:, None, :, None]
    assert unseen.any() and not unseen.all()
    poison = torch.full_like(k, float("nan"))
    poison[..., ::3, :] = float("inf")
    poison[..., 1::3, :] = float("-inf")
    dout = torch.randn(q.shape, device=device)
    dlse = torch.randn(q.shape[:3], device=device) if lse_grad else None
    scale = q.shape[-1] ** -0.5

    def attend(q, k, v):
        if backend == "twin":
            return twin.attention_forward(q, k, v, kwargs["kv_lengths"], scale, left, right)
        with attnmem.use_backend(backend):
            return attnmem.attention(q, k, v, **kwargs, return_lse=True)

    clean = run(attend, q, k, v, dout, dlse)
    poisoned = run(attend, q, torch.where(unseen, poison, k), torch.where(unseen, poison, v),
                   dout, dlse)
    for name, c, p in zip(["out", "lse", "dq", "dk", "dv"], [*clean[:2], *clean[2]],
                          [*poisoned[:2], *poisoned[2]]):
        assert not torch.isnan(p).any(), name
        if name == "dq" and mode == "atomic" and device != "cpu":
            torch.testing.assert_close(p, c)
        else:
            assert torch.equal(p, c), name
    for grad in poisoned[2][1:]:
        assert (grad.masked_select(unseen) == 0).all()
    if backend != "twin":
        check_against_float64(q, k, v, kwargs, backend, lse_grad=lse_grad)


EMPTY_SHAPES = {  # (B, H, Hkv, Nq, Nk)
    "no_batch": (0, 2, 2, 5, 7),
    "no_heads": (1, 0, 1, 5, 7),
    "no_queries": (1, 2, 2, 0, 7),
    "no_keys": (1, 2, 1, 5, 0),
}


@pytest.mark.parametrize("device, backend, mode", BACKWARD_TARGETS, indirect=["mode"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out_lse"])
@pytest.mark.parametrize("name", list(EMPTY_SHAPES))
def test_empty_inputs(name, return_lse, masked, device, backend, mode):
    """Zero batch, heads, queries or keys: zeros out, lse -inf, zero gradients, no error."""
    b, h, hkv, n_q, n_k = EMPTY_SHAPES[name]
    q, k, v = (torch.randn(b, heads, n, 8, device=device, requires_grad=True)
               for heads, n in ((h, n_q), (hkv, n_k), (hkv, n_k)))
    kwargs = {}
    if masked:
        kwargs = dict(causal=True, window=(2, None),
                      kv_lengths=torch.full((b,), 3, device=device))
    with attnmem.use_backend(backend):
        result = attnmem.attention(q, k, v, **kwargs, return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    assert out.shape == q.shape and (out == 0).all()
    loss = out.sum()
    if lse is not None:
        assert lse.shape == q.shape[:3] and (lse == float("-inf")).all()
        loss = loss + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    for grad, x in zip(grads, (q, k, v)):
        assert grad is None or (grad.shape == x.shape and (grad == 0).all())


@pytest.mark.parametrize("device, backend", TARGETS)
def test_masks_align_to_the_padded_length(device, backend):
    """The docstring's decoding example: 3 new tokens, a right-padded cache of 401 slots
    holding 15 keys, causal with a window of 128 keys back. The masks align to the 401
    slots, so every window starts past key 269 and no query sees a key. FlashAttention
    aligns to the 15 keys, as attention on the cache sliced to its length does, and there
    query i attends to keys 0 to 12 + i."""
    q = torch.randn(1, 2, 3, 16, device=device)
    k, v = (torch.randn(1, 1, 401, 16, device=device) for _ in range(2))
    lengths = torch.tensor([15], device=device)
    ks, vs = k[:, :, :15], v[:, :, :15]
    with attnmem.use_backend(backend):
        out, lse = attnmem.attention(q, k, v, causal=True, window=(128, 0), kv_lengths=lengths,
                                     return_lse=True)
        assert (out == 0).all() and (lse == float("-inf")).all()
        per_sequence, lse = attnmem.attention(q, ks, vs, causal=True, window=(128, 0),
                                              return_lse=True)
        assert torch.isfinite(lse).all() and (per_sequence != 0).all()
        # Causal alone: here each query sees all 15 keys; aligned to 15, query 0 sees 13.
        padded = attnmem.attention(q, k, v, causal=True, kv_lengths=lengths)
        torch.testing.assert_close(padded, attnmem.attention(q, ks, vs))
        assert not torch.allclose(padded, attnmem.attention(q, ks, vs, causal=True))
        # With neither causal nor window, the two alignments agree.
        torch.testing.assert_close(attnmem.attention(q, k, v, kv_lengths=lengths),
                                   attnmem.attention(q, ks, vs))


LENGTH_FORMS = {
    "strided": lambda: torch.tensor([20, 99, 7, 99])[::2],
    "expanded": lambda: torch.tensor(7).expand(2),
    "past_int32": lambda: torch.tensor([2**32 + 3, 2**31 + 5]),  # both clamp to Nk
    "negative": lambda: torch.tensor([-4, 9]),
    "int32": lambda: torch.tensor([13, 0], dtype=torch.int32),
}


@pytest.mark.parametrize("device, backend, mode", BACKWARD_TARGETS, indirect=["mode"])
@pytest.mark.parametrize("form", list(LENGTH_FORMS))
def test_kv_lengths_forms(form, device, backend, mode):
    q, k, v, kwargs = make_inputs((2, 2, 1, 13, 20, 16, True, None, None), torch.float32,
                                  device)
    kwargs["kv_lengths"] = LENGTH_FORMS[form]().to(device)
    check_against_float64(q, k, v, kwargs, backend)


def test_autotuning_results_persist(monkeypatch):
    """The launcher asks triton to keep tuning results on disk where triton can (3.9 can);
    built here without a GPU, so only its construction is checked."""
    import functools
    import inspect

    triton = pytest.importorskip("triton")
    from attnmem.kernels import attention as kernel

    options = {}
    real_autotune = triton.autotune

    @functools.wraps(real_autotune)
    def spy(*args, **kwargs):
        options.update(kwargs)
        return real_autotune(*args, **kwargs)

    monkeypatch.setattr(kernel, "_autotuned", {})
    monkeypatch.setattr(kernel, "_smem_limit", lambda device: kernel.SMEM_LIMIT[90])
    monkeypatch.setattr(triton, "autotune", spy)
    tuned = kernel._launcher("fwd", kernel._attn_fwd, "cuda", 64, 2)
    assert len(tuned.configs) == len(kernel.configs_for("fwd", 64, 2, kernel.SMEM_LIMIT[90]))
    has_option = "cache_results" in inspect.signature(real_autotune).parameters
    assert options.get("cache_results") is (True if has_option else None)


def test_atomic_backward_autotunes_from_zeroed_dq(monkeypatch):
    """Every benchmarked launch of the atomic dK/dV kernel adds into dq: the tuner zeroes it
    before each, and tunes the two variants apart. Built here without a GPU."""
    pytest.importorskip("triton")
    from attnmem.kernels import attention as kernel

    monkeypatch.setattr(kernel, "_autotuned", {})
    monkeypatch.setattr(kernel, "_smem_limit", lambda device: kernel.SMEM_LIMIT[90])
    tuned = kernel._launcher("dkdv", kernel._attn_bwd_dkdv, "cuda", 128, 2)
    assert tuned.reset_to_zero == ["dq_ptr"] and "ATOMIC_DQ" in tuned.keys
    assert kernel._launcher("dq", kernel._attn_bwd_dq, "cuda", 128, 2).reset_to_zero == []
