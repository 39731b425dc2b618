"""Backend choice: "triton" (the kernels), "torch" (the pure-torch twin) or "auto".

The choice comes from `use_backend(...)` if active, else the ATTNMEM_BACKEND environment
variable, else "auto": triton for CUDA inputs it supports, torch otherwise. Asking for
triton where it cannot run raises an error that says why.
"""

import contextlib
import importlib.util
import os

BACKENDS = ("auto", "triton", "torch")
# CUDA's limits on a launch grid's 1st axis and on its 2nd and 3rd, where the kernels put
# heads and batch entries.
GRID_X_LIMIT = 2 ** 31 - 1
GRID_YZ_LIMIT = 65535

# A plain global rather than a ContextVar: torch.compile reads it as a constant while tracing.
_stack: list[str] = []


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed attnmem calls on backend `name`: "auto", "triton" or "torch"."""
    _stack.append(_check(name))
    try:
        yield
    finally:
        _stack.pop()


def requested_backend() -> str:
    if _stack:
        return _stack[-1]
    return _check(os.environ.get("ATTNMEM_BACKEND", "auto"))


# Looked up once, at import: a module search walks sys.path, which costs more than a small
# op, and torch.compile's dynamo cannot trace it (torch 2.11 refused fullgraph=True on every
# op while this was a cached function, whose cache its dynamo sees through).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_device_reasons(tensors) -> list[str]:
    """Why the triton backend cannot run on these tensors' device (empty if it can)."""
    if not _TRITON_INSTALLED:
        return ["triton is not installed"]
    device = tensors[0].device
    if device.type == "cuda":
        return []
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return []
    return [f"inputs are on {device.type}: triton runs on CUDA devices, and on the CPU "
            "only through its interpreter (TRITON_INTERPRET=1 before triton is imported)"]


def grid_reasons(counts) -> list[str]:
    """What the triton kernels lack for launch grids whose 2nd or 3rd axis would hold these
    counts, (name, count) pairs: CUDA limits those axes to GRID_YZ_LIMIT."""
    return [f"{count} {name} > {GRID_YZ_LIMIT}, the CUDA launch grid's limit"
            for name, count in counts if count > GRID_YZ_LIMIT]


def resolve(requested: str, tensors, reasons: list[str], op: str) -> str:
    """The backend that runs `op`; `reasons` lists what the triton kernel lacks for them."""
    if requested == "torch":
        return "torch"
    reasons = triton_device_reasons(tensors) + reasons
    if requested == "auto":
        return "triton" if not reasons and tensors[0].device.type == "cuda" else "torch"
    if reasons:
        raise RuntimeError(f"attnmem.{op}: the triton backend cannot run these inputs: "
                           + "; ".join(reasons))
    return "triton"
