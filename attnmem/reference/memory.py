"""Pure-torch external-memory ops (NTM, DNC, MemN2N): the fallback and the tests' reference.

Shapes: memory (B, N, D) of N slots, keys (B, R, D) for R read heads, weights (B, R, N),
write weights (B, W, N) with erase and add vectors (B, W, D). The sparse (top-k) reads and
their selection also take a memory (N, D) shared by every batch entry. Every op is differentiable
through torch autograd and stays finite where the formulas meet zeros: zero-norm slots or
keys under cosine similarity, slots no head may use, zero weights under sharpening.
"""

import math

import torch
import torch.nn.functional as F

from attnmem.reference.attention import compute_dtype, softmax_with_lse

EPS = 1e-8


def _upcast(*tensors):
    """float16/bfloat16 computed in float32 (1e-16 is zero in half precision)."""
    return [None if x is None else x.to(compute_dtype(x.dtype)) for x in tensors]


def _norm_sq(x):
    """|x|^2 over the last dim; vector_norm reduces without a memory-sized square."""
    return torch.linalg.vector_norm(x, dim=-1).square()


def _similarity(dots, kind, width, norms_sq):
    """Dot products made the similarity `kind`; norms_sq() gives |u|^2 |v|^2 like dots."""
    if kind == "dot":
        return dots
    if kind == "scaled_dot":
        return dots / math.sqrt(width)
    # max(|u||v|, eps) as sqrt(max(|u|^2 |v|^2, eps^2)): the same value, and no 0/0 in the
    # gradient of a zero vector's norm.
    return dots / norms_sq().clamp_min(EPS * EPS).sqrt()


def similarity(memory, keys, kind):
    """(B, R, N) similarity of every key with every slot of memory (B, N, D) or (N, D):
    "cosine" u.v / max(|u||v|, 1e-8), "dot" u.v or "scaled_dot" u.v / sqrt(D)."""
    return _similarity(torch.matmul(keys, memory.transpose(-1, -2)), kind, memory.shape[-1],
                       lambda: _norm_sq(keys)[:, :, None] * _norm_sq(memory)[..., None, :])


def _usable(x, mask):
    """x (B, N, ...) with the slots mask excludes zeroed: whatever they hold (NaN, inf)
    contributes nothing, and their gradient is zero."""
    return x if mask is None else x.masked_fill(~mask[:, :, None], 0)


def memory_address(memory, keys, strength, kind, mask):
    """Content weights (B, R, N): softmax over slots of strength * sim(key, slot); slots
    with mask False get weight 0, and a head with no usable slot gets zero weights."""
    return _address(_usable(memory, mask), keys, strength, kind, mask)


def _address(memory, keys, strength, kind, mask):
    """memory_address on a memory whose masked slots are already zeroed."""
    dtype = memory.dtype
    memory, keys, strength = _upcast(memory, keys, strength)
    scores = similarity(memory, keys, kind)
    if strength is not None:
        scores = scores * strength[:, :, None]
    if mask is None:  # every slot usable: no row without a slot, torch's softmax is safe
        return torch.softmax(scores, -1).to(dtype)
    return softmax_with_lse(scores.masked_fill(~mask[:, None, :], float("-inf")))[0].to(dtype)


def memory_read(memory, weights):
    """Read vectors (B, R, D): r = sum_n w_n M_n."""
    return torch.matmul(*_upcast(weights, memory)).to(memory.dtype)


def memory_attend(memory, keys, values, strength, kind, mask):
    """Address by content and read in one: (read (B, R, Dv), weights (B, R, N))."""
    memory = _usable(memory, mask)  # once, for the scores and (without values) the read
    weights = _address(memory, keys, strength, kind, mask)
    return memory_read(memory if values is None else _usable(values, mask), weights), weights


# Slots scored at once by top_slots: (B, R, TOP_CHUNK) scores at a time, never (B, R, N).
TOP_CHUNK = 4096


