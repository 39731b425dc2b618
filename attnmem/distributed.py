"""attnmem.distributed: attention over a sequence, and external-memory ops over a memory,
split across the ranks of a torch.distributed process group (NCCL on GPUs, gloo on CPUs).

Context-parallel attention: `ring_attention` runs on each rank's shard of the sequence. Key
and value shards travel around the ring with point-to-point sends that overlap the attention
on the shard in hand; partial outputs merge exactly by their logsumexp. The backward sends
the key/value shards around again, with their gradients travelling behind them.
`shard_sequence` and `unshard_sequence` cut a full tensor into the layout ring_attention
expects and put it back together: contiguous shards, or with causal=True the zig-zag layout
(rank r holds chunks r and 2W-1-r of 2W chunks) that gives every rank the same causal work.

Sharded memory: `memory_attend`, `memory_address`, `memory_read` and `memory_write` take a
memory split across the ranks along its slots (each rank passes its own slots, in group rank
order; shards may differ in size). Each rank addresses its slots with attnmem's op, the
shards' logsumexps combine the partial reads exactly, and one all-reduce sums them.

Conventions (those of tensor-parallel training): every rank of group makes the same calls
in the same order, with shards of the same shapes (memory shards aside) and the same
requires_grad. The memory ops' replicated inputs (keys, strengths, erase and add vectors)
are the same on every rank, and so are their replicated outputs (reads); a loss computed
from a replicated output is the same on every rank, so its gradient is too. Gradients of
replicated inputs come back summed over the ranks: every rank holds the full gradient.
Sharded inputs and outputs (sequence shards, memory slots, weights over the slots) keep
their gradients on their rank.
"""

import functools
import math

import torch
import torch.distributed as dist

import attnmem
from attnmem import _checks
from attnmem import backend as _backend
from attnmem.attention import _validate, _window
from attnmem.reference.attention import compute_dtype, softmax_with_lse
from attnmem.reference.memory import similarity as _similarity

__all__ = ["memory_address", "memory_attend", "memory_read", "memory_write", "ring_attention",
           "shard_sequence", "unshard_sequence"]


# ---------------------------------------------------------------------------------------
# Process groups and the ring
# ---------------------------------------------------------------------------------------


