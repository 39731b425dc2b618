"""attnmem.apply_rotary: rotary position embeddings for training and inference, with
FlashAttention's arguments (flash_attn.layers.rotary.apply_rotary_emb).

Two torch.library custom ops: the rotation into a new tensor (with a backward: the inverse
rotation of the output's gradient) and the rotation in place (no autograd), each on the
triton kernel (attnmem.kernels.rotary) or on the pure-torch twin (attnmem.reference.rotary),
as attnmem.backend chooses.
"""

import operator
from typing import Optional

import torch

from attnmem import _checks, _library
from attnmem import backend as _backend
from attnmem.attention import MAX_TRITON_HEAD_DIM, TRITON_DTYPES
from attnmem.reference import rotary as _reference
from attnmem.varlen import _check_lengths, _cu_seqlens, _max_seqlen

MIN_ROWS = 8


def _pick(x, backend: str, batch: int, seqlen: int) -> str:
    reasons = []
    # The grid's 1st axis holds each sequence's rows (token, head) in tiles of at least
    # MIN_ROWS (kernels/rotary.py's configs at head dims up to MAX_TRITON_HEAD_DIM).
    programs = -(-seqlen * x.shape[-2] // MIN_ROWS)
    if programs > _backend.GRID_X_LIMIT:
        reasons.append(f"{seqlen} tokens x {x.shape[-2]} heads need {programs} programs > "
                       f"{_backend.GRID_X_LIMIT}, the CUDA launch grid's limit")
    if x.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {x.dtype} (supported: float16, bfloat16, float32)")
    if x.shape[-1] > MAX_TRITON_HEAD_DIM:
        reasons.append(f"head dim {x.shape[-1]} > {MAX_TRITON_HEAD_DIM}")
    reasons += _backend.grid_reasons([("sequences", batch)])
    return _backend.resolve(backend, (x,), reasons, "apply_rotary")


def _rotate(x, cos, sin, seqlen_offsets, offset, cu_seqlens, max_seqlen, interleaved,
            conjugate, backend, inplace):
    batch, seqlen = x.shape[:2] if cu_seqlens is None else (cu_seqlens.shape[0] - 1, max_seqlen)
    if _pick(x, backend, batch, seqlen) == "triton":
        from attnmem.kernels import rotary as kernel
        return kernel.apply_rotary(x, cos, sin, seqlen_offsets, offset, cu_seqlens,
                                   max_seqlen, interleaved, conjugate, inplace)
    with torch.no_grad():
        out = _reference.apply_rotary(x, cos, sin, offset if seqlen_offsets is None
                                      else seqlen_offsets, cu_seqlens, interleaved, conjugate)
    return x.copy_(out) if inplace else out


@_library.custom_op("apply_rotary", mutates_args=())
def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            seqlen_offsets: Optional[torch.Tensor], offset: int,
            cu_seqlens: Optional[torch.Tensor], max_seqlen: int, interleaved: bool,
            conjugate: bool, backend: str) -> torch.Tensor:
    """x rotated into a new tensor; by the inverse rotation with conjugate (the backward)."""
    return _rotate(x, cos, sin, seqlen_offsets, offset, cu_seqlens, max_seqlen, interleaved,
                   conjugate, backend, inplace=False)


@_rotary.register_fake
def _(x, cos, sin, seqlen_offsets, offset, cu_seqlens, max_seqlen, interleaved, conjugate,
      backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, cos, sin, seqlen_offsets, offset, cu_seqlens, *args = inputs
    ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
    ctx.args = offset, *args


def _backward(ctx, dout):
    cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
    offset, max_seqlen, interleaved, conjugate, backend = ctx.args
    dx = _rotary(dout, cos, sin, seqlen_offsets, offset, cu_seqlens, max_seqlen, interleaved,
                 not conjugate, backend)
    return dx, None, None, None, None, None, None, None, None, None


_rotary.register_autograd(_backward, setup_context=_setup_context)


@_library.custom_op("apply_rotary_", mutates_args=("x",))
def _rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             seqlen_offsets: Optional[torch.Tensor], offset: int,
             cu_seqlens: Optional[torch.Tensor], max_seqlen: int, interleaved: bool,
             backend: str) -> None:
    """x rotated in place."""
    _rotate(x, cos, sin, seqlen_offsets, offset, cu_seqlens, max_seqlen, interleaved, False,
            backend, inplace=True)


@_rotary_.register_fake
def _(x, cos, sin, seqlen_offsets, offset, cu_seqlens, max_seqlen, interleaved, backend):
    return None


