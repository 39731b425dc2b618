"""attnmem.attention_varlen against float64 attention computed one sequence at a time: out,
lse and every gradient, on both backends (the triton backward in both modes), with empty
sequences, GQA, causal masks where a sequence has more or fewer queries than keys, and
windows; neighbours' rows never leak into a sequence; bad input raises naming the argument;
the custom ops pass opcheck and trace under torch.compile; the VARLEN kernels compile for
sm_90 with wgmma and no spills.

Tolerance as tests/test_attention.py: at most twice the error of torch's own attention in
the input dtype, plus a few rounding units (tests/tolerance.py).
"""

import re

import pytest
import test_attention_dropout
import test_attention_scoremods
import torch
from test_attention import _window, naive, run

import attnmem
from attnmem import varlen
from attnmem.reference import attention as twin
from backends import BACKENDS, DEVICE, DTYPE_IDS, DTYPES
from tolerance import ATOL, assert_close_to_float64

pytestmark = pytest.mark.usefixtures("poison_empty")

# name: (H, Hkv, D, query lengths, key lengths, causal, window). Under the interpreter the
# kernels run 16 x 16 tiles: sequences end inside tiles and span several.
CASES = {
    # Empty query and key sequences; more queries than keys (the first see nothing) and fewer.
    "causal_gqa": (4, 2, 24, [5, 0, 19, 1], [9, 3, 17, 0], True, None),
    # 32 queries in all, whole tiles: the forward still bounds each sequence's rows.
    "window": (2, 2, 40, [13, 7, 12], [20, 7, 3], False, (3, 2)),
    "causal_window_mqa": (3, 1, 3, [1, 30, 8], [30, 1, 8], True, (4, None)),
}


def _targets():
    """(backend, deterministic): the triton backward in both modes."""
    out = []
    for backend in BACKENDS:
        modes = [False, True] if backend == "triton" else [None]
        out += [pytest.param(backend, mode, id=backend + {None: "", False: "-atomic",
                                                          True: "-deterministic"}[mode])
                for mode in modes]
    return out


TARGETS = _targets()


@pytest.fixture
def deterministic(request):
    """The triton backward's mode (None: the torch backend), through torch's switch, which
    the poison_empty fixture turns on and off again."""
    torch.use_deterministic_algorithms(request.param is not False)
    return request.param


def cu_seqlens(lengths):
    return torch.tensor([0, *lengths]).cumsum(0).to(DEVICE, torch.int32)


def make_inputs(case, dtype):
    heads, kv_heads, dim, lengths_q, lengths_k, causal, window = case
    q = torch.randn(sum(lengths_q), heads, dim).to(DEVICE, dtype)
    k, v = (torch.randn(sum(lengths_k), kv_heads, dim).to(DEVICE, dtype) for _ in range(2))
    args = (cu_seqlens(lengths_q), cu_seqlens(lengths_k), max(lengths_q), max(lengths_k))
    return q, k, v, args, dict(causal=causal, window=window)


def per_sequence(fn, q, k, v, cu_seqlens_q, cu_seqlens_k):
    """fn(q, k, v) -> (out, lse) on dense (1, H, N, D) batches, run on each sequence and
    packed: out (total_q, H, D), lse (H, total_q)."""
    return each_sequence(lambda q, k, v, b: fn(q, k, v), q, k, v, cu_seqlens_q, cu_seqlens_k)


def each_sequence(fn, q, k, v, cu_seqlens_q, cu_seqlens_k):
    """per_sequence for fn(q, k, v, b), b the sequence's index."""
    outs, lses = [], []
    for b, (rows_q, rows_k) in enumerate(varlen._sequences(cu_seqlens_q, cu_seqlens_k)):
        out, lse = fn(*(x.transpose(0, 1)[None] for x in (q[rows_q], k[rows_k], v[rows_k])), b)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, 1)


