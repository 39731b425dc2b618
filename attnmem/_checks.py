"""Argument checks shared by the public ops: errors that name the argument."""

import functools

import torch


def tensor(name, x, ndim, what):
    """x is a floating-point tensor of ndim dimensions, described by what: '(B, N, D)'."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def flag(name, x):
    """x is a bool: a truthy stand-in ("False", 1) would pass for True."""
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def same_device(a: torch.device, b: torch.device) -> bool:
    """a and b name one device, an index left out meaning the current one: a generator made
    with device="cuda" reports cuda, its tensors cuda:0."""
    if a.type != b.type:
        return False
    if a.index == b.index:
        return True
    current = torch.get_device_module(a.type).current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def like(name, x, ref, ref_name):
    """x has ref's dtype and device."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def lengths(name, x, batch, n, device):
    """x is None or an integer tensor (B,) on device. Returns it as the kernels read it:
    contiguous int32 clamped to [0, n] (clamped before the cast, so 2**32 + 3 is n, not 3)."""
    if x is None:
        return None
    per_batch(name, x, batch, device)
    return x.clamp(0, n).to(torch.int32).contiguous()


def per_batch(name, x, batch, device, ref="q"):
    """x is an integer tensor (B,) on device, ref's (its name in the message)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if tuple(x.shape) != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {ref} is on {device}")


def rotary_table(cos_name, cos, sin_name, sin, x_name, x):
    """cos and sin are float tables (seqlen_ro, R / 2) of one shape on x's device, with
    0 < R <= x's last dim (the head dim)."""
    for name, t in ((cos_name, cos), (sin_name, sin)):
        tensor(name, t, 2, "(seqlen_ro, rotary_dim / 2)")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got "
                            f"{t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"{sin_name} must have {cos_name}'s shape {tuple(cos.shape)}, got "
                         f"{tuple(sin.shape)}")
    if not 0 < 2 * cos.shape[1] <= x.shape[-1]:
        raise ValueError(f"{cos_name} must be (seqlen_ro, rotary_dim / 2) with 0 < rotary_dim "
                         f"<= the head dim {x.shape[-1]}, got shape {tuple(cos.shape)}")


def _floating(x):
    return isinstance(x, torch.Tensor) and x.dtype.is_floating_point


def _parts(x):
    """x's tensors, one level into a tuple or list (sparse weights (indices, weights))."""
    return x if isinstance(x, (tuple, list)) else (x,)


def _cast(x, dtype):
    """x, or each tensor of a tuple or list x, floating ones cast to dtype."""
    if isinstance(x, (tuple, list)):
        items = [_cast(t, dtype) for t in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x.to(dtype) if _floating(x) else x


def _inplace_dtype(op, args, kwargs, dtype):
    """op(inplace=True) writes its first argument: it must have dtype already."""
    first = op.__code__.co_varnames[0]
    written = args[0] if args else kwargs.get(first)
    if _floating(written) and written.dtype != dtype:
        raise TypeError(f"{op.__name__}(inplace=True) under autocast writes {first}, "
                        f"{written.dtype}, but its inputs promote to {dtype}: pass {first} "
                        f"in {dtype}, or use inplace=False")


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available, which torch.compile before torch 2.13 cannot trace
    (torch 2.11's dynamo refused fullgraph=True on every autocast_promote op)."""
    return torch.amp.is_autocast_available(device_type)


def autocast_promote(op):
    """op under torch.autocast's "promote" policy (torch.cat's and torch.stack's): while
    autocast is enabled for its inputs' device type, its floating-point tensor arguments
    (one level into a tuple such as sparse weights (indices, weights)) are cast to the
    widest floating dtype among them (torch.promote_types: float16 and bfloat16 meet in
    float32, float64 stays float64), and op runs with autocast off, so it computes and
    returns that dtype. A float32 memory beside a Linear's bfloat16 keys is never copied
    down and keeps accumulating in float32. Bool and integer tensors (masks, indices,
    lengths) pass as they are. An in-place op (inplace=True) writes its first argument,
    which must then already have that dtype (a TypeError otherwise, not a silent write to
    a copy). Outside autocast nothing is cast: mismatched dtypes raise op's TypeError
    naming the argument."""
    @functools.wraps(op)
    def promoted(*args, **kwargs):
        tensors = [t for x in (*args, *kwargs.values()) for t in _parts(x) if _floating(t)]
        if not tensors:
            return op(*args, **kwargs)
        device_type = tensors[0].device.type
        if not (_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
            return op(*args, **kwargs)
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        if kwargs.get("inplace") is True:
            _inplace_dtype(op, args, kwargs, dtype)
        args = tuple(_cast(x, dtype) for x in args)
        kwargs = {name: _cast(x, dtype) for name, x in kwargs.items()}
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)
    return promoted
