"""External-memory ops for memory-augmented networks: content and location addressing,
reading, and erase/add writing. Shapes: memory (B, N, D), keys (B, R, D), read weights
(B, R, N), write weights (B, W, N), erase and add (B, W, D). With topk=K, content
addressing keeps each head's K best slots: its weights are SparseWeights, indices and
weights (B, R, K), which memory_read and memory_write take too.

memory_address, memory_attend and memory_read also take a memory (N, D) (and values
(N, Dv)) shared by every batch entry, the batch coming from the keys or the weights: a
large key-value memory read by a batch without a copy per entry. Its sparse (top-k) reads
give it an (N, D) gradient, never a (B, N, D) one, or with sparse_grad=True a sparse COO
gradient of the touched rows (as nn.Embedding(sparse=True)) for torch.optim.SparseAdam.

The ops validate their inputs, then run on the pure-torch twin (attnmem.reference.memory)
or on their Triton kernels, as attnmem.backend chooses. Their inputs share one floating
dtype; under torch.autocast, mixed ones are promoted to the widest (torch.cat's policy,
_checks.autocast_promote): a float32 memory read and written by 16-bit heads stays float32.
"""

import numbers
from typing import NamedTuple, Optional

import torch

from attnmem import _checks, _library
from attnmem import backend as _backend
from attnmem.reference import memory as _reference

SIMILARITIES = ("cosine", "dot", "scaled_dot")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# memory_attend's tiles hold slot (and value) rows of up to MAX_TRITON_WIDTH in registers;
# heads run in blocks of 16 (kernels.memory_attend), compile-checked up to MAX_TRITON_HEADS.
MAX_TRITON_WIDTH = 256
MAX_TRITON_HEADS = 128
# The top-k selection keeps each head's candidates in registers (see kernels.memory_attend).
MAX_TRITON_TOPK = 32


class SparseWeights(NamedTuple):
    """Weights on K slots per head: indices (B, R, K) int64, best first (ties to the lower
    slot), -1 where a head has fewer than K usable slots; weights (B, R, K), 0 at -1."""

    indices: torch.Tensor
    weights: torch.Tensor