def _group(group):
    """(world size, rank in group) of group (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attnmem.distributed needs torch.distributed initialized: call "
                           "torch.distributed.init_process_group first")
    # new_group hands the ranks outside it this sentinel instead of a group.
    if group is dist.GroupMember.NON_GROUP_MEMBER or (
            isinstance(group, dist.ProcessGroup) and dist.get_rank(group) < 0):
        raise ValueError("group does not contain this rank: call attnmem.distributed on the "
                         "ranks of group only")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got "
                        f"{type(group).__name__}")
    return dist.get_world_size(group), dist.get_rank(group)


def _global_rank(group, rank):
    return rank if group is None else dist.get_global_rank(group, rank)


class _Ring:
    """Sends to a rank ahead and receives from the rank as far behind, without waiting."""

    def __init__(self, group):
        self.group = group
        self.world, self.rank = _group(group)

    def shift(self, tensor, hops=1):
        """Start sending tensor to the rank hops ahead and receiving from the rank hops
        behind: -> (buffer, requests); the buffer holds the received tensor once every
        request has been waited on."""
        received = torch.empty_like(tensor)
        to, source = ((_global_rank(self.group, (self.rank + sign * hops) % self.world))
                      for sign in (1, -1))
        requests = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, to, self.group),
            dist.P2POp(dist.irecv, received, source, self.group)])
        return received, requests


def _wait(requests):
    for request in requests:
        request.wait()


# ---------------------------------------------------------------------------------------
# Sequence layout
# ---------------------------------------------------------------------------------------


def _chunks_of(rank, world, causal):
    """The chunk indices a rank holds, in order, and how many chunks the sequence has."""
    if causal:
        return (rank, 2 * world - 1 - rank), 2 * world
    return (rank,), world


def _check_sequence(x, dim, parts, what):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be an int indexing x's {x.ndim} dimensions, got {dim!r}")
    if x.shape[dim] % parts:
        raise ValueError(f"x has length {x.shape[dim]} along dim {dim}, not divisible by "
                         f"{what} = {parts}")
    return dim % x.ndim


def shard_sequence(x, *, dim=2, group=None, causal=False):
    """This rank's part of a full tensor x (every rank passes the same x), as ring_attention
    expects it: the rank-th of W equal chunks along dim, or with causal=True chunks r and
    2W-1-r of 2W (zig-zag), so that causal attention gives every rank the same work.
    Differentiable (a slice of x)."""
    world, rank = _group(group)
    chunks, parts = _chunks_of(rank, world, causal)
    dim = _check_sequence(x, dim, parts, "2 * world size" if causal else "the world size")
    size = x.shape[dim] // parts
    return torch.cat([x.narrow(dim, chunk * size, size) for chunk in chunks], dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, causal):
        world, rank = _group(group)
        ctx.dim, ctx.rank, ctx.world, ctx.causal = dim, rank, world, causal
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format)
                 for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        if not causal:
            return torch.cat(parts, dim)
        halves = [part.chunk(2, dim) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)

    @staticmethod
    def backward(ctx, grad):
        # The full tensor is replicated, so every rank holds the same gradient for it: this
        # rank's part of it is the gradient of its shard.
        chunks, parts = _chunks_of(ctx.rank, ctx.world, ctx.causal)
        size = grad.shape[ctx.dim] // parts
        return (torch.cat([grad.narrow(ctx.dim, c * size, size) for c in chunks], ctx.dim),
                None, None, None)


def unshard_sequence(x, *, dim=2, group=None, causal=False):
    """The full tensor back from every rank's shard x (the layout shard_sequence makes, with
    the same causal), on every rank. Differentiable: the full tensor is replicated, so its
    gradient is taken to be the same on every rank, and each shard gets its part of it."""
    world, _ = _group(group)
    _, parts = _chunks_of(0, world, causal)
    dim = _check_sequence(x, dim, parts // world, "2 (the zig-zag layout's two chunks)")
    return _Unshard.apply(x, dim, group, causal)


# ---------------------------------------------------------------------------------------
# Ring attention
# ---------------------------------------------------------------------------------------


def _pair(q_seg, k_seg, n_q, n_k, left, right):
    """How a query segment sees a key segment, or None if it sees no key of it.

    Segments are (local start, global start, length); left and right are the global window
    sides (-1 unbounded; causal is right = 0) around query i's position i + n_k - n_q. Query
    i' of the segment sees key j' when i' + lo <= j' <= i' + hi. attnmem.attention aligns
    its window to the bottom right of the keys it gets, so cutting the queries and keys no
    pair needs from either end moves that alignment to where the band lies: -> (query
    slice, key slice, left, right, global start of the keys) of one attention call."""
    q_local, q_start, len_q = q_seg
    k_local, k_start, len_k = k_seg
    offset = q_start - k_start + n_k - n_q
    lo = None if left < 0 else offset - left
    hi = None if right < 0 else offset + right
    q0, q1 = (0 if hi is None else max(0, -hi)), (len_q if lo is None else min(len_q, len_k - lo))
    k0, k1 = (0 if lo is None else max(0, lo)), (len_k if hi is None else min(len_k, len_q + hi))
    if q1 <= q0 or k1 <= k0:
        return None
    # Both sides are >= 0 whenever the band is not empty; past the slice they bound nothing.
    side_left = -1 if lo is None or k1 - q1 - lo >= k1 - k0 - 1 else k1 - q1 - lo
    side_right = -1 if hi is None or hi - k1 + q1 >= q1 - q0 - 1 else hi - k1 + q1
    return (slice(q_local + q0, q_local + q1), slice(k_local + k0, k_local + k1), side_left,
            side_right, k_start + k0)


def _join(a, b, has_lengths):
    """One call for two unmasked pairs side by side in the local tensors, or None. Keys
    side by side locally need not be in the full sequence, so lengths keep them apart."""
    if a[2:4] != (-1, -1) or b[2:4] != (-1, -1):
        return None
    if a[1] == b[1] and a[0].stop == b[0].start:
        return (slice(a[0].start, b[0].stop), *a[1:])
    if not has_lengths and a[0] == b[0] and a[1].stop == b[1].start:
        return (a[0], slice(a[1].start, b[1].stop), *a[2:])
    return None


def _ring_pairs(rank, src, world, n_q, n_k, causal, left, right, has_lengths):
    """The attention calls of one step: this rank's queries against rank src's keys."""
    if src == rank and causal and left < 0 and n_q == n_k and not has_lengths:
        # A rank's own zig-zag chunks keep their order: local causal attention is the mask.
        return [(slice(0, n_q // world), slice(0, n_k // world), -1, 0, 0)]
    n_chunks = len(_chunks_of(0, world, causal)[0])
    cq, ck = n_q // (world * n_chunks), n_k // (world * n_chunks)
    q_segs = [(i * cq, c * cq, cq) for i, c in enumerate(_chunks_of(rank, world, causal)[0])]
    k_segs = [(i * ck, c * ck, ck) for i, c in enumerate(_chunks_of(src, world, causal)[0])]
    calls = []
    for pair in (_pair(qs, ks, n_q, n_k, left, right) for qs in q_segs for ks in k_segs):
        if pair is None:
            continue
        for i, call in enumerate(calls):
            joined = _join(call, pair, has_lengths)
            if joined is not None:
                calls[i] = joined
                break
        else:
            calls.append(pair)
    return calls


@functools.lru_cache(maxsize=256)
def _ring_steps(world, n_q, n_k, causal, left, right, has_lengths):
    """How many steps of the ring some rank has work in: with a one-sided window (a causal
    sliding window) the shards stop travelling once no rank needs them."""
    return 1 + max((step for step in range(world) for rank in range(world)
                    if _ring_pairs(rank, (rank - step) % world, world, n_q, n_k, causal, left,
                                   right, has_lengths)), default=0)


def _local_lengths(kv_lengths, key_start, n_keys):
    return None if kv_lengths is None else (kv_lengths - key_start).clamp(0, n_keys)


def _merge(out, lse, part, part_lse):
    """out, lse (in place) <- the softmax over the keys of both: weights by logsumexp."""
    total = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isfinite(total), total, 0.0)  # rows that saw no key yet
    out.mul_(torch.exp(lse - safe)[..., None]).add_(part * torch.exp(part_lse - safe)[..., None])
    lse.copy_(total)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_lengths, scale, left, right, causal, group):
        ring = _Ring(group)
        n_q, n_k = q.shape[2] * ring.world, k.shape[2] * ring.world
        ct = compute_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=ct, device=q.device)
        lse = torch.full(q.shape[:3], -math.inf, dtype=ct, device=q.device)
        kv = torch.stack([k, v])
        steps = _ring_steps(ring.world, n_q, n_k, causal, left, right, kv_lengths is not None)
        for step in range(steps):
            src = (ring.rank - step) % ring.world
            if step < steps - 1:
                received, requests = ring.shift(kv)
            for rows, keys, l_side, r_side, start in _ring_pairs(
                    ring.rank, src, ring.world, n_q, n_k, causal, left, right,
                    kv_lengths is not None):
                part, part_lse = attnmem.attention(
                    q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], scale=scale,
                    window=(l_side, r_side), return_lse=True,
                    kv_lengths=_local_lengths(kv_lengths, start, keys.stop - keys.start))
                _merge(out[:, :, rows], lse[:, :, rows], part, part_lse)
            if step < steps - 1:
                _wait(requests)
                kv = received
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, kv_lengths)
        ctx.args = (scale, left, right, causal, group)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, kv_lengths = ctx.saved_tensors
        scale, left, right, causal, group = ctx.args
        ring = _Ring(group)
        n_q, n_k = q.shape[2] * ring.world, k.shape[2] * ring.world
        if dout is None:
            dout = torch.zeros_like(out)
        ct = compute_dtype(q.dtype)
        backend = _backend.requested_backend()
        dq = torch.zeros(q.shape, dtype=ct, device=q.device)
        kv = torch.stack([k, v])
        dkv_received, dkv_requests = None, []
        steps = _ring_steps(ring.world, n_q, n_k, causal, left, right, kv_lengths is not None)
        for step in range(steps):
            src = (ring.rank - step) % ring.world
            if step < steps - 1:
                received, requests = ring.shift(kv)
            dkv = torch.zeros(kv.shape, dtype=ct, device=kv.device)
            for rows, keys, l_side, r_side, start in _ring_pairs(
                    ring.rank, src, ring.world, n_q, n_k, causal, left, right,
                    kv_lengths is not None):
                # attnmem's backward op with the global out and lse gives this pair's share
                # of the gradients directly: nothing is recomputed or kept per step.
                dq_part, dk_part, dv_part, _ = torch.ops.attnmem.attention_backward(
                    dout[:, :, rows], q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys],
                    out[:, :, rows], lse[:, :, rows], None if dlse is None else dlse[:, :, rows],
                    _local_lengths(kv_lengths, start, keys.stop - keys.start), scale, l_side,
                    r_side, backend)
                dq[:, :, rows] += dq_part
                dkv[0][:, :, keys] += dk_part
                dkv[1][:, :, keys] += dv_part
            if step > 0:
                # src's gradients so far, from the ranks before this one: this rank's part
                # was computed while they travelled.
                _wait(dkv_requests)
                dkv += dkv_received
            if step < steps - 1:
                dkv_received, dkv_requests = ring.shift(dkv)
            elif steps > 1:
                # Home to rank src (the next rank when the ring went all the way round),
                # while this rank's own gradients come back from `step` ranks ahead.
                dkv_received, dkv_requests = ring.shift(dkv, -step)
            if step < steps - 1:
                _wait(requests)
                kv = received
        if steps > 1:
            _wait(dkv_requests)
            dkv = dkv_received
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None,
                None, None)


def ring_attention(q, k, v, *, group=None, causal=False, window=None, kv_lengths=None,
                   scale=None, return_lse=False):
    """attnmem.attention over a sequence split across the ranks of group (the default group
    if None): each rank passes its shard q: (B, H, Nq/W, D) and k, v: (B, Hkv, Nk/W, D), cut
    by shard_sequence with the same causal (contiguous shards; with causal=True the zig-zag
    layout, each shard's length even), and gets its shard of the output (B, H, Nq/W, D), and
    with return_lse=True of the logsumexp (B, H, Nq/W) (float32, float64 for float64 inputs;
    differentiable).

    Masks are attnmem.attention's on the full sequences (Nq = W * q.shape[2], Nk likewise):
    causal, window=(left, right) around query i's position i + Nk - Nq, kv_lengths (B,) the
    global key lengths (the same tensor on every rank); GQA as there. Key/value shards go
    round the ring with point-to-point sends that overlap the attention on the shard in hand
    (W - 1 sends of k and v forward; backward, W - 1 of k and v and W of their float32
    gradients). Pairs of chunks that a mask empties are skipped, and the shards stop going
    round once no rank needs them: a sliding window, window=(left, 0) with causal=False on
    contiguous shards, takes 1 + ceil(left / shard length) steps. With causal=True every
    shard goes all the way round (each zig-zag shard borders ranks on both sides). A query
    that sees no key outputs zeros, has lse -inf and gets zero gradients.
    """
    world, _ = _group(group)
    # Shapes, dtypes, devices, heads and scale as attnmem.attention checks them; the window
    # and the lengths against the full sequences.
    scale, _, _, _ = _validate(q, k, v, causal, scale, None, None, return_lse)
    n_q, n_k = q.shape[2] * world, k.shape[2] * world
    if causal and (q.shape[2] % 2 or k.shape[2] % 2):
        raise ValueError(f"causal ring attention takes the zig-zag layout of shard_sequence("
                         f"causal=True): the sequence lengths must be divisible by 2 * world "
                         f"size = {2 * world}, got q {n_q} and k {n_k}")
    kv_lengths = _checks.lengths("kv_lengths", kv_lengths, q.shape[0], n_k, q.device)
    left, right = _window(window, n_q, n_k)
    if causal and n_q > 1:  # as attnmem.attention: with one query, causal hides no key
        right = 0 if right < 0 else min(right, 0)
    out, lse = _RingAttention.apply(q, k, v, kv_lengths, scale, left, right, causal, group)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------
# Sharded external memory
# ---------------------------------------------------------------------------------------


class _Replicate(torch.autograd.Function):
    """Replicated inputs used by each rank's shard: the identity forward; backward, the sum
    over the ranks of each shard's gradient, in one all-reduce."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        ctx.shapes = [x.shape for x in tensors]
        return tuple(x.view_as(x) for x in tensors)

    @staticmethod
    def backward(ctx, *grads):
        # The inputs share memory's dtype; gradients not given arrive as zeros.
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=ctx.group)
        sizes = [math.prod(s) for s in ctx.shapes]
        return (None, *(part.view(s) for part, s in zip(flat.split(sizes), ctx.shapes)))


