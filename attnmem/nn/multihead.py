"""A drop-in for torch.nn.MultiheadAttention on attnmem.attention."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import attnmem
from attnmem.nn import _checks
from attnmem.reference.attention import softmax_with_lse


def _compact_keys(k, v, key_padding_mask):
    """Stably move each sequence's unpadded keys (and values) to the front: softmax
    attention is invariant to the order of its keys, so any padding layout becomes lengths
    the kernel reads, decided on the device without a host sync. key_padding_mask (B, S')
    bool, True = padding -> k, v (B, H, S', hd) reordered, lengths (B,)."""
    order = torch.sort(key_padding_mask.to(torch.uint8), dim=1, stable=True).indices
    index = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    lengths = key_padding_mask.shape[1] - key_padding_mask.sum(1)
    return k.gather(2, index), v.gather(2, index), lengths


def _additive_mask(mask, dtype):
    """A float mask to add to the scores: bool True (not allowed) becomes -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def _check_mask(name, mask, shapes, like):
    """mask: a bool or floating-point tensor of one of shapes, on like's device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    if tuple(mask.shape) not in shapes:
        raise ValueError(f"{name} must be {' or '.join(map(str, shapes))}, got shape "
                         f"{tuple(mask.shape)}")
    _checks.same_device(name, mask, like)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention's constructor, parameters, state_dict and forward, with
    the attention itself on attnmem.attention whenever the weights are not needed.

    The kernel runs when need_weights=False and the masks are what it expresses: no
    attn_mask (or is_causal=True with a square one, trusted as torch does), and, without
    causal masking, a bool key_padding_mask of any layout (the unpadded keys are moved to the
    front on the device, no host sync, so the layer traces whole under torch.compile). In
    training its dropout on the weights is attnmem.attention's dropout_p, drawn in the
    kernel from torch's default generator (other draws than torch's own dropout). Otherwise
    the layer computes the exact weights (float masks, causal with padding) and drops them
    with F.dropout, as torch does. Unlike torch, a query that may attend to no key (S = 0 included)
    gets zeros, never NaN, and what keys and values under a bool key_padding_mask hold (NaN,
    inf) reaches neither the output nor a gradient. is_causal=True without an attn_mask
    applies a causal mask (torch raises instead). Wrong arguments raise ValueError or
    TypeError (torch: AssertionError).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None):
        embed_dim = _checks.integer("embed_dim", embed_dim)
        num_heads = _checks.integer("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        dropout = _checks.number("dropout", dropout, 0.0, 1.0)
        bias, add_bias_kv, add_zero_attn, batch_first = (_checks.flag(name, given) for name, given
                                                         in (("bias", bias),
                                                             ("add_bias_kv", add_bias_kv),
                                                             ("add_zero_attn", add_zero_attn),
                                                             ("batch_first", batch_first)))
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = _checks.optional_integer("kdim", kdim) or embed_dim
        self.vdim = _checks.optional_integer("vdim", vdim) or embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self):
        """torch's initialisation: Xavier-uniform projections, zero biases, Xavier-normal
        bias_k and bias_v."""
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight,
                       self.v_proj_weight):
            if weight is not None:
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        for extra in (self.bias_k, self.bias_v):
            if extra is not None:
                nn.init.xavier_normal_(extra)

    def _project(self, query, key, value):
        """Batch-first (B, L, E), (B, S, E), (B, S, E) projections."""
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.split(e)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.split(e)
        return [F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases)]

    def _heads(self, x):
        """(B, L, E) -> (B, H, L, head_dim), a view."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _check(self, query, key, value, key_padding_mask, attn_mask):
        """Shapes, dtypes and devices of forward's arguments, in the caller's layout."""
        like = self.out_proj.weight
        e, h = self.embed_dim, self.num_heads
        layout = ("N", "L", e) if self.batch_first else ("L", "N", e)
        shape = _checks.tensor("query", query, [layout, ("L", e)], like)
        batched = len(shape) == 3
        n, n_q = (query.shape[0 if self.batch_first else 1] if batched else None,
                  query.shape[1 if self.batch_first and batched else 0])
        for name, x, width in (("key", key, self.kdim), ("value", value, self.vdim)):
            if not batched:
                expected = ("S", width)
            else:
                expected = (n, "S", width) if self.batch_first else ("S", n, width)
            _checks.tensor(name, x, [expected], like)
        time = 1 if self.batch_first and batched else 0
        n_k = key.shape[time]
        if value.shape[time] != n_k:
            raise ValueError(f"value must have key's length S={n_k}, got shape "
                             f"{tuple(value.shape)}")
        if key_padding_mask is not None:
            _check_mask("key_padding_mask", key_padding_mask,
                        [(n, n_k)] if batched else [(n_k,)], like)
        if attn_mask is not None:
            _check_mask("attn_mask", attn_mask,
                        [(n_q, n_k), ((n if batched else 1) * h, n_q, n_k)], like)

    def forward(self, query, key, value, key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[torch.Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        """query (L, N, E), key (S, N, kdim), value (S, N, vdim), or (N, L, E) ... with
        batch_first, or unbatched (L, E) ...; key_padding_mask (N, S) or (S,); attn_mask
        (L, S) or (N * num_heads, L, S). Bool masks: True = may not attend; float masks are
        added to the scores. Returns (output like query, weights (N, L, S) averaged over
        heads, or (N, num_heads, L, S), or None when need_weights=False)."""
        self._check(query, key, value, key_padding_mask, attn_mask)
        need_weights, average_attn_weights, is_causal = (
            _checks.flag(name, given) for name, given in (
                ("need_weights", need_weights), ("average_attn_weights", average_attn_weights),
                ("is_causal", is_causal)))
        batched = query.dim() == 3
        if not batched:
            query, key, value = query[None], key[None], value[None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        batch, n_q, n_k = query.shape[0], query.shape[1], key.shape[1]
        if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
            # Whatever padded keys and values hold (NaN, inf) reaches neither the output
            # (zero weights times NaN) nor the projections' weight gradients.
            key, value = (x.masked_fill(key_padding_mask[..., None], 0) for x in (key, value))
        if attn_mask is not None:
            attn_mask = (attn_mask[None, None] if attn_mask.dim() == 2
                         else attn_mask.unflatten(0, (batch, self.num_heads)))

        q, k, v = self._project(query, key, value)
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], 1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], 1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.add_zero_attn:
            k, v = (torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])], 2)
                    for x in (k, v))

        dropout = self.dropout if self.training else 0.0
        # The kernel's causal mask is the square one; bias_k and the zero key stay visible.
        causal = is_causal and n_q == n_k and extra == 0
        kernel = not need_weights and (attn_mask is None and not is_causal or causal)
        if key_padding_mask is not None:
            # Compacting keys would break causal order: causal padding takes the exact path.
            kernel = kernel and key_padding_mask.dtype == torch.bool and not causal
        if kernel:
            weights, lengths = None, None
            if key_padding_mask is not None:
                k, v, lengths = _compact_keys(k, v, F.pad(key_padding_mask, (0, extra)))
            out = attnmem.attention(q, k, v, causal=causal, kv_lengths=lengths,
                                    dropout_p=dropout)
        else:
            out, weights = self._exact(q, k, v, key_padding_mask, attn_mask, is_causal, extra,
                                       dropout)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not need_weights:
            weights = None
        elif average_attn_weights:
            weights = weights.mean(1)
        if not batched:
            out = out[0]
            weights = None if weights is None else weights[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _exact(self, q, k, v, key_padding_mask, attn_mask, is_causal, extra, dropout):
        """Scores, masks and softmax in full: -> out (B, H, L, hd), weights (B, H, L, S')."""
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        n_q, n_k = q.shape[2], k.shape[2] - extra
        pad = (0, extra)  # bias_k and the zero key stay visible to every query
        if attn_mask is not None:
            scores = scores + F.pad(_additive_mask(attn_mask, scores.dtype), pad)
        elif is_causal:
            future = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
            scores = scores + F.pad(_additive_mask(future, scores.dtype), pad)
        if key_padding_mask is not None:
            scores = scores + F.pad(_additive_mask(key_padding_mask, scores.dtype),
                                    pad)[:, None, None]
        weights = softmax_with_lse(scores)[0] if scores.shape[-1] else scores  # S' = 0: empty
        weights = F.dropout(weights, dropout) if dropout > 0 else weights
        return weights @ v, weights