def check_against_float64(q, k, v, args, kwargs, backend):
    scale = q.shape[-1] ** -0.5
    left, right = (-1 if x is None else x for x in kwargs["window"] or (None, None))
    if kwargs["causal"]:
        right = 0 if right < 0 else min(right, 0)
    dense = dict(kwargs, kv_lengths=None)
    dout = torch.randn(q.shape, device=DEVICE).to(q.dtype)
    dlse = torch.randn(q.shape[1], q.shape[0], device=DEVICE)

    def twin_fn(q, k, v):
        return twin.attention_forward(q, k, v, None, scale, left, right)

    ref = run(lambda *x: per_sequence(twin_fn, *x, *args[:2]), q.double(), k.double(),
              v.double(), dout.double(), dlse.double())
    base = run(lambda *x: per_sequence(lambda *y: naive(*y, dense, scale), *x, *args[:2]),
               q, k, v, dout, dlse)
    with attnmem.use_backend(backend):
        ours = run(lambda *x: attnmem.attention_varlen(*x, *args, **kwargs, return_lse=True),
                   q, k, v, dout, dlse)
    # Queries that see no key: zero output, lse -inf, zero dq; lse compared where finite.
    unseen = torch.isinf(ref[1])
    assert torch.equal(torch.isinf(ours[1]), unseen) and (ours[1][unseen] < 0).all()
    assert (ours[0].transpose(0, 1)[unseen] == 0).all()
    assert (ours[2][0].transpose(0, 1)[unseen] == 0).all()
    finite = [r[1].masked_fill(unseen, 0.0) for r in (ours, base, ref)]
    assert_close_to_float64(finite[:1], finite[2:], finite[1:2], torch.float32)
    assert_close_to_float64([ours[0], *ours[2]], [ref[0], *ref[2]], [base[0], *base[2]],
                            q.dtype)


@pytest.mark.parametrize("backend, deterministic", TARGETS, indirect=["deterministic"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, backend, deterministic):
    check_against_float64(*make_inputs(CASES[name], torch.float32), backend)


@pytest.mark.parametrize("backend, deterministic", TARGETS, indirect=["deterministic"])
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_16bit_matches_float64(dtype, backend, deterministic):
    if dtype == torch.bfloat16 and backend == "triton" and DEVICE == "cpu":
        pytest.skip("the interpreter's tl.dot is wrong on bfloat16 (triton issue 11584)")
    check_against_float64(*make_inputs(CASES["causal_gqa"], dtype), backend)


@pytest.mark.parametrize("backend, deterministic", TARGETS, indirect=["deterministic"])
def test_neighbours_never_leak(backend, deterministic):
    """NaN and inf in one sequence's queries, keys and values change no bit of the other
    sequences' outputs and gradients (nor dq beyond the rounding of atomics, whose order
    varies on a GPU), though tiles span the sequences' boundaries."""
    q, k, v, args, kwargs = make_inputs(CASES["window"], torch.float32)
    rows_q, rows_k = varlen._sequences(*args[:2])[1]
    dout, dlse = torch.randn_like(q), torch.randn(q.shape[1], q.shape[0], device=DEVICE)

    def attend(q, k, v):
        with attnmem.use_backend(backend):
            return attnmem.attention_varlen(q, k, v, *args, **kwargs, return_lse=True)

    def poisoned(x, rows):
        x = x.clone()
        x[rows] = float("nan")
        x[rows][::3] = float("inf")
        return x

    clean = run(attend, q, k, v, dout, dlse)
    dirty = run(attend, poisoned(q, rows_q), poisoned(k, rows_k), poisoned(v, rows_k), dout,
                dlse)
    others_q = torch.ones(q.shape[0], dtype=torch.bool, device=DEVICE)
    others_q[rows_q] = False
    others_k = torch.ones(k.shape[0], dtype=torch.bool, device=DEVICE)
    others_k[rows_k] = False
    for name, c, d, rows in [("out", clean[0], dirty[0], others_q),
                             ("lse", clean[1].T, dirty[1].T, others_q),
                             *zip(["dq", "dk", "dv"], clean[2], dirty[2],
                                  [others_q, others_k, others_k])]:
        assert not torch.isnan(d[rows]).any(), name
        if name == "dq" and backend == "triton" and not deterministic and DEVICE == "cuda":
            torch.testing.assert_close(d[rows], c[rows])
        else:
            assert torch.equal(d[rows], c[rows]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [([], []), ([0, 0], [3, 2]), ([2, 3], [0, 0])],
                         ids=["no_sequence", "no_queries", "no_keys"])
def test_empty(lengths, backend):
    """No sequence, no query or no key: zeros out, lse -inf, zero gradients, no error."""
    lengths_q, lengths_k = lengths
    q, k, v = (torch.randn(sum(n), heads, 8, device=DEVICE, requires_grad=True)
               for n, heads in ((lengths_q, 2), (lengths_k, 1), (lengths_k, 1)))
    args = (cu_seqlens(lengths_q), cu_seqlens(lengths_k), max(lengths_q, default=0),
            max(lengths_k, default=0))
    with attnmem.use_backend(backend):
        out, lse = attnmem.attention_varlen(q, k, v, *args, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, q.shape[0])
    assert (out == 0).all() and (lse == float("-inf")).all()
    grads = torch.autograd.grad(out.sum() + lse.masked_fill(lse.isinf(), 0).sum(), (q, k, v),
                                allow_unused=True)
    assert all(g is None or (g == 0).all() for g in grads)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"],
                         indirect=True)
