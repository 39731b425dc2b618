"""Attention layers against torch's own modules and formulas."""

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

import attnmem
from attnmem.nn import MultiheadSelfAttention, SinusoidalPositionalEncoding, TransformerEncoderLayer
from attnmem.reference import attention as twin
from backends import BACKENDS, DEVICE

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _copy_from_torch(ours, theirs):
    with torch.no_grad():
        ours.self_attn.qkv.weight.copy_(theirs.self_attn.in_proj_weight)
        ours.self_attn.qkv.bias.copy_(theirs.self_attn.in_proj_bias)
        ours.self_attn.out.weight.copy_(theirs.self_attn.out_proj.weight)
        ours.self_attn.out.bias.copy_(theirs.self_attn.out_proj.bias)
        for name in ("linear1", "linear2", "norm1", "norm2"):
            getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("causal", [False, True])
def test_encoder_layer_matches_torch(norm_first, activation, causal):
    d, heads, n = 24, 4, 11
    theirs = torch.nn.TransformerEncoderLayer(d, heads, dim_feedforward=40, dropout=0.0,
                                              activation=activation, batch_first=True,
                                              norm_first=norm_first).double()
    ours = TransformerEncoderLayer(d, heads, dim_feedforward=40, dropout=0.0,
                                   activation=activation, norm_first=norm_first,
                                   causal=causal).double()
    _copy_from_torch(ours, theirs)
    x = torch.randn(3, n, d, dtype=torch.float64)
    lengths = torch.tensor([11, 7, 1])
    padding = torch.arange(n)[None, :] >= lengths[:, None]  # True = padding, torch's rule
    mask = torch.ones(n, n, dtype=torch.bool).triu(1) if causal else None  # True = hidden
    expect = theirs(x, src_mask=mask, src_key_padding_mask=padding, is_causal=causal)
    got = ours(x, kv_lengths=lengths)
    torch.testing.assert_close(got, expect)
    expect.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(ours.self_attn.qkv.weight.grad, theirs.self_attn.in_proj_weight.grad)
    torch.testing.assert_close(ours.linear1.weight.grad, theirs.linear1.weight.grad)


