"""attnmem.attention's contract: named errors for bad input, backend choice, torch.library."""

import os

import numpy as np
import pytest
import torch

import attnmem
from attnmem import backend

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def qkv(b=2, h=4, hkv=2, nq=5, nk=7, d=8, dtype=torch.float32):
    return (torch.randn(b, h, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, d, dtype=dtype))


def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return args


BAD_INPUTS = [
    ("q must be a torch.Tensor", lambda q, k, v: ((q.tolist(), k, v), {})),
    ("q must be \\(B, H, Nq, D\\)", lambda q, k, v: ((q[0], k, v), {})),
    ("k must be \\(B, Hkv, Nk, D\\)", lambda q, k, v: ((q, k[0], v), {})),
    ("k has batch 1 but q has batch 2", lambda q, k, v: ((q, k[:1], v[:1]), {})),
    ("k has head dim 4 but q has head dim 8", lambda q, k, v: ((q, k[..., :4], v[..., :4]), {})),
    ("v must have k's shape", lambda q, k, v: ((q, k, v[:, :, :3]), {})),
    ("k has 3 heads, which must divide q's 4", lambda q, k, v: (
        (q, torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)), {})),
    ("k must have q's dtype", lambda q, k, v: ((q, k.double(), v), {})),
    ("v must have q's dtype", lambda q, k, v: ((q, k, v.half()), {})),
    ("q must be float16, bfloat16, float32 or float64", lambda q, k, v: (
        (q.int(), k.int(), v.int()), {})),
    ("causal must be a bool", lambda q, k, v: ((q, k, v), {"causal": 1})),
    ("scale must be a finite number", lambda q, k, v: ((q, k, v), {"scale": float("nan")})),
    ("scale must be a finite number", lambda q, k, v: ((q, k, v), {"scale": "0.5"})),
    ("scale must be a finite number", lambda q, k, v: ((q, k, v), {"scale": torch.tensor(0.5)})),
    # The kernels multiply scale by log2(e) in float32 (float64 for float64 inputs).
    ("scale 1e\\+39 overflows the torch.float32 computation", lambda q, k, v: (
        (q, k, v), {"scale": 1e39})),
    ("scale -3e\\+38 overflows the torch.float32 computation", lambda q, k, v: (
        (q.half(), k.half(), v.half()), {"scale": np.float64(-3e38)})),
    ("scale 1.5e\\+308 overflows the torch.float64 computation", lambda q, k, v: (
        (q.double(), k.double(), v.double()), {"scale": 1.5e308})),
    ("return_lse must be a bool", lambda q, k, v: ((q, k, v), {"return_lse": 1})),
    ("kv_lengths must be a tensor", lambda q, k, v: ((q, k, v), {"kv_lengths": [3, 4]})),
    ("kv_lengths must be an integer tensor", lambda q, k, v: (
        (q, k, v), {"kv_lengths": torch.tensor([3.0, 4.0])})),
    ("kv_lengths must have shape \\(B,\\) = \\(2,\\)", lambda q, k, v: (
        (q, k, v), {"kv_lengths": torch.tensor([3, 4, 5])})),
    ("window must be a pair", lambda q, k, v: ((q, k, v), {"window": 3})),
    ("window left must be an int >= 0", lambda q, k, v: ((q, k, v), {"window": (-2, 0)})),
    ("window right must be an int >= 0", lambda q, k, v: ((q, k, v), {"window": (1, 2.5)})),
    ("window left must be an int >= 0", lambda q, k, v: ((q, k, v), {"window": (True, 0)})),
    ("window left must be an int >= 0", lambda q, k, v: (
        (q, k, v), {"window": (np.float64(2.0), 0)})),
    ("window right must be an int >= 0", lambda q, k, v: (
        (q, k, v), {"window": (0, np.int64(-3))})),
]