class _SumOverRanks(torch.autograd.Function):
    """Partial results summed into a replicated one; its gradient, the same on every rank,
    is each part's."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _LogSumExpOverRanks(torch.autograd.Function):
    """The logsumexp over the ranks of each rank's logsumexp (B, R): each rank's uses of it
    give partial gradients, summed over the ranks in the backward."""

    @staticmethod
    def forward(ctx, lse, group):
        world, _ = _group(group)
        parts = [torch.empty_like(lse) for _ in range(world)]
        dist.all_gather(parts, lse.contiguous(), group=group)
        total = torch.logsumexp(torch.stack(parts), 0)
        ctx.group = group
        ctx.save_for_backward(lse, total)
        return total

    @staticmethod
    def backward(ctx, grad):
        lse, total = ctx.saved_tensors
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad * _share(lse, total), None


def _share(lse, total):
    """exp(lse - total): a shard's part of the softmax mass, 0 where no slot is usable."""
    return torch.exp(lse - torch.where(torch.isfinite(total), total, 0.0))


def _shard_lse(memory, keys, strength, similarity, mask, weights):
    """(B, R) logsumexp of strength * sim(key, slot) over the usable slots of this shard,
    from the normalised weights attnmem's op returned: lse = s_n - log w_n at the top slot
    n, whose score is recomputed alone. Differentiable: its gradient, ds_n - dlog w_n, is
    sum_n w_n ds_n. A head with no usable slot gets -inf."""
    batch, heads, _ = weights.shape
    ct = compute_dtype(memory.dtype)
    if weights.shape[2] == 0:
        # -inf that still depends on the inputs: every rank then runs the backward's
        # all-reduce, shard empty or not.
        return weights.sum(-1).to(ct) - math.inf
    top_weight, top = weights.max(-1)
    usable = top_weight > 0
    rows = memory.gather(1, top[..., None].expand(-1, -1, memory.shape[2]))
    rows = rows.masked_fill(~usable[..., None], 0)  # a masked slot may hold NaN
    score = _similarity(rows.to(ct).reshape(batch * heads, 1, -1),
                        keys.to(ct).reshape(batch * heads, 1, -1), similarity).view(batch, heads)
    if strength is not None:
        score = score * strength.to(ct)
    lse = torch.where(usable, score - torch.log(torch.where(usable, top_weight, 1).to(ct)),
                      -math.inf)
    if top_weight.dtype == torch.float16 and bool((usable & (top_weight < 2 ** -14)).any()):
        # A float16 top weight below 2^-14 (nearly flat weights over more than 16k slots) is
        # subnormal and too coarse for the log: score the shard's slots instead.
        scores = _similarity(memory.to(ct) if mask is None
                             else memory.to(ct).masked_fill(~mask[..., None], 0),
                             keys.to(ct), similarity)
        if strength is not None:
            scores = scores * strength.to(ct)[..., None]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], -math.inf)
        lse = softmax_with_lse(scores)[1]
    return lse


