"""Attention modules of the encoder-decoder literature: Bahdanau's additive attention,
Luong's global and local attention, pointer attention and hard attention."""

from typing import Optional

import torch
from torch import nn

import attnmem
from attnmem.nn import _checks
from attnmem.reference.attention import softmax_with_lse


def _steps(query, width, like):
    """Checks query (B, Nq, width) or one decoder step (B, width); -> (B, Nq, width) and
    whether it was one step."""
    shape = _checks.tensor("query", query, [("B", "Nq", width), ("B", width)], like)
    return (query[:, None], True) if len(shape) == 2 else (query, False)


def _past(lengths, x):
    """(B, N) bool: the positions of x (B, N, ...) at or past each row's length."""
    return torch.arange(x.shape[1], device=x.device) >= lengths[:, None]


def _sequence(name, x, batch, length, width, like):
    """x: (batch, length, width); None, or a str in the sizes, leaves that size free."""
    _checks.tensor(name, x, [(batch, "Nk" if length is None else length,
                              "Dv" if width is None else width)], like)


class _Additive(nn.Module):
    """The projections of score(i, j) = v . tanh(W_q query_i + b + W_k key_j)."""

    def __init__(self, query_dim, key_dim, attn_dim):
        super().__init__()
        query_dim, key_dim, attn_dim = (_checks.integer(name, given) for name, given in (
            ("query_dim", query_dim), ("key_dim", key_dim), ("attn_dim", attn_dim)))
        self.query_dim, self.key_dim, self.attn_dim = query_dim, key_dim, attn_dim
        self.query_proj = nn.Linear(query_dim, attn_dim)
        self.key_proj = nn.Linear(key_dim, attn_dim, bias=False)
        self.v = nn.Parameter(torch.empty(attn_dim).uniform_(-attn_dim ** -0.5,
                                                             attn_dim ** -0.5))

    def project_keys(self, keys):
        """W_k keys (B, Nk, attn_dim): compute once per source sequence and pass as
        projected_keys to every decoder step."""
        return self.key_proj(keys)

    def _projected(self, query, keys, projected_keys):
        """W_q query + b, and W_k keys unless projected_keys gives them; inputs checked."""
        return (self.query_proj(query),
                self.project_keys(keys) if projected_keys is None else projected_keys)

    def _inputs(self, query, keys, values, kv_lengths, projected_keys):
        """Checks every input, then projects; -> (step, q, k, values)."""
        query, step = _steps(query, self.query_dim, self.v)
        batch = query.shape[0]
        _sequence("keys", keys, batch, None, self.key_dim, self.v)
        if projected_keys is not None:
            _sequence("projected_keys", projected_keys, batch, keys.shape[1], self.attn_dim,
                      self.v)
        if values is not None:
            _sequence("values", values, batch, keys.shape[1], None, self.v)
        _checks.lengths("kv_lengths", kv_lengths, batch, self.v)
        if kv_lengths is not None and projected_keys is None:
            # The op never reads keys past the lengths, but the key projection's weight
            # gradient would take them (NaN, inf) times their zero gradients.
            keys = keys.masked_fill(_past(kv_lengths, keys)[..., None], 0)
        q, k = self._projected(query, keys, projected_keys)
        return step, q, k, keys if values is None else values


class AdditiveAttention(_Additive):
    """Bahdanau et al. (2015) attention, score(i, j) = v . tanh(W_q q_i + W_k k_j), on the
    fused attnmem.additive_attention kernel. query (B, Nq, query_dim) or one decoder step
    (B, query_dim); keys (B, Nk, key_dim); values (B, Nk, Dv), by default the keys. Keys
    and values past kv_lengths reach neither the output nor a gradient, whatever they hold
    (in PointerAttention and HardAttention too). Under torch.autocast the projections run
    in the autocast dtype and the op promotes them to v's and the values' dtype
    (attnmem.additive_attention): the context comes in the widest of those."""

    def forward(self, query, keys, values=None, kv_lengths: Optional[torch.Tensor] = None,
                return_weights: bool = False, projected_keys: Optional[torch.Tensor] = None):
        """-> context (B, Nq, Dv) (or (B, Dv) for one step), and weights (B, Nq, Nk) (or
        (B, Nk)) with return_weights=True."""
        return_weights = _checks.flag("return_weights", return_weights)
        step, q, k, values = self._inputs(query, keys, values, kv_lengths, projected_keys)
        result = attnmem.additive_attention(q, k, values, self.v, kv_lengths=kv_lengths,
                                            return_weights=return_weights)
        if step:
            result = tuple(x[:, 0] for x in result) if return_weights else result[:, 0]
        return result


