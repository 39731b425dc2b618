"""attnmem.distributed: attention over a sequence, and external-memory ops over a memory,
split across the ranks of a torch.distributed process group (NCCL on GPUs, gloo on CPUs).

Context-parallel attention: `ring_attention` runs on each rank's shard of the sequence (v's
head dim may differ from q's and k's, as in attnmem.attention). Key and value shards travel
around the ring with point-to-point sends that overlap the attention on the shard in hand;
partial outputs merge exactly by their logsumexp. The backward sends the key/value shards
around again, with their gradients travelling behind them.
`shard_sequence` and `unshard_sequence` cut a full tensor into the layout ring_attention
expects and put it back together: contiguous shards, or with causal=True the zig-zag layout
(rank r holds chunks r and 2W-1-r of 2W chunks) that gives every rank the same causal work.

Sharded memory: `memory_attend`, `memory_address`, `memory_read` and `memory_write` take a
memory split across the ranks along its slots (each rank passes its own slots, in group rank
order; shards may differ in size). Each rank addresses its slots with attnmem's op, the
shards' logsumexps combine the partial reads exactly, and one all-reduce sums them.
memory_attend(topk=K) reads each head's K best slots over all ranks: each rank offers its
own K best, and one all-gather of their scores picks the same K on every rank.

Conventions (those of tensor-parallel training): every rank of group makes the same calls
in the same order, with shards of the same shapes (memory shards aside) and the same
requires_grad. The memory ops' replicated inputs (keys, strengths, erase and add vectors)
are the same on every rank, and so are their replicated outputs (reads); a loss computed
from a replicated output is the same on every rank, so its gradient is too. Gradients of
replicated inputs come back summed over the ranks: every rank holds the full gradient.
Sharded inputs and outputs (sequence shards, memory slots, weights over the slots) keep
their gradients on their rank. ring_attention's sinks are replicated but feed a sharded
output: each rank's gradient for them is its own rows' part, as the projections feeding
its shard get theirs (see ring_attention).
"""

import functools
import math
import typing

import torch
import torch.distributed as dist

import attnmem
from attnmem import _checks
from attnmem import backend as _backend
from attnmem.attention import (
    _dropout_p,
    _dropout_seed,
    _pick,
    _torch_dropout_mask,
    _validate,
    _validate_score_mods,
    _window,
)
from attnmem.memory import (
    SparseWeights,
    _address_args,
    _choose,
    _sparse_grad,
    _top_slots,
    _topk,
    _values,
)
from attnmem.reference.attention import compute_dtype, softmax_with_lse, visible
from attnmem.reference.memory import _gather, _read_rows, _upcast, slot_scores
from attnmem.reference.memory import similarity as _similarity

