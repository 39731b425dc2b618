"""Attention layers against torch's own modules and formulas."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import attnmem
from attnmem.nn import MultiheadSelfAttention, SinusoidalPositionalEncoding, TransformerEncoderLayer

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


def test_layer_arguments_are_checked():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiheadSelfAttention(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads 3 must divide num_heads 4"):
        MultiheadSelfAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="x must be \\(B, N, embed_dim\\)"):
        MultiheadSelfAttention(32, 4)(torch.randn(5, 32))
    with pytest.raises(ValueError, match="activation must be"):
        TransformerEncoderLayer(32, 4, activation="tanh")