class PointerAttention(_Additive):
    """Pointer-network attention (Vinyals et al. 2015): log-probabilities (B, Nq, Nk) of
    pointing at each input, log softmax_j(v . tanh(W_q q_i + W_k k_j)); -inf at padding.
    They are float32, under torch.autocast too (the op promotes the projections to v's
    dtype)."""

    def forward(self, query, keys, kv_lengths: Optional[torch.Tensor] = None,
                projected_keys: Optional[torch.Tensor] = None):
        step, q, k, _ = self._inputs(query, keys, None, kv_lengths, projected_keys)
        log_probs = attnmem.pointer_attention(q, k, self.v, kv_lengths=kv_lengths)
        return log_probs[:, 0] if step else log_probs


class HardAttention(PointerAttention):
    """Hard attention (Xu et al. 2015): each query takes one input's value, drawn from the
    additive attention distribution while training (stochastic hard attention, trained
    with REINFORCE through the returned log-probability) and its argmax in eval mode.
    The chosen values keep the values' dtype, under torch.autocast too."""

    def forward(self, query, keys, values=None, kv_lengths: Optional[torch.Tensor] = None,
                sample: Optional[bool] = None, generator: Optional[torch.Generator] = None):
        """-> (indices (B, Nq), chosen values (B, Nq, Dv), log-probability of each choice
        (B, Nq)); a single step (B, query_dim) drops the Nq dimension."""
        sample = self.training if sample is None else _checks.flag("sample", sample)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        step, q, k, values = self._inputs(query, keys, values, kv_lengths, None)
        log_probs = attnmem.pointer_attention(q, k, self.v, kv_lengths=kv_lengths)
        result = attnmem.hard_attention(log_probs, values, sample=sample, generator=generator)
        return tuple(x[:, 0] for x in result) if step else result


SCORES = ("dot", "general", "concat")
MODES = ("global", "local-m", "local-p")