@pytest.mark.parametrize("message, make", BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_input_raises_a_named_error(message, make):
    args, kwargs = make(*qkv())
    with pytest.raises((ValueError, TypeError), match=message):
        attnmem.attention(*args, **kwargs)


def test_numpy_numbers_and_huge_windows_are_accepted():
    q, k, v = qkv(nq=9, nk=12)
    expect = attnmem.attention(q, k, v, window=(3, 2), scale=0.5)
    for left, right, scale in [(np.int64(3), np.int32(2), np.float64(0.5)),
                               (np.int16(3), np.uint8(2), np.float32(0.5))]:
        got = attnmem.attention(q, k, v, window=(left, right), scale=scale)
        torch.testing.assert_close(got, expect)
    # A side at least as wide as the keys is unbounded, however large the int.
    torch.testing.assert_close(attnmem.attention(q, k, v, window=(2**70, np.int64(2**62))),
                               attnmem.attention(q, k, v))
    wide = attnmem.attention(q.double(), k.double(), v.double(), scale=1e100)
    assert not torch.isnan(wide).any()


def test_backend_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with attnmem.use_backend("cuda"):
            pass
    monkeypatch.setenv("ATTNMEM_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        attnmem.attention(*qkv())


def test_backend_choice(monkeypatch):
    q, k, v = qkv()
    reasons = []
    # auto keeps CPU tensors on torch even where the interpreter could run triton.
    assert backend.resolve("auto", (q, k, v), reasons, "attention") == "torch"
    assert backend.resolve("torch", (q, k, v), ["anything"], "attention") == "torch"
    meta = [x.to("meta") for x in (q, k, v)]
    with pytest.raises(RuntimeError, match="inputs are on meta: triton runs on CUDA devices"):
        backend.resolve("triton", meta, reasons, "attention")
    monkeypatch.setenv("ATTNMEM_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="attnmem.attention: the triton backend cannot run"):
        attnmem.attention(*qkv(dtype=torch.float64))
    with attnmem.use_backend("torch"):  # the context manager wins over the variable
        attnmem.attention(q, k, v)


@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter for CPU tensors")
def test_triton_backend_says_what_it_lacks():
    q, k, v = qkv(dtype=torch.float64)
    with attnmem.use_backend("triton"), pytest.raises(RuntimeError, match="dtype torch.float64"):
        attnmem.attention(q, k, v)
    q, k, v = qkv(d=320)
    with attnmem.use_backend("triton"), pytest.raises(RuntimeError, match="head dim 320 > 256"):
        attnmem.attention(q, k, v)
    with attnmem.use_backend("auto"):  # auto falls back instead
        assert attnmem.attention(q, k, v).shape == q.shape


@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter for CPU tensors")
def test_batches_past_the_launch_grid_are_refused():
    """Heads and batch entries (packed sequences) are launch-grid axes, which CUDA caps at
    65535: the triton backend says so (auto, on CUDA, runs the torch backend instead)."""
    q, k, v = qkv(b=65536, h=1, hkv=1, nq=1, nk=1)
    with attnmem.use_backend("triton"), pytest.raises(RuntimeError, match="65536 batch entries"):
        attnmem.attention(q, k, v)
    cu = torch.arange(65537, dtype=torch.int32)
    packed = [x[:, :, 0].transpose(0, 1).reshape(65536, 1, 8) for x in (q, k, v)]
    with attnmem.use_backend("triton"), pytest.raises(RuntimeError, match="65536 batch entries"):
        attnmem.attention_varlen(*packed, cu, cu, 1, 1)
    q, k, v = qkv(b=1, h=65536, hkv=1, nq=1, nk=1)
    with attnmem.use_backend("triton"), pytest.raises(RuntimeError, match="65536 heads"):
        attnmem.attention(q, k, v)


@pytest.mark.parametrize("name", ["torch"] + (["triton"] if INTERPRET else []))
def test_opcheck(name):
    from attnmem.attention import _attention_backward, _attention_forward

    q, k, v = (x.requires_grad_() for x in qkv(nq=17, nk=20))
    lengths = torch.tensor([20, 11])
    fwd_args = (q, k, v, lengths, 0.35, 4, 0, name)
    torch.library.opcheck(_attention_forward.default, fwd_args)
    out, lse = _attention_forward(*fwd_args)
    for dlse in (torch.randn_like(lse), None):  # None: the fused CPU backward on torch
        bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
                    lse.detach(), dlse, lengths, 0.35, 4, 0, name)
        torch.library.opcheck(_attention_backward.default, bwd_args)


@pytest.mark.parametrize("masked", [True, False], ids=["masks-lse", "plain"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_without_graph_breaks(compiler, masked):
    """Inductor checks the real outputs' strides against the fake ones: the plain case runs
    the fused CPU kernel's own layouts (lse (B, Nq, H), gradients (B, N, H, D))."""
    q, k, v = (x.requires_grad_() for x in qkv(nq=9, nk=12))
    lengths = torch.tensor([12, 5])

    def f(q, k, v):
        if not masked:
            return attnmem.attention(q, k, v).sin().sum()
        out, lse = attnmem.attention(q, k, v, causal=True, kv_lengths=lengths, window=(4, None),
                                     return_lse=True)
        return out.sin().sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    expect = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e)


def test_package_imports_without_triton(tmp_path):
    """attnmem and its torch backend work where triton is missing."""
    import subprocess
    import sys

    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['triton'] = None\n")
    code = ("import torch, attnmem; q = torch.randn(1, 2, 3, 4); "
            "print(attnmem.attention(q, q, q, causal=True).shape)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 2, 3, 4])" in result.stdout
