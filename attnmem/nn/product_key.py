"""Product-key memory layer (Lample et al. 2019; Berges et al. 2024) on
attnmem.product_key_lookup."""

import math

import torch
from torch import nn

import attnmem
from attnmem.nn import _checks


class ProductKeyMemory(nn.Module):
    """A memory of n_keys ** 2 value rows read through product keys, in place of a
    feed-forward layer: x (..., dim) -> (..., value_dim).

    The query network is a linear map to heads * query_dim, followed by a batch norm over
    its features (query_batchnorm, as in Lample et al.'s code); each head owns two sub-key
    tables (heads, 2, n_keys, query_dim / 2), initialised uniform in +-1/sqrt(query_dim / 2)
    as nn.Linear is, and learned (learn_keys=False keeps them fixed). The value table is an
    nn.Embedding(n_keys ** 2, value_dim), initialised normal with std value_dim ** -0.5;
    sparse=True gives it sparse gradients for torch.optim.SparseAdam. Each head reads its
    topk best rows; the heads' reads are summed. query_dim defaults to dim (rounded up to
    even), value_dim to dim.
    """

    def __init__(self, dim, n_keys, topk, heads=4, value_dim=None, query_dim=None,
                 query_batchnorm=True, sparse=False, learn_keys=True):
        super().__init__()
        dim = _checks.integer("dim", dim)
        n_keys = _checks.integer("n_keys", n_keys)
        topk = _checks.integer("topk", topk)
        heads = _checks.integer("heads", heads)
        value_dim = _checks.optional_integer("value_dim", value_dim) or dim
        query_dim = _checks.optional_integer("query_dim", query_dim) or dim + dim % 2
        query_batchnorm = _checks.flag("query_batchnorm", query_batchnorm)
        self.sparse = _checks.flag("sparse", sparse)
        learn_keys = _checks.flag("learn_keys", learn_keys)
        if query_dim % 2:
            raise ValueError(f"query_dim must be even (two halves), got {query_dim}")
        if topk > n_keys:
            raise ValueError(f"topk must be <= n_keys={n_keys}, got {topk}")
        if n_keys * n_keys > attnmem.product_key.MAX_ROWS:
            raise ValueError(f"n_keys={n_keys} gives n_keys ** 2 > 2 ** 31 - 1 value rows")
        self.dim, self.n_keys, self.topk, self.heads = dim, n_keys, topk, heads
        self.value_dim, self.query_dim = value_dim, query_dim
        self.query = nn.Linear(dim, heads * query_dim)
        self.query_norm = nn.BatchNorm1d(heads * query_dim) if query_batchnorm else None
        half = query_dim // 2
        bound = 1 / math.sqrt(half)
        sub_keys = torch.empty(heads, 2, n_keys, half).uniform_(-bound, bound)
        if learn_keys:
            self.sub_keys = nn.Parameter(sub_keys)
        else:
            self.register_buffer("sub_keys", sub_keys)
        self.values = nn.Embedding(n_keys * n_keys, value_dim, sparse=self.sparse)
        nn.init.normal_(self.values.weight, std=value_dim ** -0.5)

    def forward(self, x: torch.Tensor, return_indices: bool = False):
        """x (..., dim) -> (..., value_dim); with return_indices=True also the rows and
        weights (..., heads, topk) each head read."""
        if isinstance(x, torch.Tensor) and x.ndim == 0:
            raise ValueError(f"x must be (..., {self.dim}), got a 0-dim tensor")
        _checks.tensor("x", x, [("...",) * (x.ndim - 1) + (self.dim,)], self.query.weight)
        return_indices = _checks.flag("return_indices", return_indices)
        lead = x.shape[:-1]
        queries = self.query(x.reshape(-1, self.dim))
        if self.query_norm is not None:
            queries = self.query_norm(queries)
        # Under autocast the lookup runs in the tables' dtype: no copy of the value table.
        queries = queries.view(-1, self.heads, self.query_dim).to(self.sub_keys.dtype)
        out, rows, weights = attnmem.product_key_lookup(
            queries, self.sub_keys, self.values.weight,
            topk=self.topk, return_indices=True, sparse=self.sparse)
        out = out.view(*lead, self.value_dim)
        if return_indices:
            return (out, rows.view(*lead, self.heads, self.topk),
                    weights.view(*lead, self.heads, self.topk))
        return out

    def extra_repr(self):
        return (f"dim={self.dim}, n_keys={self.n_keys}, topk={self.topk}, heads={self.heads}, "
                f"value_dim={self.value_dim}, query_dim={self.query_dim}, sparse={self.sparse}")