def _combine(memory, keys, strength, similarity, mask, weights, group):
    """Each rank's share (B, R) of the softmax mass over the whole memory."""
    lse = _shard_lse(memory, keys, strength, similarity, mask, weights)
    return _share(lse, _LogSumExpOverRanks.apply(lse, group))


def _replicate(group, *tensors):
    """tensors (None kept) as inputs of a shard, whose gradients sum over the ranks."""
    present = [x for x in tensors if x is not None]
    if not torch.is_grad_enabled() or not any(x.requires_grad for x in present):
        return tensors
    copies = iter(_Replicate.apply(group, *present))
    return tuple(None if x is None else next(copies) for x in tensors)


def memory_address(memory, keys, *, strength=None, similarity="cosine", mask=None, group=None):
    """attnmem.memory_address over a memory whose slots are split across the ranks of group:
    memory (B, N_rank, D) and mask (B, N_rank) are this rank's slots, keys (B, R, D) and
    strength (B, R) the same on every rank. -> this rank's part (B, R, N_rank) of the
    weights over all N slots."""
    _group(group)
    keys, strength = _replicate(group, keys, strength)
    weights = attnmem.memory_address(memory, keys, strength=strength, similarity=similarity,
                                     mask=mask)
    share = _combine(memory, keys, strength, similarity, mask, weights, group)
    return (weights * share[..., None]).to(memory.dtype)