def top_slots(memory, keys, strength, kind, mask, k):
    """The k best-scoring usable slots per head, int64 (B, R, k), best first, ties to the
    lower slot, -1 past a head's last usable slot; no gradient. One pass over memory (B, N, D)
    or (N, D) in chunks of TOP_CHUNK slots (each upcast on its own), keeping each head's
    best k."""
    with torch.no_grad():
        keys, strength = _upcast(keys, strength)
        batch, heads = keys.shape[:2]
        best = keys.new_empty((batch, heads, 0))
        slots = torch.empty((batch, heads, 0), dtype=torch.int64, device=keys.device)
        n_slots = memory.shape[-2]
        for start in range(0, n_slots, TOP_CHUNK):
            chunk = _upcast(memory.narrow(-2, start, min(TOP_CHUNK, n_slots - start)))[0]
            scores = similarity(chunk, keys, kind)
            if strength is not None:
                scores = scores * strength[:, :, None]
            ids = torch.arange(start, start + chunk.shape[-2], device=keys.device)
            ids = ids.expand(batch, heads, -1)
            if mask is not None:  # whatever masked slots hold, they are never chosen
                usable = mask[:, None, start:start + chunk.shape[-2]]
                scores = scores.masked_fill(~usable, float("-inf"))
                ids = ids.masked_fill(~usable, -1)
            # A stable sort keeps earlier slots (the running best come first) ahead on ties.
            scores, ids = torch.cat([best, scores], -1), torch.cat([slots, ids], -1)
            order = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
            best, slots = scores.gather(-1, order), ids.gather(-1, order)
        return slots


def _gather(x, slots, sparse=False):
    """Rows of x (B, N, D), or (N, D) shared by the batch, at slots (B, R, K), -1 for none:
    (B, R, K, D), zero at -1. A shared x is read as an embedding table: its gradient is
    (N, D) (sparse=True: a sparse COO tensor of the rows the slots name), never (B, N, D)."""
    batch, heads, k = slots.shape
    if x.ndim == 2 and sparse:
        # Only the named rows: a -1 entry read as row 0 would put a zero row 0 into the
        # sparse gradient, which SparseAdam would step. (Selecting them syncs with the host,
        # as the sparse gradient's row count needs to anyway.)
        named = slots >= 0
        rows = F.embedding(slots[named], x, sparse=True)
        return rows.new_zeros((batch, heads, k, x.shape[-1])).index_put((named,), rows)
    if x.shape[-2] == 0:  # every slot is -1: gather from a zero row, masked below
        x = F.pad(x, (0, 0, 0, 1))
    if x.ndim == 2:
        rows = F.embedding(slots.clamp_min(0), x)
    else:
        index = slots.clamp_min(0).reshape(batch, heads * k, 1).expand(-1, -1, x.shape[2])
        rows = x.gather(1, index).reshape(batch, heads, k, x.shape[2])
    return rows.masked_fill((slots < 0)[..., None], 0)


def slot_scores(rows, keys, strength, kind, slots):
    """Scores (B, R, K), strength * sim(key, row), of each head's gathered rows (B, R, K, D);
    -inf at -1 slots."""
    dots = torch.matmul(rows, keys[..., None])[..., 0]
    scores = _similarity(dots, kind, rows.shape[-1],
                         lambda: _norm_sq(keys)[:, :, None] * _norm_sq(rows))
    if strength is not None:
        scores = scores * strength[:, :, None]
    return scores.masked_fill(slots < 0, float("-inf"))


def _slot_weights(rows, keys, strength, kind, slots):
    """Softmax weights (B, R, K) over each head's gathered rows (B, R, K, D); -1 slots get
    weight 0, a head with none gets zeros."""
    return softmax_with_lse(slot_scores(rows, keys, strength, kind, slots))[0]


def address_slots(memory, keys, strength, kind, slots, sparse=False):
    """memory_address over the given slots (B, R, K) of each head (-1: none): weights
    (B, R, K). Gradients reach those slots' rows only (sparse: see _gather)."""
    rows, keys, strength = _upcast(_gather(memory, slots, sparse), keys, strength)
    return _slot_weights(rows, keys, strength, kind, slots).to(memory.dtype)


def attend_slots(memory, keys, values, strength, kind, slots, sparse=False):
    """memory_attend over the given slots (B, R, K) of each head (-1: none) ->
    (read (B, R, Dv), weights (B, R, K)). Gradients reach those slots' rows only (sparse:
    see _gather)."""
    rows = _gather(memory, slots, sparse)
    vals = rows if values is None else _gather(values, slots, sparse)
    rows, vals, keys, strength = _upcast(rows, vals, keys, strength)
    weights = _slot_weights(rows, keys, strength, kind, slots)
    return _read_rows(weights, vals).to(memory.dtype), weights.to(memory.dtype)


def _read_rows(weights, rows):
    """sum_k w_k rows_k: (B, R, D) from weights (B, R, K) and rows (B, R, K, D)."""
    return torch.matmul(weights[:, :, None], rows)[:, :, 0]


def read_slots(memory, slots, weights, sparse=False):
    """memory_read with sparse weights (B, R, K) on slots (B, R, K) (-1: none): the dense
    read with them scattered, summed, into (B, R, N), from K gathered rows per head.
    Gradients reach those rows of memory only (sparse: see _gather), and the weights (zero
    at -1)."""
    weights = weights.masked_fill(slots < 0, 0)
    rows, weights = _upcast(_gather(memory, slots, sparse), weights)
    return _read_rows(weights, rows).to(memory.dtype)