def test_grouped_query_self_attention_matches_sdpa():
    layer = MultiheadSelfAttention(32, num_heads=8, num_kv_heads=2, window=(3, None)).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    q, k, v = layer.qkv(x).split([32, 8, 8], dim=-1)
    q = q.view(2, 9, 8, 4).transpose(1, 2)
    k, v = (t.view(2, 9, 2, 4).transpose(1, 2).repeat_interleave(4, 1) for t in (k, v))
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=j >= i - 3)
    expect = layer.out(expect.transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(layer(x), expect)


@pytest.mark.skipif(not INTERPRET, reason="drives the kernels through the interpreter")
def test_backends_agree():
    layer = TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, num_kv_heads=2,
                                    causal=True)
    x = torch.randn(2, 20, 32)
    outs = []
    for backend in ("torch", "triton"):
        layer.zero_grad()
        with attnmem.use_backend(backend):
            out = layer(x, kv_lengths=torch.tensor([20, 13]))
        out.square().sum().backward()
        outs.append((out.detach(), layer.self_attn.qkv.weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_attention_dropout_runs_in_the_kernel(backend):
    """In training the weights are dropped by attnmem.attention (torch's default generator):
    the float64 twin with the mask that call applied gives the same output."""
    api = importlib.import_module("attnmem.attention")
    layer = MultiheadSelfAttention(32, 8, num_kv_heads=2, causal=True, dropout=0.3).to(DEVICE)
    x, lengths = torch.randn(2, 9, 32, device=DEVICE), torch.tensor([9, 5], device=DEVICE)
    with attnmem.use_backend(backend):
        torch.manual_seed(3)
        got = layer(x, lengths)
        q, k, v = (t.unflatten(-1, (-1, 4)).transpose(1, 2)
                   for t in layer.qkv(x).detach().split([32, 8, 8], dim=-1))
        torch.manual_seed(3)
        keep = api.dropout_mask(q, k, 0.3)
        evaluated = layer.eval()(x, lengths)
    for p, mask, out in [(0.3, keep, got), (0.0, None, evaluated)]:
        expect, _ = twin.attention_forward(q.double(), k.double(), v.double(), lengths, 0.5,
                                           -1, 0, dropout_p=p, dropout_mask=mask)
        expect = F.linear(expect.transpose(1, 2).flatten(2), layer.out.weight.double(),
                          layer.out.bias.double())
        torch.testing.assert_close(out.double(), expect, atol=2e-5, rtol=1e-4)


def test_encoder_layer_drops_attention_weights_in_training_only(monkeypatch):
    """As torch.nn.TransformerEncoderLayer: its dropout also drops the attention weights,
    in training; in evaluation the layer matches torch's."""
    calls = []
    real = attnmem.attention
    monkeypatch.setattr(attnmem, "attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    theirs = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.2,
                                              batch_first=True).double()
    ours = TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.2).double()
    _copy_from_torch(ours, theirs)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    ours(x).sum().backward()
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    assert [c["dropout_p"] for c in calls] == [0.2, 0.0]


def test_sinusoidal_positional_encoding():
    pe = SinusoidalPositionalEncoding(7, max_len=50)
    x = torch.zeros(1, 10, 7)
    table = pe(x)[0]
    pos, i = 6, 2  # dims 2i = 4 (sin) and 2i + 1 = 5 (cos)
    angle = pos / 10000 ** (2 * i / 7)
    torch.testing.assert_close(table[pos, 4], torch.tensor(math.sin(angle)))
    torch.testing.assert_close(table[pos, 5], torch.tensor(math.cos(angle)))
    with pytest.raises(ValueError, match="exceeds max_len"):
        pe(torch.zeros(1, 51, 7))


LENGTHS = torch.tensor([3, 1])


@pytest.mark.parametrize("message,call", [
    ("divisible by num_heads", lambda: MultiheadSelfAttention(30, 4)),
    ("num_heads must be an int >= 1, got 0", lambda: MultiheadSelfAttention(32, 0)),
    ("num_kv_heads 3 must divide num_heads 4", lambda: MultiheadSelfAttention(32, 4, 3)),
    ("num_kv_heads must be an int >= 1, got 0", lambda: MultiheadSelfAttention(32, 4, 0)),
    ("embed_dim must be an int, got bool", lambda: MultiheadSelfAttention(True, 1)),
    ("causal must be a bool", lambda: MultiheadSelfAttention(32, 4, causal="yes")),
    ("window must be None or a pair", lambda: MultiheadSelfAttention(32, 4, window=3)),
    ("dropout must be in \\[0.0, 1.0\\], got 1.5",
     lambda: MultiheadSelfAttention(32, 4, dropout=1.5)),
    ("dropout must be a number, got str", lambda: MultiheadSelfAttention(32, 4, dropout="0.1")),
    ("window left must be an int >= 0, got -2",
     lambda: MultiheadSelfAttention(32, 4, window=(-2, 0))),
    ("x must be \\(B, N, 32\\), got shape \\(5, 32\\)",
     lambda: MultiheadSelfAttention(32, 4)(torch.randn(5, 32))),
    ("x must be \\(B, N, 32\\), got shape \\(2, 5, 16\\)",
     lambda: MultiheadSelfAttention(32, 4)(torch.randn(2, 5, 16))),
    ("x must be a floating-point tensor",
     lambda: MultiheadSelfAttention(32, 4)(torch.ones(2, 5, 32, dtype=torch.long))),
    ("x must have the module's dtype torch.float32",
     lambda: MultiheadSelfAttention(32, 4)(torch.randn(2, 5, 32, dtype=torch.float64))),
    ("kv_lengths must be \\(B,\\) = \\(2,\\), got shape \\(3,\\)",
     lambda: MultiheadSelfAttention(32, 4)(torch.randn(2, 5, 32), torch.tensor([1, 2, 3]))),
    ("x is on meta but the module is on cpu",
     lambda: MultiheadSelfAttention(32, 4)(torch.randn(2, 5, 32, device="meta"))),
    ("kv_lengths is on meta but the module is on cpu",
     lambda: MultiheadSelfAttention(32, 4)(torch.randn(2, 5, 32), LENGTHS.to("meta"))),
    ("kv_lengths must be an integer tensor",
     lambda: MultiheadSelfAttention(32, 4)(torch.randn(2, 5, 32), LENGTHS.float())),
    ("activation must be one of", lambda: TransformerEncoderLayer(32, 4, activation="tanh")),
    ("nhead must be an int >= 1, got 0", lambda: TransformerEncoderLayer(32, 0)),
    ("d_model 30 must be divisible by nhead 4", lambda: TransformerEncoderLayer(30, 4)),
    ("dim_feedforward must be an int >= 1", lambda: TransformerEncoderLayer(32, 4, 0)),
    ("dropout must be in", lambda: TransformerEncoderLayer(32, 4, dropout=-0.1)),
    ("layer_norm_eps must be in \\(0.0, inf\\)",
     lambda: TransformerEncoderLayer(32, 4, layer_norm_eps=0)),
    ("x must be \\(B, N, 32\\)", lambda: TransformerEncoderLayer(32, 4)(torch.randn(2, 32))),
    ("kv_lengths must be \\(B,\\)",
     lambda: TransformerEncoderLayer(32, 4)(torch.randn(2, 5, 32), LENGTHS[:1])),
    ("d_model must be an int >= 1", lambda: SinusoidalPositionalEncoding(0)),
    ("max_len must be an int", lambda: SinusoidalPositionalEncoding(8, max_len=10.0)),
    ("x must be \\(B, N, 8\\)", lambda: SinusoidalPositionalEncoding(8)(torch.randn(2, 5, 7))),
])
def test_layer_arguments_are_checked(message, call):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    layer = TransformerEncoderLayer(np.int64(16), np.int32(4), np.int16(24),
                                    num_kv_heads=np.int8(2), window=(np.int64(3), -1))
    assert layer.self_attn.window == (3, None) and layer.linear1.out_features == 24
    layer(torch.randn(2, 5, 16), kv_lengths=torch.tensor([5, 2], dtype=torch.int16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,length", [(0, 5), (2, 0)])
def test_empty_batch_or_sequence(batch, length, backend):
    """Zero batch or zero length runs forward and backward on both backends: empty output,
    finite zero gradients, as torch.nn.TransformerEncoderLayer gives."""
    layer = TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0,
                                    causal=True).to(DEVICE)
    pe = SinusoidalPositionalEncoding(16).to(DEVICE)
    x = torch.randn(batch, length, 16, device=DEVICE, requires_grad=True)
    with attnmem.use_backend(backend):
        out = layer(pe(x), kv_lengths=torch.zeros(batch, dtype=torch.long, device=DEVICE))
        out.sum().backward()
    assert out.shape == (batch, length, 16)
    for name, p in layer.named_parameters():
        assert p.grad is not None and not p.grad.any(), name
    assert x.grad.shape == x.shape
