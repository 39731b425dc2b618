"""Attention layers on attnmem.attention: self-attention, positional encoding, encoder layer."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import attnmem
from attnmem.nn import _checks


def _window(window):
    """None, or (left, right) with each side an int >= 0, or None or -1 for unbounded."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a pair (left, right), got {window!r}")
    return tuple(None if side is None or side == -1 else _checks.integer(f"window {name}", side, 0)
                 for name, side in zip(("left", "right"), window))


def alibi_slopes(num_heads):
    """BLOOM's ALiBi slopes (num_heads,) float32: for n heads a power of 2, 2^(-8 i / n) for
    i = 1..n; otherwise those of the largest power of 2 below n, then every other slope of
    twice that many (Press et al.'s geometric sequence, as BLOOM builds it)."""
    num_heads = _checks.integer("num_heads", num_heads)
    below = 2 ** int(math.log2(num_heads))
    slopes = [2 ** (-8 * i / below) for i in range(1, below + 1)]
    slopes += [2 ** (-8 * i / (2 * below)) for i in range(1, 2 * (num_heads - below), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with a fused QKV projection, grouped-query attention (num_kv_heads
    divides num_heads; 1 is multi-query), causal masking, a sliding window and padding
    lengths. x: (B, N, embed_dim), batch first. The weights are never materialised; in
    training, dropout (a probability) drops them in the kernel (attnmem.attention's
    dropout_p, drawn from torch's default generator).

    Score modifications, attnmem.attention's (see its docstring):
      softcap (a number > 0, or None): scores capped to softcap * tanh(scores / softcap),
        as Gemma 2's.
      sinks=True: a learnable logit per head in every row's softmax denominator (gpt-oss's
        attention sinks), the parameter `sinks` (num_heads,), starting at 0 (a sink as
        heavy as a key scoring 0).
      alibi=True: ALiBi's bias -slope * |i - j| between query i and key j, with the buffer
        `alibi_slopes` (num_heads,) of BLOOM's slopes (alibi_slopes()), not learned. With
        causal=True that is BLOOM's bias slope * j up to a per-row constant, which no output
        sees; without, the symmetric bias of Press et al.'s encoder experiments.

    With num_kv_heads == num_heads, `qkv` is laid out as torch.nn.MultiheadAttention's
    in_proj ([q; k; v] rows) and `out` as its out_proj.
    """

    def __init__(self, embed_dim, num_heads, num_kv_heads=None, causal=False, window=None,
                 bias=True, dropout=0.0, softcap=None, sinks=False, alibi=False):
        super().__init__()
        embed_dim = _checks.integer("embed_dim", embed_dim)
        num_heads = _checks.integer("num_heads", num_heads)
        num_kv_heads = _checks.optional_integer("num_kv_heads", num_kv_heads) or num_heads
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.window = _checks.flag("causal", causal), _window(window)
        bias = _checks.flag("bias", bias)
        self.dropout = _checks.number("dropout", dropout, 0.0, 1.0)
        self.softcap = (None if softcap is None
                        else _checks.number("softcap", softcap, 0.0, low_open=True))
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim,
                             bias=bias)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.sinks = (nn.Parameter(torch.zeros(num_heads)) if _checks.flag("sinks", sinks)
                      else None)
        self.register_buffer("alibi_slopes", alibi_slopes(num_heads)
                             if _checks.flag("alibi", alibi) else None, persistent=False)

    def forward(self, x: torch.Tensor, kv_lengths: Optional[torch.Tensor] = None):
        """x: (B, N, E); kv_lengths: (B,) valid lengths (keys past them are not attended)."""
        _checks.tensor("x", x, [("B", "N", self.embed_dim)], self.out.weight)
        batch, length, _ = x.shape
        _checks.lengths("kv_lengths", kv_lengths, batch, self.out.weight)
        heads = (self.num_heads, self.num_kv_heads, self.num_kv_heads)
        # Views of the fused projection, (B, heads, N, D) with strides: no copies.
        q, k, v = (t.unflatten(-1, (h, self.head_dim)).transpose(1, 2) for t, h in zip(
            self.qkv(x).split([h * self.head_dim for h in heads], dim=-1), heads))
        out = attnmem.attention(q, k, v, causal=self.causal, window=self.window,
                                kv_lengths=kv_lengths,
                                dropout_p=self.dropout if self.training else 0.0,
                                softcap=self.softcap, sinks=self.sinks,
                                alibi_slopes=self.alibi_slopes)
        return self.out(out.transpose(1, 2).flatten(2))


class SinusoidalPositionalEncoding(nn.Module):
    """Adds Vaswani et al.'s encoding PE(pos, 2i) = sin(pos / 10000^(2i/d)),
    PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) to x: (B, N, d_model), then dropout."""

    def __init__(self, d_model, max_len=8192, dropout=0.0):
        super().__init__()
        d_model = _checks.integer("d_model", d_model)
        max_len = _checks.integer("max_len", max_len, 0)
        dropout = _checks.number("dropout", dropout, 0.0, 1.0)
        self.d_model = d_model
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        rate = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                         * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(position * rate)
        table[:, 1::2] = torch.cos(position * rate[: d_model // 2])
        self.register_buffer("table", table, persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.tensor("x", x, [("B", "N", self.d_model)])
        _checks.same_device("x", x, self.table)
        if x.shape[1] > self.table.shape[0]:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_len "
                             f"{self.table.shape[0]}")
        return self.dropout(x + self.table[: x.shape[1]].to(x.dtype))


class TransformerEncoderLayer(nn.Module):
    """Vaswani et al.'s encoder layer on MultiheadSelfAttention: post-norm
    (x = norm(x + sublayer(x))) by default, pre-norm with norm_first=True, as
    torch.nn.TransformerEncoderLayer (batch first), dropout included: on the attention
    weights (in the kernel), after the attention and in the feed-forward block. Adds
    num_kv_heads, causal, window, softcap, sinks and alibi, MultiheadSelfAttention's."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 layer_norm_eps=1e-5, norm_first=False, bias=True, num_kv_heads=None,
                 causal=False, window=None, softcap=None, sinks=False, alibi=False):
        super().__init__()
        d_model = _checks.integer("d_model", d_model)
        nhead = _checks.integer("nhead", nhead)
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} must be divisible by nhead {nhead}")
        dim_feedforward = _checks.integer("dim_feedforward", dim_feedforward)
        dropout = _checks.number("dropout", dropout, 0.0, 1.0)
        activation = _checks.choice("activation", activation, ("relu", "gelu"))
        layer_norm_eps = _checks.number("layer_norm_eps", layer_norm_eps, 0.0, low_open=True)
        norm_first, bias = _checks.flag("norm_first", norm_first), _checks.flag("bias", bias)
        self.d_model = d_model
        self.self_attn = MultiheadSelfAttention(d_model, nhead, num_kv_heads, causal, window,
                                                bias, dropout, softcap, sinks, alibi)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout, self.dropout1, self.dropout2 = (nn.Dropout(dropout) for _ in range(3))
        self.activation = F.relu if activation == "relu" else F.gelu
        self.norm_first = norm_first

    def _attend(self, x, kv_lengths):
        return self.dropout1(self.self_attn(x, kv_lengths))

    def _feed_forward(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, x: torch.Tensor, kv_lengths: Optional[torch.Tensor] = None):
        """x: (B, N, d_model); kv_lengths: (B,) lengths of the unpadded sequences."""
        _checks.tensor("x", x, [("B", "N", self.d_model)], self.linear1.weight)
        if self.norm_first:
            x = x + self._attend(self.norm1(x), kv_lengths)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attend(x, kv_lengths))
        return self.norm2(x + self._feed_forward(x))