def memory_write(memory, weights, erase, add):
    """M' = M * prod_w (1 - w_w e_w^T) + sum_w w_w a_w^T. The last head erases and adds in
    one pass, M'' = M' + w (a - M' e), so one head streams memory twice, not five times."""
    dtype = memory.dtype
    memory, weights, erase, add = _upcast(memory, weights, erase, add)
    if weights.shape[1] == 0:
        return memory.clone().to(dtype)
    for head in range(weights.shape[1] - 1):
        memory = memory * (1 - weights[:, head, :, None] * erase[:, head, None, :])
    out = torch.addcmul(memory, weights[:, -1, :, None],
                        torch.addcmul(add[:, -1, None, :], memory, erase[:, -1, None, :],
                                      value=-1))
    if weights.shape[1] > 1:
        out = out.baddbmm(weights[:, :-1].transpose(1, 2), add[:, :-1])
    return out.to(dtype)


def memory_write_slots(memory, slots, weights, erase, add, write=memory_write, inplace=False):
    """memory_write with sparse weights (B, W, K) on slots (B, W, K) (-1: none): the dense
    write with them scattered, summed, into (B, W, N), computed on the touched rows only.
    Each touched slot's row is gathered once, the rows are written by `write` (a dense
    memory_write) with their heads' weights, and put back; inplace=True puts them back into
    memory itself. Untouched rows are memory's own."""
    batch, heads, k = slots.shape
    entries = heads * k
    # No slot (every index -1) or no entry (W = 0 or K = 0): nothing to write.
    if memory.shape[1] == 0 or entries == 0:
        return memory if inplace else memory.clone()
    weights = weights.masked_fill(slots < 0, 0)
    flat = slots.reshape(batch, entries)
    # A slot-less entry becomes a zero-weight write to a slot its batch touches anyway.
    flat = torch.where(flat >= 0, flat, flat.amax(1, keepdim=True).clamp_min(0))
    ordered, order = flat.sort(dim=-1, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    row_of_sorted = first.cumsum(-1) - 1  # the touched row each sorted entry writes
    row_of = torch.empty_like(row_of_sorted).scatter_(1, order, row_of_sorted)
    touched = torch.zeros_like(flat).scatter_(1, row_of_sorted, ordered)
    dense = weights.new_zeros((batch, heads, entries)).scatter_add(
        2, row_of.reshape(batch, heads, k), weights)
    width = memory.shape[2]
    rows = memory.gather(1, touched[..., None].expand(-1, -1, width))
    rows = write(rows, dense, erase, add).gather(1, row_of_sorted[..., None].expand(-1, -1,
                                                                                    width))
    # Repeats of a slot put back the same row; the gradient flows through its first only.
    rows = torch.where(first[..., None], rows, rows.detach())
    index = ordered[..., None].expand(-1, -1, width)
    return memory.scatter_(1, index, rows) if inplace else memory.scatter(1, index, rows)


def location_address(content_weights, prev_weights, gate, shift, gamma):
    """The NTM's location stage (B, R, N): interpolate with the previous weights by gate,
    rotate by the shift distribution (shift[..., j] moves the focus by j - S//2 slots,
    circularly), then sharpen by gamma and renormalise."""
    dtype = content_weights.dtype
    content_weights, prev_weights, gate, shift, gamma = _upcast(
        content_weights, prev_weights, gate, shift, gamma)
    gated = gate[..., None] * content_weights + (1 - gate[..., None]) * prev_weights
    half = shift.shape[-1] // 2
    shifted = sum(shift[..., j, None] * torch.roll(gated, j - half, dims=-1)
                  for j in range(shift.shape[-1]))
    # w^gamma / sum(w^gamma) is a softmax of gamma log w: it never underflows to an all-zero
    # row however sharp gamma is. w = 0 has logit -inf, and no log(0) in the gradient.
    positive = shifted > 0
    safe = torch.where(positive, shifted, 1.0)
    logits = torch.where(positive, gamma[..., None] * torch.log(safe), float("-inf"))
    return softmax_with_lse(logits)[0].to(dtype)


def memory_write_(memory, weights, erase, add):
    """memory_write into memory itself: no second memory-sized buffer for inference."""
    for head in range(weights.shape[1]):
        memory.mul_(1 - weights[:, head, :, None] * erase[:, head, None, :])
    return memory.baddbmm_(weights.transpose(1, 2), add)
