"""attnmem.attention: tiled softmax attention, validated, dispatched and differentiable.

One torch.library custom op holds the forward (out and logsumexp) and one the backward,
each running on the triton kernels or the torch backend; torch.compile traces them as
opaque ops. The torch backend runs torch's fused CPU flash-attention kernel on CPU tensors
(masks it cannot express as is_causal go in as an additive mask) and the pure-torch twin
elsewhere, for the gradient of lse, which the fused backward lacks, for softcap, sinks
and ALiBi slopes, which the fused kernel cannot express, and for dropout.
"""

import math
import numbers
import operator
from typing import Optional

import torch

from attnmem import _checks, _library
from attnmem import backend as _backend
from attnmem.reference import attention as _reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256
LOG2E = 1.4426950408889634
# The FP8 forward (FlashAttention-3's): inputs in e4m3, outputs in one of FP8_OUT_DTYPES.
FP8_DTYPE = torch.float8_e4m3fn
FP8_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
E4M3_MAX = 448.0


def _triton_reasons(q, batch: int, v=None) -> list[str]:
    reasons = []
    if q.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} (supported: float16, bfloat16, float32)")
    return reasons + _shape_reasons(q, batch, v)


def _shape_reasons(q, batch: int, v=None) -> list[str]:
    """What the kernels lack for q's shape (heads on dim 1) over `batch` batch entries or
    packed sequences: each is an axis of their launch grid, which CUDA limits to
    backend.GRID_YZ_LIMIT; and for v's head dim (its last), where v is given."""
    reasons = []
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_TRITON_HEAD_DIM}")
    if v is not None and v.shape[-1] > MAX_TRITON_HEAD_DIM:
        reasons.append(f"v's head dim {v.shape[-1]} > {MAX_TRITON_HEAD_DIM}")
    return reasons + _backend.grid_reasons((("heads", q.shape[1]),
                                            ("batch entries (sequences)", batch)))


def _pick(q, k, v, backend: str) -> str:
    return _backend.resolve(backend, (q, k, v), _triton_reasons(q, q.shape[0], v), "attention")