def test_grid_spans_the_longest_sequence(deterministic, monkeypatch):
    """Each kernel's grid: tiles of the longest sequence, by heads, by sequences (a dense
    launch over the batch padded would run ceil(max / tile) tiles all the same, but its
    tiles past a sequence's end would compute)."""
    from attnmem.kernels import attention as kernel

    launches = []
    real_run = kernel._run

    def spy(name, fn, grid, args, meta, *rest, **options):
        launches.append((name, grid(16, 32), meta["VARLEN"]))
        return real_run(name, fn, grid, args, meta, *rest, **options)

    monkeypatch.setattr(kernel, "_run", spy)
    q, k, v, args, kwargs = make_inputs(CASES["causal_window_mqa"], torch.float32)
    with attnmem.use_backend("triton"):
        attnmem.attention_varlen(q.requires_grad_(), k, v, *args, **kwargs).sum().backward()
    # 3 sequences, 3 query heads of 1 kv head, at most 30 queries and 30 keys.
    expect = [("fwd", (2, 3, 3), True), ("dkdv", (1, 1, 3), True)]
    assert launches == expect + ([("dq", (2, 3, 3), True)] if deterministic else [])


@pytest.mark.skipif(DEVICE != "cpu" or "triton" not in BACKENDS,
                    reason="drives the kernels through the interpreter")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_kernel_tiles_larger_than_sequences(deterministic):
    """64-query, 32-key tiles: most sequences end inside their first tile. Both backward
    modes, chosen by the kernel's own switch, so torch keeps poisoning."""
    from attnmem.kernels import attention as kernel

    q, k, v, args, _ = make_inputs(CASES["causal_gqa"], torch.float32)
    scale, config = 0.3, (64, 32, 1, 1)
    out, lse = kernel.attention_varlen_forward(q, k, v, *args, scale, -1, 0, config=config)
    dout = torch.randn_like(out)
    grads = kernel.attention_varlen_backward(dout, q, k, v, out, lse, None, *args, scale, -1,
                                             0, config=config, deterministic=deterministic)

    def twin_fn(q, k, v):
        return twin.attention_forward(q, k, v, None, scale, -1, 0)

    ref = run(lambda *x: per_sequence(twin_fn, *x, *args[:2]), q.double(), k.double(),
              v.double(), dout.double(), None)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref[0], **tol)
    torch.testing.assert_close(lse.double(), ref[1], **tol)
    for got, expect in zip(grads, ref[2]):
        torch.testing.assert_close(got.double(), expect, **tol)


def test_torch_backend_runs_attention_per_sequence(monkeypatch):
    """The torch backend calls attnmem.attention's ops once a sequence, forward and
    backward, so torch's fused CPU kernel runs where that op would run it."""
    calls = []
    for first, name in enumerate(("_attention_forward", "_attention_backward")):
        real = getattr(varlen, name)  # its q comes first, after dout in the backward
        monkeypatch.setattr(varlen, name, lambda *a, real=real, name=name, first=first, **kw: (
            calls.append((name, a[first].shape[2], a[first + 1].shape[2])), real(*a, **kw))[1])
    q, k, v, args, kwargs = make_inputs(CASES["window"], torch.float32)
    with attnmem.use_backend("torch"):
        attnmem.attention_varlen(q.requires_grad_(), k, v, *args, **kwargs).sum().backward()
    sizes = [(13, 20), (7, 7), (12, 3)]
    assert calls == ([("_attention_forward", *s) for s in sizes]
                     + [("_attention_backward", *s) for s in sizes])


