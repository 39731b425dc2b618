"""attnmem.attention_varlen: attention over packed variable-length batches, in
FlashAttention's layout and with its semantics (flash_attn_varlen_func).

One torch.library custom op holds the forward (out and logsumexp) and one the backward.
The triton backend runs the attention kernels with their VARLEN flag: each program finds its
sequence in the cumulative lengths, and tiles past a sequence's end exit at once, so no work
goes to padding. The torch backend runs attnmem.attention's torch path (torch's fused CPU
kernel, or the pure-torch twin) on one sequence at a time. Both take attnmem.attention's
score modifications (softcap, sinks, ALiBi slopes) and dropout. A third op holds the FP8
forward (float8_e4m3fn inputs, inference only, no autograd): the same kernel with its FP8
flag, or the float32 twin one sequence at a time.
"""

import operator
from typing import Optional

import torch

from attnmem import _checks, _library
from attnmem import backend as _backend
from attnmem.attention import (
    _OPTIONAL_INPUTS,
    _attention_backward,
    _attention_forward,
    _check_dtype,
    _dropout_p,
    _dropout_seed,
    _fp8_inference,
    _fp8_triton_reasons,
    _is_fp8,
    _no_fp8_options,
    _scale,
    _torch_dropout_mask,
    _triton_reasons,
    _validate_score_mods,
    _value_shape,
    _window,
)
from attnmem.reference import attention as _reference


def _pick(q, k, v, cu_seqlens_q, backend: str) -> str:
    return _backend.resolve(backend, (q, k, v),
                            _triton_reasons(q, cu_seqlens_q.numel() - 1, v), "attention_varlen")


@_library.custom_op("attention_varlen_forward", mutates_args=())
def _varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                    max_seqlen_k: int, scale: float, window_left: int, window_right: int,
                    backend: str, softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                    alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                    seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    mods = dict(softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, dropout_p=dropout_p)
    if _pick(q, k, v, cu_seqlens_q, backend) == "triton":
        from attnmem.kernels import attention as kernel
        return kernel.attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                               max_seqlen_q, max_seqlen_k, scale, window_left,
                                               window_right, **mods, seed=seed)
    return _forward_per_sequence(
        lambda b, rows_q, *qkv: _attention_forward(
            *qkv, None, scale, window_left, window_right, "torch",
            **_sequence_mods(mods, b, rows_q, seed)),
        q, k, v, cu_seqlens_q, cu_seqlens_k, q.dtype, _reference.compute_dtype(q.dtype))


@_varlen_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right, backend, softcap=0.0, sinks=None, alibi_slopes=None, dropout_p=0.0,
      seed=None):
    return q.new_empty((*q.shape[:2], v.shape[-1])), q.new_empty(
        (q.shape[1], q.shape[0]), dtype=_reference.compute_dtype(q.dtype))