__all__ = ["dropout_mask", "memory_address", "memory_attend", "memory_read", "memory_write",
           "ring_attention", "shard_sequence", "unshard_sequence"]


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
    _checks.flag("causal", causal)
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
    _checks.flag("causal", causal)
    _, parts = _chunks_of(0, world, causal)
    dim = _check_sequence(x, dim, parts // world, "2 (the zig-zag layout's two chunks)")
    return _Unshard.apply(x, dim, group, causal)


# ---------------------------------------------------------------------------------------
# Ring attention
# ---------------------------------------------------------------------------------------


def _pair(q_seg, k_seg, n_q, n_k, lo_rel, hi_rel):
    """How a query segment sees a key segment, or None if it sees no key of it.

    Segments are (local start, global start, length). Query i sees key j when
    lo_rel <= j - a <= hi_rel (None: unbounded), a = i + n_k - n_q its aligned position:
    window=(left, right) is lo_rel = -left, hi_rel = right, and causal hi_rel = 0.
    attnmem.attention aligns its window to the bottom right of the keys it gets, so cutting
    the queries and keys no pair needs from either end moves that alignment to where the
    band lies (the cut's bottom-right corner lies in the band): -> (query slice, key slice,
    left, right, global start of the keys, shift) of one attention call, where shift is
    a - j less the call's own a' - j', the same for all its queries and keys."""
    q_local, q_start, len_q = q_seg
    k_local, k_start, len_k = k_seg
    offset = q_start - k_start + n_k - n_q
    lo = None if lo_rel is None else offset + lo_rel
    hi = None if hi_rel is None else offset + hi_rel
    if lo is not None and hi is not None and lo > hi:
        return None
    q0, q1 = (0 if hi is None else max(0, -hi)), (len_q if lo is None else min(len_q, len_k - lo))
    k0, k1 = (0 if lo is None else max(0, lo)), (len_k if hi is None else min(len_k, len_q + hi))
    if q1 <= q0 or k1 <= k0:
        return None
    # Both sides are >= 0 whenever the band is not empty; past the slice they bound nothing.
    side_left = -1 if lo is None or k1 - q1 - lo >= k1 - k0 - 1 else k1 - q1 - lo
    side_right = -1 if hi is None or hi - k1 + q1 >= q1 - q0 - 1 else hi - k1 + q1
    return (slice(q_local + q0, q_local + q1), slice(k_local + k0, k_local + k1), side_left,
            side_right, k_start + k0, offset - (k1 - q1))


def _bound(pick, side, limit):
    """side (None: unbounded) tightened to limit by pick (min or max)."""
    return limit if side is None else pick(side, limit)


def _alibi_calls(q_seg, k_seg, n_q, n_k, lo_rel, hi_rel, global_sign=0):
    """The calls of one pair of segments with ALiBi: each as _pair's, with (lse shift, extra
    keys, extra queries) in place of shift. A call biases by -slope |a' - j'|
    from its own alignment a' = i' + Nk' - Nq'; the op's bias is -slope |a - j|, and
    a - j = a' - j' + shift. Where shift is 0 they agree. Where a - j keeps one sign s and
    a' - j' the same sign over a call's keys, -slope |a - j| = -slope |a' - j'| - slope s
    shift: the call's lse moves by -slope s shift, which the merge takes back out.

    So the pair splits where a - j changes sign (global_sign 0: not split yet), and each
    part moves its a' until it meets the nearest key: keys at or before a (s = 1, all of
    them with causal=True) by extra keys past the call's own (masked by its lengths; they
    lie in the shard's buffer, whatever they hold), keys after a (s = -1) by extra queries
    past its own (zeros, whose outputs are dropped). Then a' - j' keeps s's sign, and the
    weights that count the most get the smallest local bias, as in the op on the full
    sequence (the bias reaches slope * shard length elsewhere, where float32 rounding of
    it would cost precision)."""
    call = _pair(q_seg, k_seg, n_q, n_k, lo_rel, hi_rel)
    if call is None:
        return []
    rows, keys, left, right, start, shift = call
    if shift == 0:
        return [(rows, keys, left, right, start, 0, 0, 0)]
    if global_sign == 0:
        return (_alibi_calls(q_seg, k_seg, n_q, n_k, lo_rel, _bound(min, hi_rel, 0), 1)
                + _alibi_calls(q_seg, k_seg, n_q, n_k, _bound(max, lo_rel, 1), hi_rel, -1))
    n_rows, n_keys = rows.stop - rows.start, keys.stop - keys.start
    if global_sign == 1:
        # j' - a' reaches right at most (or the first query's last key): a' moves by that.
        extra = n_rows - 1 if right < 0 or right >= n_rows - 1 else right
        return [(rows, keys, -1 if left < 0 else left + extra, 0, start, shift - extra, extra, 0)]
    # a' - j' reaches left at most (or the last query's first key): a' moves back by that,
    # and the extra queries see no key before their a'.
    extra = n_keys - 1 if left < 0 or left >= n_keys - 1 else left
    return [(rows, keys, 0, -1 if right < 0 else right + extra, start, -shift - extra, 0, extra)]


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


def _ring_pairs(rank, src, world, n_q, n_k, causal, left, right, has_lengths, alibi=False):
    """The attention calls of one step, this rank's queries against rank src's keys: each
    (query slice, key slice, left, right, global start of the keys, ALiBi lse shift in
    slopes, extra keys, extra queries; see _alibi_calls). Without ALiBi, calls that keep their
    alignment join; with it, each pair of chunks keeps its own calls."""
    if src == rank and causal and left < 0 and n_q == n_k and not has_lengths and not alibi:
        # A rank's own zig-zag chunks keep their order: local causal attention is the mask.
        return [(slice(0, n_q // world), slice(0, n_k // world), -1, 0, 0, 0, 0, 0)]
    n_chunks = len(_chunks_of(0, world, causal)[0])
    cq, ck = n_q // (world * n_chunks), n_k // (world * n_chunks)
    q_segs = [(i * cq, c * cq, cq) for i, c in enumerate(_chunks_of(rank, world, causal)[0])]
    k_segs = [(i * ck, c * ck, ck) for i, c in enumerate(_chunks_of(src, world, causal)[0])]
    bounds = (None if left < 0 else -left, None if right < 0 else right)
    if alibi:
        return [call for qs in q_segs for ks in k_segs
                for call in _alibi_calls(qs, ks, n_q, n_k, *bounds)]
    calls = []
    for pair in (_pair(qs, ks, n_q, n_k, *bounds) for qs in q_segs for ks in k_segs):
        if pair is None:
            continue
        for i, call in enumerate(calls):
            joined = _join(call, pair[:5], has_lengths)
            if joined is not None:
                calls[i] = joined
                break
        else:
            calls.append(pair[:5])
    return [(*call, 0, 0, 0) for call in calls]


@functools.lru_cache(maxsize=256)
def _ring_steps(world, n_q, n_k, causal, left, right, has_lengths):
    """How many steps of the ring some rank has work in: with a one-sided window (a causal
    sliding window) the shards stop travelling once no rank needs them."""
    return 1 + max((step for step in range(world) for rank in range(world)
                    if _ring_pairs(rank, (rank - step) % world, world, n_q, n_k, causal, left,
                                   right, has_lengths)), default=0)


class _Call(typing.NamedTuple):
    """One attention call of a ring step (see _ring_pairs and _alibi_calls)."""
    rows: slice
    keys: slice
    left: int
    right: int
    key_start: int
    lse_shift: int
    extra: int  # keys read past the call's own, masked
    extra_rows: int  # zero queries after the call's own, whose outputs are dropped
    number: int  # in ring order from 0: the call's dropout seed


def _ring_plan(world, rank, n_q, n_k, causal, left, right, has_lengths, alibi):
    """The calls of every step, numbered in ring order."""
    steps = _ring_steps(world, n_q, n_k, causal, left, right, has_lengths)
    plan, number = [], 0
    for step in range(steps):
        calls = _ring_pairs(rank, (rank - step) % world, world, n_q, n_k, causal, left, right,
                            has_lengths, alibi)
        plan.append([_Call(*call, number + i) for i, call in enumerate(calls)])
        number += len(calls)
    return plan


def _flat(tensors):
    """tensors laid end to end in one flat tensor (a copy), so that one send carries them."""
    return torch.cat([x.reshape(-1) for x in tensors])


def _views(flat, shapes):
    """The tensors of these shapes laid end to end in flat (_flat's inverse), as views."""
    sizes = [math.prod(shape) for shape in shapes]
    return tuple(part.view(shape) for part, shape in zip(flat.split(sizes), shapes))


def _with_room(kv, room, buffer=None):
    """kv, the pair k (B, Hkv, N, D) and v (B, Hkv, N, Ev), in buffers (those given, from an
    earlier step, or new ones) with `room` more rows after their keys, which calls with
    extra keys read (masked by their lengths, so whatever the rows hold)."""
    if not room:
        return kv
    if buffer is None:
        buffer = tuple(x.new_empty(*x.shape[:2], x.shape[2] + room, x.shape[3]) for x in kv)
    for x, rows in zip(kv, buffer):
        rows[:, :, :x.shape[2]] = x
    return buffer


def _rows(x, rows, extra, fill=0.0):
    """x's rows (dim 2), then `extra` rows of fill: a call's queries and their extra ones."""
    x = x[:, :, rows]
    if not extra:
        return x
    return torch.cat([x, x.new_full((*x.shape[:2], extra, *x.shape[3:]), fill)], 2)


def _room(plan):
    return max((call.extra for calls in plan for call in calls), default=0)


def _local_lengths(kv_lengths, key_start, n_keys):
    return None if kv_lengths is None else (kv_lengths - key_start).clamp(0, n_keys)


def _call_seed(seed, number, world, rank, n_q):
    """Call `number`'s dropout seed on rank: seeds n_q apart (the torch backend seeds query
    row i of a call with seed + i) and apart between ranks, so no two calls share draws."""
    return None if seed is None else seed + (number * world + rank) * n_q


def _call_inputs(call, kv, kv_lengths, seed, world, rank, n_q):
    """A call's keys and values (with its extra keys) from kv, the pair (k, v), their
    lengths and its dropout seed."""
    k, v = kv
    n_keys = call.keys.stop - call.keys.start
    span = slice(call.keys.start, call.keys.stop + call.extra)
    lengths = _local_lengths(kv_lengths, call.key_start, n_keys)
    if call.extra and lengths is None:
        lengths = torch.full((k.shape[0],), n_keys, dtype=torch.int32, device=k.device)
    return (k[:, :, span], v[:, :, span], lengths,
            _call_seed(seed, call.number, world, rank, n_q))


def _slope_shift(alibi_slopes, shift, ct):
    """slope * shift, (B or 1, H, 1): how far a call's lse lies above the op's."""
    return alibi_slopes.to(ct).reshape(-1, alibi_slopes.shape[-1], 1) * shift


def _merge(out, lse, part, part_lse):
    """out, lse (in place) <- the softmax over the keys of both: weights by logsumexp. part
    None is a sink: mass in the denominator with no value."""
    total = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isfinite(total), total, 0.0)  # rows that saw no key yet
    out.mul_(torch.exp(lse - safe)[..., None])
    if part is not None:
        out.add_(part * torch.exp(part_lse - safe)[..., None])
    lse.copy_(total)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_lengths, sinks, alibi_slopes, seed, scale, left, right,
                causal, softcap, dropout_p, group):
        ring = _Ring(group)
        n_q, n_k = q.shape[2] * ring.world, k.shape[2] * ring.world
        ct = compute_dtype(q.dtype)
        backend = _backend.requested_backend()
        out = torch.zeros((*q.shape[:3], v.shape[-1]), dtype=ct, device=q.device)
        lse = torch.full(q.shape[:3], -math.inf, dtype=ct, device=q.device)
        # k and v (their head dims may differ) travel in one buffer, one send a step.
        shapes = (k.shape, v.shape)
        kv = _flat((k, v))
        plan = _ring_plan(ring.world, ring.rank, n_q, n_k, causal, left, right,
                          kv_lengths is not None, alibi_slopes is not None)
        room, buffer = _room(plan), None
        for step, calls in enumerate(plan):
            if step < len(plan) - 1:
                received, requests = ring.shift(kv)
            buffer = _with_room(_views(kv, shapes), room, buffer)
            for call in calls:
                k_call, v_call, lengths, call_seed = _call_inputs(
                    call, buffer, kv_lengths, seed, ring.world, ring.rank, n_q)
                part, part_lse = torch.ops.attnmem.attention_forward(
                    _rows(q, call.rows, call.extra_rows), k_call, v_call, lengths, scale,
                    call.left, call.right, backend, softcap, None, alibi_slopes, dropout_p,
                    call_seed)
                n_rows = call.rows.stop - call.rows.start
                part, part_lse = part[:, :, :n_rows], part_lse[:, :, :n_rows]
                if call.lse_shift:
                    part_lse = part_lse - _slope_shift(alibi_slopes, call.lse_shift, ct)
                _merge(out[:, :, call.rows], lse[:, :, call.rows], part, part_lse)
            if step < len(plan) - 1:
                _wait(requests)
                kv = received
        if sinks is not None:  # once per row, not once per step
            _merge(out, lse, None, sinks.to(ct)[:, None].expand_as(lse))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, kv_lengths, sinks, alibi_slopes, seed)
        ctx.args = (scale, left, right, causal, softcap, dropout_p, group)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, kv_lengths, sinks, alibi_slopes, seed = ctx.saved_tensors
        scale, left, right, causal, softcap, dropout_p, group = ctx.args
        ring = _Ring(group)
        n_q, n_k = q.shape[2] * ring.world, k.shape[2] * ring.world
        if dout is None:
            dout = torch.zeros_like(out)
        ct = compute_dtype(q.dtype)
        backend = _backend.requested_backend()
        dq = torch.zeros(q.shape, dtype=ct, device=q.device)
        shapes = (k.shape, v.shape)
        kv = _flat((k, v))
        dkv_received, dkv_requests = None, []
        plan = _ring_plan(ring.world, ring.rank, n_q, n_k, causal, left, right,
                          kv_lengths is not None, alibi_slopes is not None)
        steps, room, buffer = len(plan), _room(plan), None
        for step, calls in enumerate(plan):
            if step < steps - 1:
                received, requests = ring.shift(kv)
            # dk and dv, in ct, travel together as k and v do.
            dkv = torch.zeros(kv.shape, dtype=ct, device=kv.device)
            dk, dv = _views(dkv, shapes)
            buffer = _with_room(_views(kv, shapes), room, buffer)
            for call in calls:
                # attnmem's backward op with the global out and lse (in the call's own
                # ALiBi frame) gives this call's share of the gradients directly: nothing is
                # recomputed or kept per step.
                rows, keys, extra = call.rows, call.keys, call.extra_rows
                lse_rows = lse[:, :, rows]
                if call.lse_shift:
                    lse_rows = lse_rows + _slope_shift(alibi_slopes, call.lse_shift, ct)
                if extra:
                    # The extra queries: zero dout and lse +inf give them zero weights and
                    # add nothing to dk and dv.
                    lse_rows = _rows(lse_rows, slice(None), extra, math.inf)
                k_call, v_call, lengths, call_seed = _call_inputs(
                    call, buffer, kv_lengths, seed, ring.world, ring.rank, n_q)
                dq_part, dk_part, dv_part, _ = torch.ops.attnmem.attention_backward(
                    _rows(dout, rows, extra), _rows(q, rows, extra), k_call, v_call,
                    _rows(out, rows, extra), lse_rows,
                    None if dlse is None else _rows(dlse, rows, extra), lengths, scale,
                    call.left, call.right, backend, softcap, None, alibi_slopes, dropout_p,
                    call_seed)
                dq[:, :, rows] += dq_part[:, :, :rows.stop - rows.start]
                # The extra keys are masked: their gradients are zeros.
                dk[:, :, keys] += dk_part[:, :, :keys.stop - keys.start]
                dv[:, :, keys] += dv_part[:, :, :keys.stop - keys.start]
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
        dk, dv = _views(dkv, shapes)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[4]:
            # The sink's share of each row (0 for a row whose lse is -inf: a sink of -inf
            # that saw no key), as the dense op's: -sum of exp(sink - lse) (dout.out - dlse)
            # over this rank's rows only.
            delta = (dout.to(ct) * out.to(ct)).sum(-1)
            if dlse is not None:
                delta = delta - dlse.to(ct)
            share = torch.exp(sinks.to(ct)[:, None] - lse).nan_to_num(0.0, 0.0, 0.0)
            dsinks = -(share * delta).sum((0, 2)).to(sinks.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, dsinks, None,
                None, None, None, None, None, None, None, None)


def _ring_checks(q, k, v, group, causal, window, kv_lengths, scale, return_lse, softcap,
                 sinks, alibi_slopes, dropout_p, generator):
    """ring_attention's arguments checked against the full sequences: -> (world, scale,
    left, right, kv_lengths, softcap, sinks, alibi_slopes, dropout_p, seed)."""
    world, _ = _group(group)
    # Shapes, dtypes, devices, heads, scale and score modifications as attnmem.attention
    # checks them; the window and the lengths against the full sequences.
    scale, _, _, _ = _validate(q, k, v, causal, scale, None, None, return_lse,
                               value_head_dim=True)
    softcap, sinks, alibi_slopes = _validate_score_mods(q, scale, softcap, sinks, alibi_slopes,
                                                        q.shape[0], q.shape[1])
    dropout_p = _dropout_p(dropout_p)
    n_q, n_k = q.shape[2] * world, k.shape[2] * world
    if causal and (q.shape[2] % 2 or k.shape[2] % 2):
        raise ValueError(f"causal ring attention takes the zig-zag layout of shard_sequence("
                         f"causal=True): the sequence lengths must be divisible by 2 * world "
                         f"size = {2 * world}, got q {n_q} and k {n_k}")
    kv_lengths = _checks.lengths("kv_lengths", kv_lengths, q.shape[0], n_k, q.device)
    left, right = _window(window, n_q, n_k)
    if causal and n_q > 1:  # as attnmem.attention: with one query, causal hides no key
        right = 0 if right < 0 else min(right, 0)
    seed = _dropout_seed(dropout_p, generator, q)
    return (world, scale, left, right, kv_lengths, softcap, sinks, alibi_slopes, dropout_p,
            seed)


def ring_attention(q, k, v, *, group=None, causal=False, window=None, kv_lengths=None,
                   scale=None, return_lse=False, softcap=None, sinks=None, alibi_slopes=None,
                   dropout_p=0.0, generator=None):
    """attnmem.attention over a sequence split across the ranks of group (the default group
    if None): each rank passes its shard q: (B, H, Nq/W, D), k: (B, Hkv, Nk/W, D) and
    v: (B, Hkv, Nk/W, Ev), cut by shard_sequence with the same causal (contiguous shards;
    with causal=True the zig-zag layout, each shard's length even), and gets its shard of
    the output (B, H, Nq/W, Ev), and with return_lse=True of the logsumexp (B, H, Nq/W)
    (float32, float64 for float64 inputs; differentiable). v's head dim Ev may differ from
    D, as in attnmem.attention (MLA's D 192, Ev 128); v has k's shape otherwise.

    Masks are attnmem.attention's on the full sequences (Nq = W * q.shape[2], Nk likewise):
    causal, window=(left, right) around query i's position i + Nk - Nq, kv_lengths (B,) the
    global key lengths (the same tensor on every rank); GQA as there. Key/value shards go
    round the ring with point-to-point sends that overlap the attention on the shard in hand
    (k and v travel in one buffer, each sized by its own head dim: W - 1 sends of it forward;
    backward, W - 1 of it and W of one buffer of their float32 gradients). Pairs of chunks
    that a mask empties are skipped, and the shards stop going round once no rank needs
    them: a sliding window, window=(left, 0) with causal=False on contiguous shards, takes
    1 + ceil(left / shard length) steps. With causal=True every shard goes all the way round
    (each zig-zag shard borders ranks on both sides). A query that sees no key outputs
    zeros, has lse -inf (its sink with sinks) and gets zero gradients.

    Score modifications, as attnmem.attention defines them on the full sequences:
      softcap caps every pair of chunks' scores.
      sinks (H,), the same tensor on every rank, join each row's denominator once: they
        merge into the lse after the last step. Their gradient on each rank is that rank's
        part, the sum over its own query rows: the sum over the ranks is the gradient of the
        full sequence. That is what the projections feeding q, k and v get from their own
        tokens too, so one all-reduce of the gradients over the ranks (DDP's or FSDP's, with
        the ring's ranks in its group) completes them all alike.
      alibi_slopes (H,) or (B, H), the same on every rank, bias by global distances
        |i + Nk - Nq - j|. Each call of attnmem's op biases by distances from its own
        alignment; where both keep one sign they differ by a constant, which moves the
        call's lse and is taken back out. A pair of chunks with keys on both sides of its
        queries' positions takes two calls, split there (on the full sequence's diagonal
        one call: there the two distances agree), so with causal=True one per pair. Each
        call moves its alignment onto its queries' nearest keys: keys before them read
        extra (masked) keys past the call's own from a buffer with room for them, keys
        after them take extra zero queries (fewer than the call's keys; their outputs are
        dropped, and the triangle of keys they see, about half the call's work again with
        as many queries as keys, is what ALiBi costs without causal). The weights that
        count then get the smallest biases, and float32 errs as little as
        attnmem.attention on the full sequence (biases of slope * shard length would cost
        precision). A position offset per call in attnmem's kernel would remove the extra
        keys and queries.
    dropout_p (with generator as in attnmem.attention: one seed drawn per ring_attention
    call, on the device) drops each rank's weights in the kernels, exactly as the dense op's
    dropout is defined (weights of the full softmax dropped with probability dropout_p,
    survivors scaled by 1 / (1 - dropout_p)), and the backward regenerates the same masks:
    each call of the op, numbered in ring order, seeds its own Philox stream from the drawn
    seed, the call's number and the rank. The masks are not those attnmem.attention draws
    on the full sequence (its counters run over full-sequence positions); dropout_mask
    gives them back.
    """
    (world, scale, left, right, kv_lengths, softcap, sinks, alibi_slopes, dropout_p,
     seed) = _ring_checks(q, k, v, group, causal, window, kv_lengths, scale, return_lse,
                          softcap, sinks, alibi_slopes, dropout_p, generator)
    out, lse = _RingAttention.apply(q, k, v, kv_lengths, sinks, alibi_slopes, seed, scale,
                                    left, right, causal, softcap, dropout_p, group)
    return (out, lse) if return_lse else out


def _global_positions(rank, world, causal, length, device):
    """The full-sequence positions of a rank's shard of `length` rows (shard_sequence's)."""
    chunks, _ = _chunks_of(rank, world, causal)
    size = length // len(chunks)
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in chunks])