# ---------------------------------------------------------------------------------------
# Score modifications and dropout
# ---------------------------------------------------------------------------------------

# name: (case as CASES, softcap, sinks, ALiBi slopes' shape: "h" (H,), "bh" (B, H) or None)
MOD_CASES = {
    # Empty sequences (sinks alone there), more queries than keys, GQA.
    "softcap_sinks_alibi_h": (CASES["causal_gqa"], 2.0, True, "h"),
    "alibi_bh_window": (CASES["window"], None, False, "bh"),
}


def make_mods(case, softcap, sinks, alibi):
    heads, batch = case[0], len(case[3])
    return dict(softcap=softcap,
                sinks=torch.randn(heads, device=DEVICE) * 2 if sinks else None,
                alibi_slopes=None if alibi is None else
                torch.rand((heads,) if alibi == "h" else (batch, heads), device=DEVICE))


def compare(ours, base, ref, dtype):
    """flash-attention's rule on every output, where the float64 one is finite; infinities
    (lse of queries that see no key and no sink) must match."""
    for what, o, b, r in zip(["out", "lse", "dq", "dk", "dv", "dsinks"], ours, base, ref):
        assert o.shape == r.shape, what
        assert not torch.isnan(o).any(), f"{what} has NaN"
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(o), finite), f"{what}: infinities differ"
        err = (o.double() - r)[finite].abs().max().item()
        base_err = (b.double() - r)[finite].abs().max().item()
        atol = ATOL[dtype] * max(1.0, r[finite].abs().max().item())
        assert err <= 2 * base_err + atol, f"{what}: error {err:.3g}, torch's {base_err:.3g}"


@pytest.mark.parametrize("backend, deterministic", TARGETS, indirect=["deterministic"])
@pytest.mark.parametrize("name", list(MOD_CASES))
def test_score_mods_match_float64(name, backend, deterministic):
    """softcap, sinks (and their gradient) and ALiBi (H,) and (B, H) against float64
    attention run one sequence at a time, each sequence's ALiBi distance from its own end."""
    case, *mod_args = MOD_CASES[name]
    q, k, v, args, kwargs = make_inputs(case, torch.float32)
    mods = make_mods(case, *mod_args)
    softcap, sinks, slopes = mods["softcap"], mods["sinks"], mods["alibi_slopes"]
    scale = q.shape[-1] ** -0.5
    left, right = _window(kwargs)
    dense = dict(kwargs, kv_lengths=None)
    dout = torch.randn(q.shape, device=DEVICE)
    dlse = torch.randn(q.shape[1], q.shape[0], device=DEVICE)

    def twin_fn(q, k, v, s, a):
        return twin.attention_forward(q, k, v, None, scale, left, right, softcap or 0.0, s,
                                      None if a is None else a.double())

    def packed(fn):
        """fn(q, k, v, sinks, slopes) per sequence, with sequence b's row of (B, H) slopes."""
        return lambda q, k, v, s: each_sequence(
            lambda q, k, v, b: fn(q, k, v, s, slopes if slopes is None or slopes.ndim == 1
                                  else slopes[b:b + 1]), q, k, v, *args[:2])

    ref = test_attention_scoremods.run(packed(twin_fn), q.double(), k.double(), v.double(),
                                       None if sinks is None else sinks.double(),
                                       dout.double(), dlse.double())
    base = test_attention_scoremods.run(
        packed(lambda q, k, v, s, a: test_attention_scoremods.naive(q, k, v, s, dense, scale,
                                                                    softcap, a)),
        q, k, v, sinks, dout, dlse)
    with attnmem.use_backend(backend):
        ours = test_attention_scoremods.run(
            lambda q, k, v, s: attnmem.attention_varlen(q, k, v, *args, **kwargs, **dict(
                mods, sinks=s), return_lse=True),
            q, k, v, sinks, dout, dlse)
    compare(ours, base, ref, torch.float32)
    if sinks is not None:  # queries that see no key: zero output, all weight on the sink
        unseen = ~torch.isfinite(per_sequence(lambda *x: twin.attention_forward(
            *x, None, scale, left, right), q, k, v, *args[:2])[1])
        assert unseen.any() and (ours[0].transpose(0, 1)[unseen] == 0).all()
        torch.testing.assert_close(ours[1][unseen],
                                   sinks[:, None].expand(unseen.shape)[unseen])