def _validate(x, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens, max_seqlen):
    """-> (seqlen_offsets as a tensor or None, as an int, max_seqlen as an int)."""
    varlen = cu_seqlens is not None
    _checks.tensor("x", x, 3 if varlen else 4,
                   "(total, H, D) with cu_seqlens" if varlen else "(B, S, H, D)")
    for name, flag in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    _checks.rotary_table("cos", cos, "sin", sin, "x", x)
    seqlen_ro = cos.shape[0]
    if varlen:
        _cu_seqlens("cu_seqlens", cu_seqlens, x.device, "x")
        if max_seqlen is None:
            raise ValueError("max_seqlen must be given with cu_seqlens (the longest sequence)")
        batch = cu_seqlens.shape[0] - 1
        seqlen = _max_seqlen("max_seqlen", max_seqlen, x.shape[0], batch)
    elif max_seqlen is not None:
        raise ValueError("max_seqlen applies with cu_seqlens only")
    else:
        batch, seqlen = x.shape[:2]
    if seqlen_ro < seqlen:
        raise ValueError(f"cos has {seqlen_ro} positions but the sequences have up to {seqlen} "
                         "tokens: seqlen_ro must be at least that (as FlashAttention's)")
    tracing = torch.compiler.is_compiling()
    if varlen and x.device.type == "cpu" and not tracing:
        _check_lengths("cu_seqlens", cu_seqlens, x.shape[0], seqlen, "max_seqlen")
    if isinstance(seqlen_offsets, torch.Tensor):
        _checks.per_batch("seqlen_offsets", seqlen_offsets, batch, x.device, "x")
        if x.device.type == "cpu" and not tracing:
            _check_offsets(seqlen_offsets, cu_seqlens, seqlen, seqlen_ro)
        return seqlen_offsets.contiguous(), 0, seqlen
    try:
        offset = operator.index(seqlen_offsets)
    except TypeError:
        raise TypeError(f"seqlen_offsets must be an int or an integer tensor (B,), got "
                        f"{type(seqlen_offsets).__name__}") from None
    if isinstance(seqlen_offsets, bool) or offset < 0:
        raise ValueError(f"seqlen_offsets must be an int >= 0, got {seqlen_offsets!r}")
    if offset + seqlen > seqlen_ro:
        raise ValueError(f"cos has {seqlen_ro} positions but seqlen_offsets {offset} + {seqlen} "
                         "tokens need more: seqlen_ro must be at least seqlen_offsets + seqlen "
                         "(as FlashAttention's)")
    return None, offset, seqlen


def _check_offsets(seqlen_offsets, cu_seqlens, seqlen, seqlen_ro):
    """The values of a tensor of offsets (on the CPU, where reading them costs no device
    sync): each sequence's tokens within the table."""
    lengths = seqlen if cu_seqlens is None else cu_seqlens.diff()
    if (seqlen_offsets < 0).any():
        raise ValueError(f"seqlen_offsets must be >= 0, got {seqlen_offsets.tolist()}")
    ends = seqlen_offsets + lengths
    if len(ends) and ends.max() > seqlen_ro:
        b = int(ends.argmax())
        raise ValueError(f"cos has {seqlen_ro} positions but sequence {b} needs "
                         f"{int(ends[b])} (seqlen_offsets[{b}] + its length): seqlen_ro must "
                         "cover every token")


def apply_rotary(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                 cu_seqlens=None, max_seqlen=None):
    """Rotary position embeddings, as FlashAttention's apply_rotary_emb: x (B, S, H, D), or
    packed (total, H, D) with cu_seqlens int32 (B + 1,) and max_seqlen (the longest
    sequence), token s of sequence b at position s + seqlen_offsets (an int, or an integer
    tensor (B,): each sequence's first position, as when decoding from a KV cache).
    cos, sin (seqlen_ro, R / 2), any float dtype, R even and at most D: the first R dims of
    each head pair up as (d, d + R / 2), or (2i, 2i + 1) when interleaved (GPT-J), and the
    pair (x1, x2) at position p becomes (x1 cos - x2 sin, x1 sin + x2 cos) with the angles
    of row p, in float32 (float64 for float64 x), rounded to x's dtype; dims past R pass
    through. Returns a new tensor, or with inplace=True x itself, rotated in place.

    seqlen_ro must cover every token: at least S (max_seqlen) and, with an int offset,
    seqlen_offsets + S, checked here (as FlashAttention asserts them). With a tensor of
    offsets, and with cu_seqlens, the values are checked on CPU tensors only; on CUDA, where
    reading them would stall the host, they are trusted, as FlashAttention trusts them:
    tokens at positions outside [0, seqlen_ro) pass through unrotated (FlashAttention's
    kernel reads cos 1 and sin 0 there), and the kernel never reads outside the tensors.

    The gradient w.r.t. x is the inverse rotation of the output's gradient; cos and sin are
    constants (no gradient, as in FlashAttention). inplace=True rotates x with no autograd
    record; if x requires grad while grad mode is on, the result is instead copied into x
    with Tensor.copy_, which autograd records (FlashAttention returns x from its
    autograd.Function), so a gradient still flows and torch refuses leaf tensors."""
    offsets, offset, max_seqlen = _validate(x, cos, sin, interleaved, inplace, seqlen_offsets,
                                            cu_seqlens, max_seqlen)
    backend = _backend.requested_backend()
    args = (cos.detach(), sin.detach(), offsets, offset, cu_seqlens, max_seqlen, interleaved)
    if not inplace:
        return _rotary(x, *args, False, backend)
    if torch.is_grad_enabled() and x.requires_grad:
        return x.copy_(_rotary(x, *args, False, backend))
    _rotary_(x, *args, backend)
    return x