def dropout_mask(q, k, dropout_p, generator=None, *, group=None, causal=False, window=None,
                 kv_lengths=None, alibi_slopes=None):
    """The keep mask (B, H, Nq/W, Nk) bool that ring_attention(q, k, v, dropout_p=dropout_p,
    generator=generator, ...) applies to this rank's queries over the full sequence's keys,
    in order, with the same group, causal, window, kv_lengths and alibi_slopes (only
    whether they are given changes the calls), on the backend it picks for q and k, from
    generator in the state that call found it in. Weights that no query sees are False. A v
    whose head dim alone is past the kernels' 256 sends that call's "auto" backend to torch
    where this one picks triton: run both under attnmem.use_backend("torch") then."""
    (world, _, left, right, kv_lengths, _, _, alibi_slopes, dropout_p, seed) = _ring_checks(
        q, k, k, group, causal, window, kv_lengths, None, False, None, None, alibi_slopes,
        dropout_p, generator)
    if dropout_p == 0:
        raise ValueError("dropout_p must be > 0 for a dropout mask")
    _, rank = _group(group)
    n_q, n_k = q.shape[2] * world, k.shape[2] * world
    keep = torch.zeros(*q.shape[:3], n_k, dtype=torch.bool, device=q.device)
    triton = _pick(q, k, k, _backend.requested_backend()) == "triton"
    plan = _ring_plan(world, rank, n_q, n_k, causal, left, right, kv_lengths is not None,
                      alibi_slopes is not None)
    buffer = _with_room((k, k), _room(plan))  # only the key counts matter
    for step, calls in enumerate(plan):
        keys_at = _global_positions((rank - step) % world, world, causal, k.shape[2], q.device)
        for call in calls:
            k_call, _, lengths, call_seed = _call_inputs(call, buffer, kv_lengths, seed, world,
                                                         rank, n_q)
            own_rows, own_keys = call.rows.stop - call.rows.start, call.keys.stop - call.keys.start
            n_rows, n_keys = own_rows + call.extra_rows, k_call.shape[2]
            if triton:
                from attnmem.kernels import attention as kernel
                drawn = kernel.dropout_keep_mask(call_seed, (*q.shape[:2], n_rows, n_keys),
                                                 dropout_p)
            else:
                drawn = _torch_dropout_mask(call_seed, dropout_p, q, k_call)(
                    torch.arange(n_rows, device=q.device))
            seen = visible(torch.arange(n_rows, device=q.device), n_rows, n_keys, call.left,
                           call.right, lengths)
            if seen is not None:
                drawn = drawn & seen
            # The extra queries' weights are dropped, the extra keys masked.
            keep[:, :, call.rows, keys_at[call.keys]] |= drawn[:, :, :own_rows, :own_keys]
    return keep


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
        flat = _flat(grads)
        dist.all_reduce(flat, group=ctx.group)
        return (None, *_views(flat, ctx.shapes))


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