@_library.custom_op("attention_forward", mutates_args=())
def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       kv_lengths: Optional[torch.Tensor], scale: float, window_left: int,
                       window_right: int, backend: str, softcap: float = 0.0,
                       sinks: Optional[torch.Tensor] = None,
                       alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                       seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    mods = dict(softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    if _pick(q, k, v, backend) == "triton":
        from attnmem.kernels import attention as kernel
        return kernel.attention_forward(q, k, v, kv_lengths, scale, window_left, window_right,
                                        **mods, dropout_p=dropout_p, seed=seed)
    if dropout_p > 0:
        with torch.no_grad():
            return _reference.attention_forward(
                q, k, v, kv_lengths, scale, window_left, window_right, **mods,
                dropout_p=dropout_p, dropout_mask=_torch_dropout_mask(seed, dropout_p, q, k))
    if _fused_cpu(q, k, v) and not _modified(**mods):
        return _fused_cpu_forward(q, k, v, kv_lengths, scale, window_left, window_right)
    with torch.no_grad():
        return _reference.attention_forward(q, k, v, kv_lengths, scale, window_left,
                                            window_right, softcap, sinks, alibi_slopes)


@_attention_forward.register_fake
def _(q, k, v, kv_lengths, scale, window_left, window_right, backend, softcap=0.0, sinks=None,
      alibi_slopes=None, dropout_p=0.0, seed=None):
    return (q.new_empty((*q.shape[:3], v.shape[-1])),
            q.new_empty(q.shape[:3], dtype=_reference.compute_dtype(q.dtype)))


def _modified(softcap, sinks, alibi_slopes) -> bool:
    """Some score modification is on: torch's fused CPU kernel cannot run it."""
    return bool(softcap) or sinks is not None or alibi_slopes is not None


@_library.custom_op("attention_backward", mutates_args=())
def _attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                        kv_lengths: Optional[torch.Tensor], scale: float, window_left: int,
                        window_right: int, backend: str, softcap: float = 0.0,
                        sinks: Optional[torch.Tensor] = None,
                        alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                        seed: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv and dsinks (empty without sinks)."""
    args = (dout, q, k, v, out, lse, dlse, kv_lengths, scale, window_left, window_right)
    mods = dict(softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    if _pick(q, k, v, backend) == "triton":
        from attnmem.kernels import attention as kernel
        grads = kernel.attention_backward(*args, **mods, dropout_p=dropout_p, seed=seed)
    elif dropout_p > 0:
        grads = _reference.attention_backward(
            *args, **mods, dropout_p=dropout_p,
            dropout_mask=_torch_dropout_mask(seed, dropout_p, q, k))
    elif dlse is None and _fused_cpu(q, k, v) and not _modified(**mods):
        grads = _fused_cpu_backward(dout, q, k, v, out, lse, kv_lengths, scale, window_left,
                                    window_right)
    else:
        grads = _reference.attention_backward(*args, **mods)
    return grads if sinks is not None else (*grads, q.new_empty(0))


@_attention_backward.register_fake
def _(dout, q, k, v, out, lse, dlse, kv_lengths, scale, window_left, window_right, backend,
      softcap=0.0, sinks=None, alibi_slopes=None, dropout_p=0.0, seed=None):
    dsinks = q.new_empty(0) if sinks is None else sinks.new_empty(sinks.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


# The forward op's optional inputs after backend, with their defaults (callers may leave
# them out).
_OPTIONAL_INPUTS = (0.0, None, None, 0.0, None)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lengths, scale, window_left, window_right, backend, *rest = inputs
    softcap, sinks, alibi_slopes, dropout_p, seed = (*rest, *_OPTIONAL_INPUTS[len(rest):])
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lengths, sinks, alibi_slopes, seed)
    ctx.args = (scale, window_left, window_right, backend, softcap)
    ctx.dropout_p = dropout_p
    # An unused lse then gets None rather than zeros, and the fused CPU backward can run.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_lengths, sinks, alibi_slopes, seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dsinks = _attention_backward(dout, q, k, v, out, lse, dlse, kv_lengths,
                                             *ctx.args, sinks, alibi_slopes, ctx.dropout_p, seed)
    # ALiBi slopes get no gradient, as in FlashAttention (attention() refuses ones that ask).
    return (dq, dk, dv, None, None, None, None, None, None, None if sinks is None else dsinks,
            None, None, None)


_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _fp8_triton_reasons(q, batch: int, v=None) -> list[str]:
    """What the FP8 forward's kernel lacks for q (heads on dim 1) and v over `batch` batch
    entries or packed sequences."""
    return _shape_reasons(q, batch, v) + fp8_arch_reasons(q.device)


def fp8_arch_reasons(device) -> list[str]:
    """Triton compiles float8_e4m3fn for sm_89 and later only (the e4m3 tensor cores')."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return [f"float8_e4m3fn needs sm_89 or later (fp8 tensor cores) in triton, this GPU "
                f"is sm_{major}{minor}: the torch backend dequantizes instead"]
    return []


@_library.custom_op("attention_forward_fp8", mutates_args=())
def _attention_forward_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           descales: torch.Tensor, kv_lengths: Optional[torch.Tensor],
                           scale: float, window_left: int, window_right: int,
                           out_dtype: torch.dtype, backend: str, softcap: float = 0.0,
                           sinks: Optional[torch.Tensor] = None,
                           alibi_slopes: Optional[torch.Tensor] = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 forward: descales (B, Hkv, 3) float32 stacks q's, k's and v's. No autograd:
    attention() refuses a call that asks for a gradient."""
    mods = dict(softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    if _backend.resolve(backend, (q, k, v), _fp8_triton_reasons(q, q.shape[0], v),
                        "attention") == "triton":
        from attnmem.kernels import attention as kernel
        return kernel.attention_forward(q, k, v, kv_lengths, scale, window_left, window_right,
                                        **mods, descales=descales, out_dtype=out_dtype)
    return _reference.attention_forward_fp8(q, k, v, descales, kv_lengths, scale, window_left,
                                            window_right, out_dtype, **mods)


@_attention_forward_fp8.register_fake
def _(q, k, v, descales, kv_lengths, scale, window_left, window_right, out_dtype, backend,
      softcap=0.0, sinks=None, alibi_slopes=None):
    return (q.new_empty((*q.shape[:3], v.shape[-1]), dtype=out_dtype),
            q.new_empty(q.shape[:3], dtype=torch.float32))


def _torch_dropout_mask(seed, dropout_p, q, k):
    """The torch backend's keep mask for this seed, drawn per query row (the twin's
    seeded_keep); the seed is read on the host (a sync on CUDA tensors)."""
    return _reference.seeded_keep(int(seed[0]), dropout_p, q.shape[0], q.shape[1], k.shape[2],
                                  q.device)


# ---------------------------------------------------------------------------------------
# The torch backend on CPU tensors: torch's fused flash-attention kernel
# ---------------------------------------------------------------------------------------


def _fused_cpu(q, k, v) -> bool:
    """The fused CPU kernel runs these inputs (it takes GQA as is, every float dtype; not a
    head dim of v's own)."""
    return (q.device.type == "cpu" and q.numel() > 0 and k.numel() > 0
            and v.shape[-1] == q.shape[-1])


def _fused_cpu_masks(q, k, kv_lengths, window_left, window_right):
    """(is_causal, chunks): what the fused kernel needs for these masks. is_causal is its
    top-left causal mask, which is ours when offset + window_right == 0; any other mask is
    additive, built for chunks of query rows, each (rows, mask, seen) with seen (B or 1, 1,
    rows) telling the rows that see some key; chunks is None when no mask is left."""
    n_q, n_k = q.shape[2], k.shape[2]
    if window_left < 0 and kv_lengths is None:
        if window_right < 0:
            return False, None
        if window_right + n_k - n_q == 0:
            return True, None
    batch = 1 if kv_lengths is None else q.shape[0]
    step = max(1, _reference.CHUNK_ELEMENTS // (batch * n_k))
    chunks = []
    for start in range(0, n_q, step):
        rows = torch.arange(start, min(n_q, start + step), device=q.device)
        keep = _reference.visible(rows, n_q, n_k, window_left, window_right, kv_lengths)
        mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
        chunks.append((slice(start, start + len(rows)), mask.masked_fill_(~keep, -math.inf),
                       keep.any(-1)))
    return False, chunks


def _fused_cpu_forward(q, k, v, kv_lengths, scale, window_left, window_right):
    """The fused kernel gives lse 0 and zeros to a row that sees no key: lse becomes -inf."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # The fused kernel reads a strided last dimension as if it were contiguous.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    k, v = _reference.without_unseen_keys(k, v, q.shape[2], window_left, kv_lengths)
    is_causal, chunks = _fused_cpu_masks(q, k, kv_lengths, window_left, window_right)
    if chunks is None:
        # Its lse comes laid out (B, Nq, H): the op's outputs are contiguous, as the fake says.
        out, lse = flash(q, k, v, 0.0, is_causal, scale=scale)
        return out, lse.contiguous()
    outs, lses = [], []
    for rows, mask, seen in chunks:
        out, lse = flash(q[:, :, rows], k, v, 0.0, False, attn_mask=mask, scale=scale)
        outs.append(out)
        lses.append(lse.masked_fill(~seen, -math.inf))
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _fused_cpu_backward(dout, q, k, v, out, lse, kv_lengths, scale, window_left,
                        window_right):
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dout, q, k, v, out = (x if x.stride(-1) == 1 else x.contiguous()
                          for x in (dout, q, k, v, out))
    k_seen, v_seen = _reference.without_unseen_keys(k, v, q.shape[2], window_left, kv_lengths)
    is_causal, chunks = _fused_cpu_masks(q, k, kv_lengths, window_left, window_right)
    if chunks is None:
        # Its gradients come laid out (B, N, H, D); the op's are contiguous, as the fake says.
        return tuple(g.contiguous() for g in flash_backward(
            dout, q, k_seen, v_seen, out, lse, 0.0, is_causal, scale=scale))
    dq = torch.empty_like(q)
    ct = _reference.compute_dtype(q.dtype)
    dk, dv = torch.zeros_like(k, dtype=ct), torch.zeros_like(v, dtype=ct)
    for rows, mask, _ in chunks:
        # The kernel's own lse for rows that see no key: 0, which its masked scores ignore.
        lse_rows = lse[:, :, rows].masked_fill(lse[:, :, rows] == -math.inf, 0.0)
        dq[:, :, rows], dk_rows, dv_rows = flash_backward(
            dout[:, :, rows], q[:, :, rows], k_seen, v_seen, out[:, :, rows], lse_rows, 0.0,
            False, attn_mask=mask, scale=scale)
        dk += dk_rows
        dv += dv_rows
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        what = {"q": "(B, H, Nq, D)", "k": "(B, Hkv, Nk, D)", "v": "(B, Hkv, Nk, Ev)"}[name]
        raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")


def _window_side(name, value, n_unbounded) -> int:
    """The side as an int, -1 when unbounded; n_unbounded is the width at and past which it
    leaves every query's keys unbounded (so huge ints fit the op's int64)."""
    if value is None:
        return -1
    try:
        side = operator.index(value)  # Python and numpy integers, not floats
    except TypeError:
        side = None
    if isinstance(value, bool) or side is None or side < -1:
        raise ValueError(f"window {name} must be an int >= 0, or None or -1 for unbounded, "
                         f"got {value!r}")
    return -1 if side >= n_unbounded else side


def _window(window, n_q, n_k) -> tuple[int, int]:
    """window (None, or a pair of sides) -> (left, right) ints, -1 where unbounded. Query i's
    window [a - left, a + right], a = i + Nk - Nq, spans all keys for every i once
    left >= Nk - 1 and right >= Nq - 1."""
    if window is None:
        window = (None, None)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    return (_window_side("left", window[0], max(n_k - 1, 0)),
            _window_side("right", window[1], max(n_q - 1, 0)))


def _scale(scale, q) -> float:
    """scale as a float, refused where it would overflow the computation: the kernels
    multiply it by log2(e) in float32 (float64 for float64 inputs)."""
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    scale = float(scale)
    # Scores are scale * q.k: past 2^64 (float32; 2^512 for float64) inputs of ordinary size
    # would overflow them to inf and every output to NaN, so such a scale is refused.
    limit = torch.finfo(_reference.compute_dtype(q.dtype)).max ** 0.5 / 2 ** 32
    if abs(scale) > limit:
        raise ValueError(f"scale {scale!r} overflows the {_reference.compute_dtype(q.dtype)} "
                         f"computation: its magnitude must be at most {limit:.4g}")
    return scale


def _softcap(softcap, scale, q) -> float:
    """softcap as a float, 0.0 for none (None or 0, FlashAttention's off value); refused where
    scale / softcap would overflow the computation, as a scale would."""
    if softcap is None:
        return 0.0
    if (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
            or not math.isfinite(softcap) or softcap < 0):
        raise ValueError(f"softcap must be a finite number > 0 (or None or 0 for none), "
                         f"got {softcap!r}")
    softcap = float(softcap)
    limit = torch.finfo(_reference.compute_dtype(q.dtype)).max ** 0.5 / 2 ** 32
    if softcap and abs(scale) / softcap > limit:
        raise ValueError(f"softcap {softcap!r} is too small for scale {scale!r}: scale / softcap "
                         f"must be at most {limit:.4g}")
    return softcap


def _head_params(name, x, q, shapes, what):
    """x is None or a floating-point tensor of one of `shapes` on q's device."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if tuple(x.shape) not in shapes:
        raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    return x


def _validate_score_mods(q, scale, softcap, sinks, alibi_slopes, batch, heads):
    """(softcap, sinks, alibi_slopes) checked: softcap a float (0.0 for none), sinks (H,),
    alibi_slopes (H,) or (B, H) that asks for no gradient (it gets none)."""
    softcap = _softcap(softcap, scale, q)
    sinks = _head_params("sinks", sinks, q, [(heads,)], f"(H,) = ({heads},)")
    alibi_slopes = _head_params("alibi_slopes", alibi_slopes, q, [(heads,), (batch, heads)],
                                f"(H,) = ({heads},) or (B, H) = ({batch}, {heads})")
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes get no gradient (as in FlashAttention): pass them "
                         "detached")
    return softcap, sinks, alibi_slopes


def _check_dtype(q, fp8: bool):
    """q's dtype is float8_e4m3fn (fp8), else a float dtype attention takes."""
    if fp8 and q.dtype != FP8_DTYPE:
        raise TypeError(f"float8 inputs must be float8_e4m3fn (FlashAttention-3's FP8 forward), "
                        f"got {q.dtype}")
    if not fp8 and q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")


def _validate(q, k, v, causal, scale, kv_lengths, window, return_lse, fp8=False,
              value_head_dim=False):
    """value_head_dim: v may have a head dim Ev of its own (attention() takes it; callers
    that do not, as ring attention, leave it False: v must have k's shape)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    _check_dtype(q, fp8)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {q.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k has head dim {k.shape[-1]} but q has head dim {q.shape[-1]}")
    if q.shape[-1] < 1:
        raise ValueError("q must have a head dim of at least 1")
    _value_shape(v, k, value_head_dim)
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k has {k.shape[1]} heads, which must divide q's {q.shape[1]} heads "
                         "(grouped-query attention)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    scale = _scale(scale, q)
    kv_lengths = _checks.lengths("kv_lengths", kv_lengths, q.shape[0], k.shape[2], q.device)
    left, right = _window(window, q.shape[2], k.shape[2])
    return scale, left, right, kv_lengths


def _value_shape(v, k, value_head_dim: bool):
    """v has k's shape but for its head dim (its last), which value_head_dim lets differ
    (at least 1)."""
    if not value_head_dim:
        if v.shape != k.shape:
            raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        return
    if v.shape[:-1] != k.shape[:-1] or v.shape[-1] < 1:
        dims = ", ".join(map(str, k.shape[:-1]))
        raise ValueError(f"v must have k's shape but for its head dim, ({dims}, Ev) with "
                         f"Ev >= 1, got {tuple(v.shape)}")


def _dropout_p(dropout_p) -> float:
    if (isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real)
            or not 0 <= dropout_p <= 1):
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    return float(dropout_p)


def _dropout_seed(dropout_p, generator, q):
    """The seed, a (1,) int64 tensor on q's device, that keys one call's dropout draws: one
    torch.randint from generator (torch's default generator of q's device when None) on the
    device, so no host sync; None without dropout."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    if generator is not None and not _checks.same_device(generator.device, q.device):
        raise ValueError(f"generator is on {generator.device} but q is on {q.device}")
    if dropout_p == 0:
        return None
    return torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=q.device,
                         generator=generator)


