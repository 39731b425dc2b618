"""attnmem.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same state_dict:
outputs, weights and every gradient, in float64, for each constructor option and mask kind;
the kernel path against float64 on both backends."""

import importlib
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import attnmem
from attnmem.nn import MultiheadAttention
from attnmem.reference import attention as twin

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
def test_whatever_padded_keys_hold_stays_out(backend):
    """Keys and values under a bool key_padding_mask count for nothing, NaN or inf there
    included, with the weights (exact path) or without (kernel path): the outputs and the
    gradients, the projections' included, of zeros there (torch gives NaN)."""
    _, ours = pair({})
    dtype = torch.float32 if backend == "triton" else torch.float64
    ours.to(dtype)
    query, key, value = inputs({}, False, dtype=dtype)
    padding = masks("padding_scattered")[0]
    for need_weights in (True, False):
        results = []
        for fill in (0.0, float("nan"), float("inf")):
            kv = [x.detach().masked_fill(padding.t()[..., None], fill).requires_grad_()
                  for x in (key, value)]
            with attnmem.use_backend(backend):
                results.append(outputs_and_grads(ours, [query, *kv], key_padding_mask=padding,
                                                 need_weights=need_weights))
        for got in results[1:]:
            for i, (g, e) in enumerate(zip(got, results[0])):
                if e is not None:
                    torch.testing.assert_close(g, e, msg=f"output {i}")


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
    for mask in (prefix, scattered):  # any layout: the unpadded keys move to the front
        calls.clear()
        ours(*tensors, need_weights=False, key_padding_mask=mask)
        assert calls and calls[-1]["kv_lengths"].tolist() == (~mask).sum(1).tolist()
    x = tensors[0]
    for args, kwargs in (
            (tensors, dict()),
            (tensors, dict(attn_mask=torch.zeros(L, S))),
            (tensors, dict(key_padding_mask=masks("padding_float")[0].float())),
            ((x, x, x), dict(is_causal=True, key_padding_mask=prefix[:, :L]))):
        calls.clear()
        ours(*args, need_weights=kwargs == {}, **kwargs)
        assert not calls, kwargs


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_in_training_stays_on_the_kernel(backend, monkeypatch):
    """need_weights=False in training runs attnmem.attention with the layer's dropout as
    dropout_p, drawn from torch's default generator: the output is the float64 twin's with
    the mask that call applied. In evaluation nothing is dropped."""
    calls = []
    real = attnmem.attention
    monkeypatch.setattr(attnmem, "attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    api = importlib.import_module("attnmem.attention")
    torch_mha, ours = pair(dict(dropout=0.4, batch_first=True))
    ours.float().train()
    x = torch.randn(B, L, E, requires_grad=True)
    with attnmem.use_backend(backend):
        torch.manual_seed(5)
        out, weights = ours(x, x, x, need_weights=False)
        out.sum().backward()
        q, k, v = (ours._heads(t).detach() for t in ours._project(x, x, x))
        torch.manual_seed(5)
        keep = api.dropout_mask(q, k, 0.4)
    assert weights is None and [c["dropout_p"] for c in calls] == [0.4]
    assert torch.isfinite(x.grad).all() and keep.any() and not keep.all()
    dropped, _ = twin.attention_forward(q.double(), k.double(), v.double(), None,
                                        (E // H) ** -0.5, -1, -1, dropout_p=0.4,
                                        dropout_mask=keep)
    expect = F.linear(dropped.transpose(1, 2).flatten(2), ours.out_proj.weight.double(),
                      ours.out_proj.bias.double())
    torch.testing.assert_close(out.double(), expect, atol=2e-5, rtol=1e-4)

    torch_mha.eval()
    with attnmem.use_backend(backend):
        out, _ = ours.eval()(x, x, x, need_weights=False)
    assert calls[-1]["dropout_p"] == 0.0
    torch.testing.assert_close(out.double(), torch_mha(*(x.double(),) * 3)[0], atol=2e-5,
                               rtol=1e-4)


def padding(layout, n_k=S):
    """(B, n_k) bool padding masks, True = padding, each keeping key 0 or the last key."""
    keep = torch.tensor([n_k, 4, 1])
    positions = torch.arange(n_k)
    if layout == "right":
        return positions >= keep[:, None]
    if layout == "left":
        return positions < n_k - keep[:, None]
    scattered = torch.rand(B, n_k) > 0.5
    scattered[:, 0] = False
    return scattered


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,causal", [("right", False), ("left", False),
                                           ("scattered", False), ("right", True),
                                           ("scattered", True)])