@_library.custom_op("attention_varlen_backward", mutates_args=())
def _varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, scale: float, window_left: int, window_right: int,
                     backend: str, softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                     alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                     seed: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and dsinks (empty without sinks)."""
    mods = dict(softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, dropout_p=dropout_p)
    if _pick(q, k, v, cu_seqlens_q, backend) == "triton":
        from attnmem.kernels import attention as kernel
        grads = kernel.attention_varlen_backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q,
                                                 cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                 scale, window_left, window_right, **mods,
                                                 seed=seed)
        return grads if sinks is not None else (*grads, q.new_empty(0))
    grads = [x.new_zeros(x.shape) for x in (q, k, v)]
    dsinks = q.new_empty(0) if sinks is None else torch.zeros_like(sinks)
    for b, (rows_q, rows_k) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        stats = [None if x is None else x[None, :, rows_q].contiguous() for x in (lse, dlse)]
        *grads_b, dsinks_b = _attention_backward(
            _dense(dout[rows_q]), _dense(q[rows_q]), _dense(k[rows_k]), _dense(v[rows_k]),
            _dense(out[rows_q]), *stats, None, scale, window_left, window_right, "torch",
            **_sequence_mods(mods, b, rows_q, seed))
        for grad, grad_b, rows in zip(grads, grads_b, (rows_q, rows_k, rows_k)):
            grad[rows] = grad_b[0].transpose(0, 1)
        if sinks is not None:
            dsinks += dsinks_b
    return (*grads, dsinks)


@_varlen_backward.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      scale, window_left, window_right, backend, softcap=0.0, sinks=None, alibi_slopes=None,
      dropout_p=0.0, seed=None):
    dsinks = q.new_empty(0) if sinks is None else sinks.new_empty(sinks.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


@_library.custom_op("attention_varlen_forward_fp8", mutates_args=())
def _varlen_forward_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        descales: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                        scale: float, window_left: int, window_right: int,
                        out_dtype: torch.dtype, backend: str, softcap: float = 0.0,
                        sinks: Optional[torch.Tensor] = None,
                        alibi_slopes: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 forward of packed sequences: descales (B, Hkv, 3) float32 stacks each
    sequence's q, k and v descales. No autograd: attention_varlen() refuses a call that asks
    for a gradient."""
    mods = dict(softcap=softcap, sinks=sinks)
    reasons = _fp8_triton_reasons(q, cu_seqlens_q.shape[0] - 1, v)
    if _backend.resolve(backend, (q, k, v), reasons, "attention_varlen") == "triton":
        from attnmem.kernels import attention as kernel
        return kernel.attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                               max_seqlen_q, max_seqlen_k, scale, window_left,
                                               window_right, **mods, alibi_slopes=alibi_slopes,
                                               descales=descales, out_dtype=out_dtype)
    return _forward_per_sequence(
        lambda b, rows_q, *qkv: _reference.attention_forward_fp8(
            *qkv, descales[b:b + 1], None, scale, window_left, window_right, out_dtype, **mods,
            alibi_slopes=_sequence_slopes(alibi_slopes, b)),
        q, k, v, cu_seqlens_q, cu_seqlens_k, out_dtype, torch.float32)


@_varlen_forward_fp8.register_fake
def _(q, k, v, descales, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      window_left, window_right, out_dtype, backend, softcap=0.0, sinks=None,
      alibi_slopes=None):
    return (q.new_empty((*q.shape[:2], v.shape[-1]), dtype=out_dtype),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


# The forward op's inputs from max_seqlen_q to backend; its optional ones after them are
# attnmem.attention's, with the same defaults (callers may leave them out).
_REQUIRED_ARGS = 6


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *args = inputs
    args, rest = args[:_REQUIRED_ARGS], args[_REQUIRED_ARGS:]
    softcap, sinks, alibi_slopes, dropout_p, seed = (*rest, *_OPTIONAL_INPUTS[len(rest):])
    ctx.save_for_backward(q, k, v, *output, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes,
                          seed)
    ctx.args = (*args, softcap)
    ctx.dropout_p = dropout_p
    # An unused lse then gets None rather than zeros, and the fused CPU backward can run.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes, seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    *grads, dsinks = _varlen_backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                                      *ctx.args, sinks, alibi_slopes, ctx.dropout_p, seed)
    # ALiBi slopes get no gradient, as in FlashAttention (attention_varlen() refuses ones
    # that ask).
    return (*grads, None, None, None, None, None, None, None, None, None,
            None if sinks is None else dsinks, None, None, None)


_varlen_forward.register_autograd(_backward, setup_context=_setup_context)


def _forward_per_sequence(forward, q, k, v, cu_seqlens_q, cu_seqlens_k, out_dtype,
                          lse_dtype):
    """The torch backend's forward: forward(b, rows_q, q, k, v) -> (out, lse) of sequence b
    (query rows rows_q) as a dense batch of one (see _dense), run on each sequence and
    packed into out (total_q, H, Ev) in out_dtype and lse (H, total_q) in lse_dtype."""
    out = q.new_zeros((*q.shape[:2], v.shape[-1]), dtype=out_dtype)
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype)
    for b, (rows_q, rows_k) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        out_b, lse_b = forward(b, rows_q, _dense(q[rows_q]), _dense(k[rows_k]),
                               _dense(v[rows_k]))
        out[rows_q] = out_b[0].transpose(0, 1)
        lse[:, rows_q] = lse_b[0]
    return out, lse