class _ScoresOverRanks(torch.autograd.Function):
    """The scores (B, R, K) of the K slots chosen over every rank, each from the rank that
    holds it: forward, gathered (the same bits on every rank); own is this rank's scores of
    its own chosen slots (0 elsewhere), which the gathered ones equal there. Each rank's
    uses give partial gradients, summed over the ranks in the backward: own takes the sum
    at its slots."""

    @staticmethod
    def forward(ctx, own, gathered, group):
        ctx.group = group
        return gathered.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


def _replicate(group, *tensors):
    """tensors (None kept) as inputs of a shard, whose gradients sum over the ranks."""
    present = [x for x in tensors if x is not None]
    if not torch.is_grad_enabled() or not any(x.requires_grad for x in present):
        return tensors
    copies = iter(_Replicate.apply(group, *present))
    return tuple(None if x is None else next(copies) for x in tensors)


@_checks.autocast_promote
def memory_address(memory, keys, *, strength=None, similarity="cosine", mask=None, group=None,
                   topk=None, sparse_grad=False):
    """attnmem.memory_address over a memory whose slots are split across the ranks of group:
    memory (B, N_rank, D) and mask (B, N_rank) are this rank's slots, keys (B, R, D) and
    strength (B, R) the same on every rank. -> this rank's part (B, R, N_rank) of the
    weights over all N slots.

    topk=K: the weights of each head's K best-scoring usable slots over all ranks, as
    memory_attend(topk=K, return_weights=True) gives them (one all-gather of (B, R, K)
    scores): this rank's SparseWeights, its own slot indices and their weights, -1 and 0
    where another rank holds the slot. memory (N_rank, D) may be shared by the batch, with
    sparse_grad as in attnmem.memory_address. Under torch.autocast, mixed floating dtypes
    run in the widest, as in attnmem.memory_address."""
    _group(group)
    if topk is not None:
        slots, weights, _ = _topk_weights(memory, keys, strength, similarity, mask, topk,
                                          sparse_grad, group)
        return SparseWeights(slots, weights.to(memory.dtype))
    keys, strength = _replicate(group, keys, strength)
    weights = attnmem.memory_address(memory, keys, strength=strength, similarity=similarity,
                                     mask=mask, sparse_grad=sparse_grad)
    share = _combine(memory, keys, strength, similarity, mask, weights, group)
    return (weights * share[..., None]).to(memory.dtype)