@_library.custom_op("memory_attend", mutates_args=())
def _memory_attend_op(memory: torch.Tensor, keys: torch.Tensor, values: Optional[torch.Tensor],
                      strength: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                      similarity: str, need_read: bool, need_weights: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton path -> (read, weights, stats); an output not asked for is an empty tensor.
    stats (2, B, R) holds each head's max score and sum of exp(score - max)."""
    from attnmem.kernels import memory_attend as kernel

    read, stats, scores = kernel.memory_attend_forward(memory, keys, values, strength, mask,
                                                       similarity, need_weights, need_read)
    if need_weights:  # masked slots have score -inf: weight 0
        scores = torch.exp(scores - stats[0][..., None]) / stats[1][..., None]
    return read, scores.to(memory.dtype), stats


@_memory_attend_op.register_fake
def _(memory, keys, values, strength, mask, similarity, need_read, need_weights):
    batch, n_slots, width = memory.shape
    value_dim = width if values is None else values.shape[2]
    heads = keys.shape[1]
    weights = memory.new_empty((batch, heads, n_slots) if need_weights else (0,))
    return (memory.new_empty((batch, heads, value_dim) if need_read else (0,)), weights,
            memory.new_empty((2, batch, heads), dtype=torch.float32))


@_library.custom_op("memory_attend_backward", mutates_args=())
def _memory_attend_backward_op(dread: Optional[torch.Tensor],
                               dweights: Optional[torch.Tensor],
                               memory: torch.Tensor, keys: torch.Tensor,
                               values: Optional[torch.Tensor], strength: Optional[torch.Tensor],
                               mask: Optional[torch.Tensor], read: torch.Tensor,
                               weights: torch.Tensor, stats: torch.Tensor, similarity: str
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dmemory, dkeys, dvalues, dstrength; an empty tensor for an absent input."""
    from attnmem.kernels import memory_attend as kernel

    grads = kernel.memory_attend_backward(dread, dweights, memory, keys, values, strength, mask,
                                          read, weights, stats, similarity)
    return tuple(memory.new_empty(0) if g is None else g for g in grads)


@_memory_attend_backward_op.register_fake
def _(dread, dweights, memory, keys, values, strength, mask, read, weights, stats, similarity):
    return (memory.new_empty(memory.shape), keys.new_empty(keys.shape),
            memory.new_empty(0 if values is None else values.shape),
            memory.new_empty(0 if strength is None else strength.shape))


def _attend_setup_context(ctx, inputs, output):
    memory, keys, values, strength, mask, similarity, need_read, need_weights = inputs
    read, weights, stats = output
    ctx.save_for_backward(memory, keys, values, strength, mask, read, weights, stats)
    ctx.similarity, ctx.need_read, ctx.need_weights = similarity, need_read, need_weights
    # An output without a gradient (the statistics; read or weights where only one was
    # asked for) gets None, not a zero tensor filled on the device.
    ctx.set_materialize_grads(False)


def _attend_backward(ctx, dread, dweights, dstats):
    memory, keys, values, strength, mask, read, weights, stats = ctx.saved_tensors
    dread, dweights = (dread if ctx.need_read else None), (dweights if ctx.need_weights else None)
    if dread is None and dweights is None:
        return (None,) * 8
    dmemory, dkeys, dvalues, dstrength = _memory_attend_backward_op(
        dread, dweights, memory, keys, values, strength, mask, read, weights, stats,
        ctx.similarity)
    return (dmemory, dkeys, None if values is None else dvalues,
            None if strength is None else dstrength, None, None, None, None)


_memory_attend_op.register_autograd(_attend_backward, setup_context=_attend_setup_context)


@_library.custom_op("memory_topk", mutates_args=())
def _memory_topk_op(memory: torch.Tensor, keys: torch.Tensor, strength: Optional[torch.Tensor],
                    mask: Optional[torch.Tensor], similarity: str, k: int) -> torch.Tensor:
    """Triton path of the top-k selection -> slots (B, R, k) int64; no gradient."""
    from attnmem.kernels import memory_attend as kernel

    return kernel.memory_topk_forward(memory, keys, strength, mask, similarity, k)


@_memory_topk_op.register_fake
def _(memory, keys, strength, mask, similarity, k):
    return keys.new_empty((*keys.shape[:2], k), dtype=torch.int64)


@_library.custom_op("memory_write", mutates_args=())
def _memory_write_op(memory: torch.Tensor, weights: torch.Tensor, erase: torch.Tensor,
                     add: torch.Tensor) -> torch.Tensor:
    from attnmem.kernels import memory_write as kernel

    return kernel.memory_write_forward(memory, weights, erase, add)


@_memory_write_op.register_fake
def _(memory, weights, erase, add):
    return memory.new_empty(memory.shape)


@_library.custom_op("memory_write_backward", mutates_args=())
def _memory_write_backward_op(dout: torch.Tensor, memory: torch.Tensor, weights: torch.Tensor,
                              erase: torch.Tensor, add: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from attnmem.kernels import memory_write as kernel

    return kernel.memory_write_backward(dout, memory, weights, erase, add)


@_memory_write_backward_op.register_fake
def _(dout, memory, weights, erase, add):
    return tuple(x.new_empty(x.shape) for x in (memory, weights, erase, add))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_through(op):
    """An autograd backward handing the first output's gradient and the saved tensors to
    op; gradients of the other outputs (internal statistics) are not used."""
    def backward(ctx, grad, *unused):
        return op(grad, *ctx.saved_tensors)
    return backward


_memory_write_op.register_autograd(_backward_through(_memory_write_backward_op),
                                   setup_context=_save_inputs)


@_library.custom_op("memory_read", mutates_args=())
def _memory_read_op(memory: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    from attnmem.kernels import memory_read as kernel

    return kernel.memory_read_forward(memory, weights)


@_memory_read_op.register_fake
def _(memory, weights):
    return memory.new_empty((*weights.shape[:2], memory.shape[2]))


@_library.custom_op("memory_read_backward", mutates_args=())
def _memory_read_backward_op(dread: torch.Tensor, memory: torch.Tensor, weights: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    from attnmem.kernels import memory_read as kernel

    return kernel.memory_read_backward(dread, memory, weights)


@_memory_read_backward_op.register_fake
def _(dread, memory, weights):
    return memory.new_empty(memory.shape), weights.new_empty(weights.shape)


_memory_read_op.register_autograd(_backward_through(_memory_read_backward_op),
                                  setup_context=_save_inputs)


@_library.custom_op("memory_read_sparse", mutates_args=())
def _memory_read_sparse_op(memory: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                           sparse_grad: bool = False) -> torch.Tensor:
    """memory (B, N, D), or (N, D) shared by the batch; sparse_grad (shared memories only):
    memory's gradient a sparse COO tensor of the touched rows."""
    from attnmem.kernels import memory_read as kernel

    return kernel.memory_read_sparse_forward(memory, indices, weights)


@_memory_read_sparse_op.register_fake
def _(memory, indices, weights, sparse_grad=False):
    return memory.new_empty((*weights.shape[:2], memory.shape[-1]))


@_library.custom_op("memory_read_sparse_backward", mutates_args=())
def _memory_read_sparse_backward_op(dread: torch.Tensor, memory: torch.Tensor,
                                    indices: torch.Tensor, weights: torch.Tensor,
                                    deterministic: bool, sparse_grad: bool = False
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dmemory like memory, dweights, an empty tensor), or with sparse_grad (dmemory's
    touched rows (U, D), dweights, the touched slots (U,))."""
    from attnmem.kernels import memory_read as kernel

    dmemory, dweights, touched = kernel.memory_read_sparse_backward(
        dread, memory, indices, weights, deterministic, sparse_grad)
    return dmemory, dweights, indices.new_empty(0) if touched is None else touched


@_memory_read_sparse_backward_op.register_fake
def _(dread, memory, indices, weights, deterministic, sparse_grad=False):
    if sparse_grad:
        touched = torch.library.get_ctx().new_dynamic_size()
        return (memory.new_empty((touched, memory.shape[-1])), weights.new_empty(weights.shape),
                indices.new_empty((touched,)))
    return memory.new_empty(memory.shape), weights.new_empty(weights.shape), indices.new_empty(0)


def _read_sparse_setup_context(ctx, inputs, output):
    memory, indices, weights, sparse_grad = inputs
    ctx.save_for_backward(memory, indices, weights)
    ctx.sparse_grad = sparse_grad


def _read_sparse_backward(ctx, dread):
    memory, indices, weights = ctx.saved_tensors
    dmemory, dweights, touched = _memory_read_sparse_backward_op(
        dread, memory, indices, weights, torch.are_deterministic_algorithms_enabled(),
        ctx.sparse_grad)
    if ctx.sparse_grad:  # as product_key_lookup(sparse=True) gives its values
        dmemory = torch.sparse_coo_tensor(touched[None], dmemory, memory.shape,
                                          is_coalesced=True, check_invariants=False)
    return dmemory, None, dweights, None


_memory_read_sparse_op.register_autograd(_read_sparse_backward,
                                         setup_context=_read_sparse_setup_context)


@_library.custom_op("location_address", mutates_args=())
def _location_op(content_weights: torch.Tensor, prev_weights: torch.Tensor, gate: torch.Tensor,
                 shift: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (weights, float32 (2, B, R) row statistics of the sharpening softmax)."""
    from attnmem.kernels import location_address as kernel

    return kernel.location_address_forward(content_weights, prev_weights, gate, shift, gamma)


@_location_op.register_fake
def _(content_weights, prev_weights, gate, shift, gamma):
    return (content_weights.new_empty(content_weights.shape),
            gate.new_empty((2, *gate.shape), dtype=torch.float32))


@_library.custom_op("location_address_backward", mutates_args=())
def _location_backward_op(dout: torch.Tensor, out: torch.Tensor, stats: torch.Tensor,
                          content_weights: torch.Tensor, prev_weights: torch.Tensor,
                          gate: torch.Tensor, shift: torch.Tensor, gamma: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    from attnmem.kernels import location_address as kernel

    return kernel.location_address_backward(dout, out, stats, content_weights, prev_weights,
                                             gate, shift, gamma)


@_location_backward_op.register_fake
def _(dout, out, stats, content_weights, prev_weights, gate, shift, gamma):
    return tuple(x.new_empty(x.shape) for x in (content_weights, prev_weights, gate, shift,
                                                gamma))


def _save_outputs_and_inputs(ctx, inputs, output):
    ctx.save_for_backward(*output, *inputs)
    ctx.set_materialize_grads(False)  # the statistics' gradient, unused, stays None


_location_op.register_autograd(_backward_through(_location_backward_op),
                               setup_context=_save_outputs_and_inputs)


def _choose(op, tensors, heads=None, width=None, topk=None, grid_rows=None) -> str:
    """The backend for op: what the triton kernels lack here (dtype; heads, slot width and
    top-k where the kernel holds them in registers; the launch grid's 2nd axis: the batch,
    or grid_rows (name, count) where the kernel puts other rows there) decides with the
    requested backend."""
    x = tensors[0]
    reasons = []
    if topk is not None and topk > MAX_TRITON_TOPK:
        reasons.append(f"topk {topk} > {MAX_TRITON_TOPK}")
    if x.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {x.dtype} (supported: float16, bfloat16, float32)")
    if heads is not None and heads > MAX_TRITON_HEADS:
        reasons.append(f"{heads} heads > {MAX_TRITON_HEADS}")
    if width is not None and width > MAX_TRITON_WIDTH:
        reasons.append(f"slot width {width} > {MAX_TRITON_WIDTH}")
    reasons += _backend.grid_reasons([grid_rows or ("batch entries", x.shape[0])])
    return _backend.resolve(_backend.requested_backend(), tensors, reasons, op)


def _shape(name, x, expected, what):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must be {what} = {tuple(expected)}, got {tuple(x.shape)}")


def _memory(memory, shared=None):
    """memory (B, N, D), or (N, D) shared by the batch where shared = (what the op needs for
    it: "topk=K", sparse weights; whether the call gives it)."""
    if shared is not None and isinstance(memory, torch.Tensor) and memory.ndim == 2:
        if not shared[1]:
            raise ValueError(f"memory must be (B, N, D) here: a memory (N, D) shared by the "
                             f"batch is read with {shared[0]} (for a dense read over every "
                             f"slot, pass memory.expand(B, -1, -1))")
        return _checks.tensor("memory", memory, 2, "(N, D)")
    _checks.tensor("memory", memory, 3, "(B, N, D)")


def _sparse_grad(sparse_grad, memory, needs):
    """sparse_grad as a bool: True only for a memory (N, D) shared by the batch and `needs`
    (topk, sparse weights) given."""
    if not isinstance(sparse_grad, bool):
        raise TypeError(f"sparse_grad must be a bool, got {type(sparse_grad).__name__}")
    if sparse_grad and (memory.ndim != 2 or not needs[1]):
        raise ValueError(f"sparse_grad=True needs a memory (N, D) shared by the batch and "
                         f"{needs[0]}, got memory {tuple(memory.shape)}"
                         + ("" if needs[1] else f" without {needs[0]}"))
    return sparse_grad


def _heads(name, x, memory, what):
    """x: (B, R, D) against memory (B, N, D), or (N, D) shared by the batch."""
    _checks.tensor(name, x, 3, what)
    _checks.like(name, x, memory, "memory")
    width = memory.shape[-1]
    if memory.ndim == 2 and x.shape[2] != width:
        raise ValueError(f"{name} must be {what} with D={width}, got {tuple(x.shape)}")
    if memory.ndim == 3 and (x.shape[0] != memory.shape[0] or x.shape[2] != width):
        raise ValueError(f"{name} must be {what} with B={memory.shape[0]}, D={width}, got "
                         f"{tuple(x.shape)}")


def _weights(name, weights, memory, what):
    _checks.tensor(name, weights, 3, what)
    _checks.like(name, weights, memory, "memory")
    if weights.shape[0] != memory.shape[0] or weights.shape[2] != memory.shape[1]:
        raise ValueError(f"{name} must be {what} with B={memory.shape[0]}, "
                         f"N={memory.shape[1]}, got {tuple(weights.shape)}")


def _address_args(memory, keys, strength, similarity, mask, topk):
    _memory(memory, ("topk=K", topk is not None))
    _heads("keys", keys, memory, "(B, R, D)")
    if strength is not None:
        _checks.tensor("strength", strength, 2, "(B, R)")
        _checks.like("strength", strength, memory, "memory")
        _shape("strength", strength, keys.shape[:2], "(B, R)")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor (True = usable slot)")
        _shape("mask", mask, (keys.shape[0], memory.shape[-2]), "(B, N)")
        if mask.device != memory.device:
            raise ValueError(f"mask is on {mask.device} but memory is on {memory.device}")


def _values(values, memory):
    """values (B, N, Dv) beside memory (B, N, D), or (N, Dv) beside a shared (N, D)."""
    what = "(N, Dv)" if memory.ndim == 2 else "(B, N, Dv)"
    _checks.tensor("values", values, memory.ndim, what)
    _checks.like("values", values, memory, "memory")
    if values.shape[:-1] != memory.shape[:-1]:
        names = "N" if memory.ndim == 2 else "B, N"
        raise ValueError(f"values must be {what} with {names} = "
                         f"{tuple(memory.shape[:-1])}, got {tuple(values.shape)}")


def _topk(topk, n_slots):
    """topk as an int in [1, N] (numpy integers too; a bool is not an int)."""
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral):
        raise TypeError(f"topk must be an int, got {type(topk).__name__} {topk!r}")
    if not 1 <= topk <= n_slots:
        raise ValueError(f"topk must be an int in [1, N] = [1, {n_slots}], got {topk}")
    return int(topk)


def _top_slots(chosen, memory, keys, strength, similarity, mask, topk):
    """Each head's topk best usable slots (B, R, topk), -1 past its last; no gradient. A
    memory (N, D) shared by the batch is scored as it is (torch) or through a batch-stride-0
    view (triton): never copied per batch entry."""
    if chosen == "triton":
        if memory.ndim == 2:
            memory = memory.expand(keys.shape[0], -1, -1)
        return _memory_topk_op(memory.detach(), keys.detach(),
                               None if strength is None else strength.detach(), mask,
                               similarity, topk)
    return _reference.top_slots(memory, keys, strength, similarity, mask, topk)


@_checks.autocast_promote
def memory_address(memory, keys, *, strength=None, similarity="cosine", mask=None,
                   topk=None, sparse_grad=False):
    """Content addressing: weights (B, R, N) = softmax over slots of
    strength * sim(key, slot). strength: (B, R), >= 0 (default 1); similarity: "cosine"
    (NTM/DNC, u.v / max(|u||v|, 1e-8)), "dot" (MemN2N) or "scaled_dot" (u.v / sqrt(D));
    mask: (B, N) bool, True = usable slot. A head with no usable slot gets zero weights.

    topk=K (an int in [1, N]): the softmax runs over each head's K best-scoring usable
    slots only, found in one pass over memory that never holds the (B, R, N) scores;
    returns SparseWeights (indices and weights (B, R, K)). A head with fewer than K usable
    slots gets index -1 and weight 0 past them. Gradients reach the K slots' rows, the keys
    and strength; the selection itself has none.

    With topk, memory may be (N, D), one memory shared by every batch entry (keys (B, R, D)
    and mask (B, N) give the batch): it is scored without a copy per entry and its gradient
    is (N, D), the gathered rows' gradients summed into it, never a (B, N, D) buffer (a
    3-D memory.expand(B, -1, -1) would get one from the gather's backward).
    sparse_grad=True (shared memories only) makes that gradient a sparse COO tensor of the
    gathered rows, uncoalesced, as nn.Embedding(sparse=True) does, for
    torch.optim.SparseAdam. Without topk a shared memory raises a ValueError: pass
    memory.expand(B, -1, -1) for the dense weights. Under torch.autocast, mixed floating
    dtypes run in the widest (see the module docstring)."""
    _address_args(memory, keys, strength, similarity, mask, topk)
    sparse_grad = _sparse_grad(sparse_grad, memory, ("topk=K", topk is not None))
    if topk is not None:
        topk = _topk(topk, memory.shape[-2])
    chosen = _choose("memory_address", (memory, keys), keys.shape[1], memory.shape[-1], topk,
                     ("batch entries", keys.shape[0]))
    if topk is not None:
        slots = _top_slots(chosen, memory, keys, strength, similarity, mask, topk)
        return SparseWeights(slots, _reference.address_slots(memory, keys, strength,
                                                             similarity, slots, sparse_grad))
    if chosen == "triton":
        return _memory_attend_op(memory, keys, None, strength, mask, similarity, False, True)[1]
    return _reference.memory_address(memory, keys, strength, similarity, mask)


@_checks.autocast_promote
def memory_read(memory, weights, *, sparse_grad=False):
    """Read vectors (B, R, D): r = sum_n w_n M_n for weights (B, R, N).

    Sparse weights: (indices, weights) of (B, R, K), e.g. memory_address's SparseWeights,
    read K gathered rows per head, r = sum_k w_k M[indices_k], never through a (B, R, N)
    tensor: exactly the dense read of the weights scattered (summed) into (B, R, N). An
    index -1 reads nothing; indices are range-checked on CPU tensors only (on CUDA, one
    outside [-1, N) reads nothing). Gradients reach the weights and the gathered rows of
    memory, scattered into a dense dMemory: on the triton backend by float32 atomics for a
    float32 memory, else (16-bit memories, torch.use_deterministic_algorithms) by sorted
    per-row sums that repeat bit for bit; on the torch backend by the gather's backward.

    Sparse weights also read a memory (N, D) shared by every batch entry (the weights give
    the batch), whose gradient is then (N, D), never (B, N, D): the same atomics or row
    sums on the triton backend, torch's embedding backward on the torch backend.
    sparse_grad=True (shared memories only) makes it a sparse COO tensor of the touched
    rows, for torch.optim.SparseAdam: coalesced (the triton backend's row sums, one host
    sync for their count) or not (torch's embedding). Dense weights need a memory
    (B, N, D). Under torch.autocast, mixed floating dtypes run in the widest (see the
    module docstring)."""
    sparse = isinstance(weights, (tuple, list))
    _memory(memory, ("sparse weights (indices, weights)", sparse))
    sparse_grad = _sparse_grad(sparse_grad, memory, ("sparse weights (indices, weights)",
                                                     sparse))
    if sparse:
        indices, weights = _sparse_weights(weights, memory, "R")
        # The sparse kernels put the batch entries x heads on their grid's 1st axis, and on
        # its 2nd the slots' columns in chunks of 16 or more, or the top-k in chunks of 2 or
        # more (kernels/memory_read.py's sparse_config).
        chunks = max(-(-memory.shape[-1] // 16), -(-weights.shape[-1] // 2))
        if _choose("memory_read", (memory, weights),
                   grid_rows=("column or top-k chunks", chunks)) == "triton":
            return _memory_read_sparse_op(memory, indices, weights, sparse_grad)
        return _reference.read_slots(memory, indices, weights, sparse_grad)
    _weights("weights", weights, memory, "(B, R, N)")
    chosen = _choose("memory_read", (memory, weights), heads=weights.shape[1])
    if chosen == "triton":
        return _memory_read_op(memory, weights)
    return _reference.memory_read(memory, weights)


@_checks.autocast_promote
def memory_attend(memory, keys, *, values=None, strength=None, similarity="cosine", mask=None,
                  return_weights=False, topk=None, sparse_grad=False):
    """Content addressing and read in one: softmax over slots of strength * sim(key, slot),
    then the weighted sum of values (B, N, Dv), by default of memory itself (a key-value
    memory such as MemN2N's A and C embeddings passes values). Returns (B, R, Dv), and
    with return_weights=True also the weights (B, R, N).

    topk=K: the read uses each head's K best-scoring usable slots only (see
    memory_address), gathering K rows per head after one pass over memory; the weights
    returned are SparseWeights (indices and weights (B, R, K)). Gradients reach the K
    slots' rows of memory and values, the keys and strength.

    With topk, memory (N, D) and values (N, Dv) may be shared by every batch entry, with
    (N, D) gradients and sparse_grad as in memory_address (sparse_grad makes both memory's
    and values' gradients sparse). Without topk a shared memory raises a ValueError. Under
    torch.autocast, mixed floating dtypes run in the widest (see the module docstring)."""
    _checks.flag("return_weights", return_weights)
    _address_args(memory, keys, strength, similarity, mask, topk)
    sparse_grad = _sparse_grad(sparse_grad, memory, ("topk=K", topk is not None))
    if topk is not None:
        topk = _topk(topk, memory.shape[-2])
    if values is not None:
        _values(values, memory)
    # With topk, the kernel scores memory only; values are gathered by torch.
    width = memory.shape[-1] if values is None or topk is not None else max(memory.shape[2],
                                                                            values.shape[2])
    chosen = _choose("memory_attend", (memory, keys), keys.shape[1], width, topk,
                     ("batch entries", keys.shape[0]))
    if topk is not None:
        slots = _top_slots(chosen, memory, keys, strength, similarity, mask, topk)
        read, weights = _reference.attend_slots(memory, keys, values, strength, similarity,
                                                slots, sparse_grad)
        return (read, SparseWeights(slots, weights)) if return_weights else read
    if chosen == "triton":
        read, weights, _ = _memory_attend_op(memory, keys, values, strength, mask, similarity,
                                             True, return_weights)
    else:
        read, weights = _reference.memory_attend(memory, keys, values, strength, similarity,
                                                 mask)
    return (read, weights) if return_weights else read


def _sparse_weights(weights, memory, heads):
    """(indices, weights) of a sparse read ("R" heads) or write ("W"), checked: indices an
    integer (B, heads, K) tensor of slots in [-1, N) (-1: none), weights (B, heads, K) like
    memory. The range is checked on CPU tensors only, as FlashAttention checks cu_seqlens:
    on CUDA reading it would stall the host until the device catches up, and under
    torch.compile it would break the graph. Unchecked, an index outside [-1, N) counts as
    -1: its entry reads or writes nothing."""
    shape = f"(B, {heads}, K)"
    if len(weights) != 2:
        raise ValueError(f"weights must be a (B, {heads}, N) tensor or (indices, weights) of "
                         f"{shape}, got a sequence of {len(weights)}")
    indices, weights = weights
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"weights' indices must be a torch.Tensor, got "
                        f"{type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or \
            indices.dtype == torch.bool:
        raise TypeError(f"weights' indices must be an integer tensor, got {indices.dtype}")
    if indices.ndim != 3 or (memory.ndim == 3 and indices.shape[0] != memory.shape[0]):
        batch = "" if memory.ndim == 2 else f" with B={memory.shape[0]}"
        raise ValueError(f"weights' indices must be {shape}{batch}, got "
                         f"{tuple(indices.shape)}")
    if indices.device != memory.device:
        raise ValueError(f"weights' indices are on {indices.device} but memory is on "
                         f"{memory.device}")
    _checks.tensor("weights", weights, 3, shape)
    _checks.like("weights", weights, memory, "memory")
    _shape("weights", weights, indices.shape, f"{shape} like its indices")
    n_slots = memory.shape[-2]
    if indices.device.type == "cpu" and not torch.compiler.is_compiling() and indices.numel():
        low, high = torch.aminmax(indices)
        if low < -1 or high >= n_slots:
            raise ValueError(f"weights' indices must be slots in [-1, N) = [-1, {n_slots}), "
                             f"got values in [{low}, {high}]")
    indices = indices.long()
    return torch.where((indices >= 0) & (indices < n_slots), indices, -1), weights


@_checks.autocast_promote
def memory_write(memory, weights, erase, add, *, inplace=False):
    """Erase then add: M' = M * prod_w (1 - w_w e_w^T) + sum_w w_w a_w^T, for write weights
    (B, W, N), erase (B, W, D) in [0, 1] and add (B, W, D). inplace=True updates memory
    itself (inference) and raises if autograd would need the old memory.

    Sparse weights: (indices, weights) of (B, W, K), e.g. memory_address's SparseWeights,
    write only those slots, exactly as the dense write with the weights scattered into
    (B, W, N) (an index repeated within a head adds its weights; -1 writes nothing). Heads
    hitting one slot compose as in the dense write: the product of their erases, the sum
    of their adds. Only the touched rows are computed (each slot once, however many
    entries name it); out of place, memory is still copied once. Indices are range-checked
    on CPU tensors only, without a device sync: on CUDA an index outside [-1, N) writes
    nothing, as -1 does. Under torch.autocast, mixed floating dtypes run in the widest (see
    the module docstring); in place, memory must already have it."""
    _checks.flag("inplace", inplace)
    _memory(memory)
    sparse = isinstance(weights, (tuple, list))
    if sparse:
        indices, weights = _sparse_weights(weights, memory, "W")
    else:
        _weights("weights", weights, memory, "(B, W, N)")
    for name, x in (("erase", erase), ("add", add)):
        _checks.tensor(name, x, 3, "(B, W, D)")
        _checks.like(name, x, memory, "memory")
        _shape(name, x, (*weights.shape[:2], memory.shape[2]), "(B, W, D)")
    if sparse:
        if inplace:
            _check_inplace(memory, weights, erase, add)
        return _reference.memory_write_slots(memory, indices, weights, erase, add,
                                             write=memory_write, inplace=inplace)
    chosen = _choose("memory_write", (memory, weights))
    if not inplace:
        if chosen == "triton":
            return _memory_write_op(memory, weights, erase, add)
        return _reference.memory_write(memory, weights, erase, add)
    _check_inplace(memory, weights, erase, add)
    if chosen == "triton":
        from attnmem.kernels import memory_write as kernel

        if memory.stride(-1) != 1:
            raise ValueError("memory_write(inplace=True) needs memory's last dimension "
                             "contiguous on the triton backend")
        kernel.memory_write_forward(memory, weights, erase, add, out=memory)
        # The kernel writes memory's storage unseen by autograd: its version moves as torch's
        # in-place ops move it, so a backward that saved the old memory raises.
        torch.autograd.graph.increment_version(memory)
        return memory
    return _reference.memory_write_(memory, weights, erase, add)


def _check_inplace(memory, weights, erase, add):
    if torch.is_grad_enabled() and any(x.requires_grad for x in (memory, weights, erase, add)):
        raise RuntimeError("memory_write(inplace=True) overwrites memory, which autograd needs "
                           "for the gradient: use inplace=False, or run under torch.no_grad()")
    # torch's own in-place ops refuse these: one written element would stand for several.
    if torch._debug_has_internal_overlap(memory) == 1:
        raise ValueError("memory_write(inplace=True) needs a memory whose elements do not "
                         "overlap (an expanded or stride-0 memory would mix batches): pass "
                         "memory.clone(), or use inplace=False")
    for name, x in (("weights", weights), ("erase", erase), ("add", add)):
        if torch._C._overlaps(memory, x):
            raise ValueError(f"memory_write(inplace=True): {name} shares storage with memory, "
                             "which the write overwrites; pass a copy, or use inplace=False")


@_checks.autocast_promote
def location_address(content_weights, prev_weights, gate, shift, gamma):
    """The NTM's location addressing (B, R, N): w_g = g w_c + (1 - g) w_prev, a circular
    convolution with the shift distribution shift (B, R, S), S odd, where shift[..., j] moves
    the focus by j - S//2 slots, then sharpening w^gamma / sum(w^gamma). gate: (B, R) in
    [0, 1]; gamma: (B, R), >= 1. Under torch.autocast, mixed floating dtypes run in the
    widest (see the module docstring)."""
    _checks.tensor("content_weights", content_weights, 3, "(B, R, N)")
    for name, x in (("prev_weights", prev_weights),):
        _checks.tensor(name, x, 3, "(B, R, N)")
        _checks.like(name, x, content_weights, "content_weights")
        _shape(name, x, content_weights.shape, "(B, R, N)")
    for name, x in (("gate", gate), ("gamma", gamma)):
        _checks.tensor(name, x, 2, "(B, R)")
        _checks.like(name, x, content_weights, "content_weights")
        _shape(name, x, content_weights.shape[:2], "(B, R)")
    _checks.tensor("shift", shift, 3, "(B, R, S)")
    _checks.like("shift", shift, content_weights, "content_weights")
    if shift.shape[:2] != content_weights.shape[:2] or shift.shape[2] % 2 != 1:
        raise ValueError(f"shift must be (B, R, S) with (B, R) = "
                         f"{tuple(content_weights.shape[:2])} and S odd, got {tuple(shift.shape)}")
    batch, heads = content_weights.shape[:2]
    chosen = _choose("location_address", (content_weights,),
                     grid_rows=("rows (batch entries x heads)", batch * heads))
    if chosen == "triton":
        return _location_op(content_weights, prev_weights, gate, shift, gamma)[0]
    return _reference.location_address(content_weights, prev_weights, gate, shift, gamma)