def test_any_padding_layout_matches_torch(layout, causal, backend):
    """Right-, left- and scattered padding, causal or not, on both backends against torch in
    float64 (float32 through the triton kernels). Causal self-attention keeps key 0, so
    every query sees a key and torch has no NaN (left padding would hide every key from the
    first queries)."""
    torch_mha, ours = pair(dict(batch_first=True))
    dtype = torch.float32 if backend == "triton" else torch.float64
    ours.to(dtype)
    x = torch.randn(B, L, E, dtype=torch.float64)
    keys = x if causal else torch.randn(B, S, E, dtype=torch.float64)
    mask = padding(layout, keys.shape[1])
    attn_mask = torch.ones(L, L, dtype=torch.bool).triu(1) if causal else None
    kwargs = dict(key_padding_mask=mask, attn_mask=attn_mask, is_causal=causal,
                  need_weights=False)
    x.requires_grad_()
    keys.requires_grad_()
    expect = outputs_and_grads(torch_mha, [x, keys, keys], **kwargs)
    query = x.detach().to(dtype).requires_grad_()
    key = query if causal else keys.detach().to(dtype).requires_grad_()
    with attnmem.use_backend(backend):
        got = outputs_and_grads(ours, [query, key, key], **kwargs)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    for i, (g, e) in enumerate(zip(got, expect)):
        if e is not None:
            torch.testing.assert_close(g.double(), e, **tol, msg=f"output {i}")


def test_padding_mask_traces_whole_under_torch_compile():
    """No host sync decides the path: fullgraph tracing succeeds, output and gradients match
    eager for a scattered padding mask."""
    torch._dynamo.reset()
    _, ours = pair(dict(batch_first=True))
    x, keys = (torch.randn(B, n, E, dtype=torch.float64) for n in (L, S))
    mask = padding("scattered")

    def run(module):
        query, key = x.clone().requires_grad_(), keys.clone().requires_grad_()
        out, _ = module(query, key, key, key_padding_mask=mask, need_weights=False)
        out.square().sum().backward()
        return out.detach(), query.grad, key.grad

    eager = run(ours)
    compiled = run(torch.compile(ours, backend="aot_eager", fullgraph=True))
    for g, e in zip(compiled, eager):
        torch.testing.assert_close(g, e)


def _forward(*tensors, options=None, **kwargs):
    return lambda: MultiheadAttention(E, H, **(options or {}))(*tensors, **kwargs)


def _seqs(n_q=L, n_k=S, batch=B, widths=(E, E, E), dtype=torch.float32):
    return [torch.randn(n, batch, w, dtype=dtype) for n, w in zip((n_q, n_k, n_k), widths)]


