"""attnmem.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same state_dict:
outputs, weights and every gradient, in float64, for each constructor option and mask kind;
the kernel path against float64 on both backends."""

import itertools
import os

import pytest
import torch

import attnmem
from attnmem.nn import MultiheadAttention

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])
E, H, L, S, B = 24, 3, 7, 9, 3

OPTIONS = {  # constructor keyword arguments
    "plain": {},
    "batch_first": dict(batch_first=True),
    "no_bias": dict(bias=False),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "kdim_vdim": dict(kdim=10, vdim=6, batch_first=True),
}


def masks(kind, n_q=L, n_k=S):
    """(key_padding_mask, attn_mask, is_causal) of one kind, never hiding every key."""
    lengths = torch.tensor([n_k, 4, 1])
    prefix = torch.arange(n_k) >= lengths[:, None]
    scattered = torch.rand(B, n_k) > 0.6
    scattered[:, 0] = False
    causal = torch.ones(n_q, n_k, dtype=torch.bool).triu(1)
    per_head = torch.rand(B * H, n_q, n_k) > 0.7
    per_head[..., 0] = False
    return {
        "none": (None, None, False),
        "padding_prefix": (prefix, None, False),
        "padding_scattered": (scattered, None, False),
        "padding_float": (torch.randn(B, n_k, dtype=torch.float64), None, False),
        "bool_mask": (None, causal, False),
        "float_mask": (None, torch.randn(n_q, n_k, dtype=torch.float64), False),
        "per_head_mask": (prefix, per_head, False),
        "causal_hint": (prefix, causal, True),
    }[kind]


def pair(options):
    torch_mha = torch.nn.MultiheadAttention(E, H, **options, dtype=torch.float64)
    ours = MultiheadAttention(E, H, **options, dtype=torch.float64)
    ours.load_state_dict(torch_mha.state_dict())
    return torch_mha, ours


def inputs(options, self_attention, n_q=L, n_k=S, dtype=torch.float64):
    def seq(n, width):
        shape = (B, n, width) if options.get("batch_first") else (n, B, width)
        return torch.randn(shape, dtype=dtype, requires_grad=True)

    if self_attention and "kdim" not in options:
        x = seq(n_q, E)
        return x, x, x
    return seq(n_q, E), seq(n_k, options.get("kdim", E)), seq(n_k, options.get("vdim", E))


def outputs_and_grads(module, tensors, **kwargs):
    out, weights = module(*tensors, **kwargs)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum()
    if weights is not None:
        loss = loss + (weights * weights).sum()
    leaves = list({id(t): t for t in tensors}.values()) + list(module.parameters())
    return [out, weights, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("kind", ["none", "padding_prefix", "padding_scattered",
                                  "padding_float", "bool_mask", "float_mask", "per_head_mask",
                                  "causal_hint"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_torch(option, kind, need_weights, average):
    options = OPTIONS[option]
    torch_mha, ours = pair(options)
    self_attention = kind in ("bool_mask", "causal_hint")
    n_k = L if self_attention else S
    key_padding_mask, attn_mask, is_causal = masks(kind, n_k=n_k)
    if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
        key_padding_mask = key_padding_mask[:, :n_k]
    tensors = inputs(options, self_attention, n_k=n_k)
    kwargs = dict(key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                  need_weights=need_weights, average_attn_weights=average)
    expect = outputs_and_grads(torch_mha, tensors, **kwargs)
    got = outputs_and_grads(ours, tensors, **kwargs)
    assert (got[1] is None) == (expect[1] is None)
    for i, (g, e) in enumerate(zip(got, expect)):
        if e is not None:
            torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9, msg=f"output {i}")


def test_unbatched_and_dropout_match_torch():
    torch_mha, ours = pair(dict(dropout=0.3))
    x = torch.randn(L, E, dtype=torch.float64)
    padding = torch.arange(L) >= 5
    for module in (torch_mha, ours):
        module.train()
    results = []
    for module in (torch_mha, ours):
        torch.manual_seed(7)  # the same dropout draws over the same (B*H, L, S) weights
        results.append(module(x, x, x, key_padding_mask=padding, average_attn_weights=False))
    for g, e in zip(results[1], results[0]):
        torch.testing.assert_close(g, e)
    assert results[1][0].shape == (L, E) and results[1][1].shape == (H, L, L)


def test_state_dicts_load_both_ways():
    for options in OPTIONS.values():
        torch_mha, ours = pair(options)
        assert list(ours.state_dict()) == list(torch_mha.state_dict())
        torch_mha.load_state_dict(ours.state_dict())
        fresh = MultiheadAttention(E, H, **options)
        assert [p.shape for p in fresh.parameters()] == [p.shape for p in ours.parameters()]


def test_fully_masked_rows_give_zeros_where_torch_gives_nan():
    torch_mha, ours = pair({})
    tensors = inputs({}, False)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1] = True
    for need_weights in (True, False):
        out, weights = ours(*tensors, key_padding_mask=padding, need_weights=need_weights)
        expect, _ = torch_mha(*tensors, key_padding_mask=padding, need_weights=True)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:, 1], ours.out_proj.bias.expand(L, E))
        torch.testing.assert_close(out[:, [0, 2]], expect[:, [0, 2]])
        if need_weights:
            assert (weights[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,option", list(itertools.product(
    ["none", "padding_prefix", "causal_hint"], ["plain", "batch_first", "bias_kv_zero_attn"])))
