"""Additive (Bahdanau) attention and the ops read off its distribution: pointer attention
(log-probabilities over the inputs) and hard attention (one chosen input per query).

The score is v . tanh(q_i + k_j) on projected queries q = W_q query (+ bias) and keys
k = W_k key: the projections stay ordinary matmuls, and the Triton kernel fuses the tanh
scores, the softmax and the weighted sum without forming the (B, Nq, Nk, A) tensor that
eager torch does.

additive_attention's and pointer_attention's inputs share one floating dtype; under
torch.autocast, mixed ones (a Linear's bfloat16 q and k beside float32 v and values) are
promoted to the widest, torch.cat's policy (_checks.autocast_promote).
"""

from typing import Optional

import torch

from attnmem import _checks, _library
from attnmem import backend as _backend
from attnmem.reference import additive as _reference
from attnmem.reference.attention import softmax_with_lse

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The kernel holds a (BLOCK_M, value width) accumulator in registers.
MAX_TRITON_VALUE_DIM = 256


@_library.custom_op("additive_attention", mutates_args=())
def _additive_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 values: Optional[torch.Tensor], kv_lengths: Optional[torch.Tensor],
                 need_scores: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton path -> (out, scores, lse); out is (B, Nq, 0) without values, scores (0,)
    unless need_scores."""
    from attnmem.kernels import additive_attention as kernel

    out, lse, scores = kernel.additive_attention_forward(q, k, v, values, kv_lengths,
                                                         need_scores)
    return out, scores, lse


@_additive_op.register_fake
def _(q, k, v, values, kv_lengths, need_scores):
    batch, n_q, _ = q.shape
    return (q.new_empty((batch, n_q, 0 if values is None else values.shape[2])),
            q.new_empty((batch, n_q, k.shape[1]) if need_scores else (0,), dtype=torch.float32),
            q.new_empty((batch, n_q), dtype=torch.float32))


@_library.custom_op("additive_attention_backward", mutates_args=())
def _additive_backward_op(dout: Optional[torch.Tensor], dscores: Optional[torch.Tensor],
                          dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, values: Optional[torch.Tensor],
                          kv_lengths: Optional[torch.Tensor], out: torch.Tensor,
                          lse: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, dvalues (empty without values)."""
    from attnmem.kernels import additive_attention as kernel

    dq, dk, dv, dvalues = kernel.additive_attention_backward(dout, dscores, dlse, q, k, v,
                                                             values, kv_lengths, out, lse)
    return dq, dk, dv, q.new_empty(0) if dvalues is None else dvalues


@_additive_backward_op.register_fake
def _(dout, dscores, dlse, q, k, v, values, kv_lengths, out, lse):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(0 if values is None else values.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, values, kv_lengths, need_scores = inputs
    out, _, lse = output
    ctx.save_for_backward(q, k, v, values, kv_lengths, out, lse)
    ctx.need_scores = need_scores


def _backward(ctx, dout, dscores, dlse):
    q, k, v, values, kv_lengths, out, lse = ctx.saved_tensors
    dq, dk, dv, dvalues = _additive_backward_op(
        None if values is None else dout, dscores if ctx.need_scores else None, dlse, q, k, v,
        values, kv_lengths, out, lse)
    return dq, dk, dv, None if values is None else dvalues, None, None


_additive_op.register_autograd(_backward, setup_context=_setup_context)


def _tensor(name, x, ndim, what, q=None):
    _checks.tensor(name, x, ndim, what)
    if q is not None:
        _checks.like(name, x, q, "q")


def _validate(q, k, values, v, kv_lengths):
    _tensor("q", q, 3, "(B, Nq, A)")
    _tensor("k", k, 3, "(B, Nk, A)", q)
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k must be (B, Nk, A) with B, A = {q.shape[0]}, {q.shape[2]} from q, "
                         f"got {tuple(k.shape)}")
    _tensor("v", v, 1, "(A,)", q)
    if v.shape[0] != q.shape[2]:
        raise ValueError(f"v must be (A,) = ({q.shape[2]},), got {tuple(v.shape)}")
    if values is not None:
        _tensor("values", values, 3, "(B, Nk, Dv)", q)
        if values.shape[:2] != k.shape[:2]:
            raise ValueError(f"values must be (B, Nk, Dv) with B, Nk = {tuple(k.shape[:2])}, "
                             f"got {tuple(values.shape)}")
    return _checks.lengths("kv_lengths", kv_lengths, q.shape[0], k.shape[1], q.device)


def _run(q, k, values, v, kv_lengths, need_scores):
    """(out, scores, lse) on the backend chosen for these inputs."""
    kv_lengths = _validate(q, k, values, v, kv_lengths)
    reasons = []
    if q.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} (supported: float16, bfloat16, float32)")
    if values is not None and values.shape[2] > MAX_TRITON_VALUE_DIM:
        reasons.append(f"value width {values.shape[2]} > {MAX_TRITON_VALUE_DIM}")
    reasons += _backend.grid_reasons([("batch entries", q.shape[0])])
    if _backend.resolve(_backend.requested_backend(), (q, k, v), reasons,
                        "additive_attention") == "triton":
        return _additive_op(q, k, v, values, kv_lengths, need_scores)
    return _reference.additive_attention(q, k, v, values, kv_lengths)


