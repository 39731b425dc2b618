"""attnmem._library's operators behave as torch.library.custom_op's did: differentiable at the
operator (torch.ops.attnmem.* called directly), defaults filled in for setup_context, a
backward through an op without a derivative raises, and an op that mutates an input bumps
its version as torch's in-place ops do (a backward that saved it raises)."""

import pytest
import torch

import attnmem
from backends import BACKENDS, DEVICE


def test_operator_is_differentiable_and_fills_defaults():
    """torch.ops.attnmem.attention_forward itself carries the gradient (softcap, sinks and
    the rest left to their defaults), equal to attnmem.attention's."""
    q, k, v = (torch.randn(2, 5, 3, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
               for _ in range(3))
    out, _ = torch.ops.attnmem.attention_forward(q, k, v, None, 0.3, -1, 0, "torch")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    with attnmem.use_backend("torch"):
        expected = torch.autograd.grad(attnmem.attention(q, k, v, causal=True, scale=0.3).sum(),
                                       (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_backward_through_an_operator_without_derivative_raises():
    dout, q, k, v = (torch.randn(1, 4, 2, 8, requires_grad=True) for _ in range(4))
    out, lse = torch.ops.attnmem.attention_forward(q.detach(), k.detach(), v.detach(), None,
                                                   0.3, -1, -1, "torch")
    dq, _, _, _ = torch.ops.attnmem.attention_backward(dout, q, k, v, out, lse, None, None,
                                                       0.3, -1, -1, "torch")
    with pytest.raises(RuntimeError, match="attention_backward has no derivative"):
        dq.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_rotation_bumps_the_version(backend):
    x = torch.randn(2, 6, 2, 8, device=DEVICE, requires_grad=True)
    cos, sin = torch.randn(6, 4, device=DEVICE), torch.randn(6, 4, device=DEVICE)
    saved = x.exp()  # exp's backward reads its output
    version = saved._version
    with torch.no_grad(), attnmem.use_backend(backend):
        attnmem.apply_rotary(saved, cos, sin, inplace=True)
    assert saved._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_bumps_the_caches_versions(backend):
    k_cache, v_cache = (torch.zeros(2, 8, 1, 16, device=DEVICE) for _ in range(2))
    k, v = (torch.randn(2, 3, 1, 16, device=DEVICE) for _ in range(2))
    versions = k_cache._version, v_cache._version
    with attnmem.use_backend(backend):
        attnmem.kvcache_append(k_cache, v_cache, k, v, cache_seqlens=2)
    assert k_cache._version > versions[0] and v_cache._version > versions[1]
    torch.testing.assert_close(k_cache[:, 2:5], k)