@_checks.autocast_promote
def memory_attend(memory, keys, *, values=None, strength=None, similarity="cosine", mask=None,
                  return_weights=False, group=None, topk=None, sparse_grad=False):
    """attnmem.memory_attend over a memory whose slots are split across the ranks of group:
    memory (B, N_rank, D), values (B, N_rank, Dv) and mask (B, N_rank) are this rank's slots,
    keys (B, R, D) and strength (B, R) the same on every rank. -> the read over all N slots
    (B, R, Dv), the same on every rank, and with return_weights=True this rank's part of
    the weights (B, R, N_rank). One all-gather of the (B, R) logsumexps and one all-reduce of
    the reads forward; backward, one all-reduce of the (B, R) logsumexp gradients and one of
    the keys' and strengths' gradients. attnmem.memory_attend returns no logsumexp, so each
    rank asks it for its weights too (B, R, N_rank, R/D of the memory's size) and reads the
    shard's logsumexp off the top weight.

    topk=K: each head reads its K best-scoring usable slots over all ranks, as
    attnmem.memory_attend(topk=K) over the shards concatenated in rank order: the same
    slots, weights, read and gradients. Each rank finds its own K best (all its usable
    slots where it holds fewer) in one pass over its shard, never holding (B, R, N_rank)
    scores; one all-gather of their (B, R, K) scores lets every rank pick the same K best
    of the world x K (ties to the lower rank, then the lower slot, so to the lower slot of
    the concatenated memory); the softmax runs over those K, and each rank reads the rows
    it holds of them. One all-reduce sums the reads; backward, one all-reduce of the
    (B, R, K) score gradients and one of the keys' and strengths'. With return_weights=True
    the weights are this rank's part, SparseWeights (B, R, K) in the global best-first
    order: its own slot indices (in [0, N_rank)) and their weights, -1 and 0 where another
    rank holds the slot or fewer than K slots are usable. memory (N_rank, D) and values
    (N_rank, Dv) may be shared by the batch, with sparse_grad as in attnmem.memory_attend.
    K may exceed a rank's slot count but not the total: on CPU tensors one all-reduce of
    the shard sizes checks it; on a GPU reading the total would stall the host, so there a
    K past it is not caught and its entries past the usable slots get -1 and weight 0, as
    where fewer than K slots are usable. Under torch.autocast, mixed floating dtypes run in
    the widest, as in attnmem.memory_attend."""
    _group(group)
    _checks.flag("return_weights", return_weights)
    if topk is not None:
        return _attend_topk(memory, keys, values, strength, similarity, mask, return_weights,
                            topk, sparse_grad, group)
    keys, strength = _replicate(group, keys, strength)
    read, weights = attnmem.memory_attend(memory, keys, values=values, strength=strength,
                                          similarity=similarity, mask=mask, return_weights=True,
                                          sparse_grad=sparse_grad)
    share = _combine(memory, keys, strength, similarity, mask, weights, group)
    ct = compute_dtype(memory.dtype)
    read = _SumOverRanks.apply(read.to(ct) * share[..., None], group).to(read.dtype)
    if not return_weights:
        return read
    return read, (weights * share[..., None]).to(weights.dtype)