def _log_weights(scores, lse):
    """log softmax from the scores and their logsumexp: -inf where masked, never NaN."""
    return scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]


@_checks.autocast_promote
def additive_attention(q, k, values, v, *, kv_lengths=None, return_weights=False):
    """Bahdanau attention: out_i = sum_j softmax_j(v . tanh(q_i + k_j)) values_j.

    q: (B, Nq, A) projected queries (W_q query + bias); k: (B, Nk, A) projected keys
    (W_k key); values: (B, Nk, Dv); v: (A,). kv_lengths (B,): keys j >= kv_lengths[b] are
    padding. Returns (B, Nq, Dv), and with return_weights=True also the weights
    (B, Nq, Nk). A query with no key outputs zeros and zero weights.
    On CUDA (sm_75 on) the triton kernels take float16 and bfloat16 inputs' tanh from the
    hardware (tanh.approx.f32, about 2^-11 relative error, within their rounding), float32
    inputs' from an exact form (a tanh within 2e-7 of float64's). Under torch.autocast,
    mixed floating dtypes run in the widest (see the module docstring).
    """
    if values is None:
        raise TypeError("values must be a tensor (B, Nk, Dv); for the distribution alone, "
                        "use pointer_attention")
    _checks.flag("return_weights", return_weights)
    out, scores, lse = _run(q, k, values, v, kv_lengths, return_weights)
    if not return_weights:
        return out
    return out, torch.exp(_log_weights(scores, lse)).to(q.dtype)


@_checks.autocast_promote
def pointer_attention(q, k, v, *, kv_lengths=None):
    """Pointer-network attention (Vinyals et al. 2015): the log-probabilities (B, Nq, Nk),
    in float32, of pointing at input j from output step i, log softmax_j(v . tanh(q_i + k_j)).
    Padding keys (j >= kv_lengths[b]) get -inf. Shapes as in additive_attention. The tanh is
    the exact form in every dtype (not the hardware's, whose 2^-11 relative error would
    reach the float32 log-probabilities at 2^-11 of the scores' range). Under
    torch.autocast, mixed floating dtypes run in the widest (see the module docstring)."""
    _, scores, lse = _run(q, k, None, v, kv_lengths, True)
    return _log_weights(scores, lse).float()


def hard_attention(log_weights, values, *, sample=False, generator=None):
    """Hard attention: each query attends to one input, the most likely (sample=False) or
    one drawn from the distribution (Xu et al. 2015's stochastic hard attention).

    log_weights: (B, Nq, Nk) log-probabilities (e.g. pointer_attention's); values:
    (B, Nk, Dv). Returns (indices (B, Nq) int64, chosen values (B, Nq, Dv), log-probability
    of each choice (B, Nq)); only the last is differentiable (REINFORCE's score function).
    A query whose inputs are all -inf (or that has none, Nk = 0) picks index 0 with
    log-probability -inf and a zero value.
    """
    _tensor("log_weights", log_weights, 3, "(B, Nq, Nk)")
    _tensor("values", values, 3, "(B, Nk, Dv)")
    if values.shape[:2] != (log_weights.shape[0], log_weights.shape[2]):
        raise ValueError(f"values must be (B, Nk, Dv) with B, Nk = {log_weights.shape[0]}, "
                         f"{log_weights.shape[2]} from log_weights, got {tuple(values.shape)}")
    if values.device != log_weights.device:
        raise ValueError(f"values is on {values.device} but log_weights is on "
                         f"{log_weights.device}")
    if not isinstance(sample, bool):
        raise TypeError(f"sample must be a bool, got {type(sample).__name__}")
    # One host sync: NaN or +inf log-probabilities would pick arbitrary inputs silently.
    if not bool((log_weights < float("inf")).all()):
        raise ValueError("log_weights must be log-probabilities: finite or -inf, without NaN "
                         "or +inf")
    if log_weights.shape[2] == 0:  # nothing to choose: as for a row of -inf inputs
        batch, n_q = log_weights.shape[:2]
        return (torch.zeros((batch, n_q), dtype=torch.long, device=values.device),
                values.new_zeros((batch, n_q, values.shape[2])),
                log_weights.new_full((batch, n_q), float("-inf")))
    with torch.no_grad():
        if sample:
            # Normalised here, so log-weights off by a constant (or far below 0) sample right.
            probs = softmax_with_lse(log_weights.detach().float())[0].flatten(0, 1)
            empty = probs.sum(-1) == 0
            probs[empty, 0] = 1.0
            indices = torch.multinomial(probs, 1, generator=generator).view(
                log_weights.shape[:2])
        else:
            indices = log_weights.argmax(-1)
    chosen = torch.gather(values, 1, indices[..., None].expand(-1, -1, values.shape[2]))
    log_prob = torch.gather(log_weights, 2, indices[..., None]).squeeze(-1)
    # Only a query whose inputs are all -inf picks one of log-probability -inf: index 0
    # holds no value of it (padding may hold NaN), as with no inputs at all.
    chosen = chosen.masked_fill((log_prob == float("-inf"))[..., None], 0)
    return indices, chosen, log_prob