class LuongAttention(nn.Module):
    """Luong et al. (2015) attention for a decoder state h_t over source states h_s.

    score: "dot" h_t . h_s, "general" h_t . W_a h_s, or "concat" v . tanh(W_a [h_t; h_s]).
    mode: "global" attends to every source position (on attnmem.attention for dot and
    general, on the additive kernel for concat). "local-m" attends to the window
    [p_t - D, p_t + D] around p_t = t; "local-p" predicts p_t = S sigmoid(v_p . tanh(W_p h_t))
    (S the source length) and multiplies the window's alignment by
    exp(-(s - p_t)^2 / (2 sigma^2)), sigma = D / 2. The local modes gather the 2D + 1 window
    positions and score them in torch. Returns the attentional state
    h~_t = tanh(W_c [c_t; h_t]) (B, Nq, hidden_size).

    Under torch.autocast the Linear layers and the dot and general scores' matmuls run in
    the autocast dtype, concat's global mode on attnmem.additive_attention, which promotes;
    the local modes keep the window positions in float32 at least, as 16-bit states would
    round them past 256 (bfloat16) or 2048 (float16).
    """

    def __init__(self, hidden_size, score="general", mode="global", window=10,
                 source_size=None, attn_dim=None):
        super().__init__()
        hidden_size = _checks.integer("hidden_size", hidden_size)
        score = _checks.choice("score", score, SCORES)
        mode = _checks.choice("mode", mode, MODES)
        window = _checks.integer("window", window, 0)
        source_size = _checks.optional_integer("source_size", source_size) or hidden_size
        attn_dim = _checks.optional_integer("attn_dim", attn_dim)
        self.hidden_size, self.source_size = hidden_size, source_size
        if score == "dot" and source_size != hidden_size:
            raise ValueError(f"score='dot' needs source_size == hidden_size, got "
                             f"{source_size} and {hidden_size}")
        self.score, self.mode, self.window = score, mode, window
        if score == "general":
            self.W_a = nn.Linear(source_size, hidden_size, bias=False)
        elif score == "concat":
            self.concat = _Additive(hidden_size, source_size, attn_dim or hidden_size)
        if mode == "local-p":
            self.W_p = nn.Linear(hidden_size, hidden_size, bias=False)
            self.v_p = nn.Linear(hidden_size, 1, bias=False)
        self.W_c = nn.Linear(source_size + hidden_size, hidden_size, bias=False)

    def forward(self, query, source, source_lengths: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, return_weights: bool = False):
        """query: (B, Nq, hidden_size) decoder states or one step (B, hidden_size); source:
        (B, Ns, source_size); source_lengths: (B,) integer, in every mode (what the source
        holds past them, NaN or inf, reaches nothing); positions: the
        target positions t, local-m only, (B, Nq) or (Nq,) (or (B,) for one step; default
        0..Nq-1). -> h~ (B, Nq, hidden_size), and the alignment weights (B, Nq, Ns) with
        return_weights=True. Ns = 0 gives a zero context."""
        like = self.W_c.weight
        query, step = _steps(query, self.hidden_size, like)
        batch, n_q = query.shape[:2]
        _checks.tensor("source", source, [(batch, "Ns", self.source_size)], like)
        source_lengths = _checks.lengths("source_lengths", source_lengths, batch, like)
        return_weights = _checks.flag("return_weights", return_weights)
        if positions is not None:
            positions = self._positions(positions, batch, n_q, step, like)
        if source_lengths is not None:
            # Zero weights times a NaN or inf past the lengths would still reach the context.
            source = source.masked_fill(_past(source_lengths, source)[..., None], 0)
        if self.mode == "global":
            context, weights = self._global(query, source, source_lengths, return_weights)
        else:
            context, weights = self._local(query, source, source_lengths, positions)
        out = torch.tanh(self.W_c(torch.cat([context, query], -1)))
        if step:
            out, weights = out[:, 0], weights[:, 0] if weights is not None else None
        return (out, weights) if return_weights else out

    def _positions(self, positions, batch, n_q, step, like):
        """positions (B, Nq) or (Nq,), or (B,) for one step -> broadcastable to (B, Nq)."""
        if self.mode != "local-m":
            raise ValueError(f"positions is read only by mode='local-m', not {self.mode!r}")
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
        shapes = [(batch, n_q), (n_q,)] + ([(batch,)] if step else [])
        if tuple(positions.shape) not in shapes:
            raise ValueError(f"positions must be {' or '.join(map(str, shapes))}, got shape "
                             f"{tuple(positions.shape)}")
        if positions.dtype == torch.bool or positions.dtype.is_complex:
            raise TypeError(f"positions must be an integer or floating-point tensor, got "
                            f"{positions.dtype}")
        _checks.same_device("positions", positions, like)
        return positions[:, None] if step and positions.shape == (batch,) else positions

    def _keys(self, source):
        return self.W_a(source) if self.score == "general" else source

    def _global(self, query, source, lengths, return_weights):
        if self.score == "concat":
            q, k = self.concat._projected(query, source, None)
            result = attnmem.additive_attention(q, k, source, self.concat.v, kv_lengths=lengths,
                                                return_weights=return_weights)
            return result if return_weights else (result, None)
        keys = self._keys(source)
        # attnmem.attention reads values as wide as its keys: wider or narrower sources
        # (general scores with source_size != hidden_size) take the exact weights.
        if not return_weights and keys.shape[-1] == source.shape[-1]:
            return attnmem.attention(query[:, None], keys[:, None], source[:, None], scale=1.0,
                                     kv_lengths=lengths)[:, 0], None
        scores = query @ keys.transpose(1, 2)
        if lengths is not None:
            scores = scores.masked_fill(_past(lengths, source)[:, None], float("-inf"))
        weights = softmax_with_lse(scores)[0] if source.shape[1] else scores
        return weights @ source, weights if return_weights else None

    def _local(self, query, source, lengths, positions):
        batch, n_q, _ = query.shape
        n_s = source.shape[1]
        # Positions in float32 at least: bfloat16 (an autocast decoder's states) holds the
        # integers exactly only up to 256, float16 up to 2048.
        position_dtype = torch.promote_types(query.dtype, torch.float32)
        length = (torch.full((batch,), n_s, device=source.device) if lengths is None
                  else lengths.clamp(0, n_s)).to(position_dtype)
        if n_s == 0:  # a zero row to gather from; length 0 keeps it out of every window
            source = source.new_zeros(batch, 1, source.shape[2])
        if self.mode == "local-p":
            center = length[:, None] * torch.sigmoid(
                self.v_p(torch.tanh(self.W_p(query)))).squeeze(-1)
        elif positions is None:
            center = torch.arange(n_q, device=query.device, dtype=position_dtype).expand(batch,
                                                                                         -1)
        else:
            center = positions.to(position_dtype).expand(batch, n_q)
        offsets = torch.arange(-self.window, self.window + 1, device=query.device)
        index = center.detach().round().long()[..., None] + offsets  # (B, Nq, 2D + 1)
        inside = (index >= 0) & (index < length[:, None, None])
        index = index.clamp(0, source.shape[1] - 1)
        gathered = source[torch.arange(batch, device=source.device)[:, None, None], index]
        if self.score == "concat":
            q, k = self.concat._projected(query, source, None)
            keys = k[torch.arange(batch, device=source.device)[:, None, None], index]
            scores = torch.tanh(q[:, :, None] + keys) @ self.concat.v
        else:
            keys = self._keys(source)[torch.arange(batch, device=source.device)[:, None, None],
                                      index]
            scores = (query[:, :, None] * keys).sum(-1)
        align, _ = softmax_with_lse(scores.masked_fill(~inside, float("-inf")))
        if self.mode == "local-p":
            # A window of one position (D = 0, sigma = 0) has no spread to weigh.
            if self.window > 0:
                sigma = self.window / 2
                gauss = torch.exp(-(index - center[..., None]) ** 2 / (2 * sigma ** 2))
                align = align * gauss.to(align.dtype)
        context = (align[..., None] * gathered).sum(2)
        weights = align.new_zeros(batch, n_q, source.shape[1]).scatter_add(2, index, align)
        return context, weights[..., :n_s]