def _sequence_mods(mods, b, rows_q, seed):
    """attnmem.attention's score modifications and dropout for sequence b (query rows
    rows_q), a batch of one: its row of (B, H) ALiBi slopes, and _sequence_seed."""
    return dict(mods, alibi_slopes=_sequence_slopes(mods["alibi_slopes"], b),
                seed=_sequence_seed(seed, rows_q))


def _sequence_slopes(slopes, b):
    """Sequence b's ALiBi slopes: its row of (B, H) slopes, (H,) ones as they are."""
    return slopes[b:b + 1] if slopes is not None and slopes.ndim == 2 else slopes


def _sequence_seed(seed, rows_q):
    """The seed shifted by the sequence's first packed row: attnmem.attention's torch path
    draws its query row i's mask from seed + i, so packed row r's comes from seed + r."""
    return None if seed is None else seed + rows_q.start


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """(query rows, key rows) of each sequence, as slices; the torch backend reads the
    cumulative lengths on the host."""
    ends_q, ends_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(slice(*ends_q[b:b + 2]), slice(*ends_k[b:b + 2])) for b in range(len(ends_q) - 1)]


def _dense(x):
    """One sequence's packed rows (N, H, D) as attnmem.attention's batch of one (1, H, N, D)."""
    return x.transpose(0, 1)[None]


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def _cu_seqlens(name, x, device, ref="q"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as FlashAttention's), got {x.dtype}")
    if x.ndim != 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must be (B + 1,) cumulative lengths, got shape "
                         f"{tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {ref} is on {device}")
    if x.shape[0] > 1 and x.stride(0) != 1:
        # The kernels read sequence b's bounds at b and b + 1 (FlashAttention checks the same).
        raise ValueError(f"{name} must be contiguous, got stride {x.stride(0)}")


def _max_seqlen(name, value, total, batch) -> int:
    try:
        value = operator.index(value)  # Python and numpy integers, not floats
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value}")
    # A check on sizes alone, which needs no look at the lengths.
    if value * batch < total:
        raise ValueError(f"{name} = {value} cannot hold {total} rows in {batch} sequences: it "
                         "must be at least the longest sequence's length")
    return value


def _check_lengths(name, cu_seqlens, total, max_seqlen, max_name):
    """The values of cu_seqlens (on the CPU, where reading them costs no device sync)."""
    lengths = cu_seqlens.diff()
    if cu_seqlens[0] != 0:
        raise ValueError(f"{name} must start at 0, got {int(cu_seqlens[0])}")
    if (lengths < 0).any():
        b = int((lengths < 0).nonzero()[0])
        raise ValueError(f"{name} must be nondecreasing, but {name}[{b + 1}] = "
                         f"{int(cu_seqlens[b + 1])} < {name}[{b}] = {int(cu_seqlens[b])}")
    if cu_seqlens[-1] != total:
        raise ValueError(f"{name} must end at the {total} packed rows, got "
                         f"{int(cu_seqlens[-1])}")
    if len(lengths) and lengths.max() > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is less than the longest sequence in "
                         f"{name}, {int(lengths.max())}")


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
              window, return_lse, fp8=False):
    _checks.tensor("q", q, 3, "(total_q, H, D)")
    _check_dtype(q, fp8)
    for name, x in (("k", k), ("v", v)):
        _checks.tensor(name, x, 3, "(total_k, Hkv, Ev)" if name == "v" else "(total_k, Hkv, D)")
        _checks.like(name, x, q, "q")
    if q.shape[-1] < 1:
        raise ValueError("q must have a head dim of at least 1")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k has head dim {k.shape[-1]} but q has head dim {q.shape[-1]}")
    _value_shape(v, k, value_head_dim=True)
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k has {k.shape[1]} heads, which must divide q's {q.shape[1]} heads "
                         "(grouped-query attention)")
    for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _cu_seqlens(name, x, q.device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's shape (B + 1,) = "
                         f"{tuple(cu_seqlens_q.shape)}, got {tuple(cu_seqlens_k.shape)}")
    batch, total_q, total_k = cu_seqlens_q.shape[0] - 1, q.shape[0], k.shape[0]
    max_seqlen_q = _max_seqlen("max_seqlen_q", max_seqlen_q, total_q, batch)
    max_seqlen_k = _max_seqlen("max_seqlen_k", max_seqlen_k, total_k, batch)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    scale = _scale(scale, q)
    # Bounds past every sequence, whatever the lengths: a window of total_k - 1 keys back
    # and total_q - 1 ahead spans all keys of any sequence.
    left, right = _window(window, total_q, total_k)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_lengths("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q")
        _check_lengths("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k")
    return max_seqlen_q, max_seqlen_k, scale, left, right