@pytest.mark.parametrize("backend, deterministic", TARGETS, indirect=["deterministic"])
def test_dropout_matches_float64_with_the_same_mask(backend, deterministic):
    """Dropout against float64 run with the mask the backend applied (varlen.dropout_mask
    reads it back), sequence by sequence; the same generator state gives the same output."""
    q, k, v, args, kwargs = make_inputs(CASES["causal_gqa"], torch.float32)
    p, scale = 0.3, q.shape[-1] ** -0.5
    left, right = _window(kwargs)
    dense = dict(kwargs, kv_lengths=None)
    dout = torch.randn(q.shape, device=DEVICE)
    dlse = torch.randn(q.shape[1], q.shape[0], device=DEVICE)

    def attend(q, k, v):
        return attnmem.attention_varlen(q, k, v, *args, **kwargs, return_lse=True, dropout_p=p,
                                        generator=test_attention_dropout.with_seed(5))

    with attnmem.use_backend(backend):
        keep = varlen.dropout_mask(q, k, *args, p, test_attention_dropout.with_seed(5))
        ours = run(attend, q, k, v, dout, dlse)
        again = run(attend, q, k, v, dout, dlse)
    for a, b in zip([*ours[:2], *ours[2]], [*again[:2], *again[2]]):
        assert torch.equal(a, b)

    def sequence_by_sequence(fn):
        """fn(q, k, v, mask) per sequence, with sequence b's mask."""
        return lambda q, k, v: each_sequence(
            lambda q, k, v, b: fn(q, k, v, keep[b:b + 1, :, :q.shape[2], :k.shape[2]]),
            q, k, v, *args[:2])

    ref = run(sequence_by_sequence(lambda q, k, v, m: twin.attention_forward(
        q, k, v, None, scale, left, right, dropout_p=p, dropout_mask=m)),
        q.double(), k.double(), v.double(), dout.double(), dlse.double())
    base = run(sequence_by_sequence(lambda q, k, v, m: test_attention_dropout.naive(
        q, k, v, dense, scale, m, p)), q, k, v, dout, dlse)
    compare([*ours[:2], *ours[2]], [*base[:2], *base[2]], [*ref[:2], *ref[2]], torch.float32)
    # The mask drops some weights and keeps most, and sequences draw their own: the same
    # rows and keys of two sequences differ.
    kept = keep[0, 0, :5, :9]
    assert 0.5 < keep[0, :, :5, :9].float().mean() < 0.9
    assert not torch.equal(kept, keep[2, 0, :5, :9])


def _good():
    q = torch.randn(9, 4, 8, device=DEVICE)
    k, v = (torch.randn(7, 2, 8, device=DEVICE) for _ in range(2))
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens([4, 5]), cu_seqlens_k=cu_seqlens([7, 0]),
                max_seqlen_q=5, max_seqlen_k=7)