@pytest.mark.parametrize("message,call", [
    ("embed_dim 10 must be divisible by num_heads 3", lambda: MultiheadAttention(10, 3)),
    ("num_heads must be an int >= 1, got 0", lambda: MultiheadAttention(E, 0)),
    ("embed_dim must be an int, got bool", lambda: MultiheadAttention(True, 1)),
    ("embed_dim must be an int, got float", lambda: MultiheadAttention(24.0, 3)),
    ("dropout must be in \\[0.0, 1.0\\], got 1.5", lambda: MultiheadAttention(E, H, 1.5)),
    ("kdim must be an int >= 1, got 0", lambda: MultiheadAttention(E, H, kdim=0)),
    ("batch_first must be a bool", lambda: MultiheadAttention(E, H, batch_first="yes")),
    ("query must be \\(L, N, 24\\) or \\(L, 24\\), got shape \\(7, 3, 5\\)",
     _forward(*_seqs(widths=(5, E, E)))),
    ("query must be \\(N, L, 24\\)", _forward(torch.randn(B, L, E, 1), *_seqs()[1:],
                                              options=dict(batch_first=True))),
    ("key must be \\(S, 3, 10\\)", _forward(*_seqs(), options=dict(kdim=10, vdim=6))),
    ("value must be \\(S, 3, 24\\)", _forward(*_seqs()[:2], torch.randn(S, 2, E))),
    ("value must have key's length S=9", _forward(*_seqs()[:2], torch.randn(S + 1, B, E))),
    ("key must be \\(S, 24\\)", _forward(torch.randn(L, E), *_seqs()[1:])),
    ("query must be a floating-point tensor", _forward(
        torch.ones(L, B, E, dtype=torch.long), *_seqs()[1:])),
    ("key must have the module's dtype torch.float32, got torch.float64",
     _forward(_seqs()[0], *_seqs(dtype=torch.float64)[1:])),
    ("query must be a torch.Tensor", _forward("query", *_seqs()[1:])),
    ("need_weights must be a bool", _forward(*_seqs(), need_weights=None)),
    ("key_padding_mask must be \\(3, 9\\), got shape \\(3, 10\\)",
     _forward(*_seqs(), key_padding_mask=torch.zeros(B, S + 1, dtype=torch.bool))),
    ("key_padding_mask must be \\(9,\\)", _forward(
        torch.randn(L, E), torch.randn(S, E), torch.randn(S, E),
        key_padding_mask=torch.zeros(1, S, dtype=torch.bool))),
    ("key_padding_mask must be a bool or floating-point",
     _forward(*_seqs(), key_padding_mask=torch.zeros(B, S, dtype=torch.long))),
    ("attn_mask must be \\(7, 9\\) or \\(9, 7, 9\\), got shape \\(2, 7, 9\\)",
     _forward(*_seqs(), attn_mask=torch.zeros(2, L, S))),
    ("attn_mask must be a bool or floating-point",
     _forward(*_seqs(), attn_mask=torch.zeros(L, S, dtype=torch.int))),
    ("attn_mask must be a torch.Tensor", _forward(*_seqs(), attn_mask=[[0.0]])),
    ("query is on meta but the module is on cpu",
     _forward(torch.randn(L, B, E, device="meta"), *_seqs()[1:])),
    ("key_padding_mask is on meta but the module is on cpu", _forward(
        *_seqs(), key_padding_mask=torch.zeros(B, S, dtype=torch.bool, device="meta"))),
])
def test_bad_input_raises_a_named_error(message, call):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    layer = MultiheadAttention(np.int64(E), np.int32(H), kdim=np.int16(10), batch_first=np.True_)
    assert (layer.embed_dim, layer.num_heads, layer.kdim, layer.batch_first) == (E, H, 10, True)
    assert type(layer.embed_dim) is int and type(layer.head_dim) is int


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch,n_q,n_k", [(0, L, S), (B, 0, S), (B, L, 0)])
def test_empty_inputs_match_torch(batch, n_q, n_k, need_weights, backend):
    """Zero batch, zero queries or zero keys: outputs (out_proj's bias where no key is
    seen), weights (N, L, S) of zeros, and zero gradients, on both backends."""
    torch_mha, ours = pair(dict(batch_first=True))
    dtype = torch.float32 if backend == "triton" else torch.float64
    ours.to(dtype)
    query, key = (torch.randn(batch, n, E, dtype=dtype, requires_grad=True)
                  for n in (n_q, n_k))
    padding = torch.zeros(batch, n_k, dtype=torch.bool)
    with attnmem.use_backend(backend):
        out, weights = ours(query, key, key, key_padding_mask=padding, need_weights=need_weights)
        (out.square().sum() + (0 if weights is None else weights.sum())).backward()
    assert out.shape == (batch, n_q, E)
    torch.testing.assert_close(out, ours.out_proj.bias.expand_as(out) if n_k == 0 else
                               torch_mha(query.double(), key.double(), key.double(),
                                         need_weights=False)[0].to(dtype))
    assert (weights is None) == (not need_weights)
    if need_weights:
        assert weights.shape == (batch, n_q, n_k) and not weights.any()
    for grad in (query.grad, key.grad, ours.in_proj_weight.grad):
        assert grad is not None and not grad.any()