def test_kernel_path_matches_float64(kind, option, backend):
    """need_weights=False runs attnmem.attention, here in float32 against torch in float64."""
    options = OPTIONS[option]
    torch_mha, ours = pair(options)
    ours.float()
    self_attention = kind == "causal_hint"
    key_padding_mask, attn_mask, is_causal = masks(kind, n_k=L if self_attention else S)
    if key_padding_mask is not None and self_attention:
        key_padding_mask = key_padding_mask[:, :L]
    tensors = inputs(options, self_attention, n_k=L if self_attention else S)
    kwargs = dict(key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                  need_weights=False)
    expect = outputs_and_grads(torch_mha, tensors, **kwargs)
    with attnmem.use_backend(backend):
        got = outputs_and_grads(ours, [t.detach().float().requires_grad_() for t in tensors]
                                if not self_attention else
                                [tensors[0].detach().float().requires_grad_()] * 3, **kwargs)
    for i, (g, e) in enumerate(zip(got, expect)):
        if e is not None:
            torch.testing.assert_close(g.double(), e, atol=2e-5, rtol=1e-4, msg=f"output {i}")


def test_kernel_path_is_taken_only_when_it_is_exact(monkeypatch):
    calls = []
    real = attnmem.attention
    monkeypatch.setattr(attnmem, "attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    _, ours = pair({})
    tensors = inputs({}, False)
    prefix, scattered = masks("padding_prefix")[0], masks("padding_scattered")[0]
    ours(*tensors, need_weights=False, key_padding_mask=prefix)
    assert calls and calls[-1]["kv_lengths"].tolist() == [S, 4, 1]
    for kwargs in (dict(), dict(key_padding_mask=scattered),
                   dict(attn_mask=torch.zeros(L, S))):
        calls.clear()
        ours(*tensors, need_weights=kwargs == {}, **kwargs)
        assert not calls, kwargs


@pytest.mark.parametrize("message,call", [
    ("embed_dim 10 must be divisible by num_heads 3", lambda: MultiheadAttention(10, 3)),
    ("query must have 24 features", lambda: MultiheadAttention(E, H)(
        torch.randn(L, B, 5), torch.randn(S, B, E), torch.randn(S, B, E))),
    ("key_padding_mask must be", lambda: MultiheadAttention(E, H)(
        *inputs({}, False, dtype=torch.float32), key_padding_mask=torch.zeros(B, S + 1,
                                                                              dtype=torch.bool))),
    ("attn_mask must be", lambda: MultiheadAttention(E, H)(
        *inputs({}, False, dtype=torch.float32), attn_mask=torch.zeros(2, L, S))),
    ("attn_mask must be a bool or floating-point", lambda: MultiheadAttention(E, H)(
        *inputs({}, False, dtype=torch.float32), attn_mask=torch.zeros(L, S, dtype=torch.int))),
])
def test_bad_input_raises_a_named_error(message, call):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