def _cu(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


# name: (changes to _good(), error, words of the message)
ERRORS = {
    "q_4d": (dict(q=torch.randn(1, 9, 4, 8, device=DEVICE)), ValueError,
             "q must be (total_q, H, D)"),
    "k_dtype": (dict(k=torch.randn(7, 2, 8, dtype=torch.float64, device=DEVICE)), TypeError,
                "k must have q's dtype"),
    "v_shape": (dict(v=torch.randn(6, 2, 8, device=DEVICE)), ValueError,
                "v must have k's shape"),
    "heads": (dict(k=torch.randn(7, 3, 8, device=DEVICE), v=torch.randn(7, 3, 8, device=DEVICE)),
              ValueError, "k has 3 heads"),
    "cu_not_tensor": (dict(cu_seqlens_k=[0, 7, 7]), TypeError,
                      "cu_seqlens_k must be a torch.Tensor"),
    "cu_int64": (dict(cu_seqlens_q=torch.tensor([0, 4, 9], device=DEVICE)), TypeError,
                 "cu_seqlens_q must be int32"),
    "cu_2d": (dict(cu_seqlens_q=_cu(0, 4, 9)[None]), ValueError, "cu_seqlens_q must be (B + 1,)"),
    "cu_batch": (dict(cu_seqlens_k=_cu(0, 7)), ValueError,
                 "cu_seqlens_k must have cu_seqlens_q's shape"),
    "cu_device": (dict(cu_seqlens_k=_cu(0, 7, 7).to("meta")), ValueError,
                  "cu_seqlens_k is on meta"),
    "cu_start": (dict(cu_seqlens_q=_cu(1, 4, 9)), ValueError, "cu_seqlens_q must start at 0"),
    "cu_decreasing": (dict(cu_seqlens_k=_cu(0, 7, 6)), ValueError,
                      "cu_seqlens_k must be nondecreasing, but cu_seqlens_k[2] = 6"),
    "cu_end": (dict(cu_seqlens_q=_cu(0, 4, 8)), ValueError,
               "cu_seqlens_q must end at the 9 packed rows"),
    "max_short": (dict(cu_seqlens_q=_cu(0, 2, 9), max_seqlen_q=6), ValueError,
                  "max_seqlen_q = 6 is less than the longest sequence in cu_seqlens_q, 7"),
    "max_total": (dict(max_seqlen_k=3), ValueError, "max_seqlen_k = 3 cannot hold 7 rows"),
    "max_float": (dict(max_seqlen_k=7.0), TypeError, "max_seqlen_k must be an int"),
    "max_negative": (dict(max_seqlen_q=-1), ValueError, "max_seqlen_q must be an int >= 0"),
    "causal": (dict(causal=1), TypeError, "causal must be a bool"),
    "window": (dict(window=(2,)), ValueError, "window must be a pair"),
    "scale": (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
    "softcap": (dict(softcap=-1.0), ValueError, "softcap must be a finite number > 0"),
    "sinks_shape": (dict(sinks=torch.zeros(2, device=DEVICE)), ValueError,
                    "sinks must be (H,) = (4,)"),
    "sinks_dtype": (dict(sinks=torch.zeros(4, dtype=torch.int32, device=DEVICE)), TypeError,
                    "sinks must be a floating-point tensor"),
    "alibi_shape": (dict(alibi_slopes=torch.zeros(3, 4, device=DEVICE)), ValueError,
                    "alibi_slopes must be (H,) = (4,) or (B, H) = (2, 4)"),
    "alibi_grad": (dict(alibi_slopes=torch.zeros(4, device=DEVICE, requires_grad=True)),
                   ValueError, "alibi_slopes get no gradient"),
    "dropout_p": (dict(dropout_p=1.5), ValueError, "dropout_p must be a number in [0, 1]"),
    "generator": (dict(dropout_p=0.1, generator=3), TypeError,
                  "generator must be a torch.Generator"),
}


# The lengths' values, checked on CPU tensors only (attention_varlen's docstring: on CUDA,
# reading them would stall the host).
CPU_ONLY = {"cu_start", "cu_decreasing", "cu_end", "max_short"}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_name_the_argument(name):
    if name in CPU_ONLY and DEVICE != "cpu":
        pytest.skip("cu_seqlens' values are checked on CPU tensors only")
    changes, error, words = ERRORS[name]
    args = {**_good(), **changes}
    with pytest.raises(error, match=re.escape(words)):
        attnmem.attention_varlen(**args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modified", [False, True], ids=["plain", "mods_dropout"])
def test_opcheck(backend, modified):
    """The custom ops' schemas, fakes, autograd registration and dispatch, plain and with
    softcap, sinks, (B, H) ALiBi slopes and dropout; for the triton backend, the checks that
    its outputs have the fakes' shapes, strides and dtypes."""
    args = _good()
    q, k, v = (args[x].requires_grad_() for x in "qkv")
    lengths = (args["cu_seqlens_q"], args["cu_seqlens_k"], 5, 7)
    mods = ()
    if modified:
        mods = (1.5, torch.randn(4, device=DEVICE, requires_grad=True),
                torch.rand(2, 4, device=DEVICE), 0.2, torch.tensor([123], device=DEVICE))
    checks = {} if backend == "torch" else dict(test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(varlen._varlen_forward.default,
                          (q, k, v, *lengths, 0.3, 2, 0, backend, *mods), **checks)
    out, lse = varlen._varlen_forward(q, k, v, *lengths, 0.3, 2, 0, backend, *mods)
    torch.library.opcheck(varlen._varlen_backward.default, (
        torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
        torch.randn_like(lse), *lengths, 0.3, 2, 0, backend,
        *(x.detach() if isinstance(x, torch.Tensor) else x for x in mods)), **checks)


def test_traces_under_torch_compile():
    """Forward and backward under torch.compile(fullgraph=True), through the fake kernels,
    with softcap, sinks and ALiBi slopes (and their gradients: the sinks' too)."""
    args = _good()
    q, k, v = (args.pop(x).requires_grad_() for x in "qkv")
    sinks = torch.randn(4, device=DEVICE, requires_grad=True)
    mods = dict(softcap=2.0, sinks=sinks, alibi_slopes=torch.rand(4, device=DEVICE))
    expect = attnmem.attention_varlen(q, k, v, **args, causal=True, **mods)
    grads = torch.autograd.grad(expect.sum(), (q, k, v, sinks))
    fn = torch.compile(attnmem.attention_varlen, backend="aot_eager", fullgraph=True)
    got = fn(q, k, v, **args, causal=True, **mods)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    for g, e in zip(torch.autograd.grad(got.sum(), (q, k, v, sinks)), grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Compiled for sm_90 (no GPU needed; see tests/aot.py)
# ---------------------------------------------------------------------------------------


def _varlen_job(name, config, flags=(), **options):
    """test_attention_targets' job for a kernel, with VARLEN on (float16, head dim 128) and
    the score modifications' `flags`, expecting wgmma and no spill
    (tests/test_triton_versions.py checks it on the GPU machines' triton too), and TMA from
    the forward's TMA configs."""
    from test_attention_targets import expecting, job

    spec = job(name, 90, "float16", 128, config, **options)
    constexprs = dict(spec["constexprs"], HAS_KV_LENGTHS=False, VARLEN=True,
                      **dict.fromkeys(flags, True))
    if name == "fwd":
        constexprs.update(MASK_KEYS=True, EVEN_M=False)
    pointers = dict(spec["pointers"], cu_seqlens_q_ptr="i32", cu_seqlens_k_ptr="i32",
                    **{f"{flag.removeprefix('HAS_').lower()}_ptr": "fp32" for flag in flags
                       if flag != "SOFTCAP"})
    return expecting({**spec, "constexprs": constexprs, "pointers": pointers}, wgmma=True,
                     spill_stores=0, spill_loads=0, tma="USE_TMA" in config)


def _compile_cases():
    """The first sm_90 config of each kernel at head dim 128 (the forward's first that a
    masked call runs: it loads through TMA); dK/dV atomic and deterministic; the forward
    with softcap, sinks and ALiBi."""
    from attnmem.kernels import attention as kernel

    def first(name, **options):
        return next(c for c in kernel.configs_for(name, 128, 2, kernel.SMEM_LIMIT[90], 90,
                                                  **options) if "WARP_SPECIALIZE" not in c)

    return {"fwd": _varlen_job("fwd", first("fwd", tma=True)),
            "fwd-mods": _varlen_job("fwd", first("fwd", tma=True),
                                    ("SOFTCAP", "HAS_SINKS", "HAS_ALIBI")),
            "dkdv": _varlen_job("dkdv", first("dkdv")),
            "dkdv-det": _varlen_job("dkdv", first("dkdv"), atomic_dq=False),
            "dq": _varlen_job("dq", first("dq"))}


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    from aot import compile_all

    cases = _compile_cases()
    return dict(zip(cases, compile_all(list(cases.values()))))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fwd", "fwd-mods", "dkdv", "dkdv-det", "dq"])
def test_sm90_varlen_kernels_use_wgmma_and_spill_no_register(compiled, case):
    result, expect = compiled[case], _compile_cases()[case]["expect"]
    assert result["error"] is None, result["error"]
    assert expect["tma"] == case.startswith("fwd")
    assert {k: result[k] for k in expect} == expect, f"{result['registers']} registers"