def _topk_weights(memory, keys, strength, similarity, mask, topk, sparse_grad, group):
    """The global top-k weights (see memory_attend's topk) -> (slots (B, R, K) this rank's
    own indices, -1 elsewhere; weights (B, R, K) in the compute dtype, 0 at -1; the gathered
    rows (B, R, K, D) in the compute dtype, with gradients to memory)."""
    world, rank = _group(group)
    _address_args(memory, keys, strength, similarity, mask, topk)
    sparse_grad = _sparse_grad(sparse_grad, memory, ("topk=K", True))
    n_slots = math.inf  # unchecked off the CPU
    if memory.device.type == "cpu":
        total = torch.tensor(memory.shape[-2])
        dist.all_reduce(total, group=group)
        n_slots = int(total)
    topk = _topk(topk, n_slots)
    batch, heads, _ = keys.shape
    offered = min(topk, memory.shape[-2])
    with torch.no_grad():
        slots = keys.new_empty((batch, heads, 0), dtype=torch.int64)
        if offered:
            chosen = _choose("memory_attend", (memory, keys), heads, memory.shape[-1], offered,
                             ("batch entries", batch))
            slots = _top_slots(chosen, memory, keys, strength, similarity, mask, offered)
        slots = torch.nn.functional.pad(slots, (0, topk - offered), value=-1)
        rows, k, s = _upcast(_gather(memory, slots), keys, strength)
        scores = slot_scores(rows, k, s, similarity, slots)
        parts = [torch.empty_like(scores) for _ in range(world)]
        dist.all_gather(parts, scores.contiguous(), group=group)
        # Candidates in rank order, each rank's best first (ties to the lower slot): a stable
        # sort breaks ties alike on every rank, by rank, then slot.
        best, order = torch.cat(parts, -1).sort(dim=-1, descending=True, stable=True)
        best, order = best[..., :topk], order[..., :topk]
        mine = (order // topk == rank) & (best > -math.inf)
        slots = torch.where(mine, slots.gather(-1, order % topk), -1)
    keys, strength = _replicate(group, keys, strength)
    rows, keys, strength = _upcast(_gather(memory, slots, sparse_grad), keys, strength)
    own = slot_scores(rows, keys, strength, similarity, slots).masked_fill(~mine, 0)
    weights = softmax_with_lse(_ScoresOverRanks.apply(own, best, group))[0].masked_fill(~mine, 0)
    return slots, weights, rows


def _attend_topk(memory, keys, values, strength, similarity, mask, return_weights, topk,
                 sparse_grad, group):
    """memory_attend(topk=topk): see there."""
    if values is not None:
        _values(values, memory)
    slots, weights, rows = _topk_weights(memory, keys, strength, similarity, mask, topk,
                                         sparse_grad, group)
    vals = rows if values is None else _upcast(_gather(values, slots, sparse_grad))[0]
    read = _SumOverRanks.apply(_read_rows(weights, vals), group).to(memory.dtype)
    if not return_weights:
        return read
    return read, SparseWeights(slots, weights.to(memory.dtype))


@_checks.autocast_promote
def memory_read(memory, weights, *, group=None):
    """attnmem.memory_read over a memory whose slots are split across the ranks of group:
    memory (B, N_rank, D) and weights (B, R, N_rank) this rank's slots. -> the read
    (B, R, D) over all slots, the same on every rank (one all-reduce). Under
    torch.autocast, mixed floating dtypes run in the widest, as in attnmem.memory_read."""
    _group(group)
    read = attnmem.memory_read(memory, weights)
    return _SumOverRanks.apply(read.to(compute_dtype(read.dtype)), group).to(read.dtype)


@_checks.autocast_promote
def memory_write(memory, weights, erase, add, *, inplace=False, group=None):
    """attnmem.memory_write on the slots this rank holds: memory (B, N_rank, D) and weights
    (B, W, N_rank) this rank's, erase and add (B, W, D) the same on every rank (their
    gradients sum over the ranks). -> this rank's slots after the write; no communication
    forward. Under torch.autocast, mixed floating dtypes run in the widest, as in
    attnmem.memory_write."""
    _group(group)
    erase, add = _replicate(group, erase, add)
    return attnmem.memory_write(memory, weights, erase, add, inplace=inplace)
