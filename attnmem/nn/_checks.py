"""Argument checks of the nn modules: errors that name the user's argument and say what it
should have been, with the sizes the module was built with."""

import numbers

import torch

try:
    from numpy import bool_ as _numpy_bool
except ImportError:  # numpy is optional for torch
    _numpy_bool = bool


def integer(name, value, minimum=1):
    """value is an int >= minimum (numpy integers too; a bool is not an int). -> int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def optional_integer(name, value, minimum=1):
    return None if value is None else integer(name, value, minimum)


def number(name, value, low, high=None, *, low_open=False):
    """value is a real number in [low, high] ((low, high] with low_open). -> float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    above = value > low if low_open else value >= low
    if not (above and (high is None or value <= high)):
        interval = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def flag(name, value):
    """value is a bool (numpy bools too). -> bool."""
    if not isinstance(value, (bool, _numpy_bool)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def choice(name, value, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _dims(shape):
    return "(" + ", ".join(str(s) for s in shape) + ")"


def tensor(name, x, shapes, like=None):
    """x is a floating-point tensor matching one of shapes, each a tuple of dimension names
    (str, any size) and sizes (int); on like's device and, outside autocast, of like's dtype.
    Returns the shape it matched, as given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    matched = next((s for s in shapes if len(s) == x.ndim and all(
        isinstance(d, str) or d == n for d, n in zip(s, x.shape))), None)
    if matched is None:
        expected = " or ".join(_dims(s) for s in shapes)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if like is not None:
        same_device(name, x, like)
        if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name} must have the module's dtype {like.dtype}, got {x.dtype}")
    return matched


def same_device(name, x, like):
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the module is on {like.device}")


def lengths(name, x, batch, like):
    """None, or an integer tensor (B,) on like's device (values past the sequence are
    clamped by the ops)."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if tuple(x.shape) != (batch,):
        raise ValueError(f"{name} must be (B,) = ({batch},), got shape {tuple(x.shape)}")
    same_device(name, x, like)
    return x


def token_ids(name, x, shape, like):
    """x: an integer tensor of token ids of shape (str: any size) on like's device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.ndim != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(shape, x.shape)):
        raise ValueError(f"{name} must be {_dims(shape)}, got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids, got {x.dtype}")
    same_device(name, x, like)