def memory_attend(memory, keys, *, values=None, strength=None, similarity="cosine", mask=None,
                  return_weights=False, group=None):
    """attnmem.memory_attend over a memory whose slots are split across the ranks of group:
    memory (B, N_rank, D), values (B, N_rank, Dv) and mask (B, N_rank) are this rank's slots,
    keys (B, R, D) and strength (B, R) the same on every rank. -> the read over all N slots
    (B, R, Dv), the same on every rank, and with return_weights=True this rank's part of
    the weights (B, R, N_rank). One all-gather of the (B, R) logsumexps and one all-reduce of
    the reads forward; backward, one all-reduce of the (B, R) logsumexp gradients and one of
    the keys' and strengths' gradients. attnmem.memory_attend returns no logsumexp, so each
    rank asks it for its weights too (B, R, N_rank, R/D of the memory's size) and reads the
    shard's logsumexp off the top weight."""
    _group(group)
    keys, strength = _replicate(group, keys, strength)
    read, weights = attnmem.memory_attend(memory, keys, values=values, strength=strength,
                                          similarity=similarity, mask=mask, return_weights=True)
    share = _combine(memory, keys, strength, similarity, mask, weights, group)
    ct = compute_dtype(memory.dtype)
    read = _SumOverRanks.apply(read.to(ct) * share[..., None], group).to(read.dtype)
    if not return_weights:
        return read
    return read, (weights * share[..., None]).to(weights.dtype)


def memory_read(memory, weights, *, group=None):
    """attnmem.memory_read over a memory whose slots are split across the ranks of group:
    memory (B, N_rank, D) and weights (B, R, N_rank) this rank's slots. -> the read
    (B, R, D) over all slots, the same on every rank (one all-reduce)."""
    _group(group)
    read = attnmem.memory_read(memory, weights)
    return _SumOverRanks.apply(read.to(compute_dtype(read.dtype)), group).to(read.dtype)


def memory_write(memory, weights, erase, add, *, inplace=False, group=None):
    """attnmem.memory_write on the slots this rank holds: memory (B, N_rank, D) and weights
    (B, W, N_rank) this rank's, erase and add (B, W, D) the same on every rank (their
    gradients sum over the ranks). -> this rank's slots after the write; no communication
    forward."""
    _group(group)
    erase, add = _replicate(group, erase, add)
    return attnmem.memory_write(memory, weights, erase, add, inplace=inplace)