def dropout_mask(q, k, dropout_p, generator=None):
    """The keep mask (B, H, Nq, Nk) bool that attention(q, k, v, dropout_p=dropout_p,
    generator=generator) applies on the backend it picks, where generator is in the state
    that call found it in (draw one seed from it, as the call does): the tests run the
    float64 twin with it, as FlashAttention's tests read their kernel's mask back."""
    dropout_p = _dropout_p(dropout_p)
    if dropout_p == 0:
        raise ValueError("dropout_p must be > 0 for a dropout mask")
    seed = _dropout_seed(dropout_p, generator, q)
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if _pick(q, k, k, _backend.requested_backend()) == "triton":
        from attnmem.kernels import attention as kernel
        return kernel.dropout_keep_mask(seed, shape, dropout_p)
    return _torch_dropout_mask(seed, dropout_p, q, k)(torch.arange(q.shape[2],
                                                                   device=q.device))


def _is_fp8(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.element_size() == 1


def _fp8_descales(q, shape, descales, q_name="q"):
    """(q_descale, k_descale, v_descale), each None (1) or of `shape`, (B, Hkv), floating
    point on q's device (q_name in the message) -> one (B, Hkv, 3) float32 tensor."""
    checked = []
    for name, x in zip(("q_descale", "k_descale", "v_descale"), descales):
        if x is None:
            checked.append(torch.ones(shape, dtype=torch.float32, device=q.device))
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
        if not x.dtype.is_floating_point or _is_fp8(x):
            raise TypeError(f"{name} must be a floating-point tensor (used in float32), got "
                            f"{x.dtype}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must be (B, Hkv) = {shape}, got shape {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but {q_name} is on {q.device}")
        checked.append(x.to(torch.float32))
    return torch.stack(checked, -1)


def _fp8_out_dtype(out_dtype) -> torch.dtype:
    if out_dtype is None:
        return torch.bfloat16
    if out_dtype not in FP8_OUT_DTYPES:
        raise TypeError(f"out_dtype must be torch.bfloat16, torch.float16 or torch.float32, "
                        f"got {out_dtype!r}")
    return out_dtype


def _fp8_inference(q, k, v, batch, sinks, dropout_p, descales, out_dtype):
    """The FP8 forward's own checks, shared by attention() and attention_varlen(): no
    dropout, nothing that asks for a gradient, descales (batch, Hkv) each. -> (descales
    stacked (batch, Hkv, 3) float32, out_dtype)."""
    if _dropout_p(dropout_p) != 0:
        raise ValueError("dropout_p must be 0 with float8 inputs: the FP8 forward is for "
                         "inference")
    out_dtype = _fp8_out_dtype(out_dtype)
    descales_3 = _fp8_descales(q, (batch, k.shape[1]), descales)
    asking = [name for name, x in (("q", q), ("k", k), ("v", v), ("sinks", sinks),
                                   *zip(("q_descale", "k_descale", "v_descale"), descales))
              if isinstance(x, torch.Tensor) and x.requires_grad]
    if asking and torch.is_grad_enabled():
        raise ValueError(f"the FP8 forward has no backward (as FlashAttention-3's), but "
                         f"{', '.join(asking)} require grad: run it under torch.no_grad() or "
                         "torch.inference_mode(), or pass detached tensors")
    return descales_3, out_dtype


def _no_fp8_options(q, descales, out_dtype):
    """Inputs that are not float8 take no descales and no out_dtype."""
    for name, x in (*zip(("q_descale", "k_descale", "v_descale"), descales),
                    ("out_dtype", out_dtype)):
        if x is not None:
            raise ValueError(f"{name} applies to float8_e4m3fn inputs only (q is "
                             f"{getattr(q, 'dtype', type(q).__name__)})")


def _attention_fp8(q, k, v, causal, scale, kv_lengths, window, return_lse, softcap, sinks,
                   alibi_slopes, dropout_p, descales, out_dtype):
    """attention() on float8_e4m3fn inputs: checked, then the FP8 forward (inference only)."""
    scale, window_left, window_right, kv_lengths = _validate(q, k, v, causal, scale,
                                                             kv_lengths, window, return_lse,
                                                             fp8=True, value_head_dim=True)
    softcap, sinks, alibi_slopes = _validate_score_mods(q, scale, softcap, sinks, alibi_slopes,
                                                        q.shape[0], q.shape[1])
    descales_3, out_dtype = _fp8_inference(q, k, v, q.shape[0], sinks, dropout_p, descales,
                                           out_dtype)
    if causal and q.shape[2] > 1:
        window_right = 0 if window_right < 0 else min(window_right, 0)
    out, lse = _attention_forward_fp8(q, k, v, descales_3, kv_lengths, scale, window_left,
                                      window_right, out_dtype, _backend.requested_backend(),
                                      softcap, sinks, alibi_slopes)
    return (out, lse) if return_lse else out


def quantize_fp8(x, *, kv_heads=None, per_tensor=False, cu_seqlens=None):
    """x (B, H, N, D) floating point -> (x in float8_e4m3fn, descale (B, Hkv) float32) with
    x ~ x_fp8 * descale[b, h // (H // Hkv)]: the inputs and q_descale, k_descale or
    v_descale of attention()'s FP8 forward. The scale maps amax to e4m3's largest value, 448:
    one amax per batch and group of H // Hkv heads (kv_heads = Hkv, default H: per (batch,
    head); pass k's head count when quantizing a grouped-query q, whose descale is per kv
    head as FlashAttention-3's), or of the whole tensor with per_tensor=True (the descale
    then repeats one value). An all-zero group gets descale 1. x must be finite: an inf
    makes its group's descale inf and its values NaN or zero.

    Packed sequences, as attention_varlen() takes them: x (total, H, D) with cu_seqlens, its
    int32 (B + 1,) cumulative lengths on x's device, gives descale (B, Hkv), one amax per
    sequence and group of heads (an empty sequence gets descale 1), computed on the device
    without reading the lengths on the host. Rows outside every sequence (lengths that do
    not end at total, which are checked on CPU tensors only) are scaled with the nearest
    sequence's descale."""
    packed = cu_seqlens is not None
    what = "(total, H, D)" if packed else "(B, H, N, D)"
    if not isinstance(x, torch.Tensor) or x.ndim != (3 if packed else 4):
        raise ValueError(f"x must be a {what} tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.dtype.is_floating_point or _is_fp8(x):
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    heads = x.shape[1]
    kv_heads = heads if kv_heads is None else kv_heads
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or (
            heads % kv_heads):
        raise ValueError(f"kv_heads must be an int that divides x's {heads} heads, got "
                         f"{kv_heads!r}")
    grouped = x.detach().float().unflatten(1, (kv_heads, heads // kv_heads))
    if packed:
        sequence = _packed_rows(cu_seqlens, x)
        batch = cu_seqlens.shape[0] - 1
    else:
        batch = x.shape[0]
    if per_tensor:
        amax = grouped.abs().amax().expand(batch, kv_heads)
    elif packed:
        amax = grouped.new_zeros(batch, kv_heads).scatter_reduce_(
            0, sequence[:, None].expand(-1, kv_heads), grouped.abs().amax((2, 3)), "amax")
    else:
        amax = grouped.abs().amax((2, 3, 4))
    descale = torch.where(amax > 0, amax / E4M3_MAX, 1.0)
    if packed:
        scaled = grouped / descale[sequence][:, :, None, None]
    else:
        scaled = grouped / descale[:, :, None, None, None]
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).flatten(1, 2), descale.contiguous()


def _packed_rows(cu_seqlens, x):
    """The sequence of each of x's packed rows (total,) int64, from cu_seqlens checked as
    attention_varlen checks them, on the device (rows outside every sequence go to the
    nearest one)."""
    from attnmem import varlen

    varlen._cu_seqlens("cu_seqlens", cu_seqlens, x.device, "x")
    total = x.shape[0]
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        varlen._check_lengths("cu_seqlens", cu_seqlens, total, total, "x's rows")
    if cu_seqlens.shape[0] < 2 and total:
        raise ValueError(f"cu_seqlens holds no sequence for x's {total} rows")
    rows = torch.arange(total, dtype=cu_seqlens.dtype, device=x.device)
    sequence = torch.searchsorted(cu_seqlens, rows, right=True) - 1
    return sequence.clamp_(0, max(cu_seqlens.shape[0] - 2, 0))


def attention(q, k, v, *, causal=False, scale=None, kv_lengths=None, window=None,
              return_lse=False, softcap=None, sinks=None, alibi_slopes=None, dropout_p=0.0,
              generator=None, q_descale=None, k_descale=None, v_descale=None, out_dtype=None):
    """Softmax attention `softmax(q k^T * scale + mask) v`, tiled so scores never fill memory.

    q: (B, H, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Ev) with H % Hkv == 0 (query head
    h reads kv head h // (H // Hkv)). Returns (B, H, Nq, Ev) in q's dtype, and with
    return_lse=True also the natural-log logsumexp (B, H, Nq) of the scaled, masked scores
    (differentiable), in float32 (float64 for float64 inputs). v's head dim Ev may differ
    from q's and k's D, as SDPA's may (multi-head latent attention trains with D = 192,
    Ev = 128): every option below takes it, on both backends (the triton kernels up to 256
    each; on CPU tensors the torch backend then runs the twin, as torch's fused kernel takes
    one head dim).

    Masks align every batch to the padded key length Nk, not to its own kv_lengths[b]: query
    i sits at a = i + Nk - Nq (bottom-right on the padded keys) and sees key j when all of
    these hold:
      causal:            j <= a
      window=(l, r):     a - l <= j <= a + r   (None or -1 leaves a side unbounded)
      kv_lengths (B,):   j < kv_lengths[b]     (values are clamped to [0, Nk])
    FlashAttention's varlen and KV-cache kernels instead align each sequence to its own
    length, a = i + kv_lengths[b] - Nq; the two agree when kv_lengths is None or neither
    causal nor window is set. Decoding Nq = 3 new tokens from a right-padded cache of
    Nk = 401 slots holding 15 keys (kv_lengths = 15), with causal=True and window=(128, 0),
    puts a at 398 + i here: every window starts past key 269, so each query sees no key and
    outputs zeros, where FlashAttention puts a at 12 + i and attends to keys 0 to 12 + i.
    Decode from a padded cache with attnmem.attention_with_kvcache, and run packed batches
    with attnmem.attention_varlen: both align each sequence to its own length.

    Keys that no query sees (j >= kv_lengths[b], or j < Nk - Nq - l, before every query's
    window) contribute nothing, forward and backward, whatever they hold: padding that holds
    NaN or inf reaches no output and gets zero gradients. A non-finite key or value that
    some query sees is a non-finite input, which may also reach queries beside it.
    A query that sees no key outputs zeros, has lse -inf and gets zero gradients.
    scale defaults to 1/sqrt(D) (q's head dim, as in SDPA); numpy numbers are accepted for
    scale and the window sides.
    The triton backward adds the gradient of q up with float32 atomics by default (5 matrix
    products per tile pair, as FlashAttention-2 and -3; on a GPU its last bits vary from run
    to run); under torch.use_deterministic_algorithms(True) it computes it in a separate
    kernel instead (7 products, bit-for-bit repeatable), as torch's own attention does.
    Inputs may be strided; a non-contiguous last dimension is copied once for the triton
    backend. On CPU tensors the torch backend runs torch's fused flash-attention kernel (the
    one F.scaled_dot_product_attention runs there); the chunked pure-torch twin runs on
    other devices, for the gradient of lse, which that kernel's backward lacks, and for the
    score modifications below, which it cannot express.

    Score modifications (FlashAttention's semantics), applied in this order to the scaled
    scores s = scale * q.k before the mask:
      softcap (float > 0; None or 0 for none): s becomes softcap * tanh(s / softcap), as
        Gemma 2 and FlashAttention's softcap do: scale applies before the cap. On CUDA
        (sm_75 on) the triton kernels take float16 and bfloat16 inputs' tanh from the
        hardware (tanh.approx.f32, about 2^-11 relative error, within their rounding, as
        FlashAttention-3 does), float32 inputs' from an exact form (a tanh within 1.2e-7 of
        float64's).
      alibi_slopes ((H,) or (B, H), any float dtype, computed in float32): the bias
        -slope * |a - j| is added, with a = i + Nk - Nq as above (FlashAttention's
        -alibi_slope * |i + seqlen_k - seqlen_q - j|; its causal kernel adds slope * j
        instead, which differs by a per-row constant: the same output and gradients, an lse
        larger by slope * a there). No gradient reaches the slopes, as in FlashAttention: a
        tensor that requires grad is refused while grad mode is on.
      sinks ((H,), any float dtype, differentiable): one logit per query head joins every
        row's softmax denominator and contributes no value (gpt-oss's attention sinks):
        out_i = sum_j p_ij v_j with p_ij = exp(s_ij) / (exp(sinks[h]) + sum_k exp(s_ik)).
        lse then includes the sink, log(exp(sinks[h]) + sum_k exp(s_ik)); a query that sees
        no key puts all its weight on the sink: it outputs zeros and has lse = sinks[h] (a
        sink of -inf is no sink). The sinks' gradient is -sum over batches and queries of
        exp(sinks[h] - lse) * (dout . out - dlse).

    dropout_p (as FlashAttention's and SDPA's): each weight of the softmax is dropped with
    probability dropout_p (0 to 1) and the rest are scaled by 1 / (1 - dropout_p); lse is
    that of the undropped scores. Apply it in training only: pass 0.0 in evaluation, as
    with SDPA. Each call draws one int64 seed with torch.randint from `generator` (a
    torch.Generator on q's device; torch's default one for that device when None), on
    the device, so there is no host sync and the same generator state gives the same
    mask, output and gradients. The triton kernels draw the mask with Philox 4x32 keyed
    by the seed, one counter for each four keys of a (batch, head, query) and one word of
    it for each key; the backward regenerates the mask from the saved seed instead of
    storing it, and the deterministic backward stays bit-for-bit repeatable. The torch
    backend runs the twin with a mask of torch.rand draws, query row i from a generator
    seeded with seed + i (it reads the seed on the host), regenerated the same way in the
    backward: the two backends draw different masks from the same seed.
    dropout_mask(q, k, dropout_p, generator) returns the mask a call applies.
    torch.compile(fullgraph=True) traces the seed's randint with the default generator
    (with torch 2.13, aot_eager and inductor draw the eager seed); dynamo refuses an
    explicit generator, as for torch.rand(generator=...). Under CUDA graph capture the
    seed is a captured randint, which torch's CUDA generator redraws on each replay (not
    yet run on a GPU).

    FP8 (FlashAttention-3's FP8 forward, inference only): q, k, v in torch.float8_e4m3fn
    with q_descale, k_descale, v_descale ((B, Hkv) float32 each, None for 1) such that the
    inputs are q * q_descale[b, h // (H // Hkv)] and so on (quantize_fp8 makes both). The
    output comes in out_dtype (bfloat16 by default; float16 or float32), lse in float32.
    Both products run in e4m3 with float32 accumulation on GPUs with fp8 tensor cores (sm_89
    and later): q's and k's descales fold into the softmax scale, the softmax weights are
    rounded to e4m3 (scaled into [0, 2^8] first) for the product with v, and v's descale
    scales the output. Rounding the weights costs up to 2^-4 of sum_j p_ij |v_jd| per output
    element; lse is as exact as in float32. The kernel reads v with its keys contiguous (the
    operand layout sm_90's e4m3 wgmma takes): a v viewed transposed from (B, Hkv, D, Nk)
    memory goes in as it is, any other is copied once per call. causal, window, kv_lengths,
    grouped-query heads, return_lse, softcap, sinks and alibi_slopes work as above;
    dropout_p must be 0 and nothing may ask for a gradient (there is no backward). On older
    GPUs, on the CPU and on the torch backend the inputs are dequantized and the float32
    twin runs.
    """
    if _is_fp8(q):
        return _attention_fp8(q, k, v, causal, scale, kv_lengths, window, return_lse, softcap,
                              sinks, alibi_slopes, dropout_p, (q_descale, k_descale, v_descale),
                              out_dtype)
    _no_fp8_options(q, (q_descale, k_descale, v_descale), out_dtype)
    scale, window_left, window_right, kv_lengths = _validate(q, k, v, causal, scale,
                                                             kv_lengths, window, return_lse,
                                                             value_head_dim=True)
    softcap, sinks, alibi_slopes = _validate_score_mods(q, scale, softcap, sinks, alibi_slopes,
                                                        q.shape[0], q.shape[1])
    dropout_p = _dropout_p(dropout_p)
    seed = _dropout_seed(dropout_p, generator, q)
    if causal and q.shape[2] > 1:  # with one query, causal hides no key
        window_right = 0 if window_right < 0 else min(window_right, 0)
    out, lse = _attention_forward(q, k, v, kv_lengths, scale, window_left, window_right,
                                  _backend.requested_backend(), softcap, sinks, alibi_slopes,
                                  dropout_p, seed)
    return (out, lse) if return_lse else out