def dropout_mask(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                 generator=None):
    """The keep masks (B, H, max_seqlen_q, max_seqlen_k) bool that attention_varlen(q, k, v,
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
    generator=generator) applies on the backend it picks, where generator is in the state
    that call found it in: sequence b's mask is [b, :, :Lq, :Lk] (the rest is not used, and
    is False on the torch backend). The tests run the float64 twin with it."""
    dropout_p = _dropout_p(dropout_p)
    if dropout_p == 0:
        raise ValueError("dropout_p must be > 0 for a dropout mask")
    seed = _dropout_seed(dropout_p, generator, q)
    shape = (cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k)
    if _pick(q, k, k, cu_seqlens_q, _backend.requested_backend()) == "triton":
        from attnmem.kernels import attention as kernel
        return kernel.dropout_keep_mask(seed, shape, dropout_p)
    keep = torch.zeros(shape, dtype=torch.bool, device=q.device)
    for b, (rows_q, rows_k) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        n_q, n_k = rows_q.stop - rows_q.start, rows_k.stop - rows_k.start
        draw = _torch_dropout_mask(_sequence_seed(seed, rows_q), dropout_p, _dense(q[rows_q]),
                                   _dense(k[rows_k]))
        keep[b, :, :n_q, :n_k] = draw(torch.arange(n_q, device=q.device))[0]
    return keep


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     causal=False, scale=None, window=None, return_lse=False, softcap=None,
                     sinks=None, alibi_slopes=None, dropout_p=0.0, generator=None,
                     q_descale=None, k_descale=None, v_descale=None, out_dtype=None):
    """Softmax attention over a packed batch of variable-length sequences, in the layout of
    FlashAttention's flash_attn_varlen_func and with its semantics.

    q: (total_q, H, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Ev) with H % Hkv == 0 (query
    head h reads kv head h // (H // Hkv)): the sequences' rows one after another, no padding
    between them. v's head dim Ev may differ from D, as in attnmem.attention.
    cu_seqlens_q, cu_seqlens_k: contiguous int32 (B + 1,) cumulative lengths on q's device,
    starting at 0 and ending at total_q (total_k): sequence b's queries are rows cu_seqlens_q[b] to
    cu_seqlens_q[b + 1] of q, its keys rows cu_seqlens_k[b] to cu_seqlens_k[b + 1] of k and
    v. Lengths may be 0. max_seqlen_q, max_seqlen_k: ints, at least the longest sequence's
    lengths: they size the launch grid, as in FlashAttention. Returns out (total_q, H, Ev) in
    q's dtype and, with return_lse=True, the natural-log logsumexp (H, total_q) of the
    scaled, masked scores (differentiable), float32 (float64 for float64 inputs, which only
    the torch backend takes).

    Masks align each sequence bottom-right to its own lengths, as FlashAttention's varlen
    kernels do: with Lq and Lk the lengths of sequence b, its query i sits at
    a = i + Lk - Lq and sees its key j (0 <= j < Lk, never another sequence's) when:
      causal:            j <= a
      window=(l, r):     a - l <= j <= a + r   (None or -1 leaves a side unbounded)
    A query that sees no key (Lk = 0, or a mask that hides every key, as causal does to the
    first Lq - Lk queries when Lq > Lk) outputs zeros, has lse -inf and gets zero gradients.
    scale defaults to 1/sqrt(D).

    The triton backend's grid is ceil(max_seqlen / tile) tiles per sequence and head; tiles
    past a sequence's end exit at once, so no work goes to padding. Its backward adds dQ
    with float32 atomics by default and runs a separate dQ kernel, bit-for-bit repeatable,
    under torch.use_deterministic_algorithms(True), as attnmem.attention does (FlashAttention's
    deterministic flag). The torch backend computes each sequence with attnmem.attention's
    torch path, reading the cumulative lengths on the host.

    Checked on CPU tensors, and left out on CUDA, where reading the lengths would stall the
    host until the device catches up (FlashAttention does not check them either): that
    cu_seqlens start at 0, never decrease, end at the packed totals, and that no sequence is
    longer than max_seqlen. On CUDA the kernels clamp every sequence into the packed rows, so
    wrong lengths read and write nothing outside the tensors, but rows that no sequence
    covers, or that lie past max_seqlen in theirs, are left unwritten. Checked everywhere,
    from sizes alone: max_seqlen * B covers the totals.

    softcap, sinks ((H,)), alibi_slopes ((H,) or (B, H), row b for sequence b), dropout_p
    and generator: as attnmem.attention takes them (FlashAttention's varlen function takes
    softcap, alibi_slopes and dropout_p alike), with the same checks. ALiBi's bias
    -slope * |a - j| measures from the sequence's own aligned position a = i + Lk - Lq, and
    a query that sees no key has lse = sinks[h] with sinks. Dropout draws one seed as
    attnmem.attention does; the triton kernels key sequence b's Philox counters by b where
    attnmem.attention's use the batch index, and the torch backend draws packed query row
    r's mask from a generator seeded with seed + r. dropout_mask(q, k, cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, generator), in this module,
    returns the masks a call applies.

    FP8 (FlashAttention-3's FP8 forward of flash_attn_varlen_func, inference only): q, k, v
    in torch.float8_e4m3fn with q_descale, k_descale, v_descale ((B, Hkv) float32 each, row
    b for sequence b; None for 1), such that sequence b's inputs are q * q_descale[b,
    h // (H // Hkv)] and so on (attnmem.quantize_fp8(x, kv_heads=Hkv,
    cu_seqlens=cu_seqlens) makes both). As attnmem.attention's FP8 forward: out in out_dtype
    (bfloat16 by default; float16 or float32), lse float32, both products in e4m3 with
    float32 accumulation on GPUs with fp8 tensor cores (the softmax weights rounded to e4m3,
    up to 2^-4 of sum_j p_ij |v_jd| per output element), the float32 twin on older GPUs, the
    CPU and the torch backend; causal, window, grouped-query heads, return_lse, softcap,
    sinks and alibi_slopes as above; dropout_p must be 0 and nothing may ask for a gradient.
    The kernel reads v with its keys contiguous: the launcher copies v once per call into
    (Hkv, D, keys) with each sequence's keys starting on a 16-byte boundary.
    """
    fp8 = _is_fp8(q)
    descales = (q_descale, k_descale, v_descale)
    if not fp8:
        _no_fp8_options(q, descales, out_dtype)
    max_seqlen_q, max_seqlen_k, scale, window_left, window_right = _validate(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window,
        return_lse, fp8)
    batch = cu_seqlens_q.shape[0] - 1
    softcap, sinks, alibi_slopes = _validate_score_mods(q, scale, softcap, sinks, alibi_slopes,
                                                        batch, q.shape[1])
    if fp8:
        descales, out_dtype = _fp8_inference(q, k, v, batch, sinks, dropout_p, descales,
                                             out_dtype)
        out, lse = _varlen_forward_fp8(q, k, v, descales, cu_seqlens_q, cu_seqlens_k,
                                       max_seqlen_q, max_seqlen_k, scale, window_left,
                                       window_right, out_dtype, _backend.requested_backend(),
                                       softcap, sinks, alibi_slopes)
        return (out, lse) if return_lse else out
    dropout_p = _dropout_p(dropout_p)
    seed = _dropout_seed(dropout_p, generator, q)
    out, lse = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               scale, window_left, window_right, _backend.requested_backend(),
                               softcap, sinks, alibi_slopes, dropout_p, seed)
    return (out, lse) if return_lse else out
