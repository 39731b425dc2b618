"""attnmem.distributed on 2 and 3 CPU processes (gloo) against single-process attnmem on the
same full tensors: ring attention (causal or not, GQA, windows, lengths, Nq != Nk, a value
head dim apart from q's and k's, the gradient of lse, softcap, sinks, ALiBi, dropout) and
the sharded memory ops and module, outputs and every gradient.

Each world size spawns one process group that runs every case, so a test pays for one
start-up; a hang fails at the deadline instead of blocking the run.
"""

import functools
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnmem
from attnmem import distributed
from attnmem.nn import KeyValueMemory, ShardedKeyValueMemory
from attnmem.reference import attention as twin
from backends import INTERPRET

pytestmark = pytest.mark.xdist_group("distributed")

DEADLINE_S = 120


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, seed, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        for case in cases:
            torch.manual_seed(seed)  # the same full tensors on every rank
            case(rank, world)
            dist.barrier()
        # The custom ops ran with the group made: torch's lazy import of
        # torch.distributed.nn (see attnmem/__init__.py) must not hold it past
        # destroy_process_group.
        assert not _held_groups(), "torch.distributed.nn holds the process group"
    finally:
        dist.destroy_process_group()


def _held_groups():
    """The process groups held as default arguments by torch.distributed.nn.functional."""
    import torch.distributed.nn.functional as functional
    return [value for f in vars(functional).values() if callable(f)
            for value in getattr(f, "__defaults__", None) or ()
            if isinstance(value, dist.ProcessGroup)]


def _spawn(world, cases):
    context = mp.start_processes(_worker, args=(world, _free_port(),
                                                int(os.environ["ATTNMEM_SEED"]), cases),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world} processes still running after {DEADLINE_S} s: a hang")


def _close(actual, expected, what, tol=1e-10):
    assert actual.shape == expected.shape, what
    assert not actual.isnan().any(), f"{what}: NaN"
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol,
                               msg=lambda detail: f"{what}: {detail}")


# ---------------------------------------------------------------------------------------
# Ring attention
# ---------------------------------------------------------------------------------------

ATTENTION_CASES = [
    # (B, H, Hkv, Nq per rank, Nk per rank, D or (D, Ev) with v's head dim Ev apart, causal,
    # window, lengths, dtype); the float32 cases run again on the triton kernels (through
    # the interpreter)
    (2, 2, 2, 6, 6, 8, False, None, None, torch.float64),
    (2, 4, 2, 6, 6, 5, True, None, None, torch.float64),
    (3, 3, 1, 4, 4, 4, True, (5, None), [24, 7, 0], torch.float64),
    (2, 2, 2, 5, 5, 4, False, (3, 2), [13, 1], torch.float64),
    (1, 2, 1, 4, 8, 4, True, None, None, torch.float64),
    (1, 2, 2, 5, 3, 4, False, (2, 4), None, torch.float64),
    (2, 4, 2, 6, 6, (24, 40), True, None, [20, 9], torch.float64),
    (1, 3, 1, 5, 5, (40, 8), False, (4, 3), None, torch.float64),
    # sliding windows on contiguous shards: the ring stops after 2 steps, or after 1
    (2, 2, 1, 6, 6, 4, False, (4, 0), [17, 3], torch.float64),
    (1, 2, 2, 4, 4, 4, False, (0, 0), None, torch.float64),
    (2, 4, 2, 8, 8, 16, True, (9, 0), None, torch.float32),
    (2, 2, 1, 6, 6, 8, False, None, [15, 4], torch.float32),
    (1, 2, 1, 4, 4, (24, 8), True, None, [13], torch.float32),
]


def _head_dims(d):
    """(D, Ev) of a case's D or (D, Ev)."""
    return d if isinstance(d, tuple) else (d, d)


def _attention_cases(rank, world, backend="torch"):
    for b, h, hkv, nq, nk, d, causal, window, lengths, dtype in ATTENTION_CASES:
        if backend == "triton" and dtype == torch.float64:
            continue
        what = (f"world {world}, {backend}: "
                f"{(b, h, hkv, nq, nk, d, causal, window, lengths, dtype)}")
        d_qk, d_v = _head_dims(d)
        full = [torch.randn(b, heads, n * world, dim, dtype=dtype)
                for heads, n, dim in ((h, nq, d_qk), (hkv, nk, d_qk), (hkv, nk, d_v))]
        kv_lengths = None if lengths is None else torch.tensor(lengths)
        for i, length in enumerate(lengths or []):  # padding counts for nothing
            full[1][i, :, length:] = full[2][i, :, length:] = float("nan")
        dout = torch.randn(b, h, nq * world, d_v, dtype=dtype)
        dlse = torch.randn(full[0].shape[:3], dtype=torch.float64 if dtype == torch.float64
                           else torch.float32)
        # The full attention, single process.
        ref = [x.clone().requires_grad_() for x in full]
        out, lse = attnmem.attention(*ref, causal=causal, window=window, kv_lengths=kv_lengths,
                                     return_lse=True)
        ((out * dout).sum() + (lse.nan_to_num(neginf=0) * dlse).sum()).backward()
        # The ring, from each rank's shard.
        shard = [distributed.shard_sequence(x, causal=causal).requires_grad_() for x in full]
        with attnmem.use_backend(backend):
            out_r, lse_r = distributed.ring_attention(*shard, causal=causal, window=window,
                                                      kv_lengths=kv_lengths, return_lse=True)
            ((out_r * distributed.shard_sequence(dout, causal=causal)).sum()
             + (lse_r.nan_to_num(neginf=0)
                * distributed.shard_sequence(dlse, causal=causal)).sum()).backward()
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        _close(out_r, distributed.shard_sequence(out.detach(), causal=causal), f"{what} out",
               tol)
        _close(lse_r, distributed.shard_sequence(lse.detach(), causal=causal), f"{what} lse",
               tol)
        for name, x, r in zip("qkv", shard, ref):
            _close(x.grad, distributed.shard_sequence(r.grad, causal=causal),
                   f"{what} d{name}", tol)
        _close(distributed.unshard_sequence(out_r.detach(), causal=causal), out.detach(),
               f"{what} unshard", tol)
        if lengths is not None and 0 in lengths:  # a batch that sees no key: zeros, -inf
            empty = lengths.index(0)
            assert (out_r[empty] == 0).all() and (lse_r[empty] == -float("inf")).all()


SCORE_MOD_CASES = [
    # (B, H, Hkv, Nq per rank, Nk per rank, D or (D, Ev), causal, window, lengths, softcap,
    # sinks, alibi_slopes' shape (H,) or (B, H), dropout_p); the last three run again on the
    # triton kernels (through the interpreter)
    (2, 4, 2, 6, 6, 5, True, None, [12, 0], 2.0, True, "BH", 0.0),
    (2, 2, 1, 5, 5, 4, False, (3, 2), None, None, True, "H", 0.0),
    (1, 2, 1, 4, 8, 4, True, (6, None), None, 3.0, False, "H", 0.0),
    (1, 2, 2, 5, 3, 3, False, None, [9], None, True, "BH", 0.0),
    (2, 2, 2, 6, 6, 4, True, None, [11, 5], 2.0, True, None, 0.3),
    (2, 4, 2, 6, 6, (5, 9), True, None, [12, 0], 2.0, True, "BH", 0.3),
    (1, 2, 1, 5, 5, (6, 3), False, (4, 3), [8], None, True, "H", 0.3),
    (2, 2, 1, 4, 4, 4, True, None, None, None, False, "H", 0.0),
    (1, 2, 1, 4, 4, 4, False, (5, 2), [7], 2.0, True, "H", 0.3),
]


def _score_mod_cases(rank, world, backend="torch"):
    """softcap, sinks, ALiBi and dropout against attnmem.attention on the full sequence (the
    float64 twin with the ring's own masks under dropout): outputs, lse and every gradient,
    the sinks' summed over the ranks."""
    dtype, tol = (torch.float64, 1e-10) if backend == "torch" else (torch.float32, 2e-5)
    for case in SCORE_MOD_CASES if backend == "torch" else SCORE_MOD_CASES[-3:]:
        b, h, hkv, nq, nk, d, causal, window, lengths, softcap, sinks, alibi, p = case
        what = f"world {world}, {backend}: {case}"
        d_qk, d_v = _head_dims(d)
        full = [torch.randn(b, heads, n * world, dim, dtype=torch.float64)
                for heads, n, dim in ((h, nq, d_qk), (hkv, nk, d_qk), (hkv, nk, d_v))]
        kv_lengths = None if lengths is None else torch.tensor(lengths)
        for i, length in enumerate(lengths or []):  # padding counts for nothing
            full[1][i, :, length:] = full[2][i, :, length:] = float("nan")
        sink = torch.randn(h, dtype=torch.float64) if sinks else None
        slopes = None if alibi is None else torch.rand((h,) if alibi == "H" else (b, h),
                                                       dtype=torch.float64)
        dout = torch.randn(b, h, nq * world, d_v, dtype=torch.float64)
        dlse = torch.randn(full[0].shape[:3], dtype=torch.float64)
        mods = dict(causal=causal, window=window, kv_lengths=kv_lengths, softcap=softcap,
                    alibi_slopes=slopes)
        shard = [distributed.shard_sequence(x, causal=causal).to(dtype).requires_grad_()
                 for x in full]
        sink_r = None if sink is None else sink.to(dtype, copy=True).requires_grad_()
        with attnmem.use_backend(backend):
            generator = torch.Generator().manual_seed(7)
            if p:
                keep = distributed.dropout_mask(shard[0], shard[1], p, generator, causal=causal,
                                                window=window, kv_lengths=kv_lengths,
                                                alibi_slopes=slopes)
                generator.manual_seed(7)
            out_r, lse_r = distributed.ring_attention(*shard, **mods, sinks=sink_r,
                                                      return_lse=True, dropout_p=p,
                                                      generator=generator)
            ((out_r * distributed.shard_sequence(dout, causal=causal).to(dtype)).sum()
             + (lse_r.nan_to_num(neginf=0)
                * distributed.shard_sequence(dlse, causal=causal).to(dtype)).sum()).backward()
        ref = [x.clone().requires_grad_() for x in full]
        sink_ref = None if sink is None else sink.clone().requires_grad_()
        if p:  # the twin with the ring's masks, gathered from every rank
            left, right = (-1 if side is None else side for side in window or (None, None))
            keep = distributed.unshard_sequence(keep.double(), causal=causal) > 0
            out, lse = twin.attention_forward(*ref, kv_lengths, d_qk ** -0.5, left,
                                              0 if causal else right, softcap or 0.0, sink_ref,
                                              slopes, p, keep)
        else:
            out, lse = attnmem.attention(*ref, **mods, sinks=sink_ref, return_lse=True)
        ((out * dout).sum() + (lse.nan_to_num(neginf=0) * dlse).sum()).backward()
        for name, actual, expected in (("out", out_r, out), ("lse", lse_r, lse),
                                       *((f"d{n}", x.grad, r.grad)
                                         for n, x, r in zip("qkv", shard, ref))):
            _close(actual.double(), distributed.shard_sequence(expected.detach(), causal=causal),
                   f"{what} {name}", tol)
        if sink is not None:
            dsinks = sink_r.grad.double()
            dist.all_reduce(dsinks)
            _close(dsinks, sink_ref.grad, f"{what} dsinks (summed over the ranks)", tol)
        if p:  # the same generator state, the same masks and outputs
            with attnmem.use_backend(backend):
                again = distributed.ring_attention(*shard, **mods, sinks=sink_r, dropout_p=p,
                                                   generator=generator.manual_seed(7))
            assert torch.equal(again, out_r), what
    q = torch.zeros(1, 2, 4, 4)
    for message, kwargs in (
            ("sinks must be \\(H,\\)", dict(sinks=torch.zeros(3))),
            ("alibi_slopes must be \\(H,\\) = \\(2,\\) or \\(B, H\\)",
             dict(alibi_slopes=torch.zeros(2, 2))),
            ("alibi_slopes get no gradient", dict(alibi_slopes=torch.zeros(2,
                                                                           requires_grad=True))),
            ("softcap must be a finite number", dict(softcap=-1.0)),
            ("dropout_p must be a number in \\[0, 1\\]", dict(dropout_p=1.5)),
            ("generator must be a torch.Generator", dict(dropout_p=0.1, generator=3))):
        with pytest.raises((ValueError, TypeError), match=message):
            distributed.ring_attention(q, q, q, **kwargs)
    with pytest.raises(ValueError, match="dropout_p must be > 0"):
        distributed.dropout_mask(q, q, 0.0)


def _alibi_precision(rank, world):
    """ALiBi's bias reaches slope * shard length in a call whose alignment is not the
    query's: the ring's calls align on each query's nearest key, so in float32 they err as
    little as attnmem.attention on the full sequence does (calls split at their own
    diagonal, some with negated slopes, erred 3.5 to 6 times more here)."""
    slopes = torch.tensor([0.5], dtype=torch.float64)
    for causal in (True, False):
        full = [torch.randn(1, 1, 512 * world, 8, dtype=torch.float64) for _ in range(3)]
        exact = distributed.shard_sequence(
            attnmem.attention(*full, causal=causal, alibi_slopes=slopes), causal=causal)
        dense = distributed.shard_sequence(attnmem.attention(
            *(x.float() for x in full), causal=causal, alibi_slopes=slopes.float()),
            causal=causal)
        ring = distributed.ring_attention(
            *(distributed.shard_sequence(x.float(), causal=causal) for x in full),
            causal=causal, alibi_slopes=slopes.float())
        # Root-mean-square errors: their ratio stayed within 0.98-1.03 over 24 draws, where
        # the largest errors' ratio, one element each, reached 2 on some draws.
        error, dense_error = ((x.double() - exact).pow(2).mean().sqrt() for x in (ring, dense))
        assert error <= 1.25 * dense_error, (causal, error, dense_error)


def _layout_and_errors(rank, world):
    x = torch.arange(4 * world, dtype=torch.float64).view(1, 1, -1, 1)
    zigzag = distributed.shard_sequence(x, causal=True).flatten().tolist()
    assert zigzag == [2 * rank, 2 * rank + 1, 4 * world - 2 - 2 * rank, 4 * world - 1 - 2 * rank]
    assert distributed.shard_sequence(x).flatten().tolist() == list(range(4 * rank,
                                                                          4 * rank + 4))
    # unshard's gradient: the replicated full tensor's gradient, each rank its part.
    part = distributed.shard_sequence(x, causal=True).requires_grad_()
    (distributed.unshard_sequence(part, causal=True) * x).sum().backward()
    _close(part.grad, distributed.shard_sequence(x, causal=True), "unshard backward")
    with pytest.raises(ValueError, match="not divisible by 2 \\* world size"):
        distributed.shard_sequence(torch.zeros(1, 1, 2 * world + 1, 1), causal=True)
    with pytest.raises(ValueError, match="dim"):
        distributed.shard_sequence(torch.zeros(1, 1, 2 * world, 1), dim=4)
    for layout in (distributed.shard_sequence, distributed.unshard_sequence):
        with pytest.raises(TypeError, match="causal must be a bool"):
            layout(torch.zeros(1, 1, 2 * world, 1), causal="no")
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="divisible by 2 \\* world size"):
        distributed.ring_attention(q, q, q, causal=True)
    with pytest.raises(ValueError, match="window left"):
        distributed.ring_attention(q, q, q, window=(-2, 0))
    with pytest.raises(ValueError, match="kv_lengths"):
        distributed.ring_attention(q, q, q, kv_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="heads"):
        distributed.ring_attention(q, q[:, :1].expand(1, 3, 3, 4), q[:, :1].expand(1, 3, 3, 4))
    with pytest.raises(TypeError, match="group"):
        distributed.ring_attention(q, q, q, group="ring")
    memory = torch.zeros(1, 3, 4)
    with pytest.raises(TypeError, match="return_weights must be a bool"):
        distributed.memory_attend(memory, memory[:, :1], return_weights="no")
    # v's head dim is its own; its other sizes, dtype and device are k's.
    assert distributed.ring_attention(q, q, torch.zeros(1, 2, 3, 7)).shape == (1, 2, 3, 7)
    for shape in ((1, 2, 2, 7), (1, 1, 3, 7), (2, 2, 3, 7), (1, 2, 3, 0)):
        with pytest.raises(ValueError, match="v must have k's shape but for its head dim"):
            distributed.ring_attention(q, q, torch.zeros(shape))
    with pytest.raises(TypeError, match="v must have q's dtype"):
        distributed.ring_attention(q, q, torch.zeros(1, 2, 3, 7, dtype=torch.float64))
    empty = torch.zeros(2, 2, 0, 4, requires_grad=True)
    empty_v = torch.zeros(2, 2, 0, 3, requires_grad=True)
    out = distributed.ring_attention(empty, empty, empty_v, causal=True)
    out.sum().backward()
    assert out.shape == empty_v.shape and empty.grad.shape == empty.shape
    assert empty_v.grad.shape == empty_v.shape


def _subgroup(rank, world):
    """A ring over some of the ranks: its peers are global ranks, not group ranks."""
    members = [0, world - 1]
    group = dist.new_group(members)
    if rank not in members:
        with pytest.raises(ValueError, match="group does not contain this rank"):
            distributed.shard_sequence(torch.zeros(1, 1, 4, 1), group=group)
        return
    full = [torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    part = [distributed.shard_sequence(x.detach(), group=group, causal=True).requires_grad_()
            for x in full]
    out = distributed.ring_attention(*part, group=group, causal=True)  # no lse: dlse is None
    out.square().sum().backward()
    expected = attnmem.attention(*full, causal=True)
    expected.square().sum().backward()
    for name, actual, wanted in zip(("out", "dq", "dk", "dv"), (out, *(x.grad for x in part)),
                                    (expected, *(x.grad for x in full))):
        _close(actual, distributed.shard_sequence(wanted.detach(), group=group, causal=True),
               f"subgroup {name}")


# ---------------------------------------------------------------------------------------
# Sharded memory
# ---------------------------------------------------------------------------------------


def _split(x, world, rank, dim=1):
    """Uneven shards along the slots, as torch.tensor_split cuts them."""
    return torch.tensor_split(x, world, dim)[rank]


def _memory_cases(rank, world, dtype=torch.float64, backend="torch"):
    """The sharded ops in dtype on backend against single-process float64 on the torch
    backend."""
    tol = 1e-10 if dtype == torch.float64 else 2e-5

    def mine(x, dim=None):
        """This rank's slots of x (all of x for a replicated input), a leaf in dtype."""
        x = x.detach() if dim is None else _split(x.detach(), world, rank, dim)
        return x.to(dtype, copy=True).requires_grad_()

    def check(actual, expected, what, dim=None):
        expected = expected.detach() if dim is None else _split(expected.detach(), world, rank,
                                                                 dim)
        _close(actual, expected.to(dtype), f"world {world}, {backend}, {dtype}: {what}", tol)

    b, r, n, d, dv, w = 2, 3, 4 * world + 3, 5, 4, 2
    memory = torch.randn(b, n, d, dtype=torch.float64)
    values = torch.randn(b, n, dv, dtype=torch.float64)
    keys = torch.randn(b, r, d, dtype=torch.float64)
    strength = torch.rand(b, r, dtype=torch.float64) * 4
    mask = torch.rand(b, n) < 0.7
    mask[1, :] = False  # batch 1: one usable slot, on the last rank
    mask[1, -1] = True
    mask[0, : n // world + 1] = False  # batch 0: rank 0's slots all masked
    memory[~mask] = float("nan")  # masked slots count for nothing
    values[~mask] = float("nan")
    dread, dweights = torch.randn(b, r, dv, dtype=torch.float64), torch.randn(b, r, n,
                                                                                dtype=torch.float64)
    for similarity in ("cosine", "dot"):
        ref = [x.clone().requires_grad_() for x in (memory, keys, values, strength)]
        read, weights = attnmem.memory_attend(ref[0], ref[1], values=ref[2], strength=ref[3],
                                              similarity=similarity, mask=mask,
                                              return_weights=True)
        ((read * dread).sum() + (weights * dweights).sum()).backward()
        shard = [mine(memory, 1), mine(keys), mine(values, 1), mine(strength)]
        with attnmem.use_backend(backend):
            read_s, weights_s = distributed.memory_attend(
                shard[0], shard[1], values=shard[2], strength=shard[3], similarity=similarity,
                mask=_split(mask, world, rank), return_weights=True)
            ((read_s * dread.to(dtype)).sum()
             + (weights_s * _split(dweights, world, rank, 2).to(dtype)).sum()).backward()
        check(read_s, read, f"{similarity} read")
        check(weights_s, weights, f"{similarity} weights", 2)
        for name, x, full, dim in zip(("memory", "keys", "values", "strength"), shard, ref,
                                      (1, None, 1, None)):
            check(x.grad, full.grad, f"{similarity} d{name}", dim)
    # memory_address, then memory_read and memory_write with those weights, on a memory
    # without zero slots: cosine similarity's gradient at a zero slot is ~1/eps, which float32
    # cannot match to the tolerance.
    memory = torch.randn(b, n, d, dtype=torch.float64)
    ref = [x.clone().requires_grad_() for x in (memory, keys, strength)]
    erase = torch.rand(b, w, d, dtype=torch.float64, requires_grad=True)
    add = torch.randn(b, w, d, dtype=torch.float64, requires_grad=True)
    weights = attnmem.memory_address(ref[0], ref[1], strength=ref[2])
    written = attnmem.memory_write(ref[0], weights[:, :w], erase, add)
    read = attnmem.memory_read(written, weights)
    dwritten = torch.randn_like(written)
    ((read * dread[..., :1]).sum() + (written * dwritten).sum()).backward()
    shard = [mine(ref[0], 1), mine(keys), mine(strength), mine(erase), mine(add)]
    with attnmem.use_backend(backend):
        weights_s = distributed.memory_address(shard[0], shard[1], strength=shard[2])
        written_s = distributed.memory_write(shard[0], weights_s[:, :w], shard[3], shard[4])
        read_s = distributed.memory_read(written_s, weights_s)
        ((read_s * dread[..., :1].to(dtype)).sum()
         + (written_s * _split(dwritten, world, rank).to(dtype)).sum()).backward()
    check(weights_s, weights, "address weights", 2)
    check(written_s, written, "written", 1)
    check(read_s, read, "read after write")
    for name, x, full, dim in zip(("memory", "keys", "strength", "erase", "add"), shard,
                                  (*ref, erase, add), (1, None, None, None, None)):
        check(x.grad, full.grad, f"address/write/read d{name}", dim)
    # world - 1 slots: the last rank holds none.
    ref = [x[:, : world - 1].nan_to_num().requires_grad_() for x in (memory, values)]
    ref.append(keys.clone().requires_grad_())
    read = attnmem.memory_attend(ref[0], ref[2], values=ref[1])
    (read * dread).sum().backward()
    shard = [mine(ref[0], 1), mine(ref[1], 1), mine(keys)]
    with attnmem.use_backend(backend):
        read_s = distributed.memory_attend(shard[0], shard[2], values=shard[1])
        (read_s * dread.to(dtype)).sum().backward()
    check(read_s, read, "empty shard read")
    for name, x, full, dim in zip(("memory", "values", "keys"), shard, ref, (1, 1, None)):
        check(x.grad, full.grad, f"empty shard d{name}", dim)


def _local(weights, world, rank, n):
    """This rank's part of single-device SparseWeights over n slots: its slots' indices in
    its shard and their weights, -1 and 0 where another rank holds the slot."""
    start = sum(part.numel() for part in torch.tensor_split(torch.empty(n), world)[:rank])
    size = torch.tensor_split(torch.empty(n), world)[rank].numel()
    ours = (weights.indices >= start) & (weights.indices < start + size)
    return (torch.where(ours, weights.indices - start, -1),
            torch.where(ours, weights.weights.detach(), 0))


def _topk_cases(rank, world, dtype=torch.float64, backend="torch"):
    """memory_attend(topk=K) over the shards against single-process attnmem.memory_attend
    (topk=K) in float64 on the full memory: indices, weights, read and every gradient (and
    memory_address(topk=K)'s indices and weights), with
    K past one shard's slots; masks leaving fewer than K usable slots or none; a memory
    (N, D) shared by the batch with sparse gradients; K = N; a rank without slots; exact
    ties within and across the ranks. The float32 run (triton) takes the dense cases."""
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    what = f"world {world}, {backend}, {dtype}, topk"
    n, d, dv, k = 3 * world + 2, 5, 4, 5  # shards of 3 or 4 slots
    mask = torch.rand(3, n) < 0.8
    mask[1] = False
    mask[1, [0, -1]] = True  # batch 1: 2 usable slots, on the first and the last rank
    mask[2] = False  # batch 2: none
    cases = [  # (memory shape, K, similarity, mask, strength, values, sparse_grad, ties)
        ((3, n, d), k, "cosine", mask, True, True, False, False),
        ((n, d), k, "dot", None, False, True, True, False),
        ((n, d), n, "scaled_dot", mask, True, False, True, False),
        ((2, world - 1, d), world - 1, "dot", None, True, True, False, False),  # last rank: none
        ((2, n, d), k, "dot", None, False, True, False, True),
    ]
    for shape, topk, similarity, mask_, with_strength, with_values, sparse, ties in cases:
        if dtype != torch.float64 and (sparse or shape[-2] < world):
            continue  # the triton kernels run the dense cases with slots on every rank
        case = f"{what}: {shape}, K={topk}, {similarity}, sparse_grad={sparse}, ties={ties}"
        batch, slots = 3 if len(shape) == 2 else shape[0], shape[-2]
        memory = torch.randn(shape, dtype=torch.float64)
        keys = torch.randn(batch, 3, d, dtype=torch.float64)
        if ties:
            # Slots repeating 3 rows of small integers: exact ties within and across the
            # ranks, which go to the lower slot as on one device.
            memory = torch.randint(-2, 3, (2, 3, d)).double().repeat(1, n, 1)[:, :n]
            keys = torch.randint(-2, 3, (batch, 3, d)).double()
        values = torch.randn(*shape[:-1], dv, dtype=torch.float64) if with_values else None
        strength = torch.rand(batch, 3, dtype=torch.float64) * 4 if with_strength else None
        if mask_ is not None and len(shape) == 3:
            memory[~mask_] = float("nan")  # masked slots count for nothing
        full = {"memory": memory, "keys": keys, "values": values, "strength": strength}
        full = {name: x.clone().requires_grad_() for name, x in full.items() if x is not None}
        read, weights = attnmem.memory_attend(
            full["memory"], full["keys"], values=full.get("values"),
            strength=full.get("strength"), similarity=similarity, mask=mask_, topk=topk,
            return_weights=True, sparse_grad=sparse)
        dread, dweights = torch.randn_like(read), torch.randn_like(weights.weights)
        ((read * dread).sum() + (weights.weights * dweights).sum()).backward()
        sharded = {"memory": -2, "values": -2}
        mine = {name: (_split(x.detach(), world, rank, sharded[name]) if name in sharded
                       else x.detach()).to(dtype, copy=True).requires_grad_()
                for name, x in full.items()}
        with attnmem.use_backend(backend):
            read_s, weights_s = distributed.memory_attend(
                mine["memory"], mine["keys"], values=mine.get("values"),
                strength=mine.get("strength"), similarity=similarity,
                mask=None if mask_ is None else _split(mask_, world, rank),
                topk=topk, return_weights=True, sparse_grad=sparse)
            ((read_s * dread.to(dtype)).sum()
             + (weights_s.weights * dweights.to(dtype)).sum()).backward()
        indices, expected = _local(weights, world, rank, slots)
        assert torch.equal(weights_s.indices, indices), case
        _close(weights_s.weights, expected.to(dtype), f"{case} weights", tol)
        _close(read_s, read.detach().to(dtype), f"{case} read", tol)
        if mask_ is not None:  # the batch entry without usable slots reads zeros
            assert (read_s[2] == 0).all() and (weights_s.indices[2] == -1).all(), case
        with attnmem.use_backend(backend):  # memory_address(topk=K): the same weights
            address = distributed.memory_address(
                mine["memory"], mine["keys"], strength=mine.get("strength"),
                similarity=similarity, mask=None if mask_ is None else _split(mask_, world, rank),
                topk=topk, sparse_grad=sparse)
        assert torch.equal(address.indices, indices), case
        _close(address.weights, expected.to(dtype), f"{case} address weights", tol)
        for name, x in mine.items():
            grad, wanted = x.grad, full[name].grad
            if sparse and name in sharded:
                # Only this rank's chosen slots get a (sparse) gradient row.
                assert grad.is_sparse, case
                touched = set(grad.coalesce().indices()[0].tolist())
                assert touched == set(indices[indices >= 0].tolist()), case
                grad, wanted = grad.to_dense(), wanted.to_dense()
            if name in sharded:
                wanted = _split(wanted, world, rank, sharded[name])
            _close(grad, wanted.to(dtype), f"{case} d{name}", tol)
    if dtype != torch.float64:
        return
    memory, keys = torch.zeros(2, d), torch.zeros(2, 3, d)
    for message, kwargs in (
            (f"topk must be an int in \\[1, N\\] = \\[1, {2 * world}\\]",
             dict(topk=2 * world + 1)),
            ("topk must be an int in", dict(topk=0)),
            ("topk must be an int, got float", dict(topk=2.0)),
            ("sparse_grad=True needs a memory \\(N, D\\) shared",
             dict(topk=2, sparse_grad=True)),
            ("values must be \\(N, Dv\\)", dict(topk=2, values=torch.zeros(3, d)))):
        with pytest.raises((ValueError, TypeError), match=message):
            distributed.memory_attend(memory if "sparse_grad" not in kwargs
                                      else memory.expand(2, -1, -1), keys, **kwargs)


def _module_case(rank, world):
    # Dense reads of R = 2 queries; top-k reads (K past one rank's slots, sparse gradients)
    # of one query.
    for topk, sparse, h_shape in ((None, False, (3, 2, 6)), (7, True, (3, 6))):
        what = f"module topk={topk}"
        full = KeyValueMemory(6, num_slots=5 * world + 1, key_dim=4, value_dim=3, topk=topk,
                              sparse=sparse).double()
        sharded = ShardedKeyValueMemory(
            6, keys=_split(full.keys, world, rank, 0), values=_split(full.values, world, rank, 0),
            learn=True, topk=topk, sparse=sparse).double()
        # The replicated layers start from group rank 0's: the full module's on every rank.
        sharded.load_state_dict({**full.state_dict(), "keys": sharded.keys,
                                 "values": sharded.values})
        h = torch.randn(h_shape, dtype=torch.float64)
        out, weights = full(h, return_weights=True)
        out.square().sum().backward()
        out_s, weights_s = sharded(h, return_weights=True)
        out_s.square().sum().backward()
        _close(out_s, out.detach(), f"{what} out")
        if topk is None:
            _close(weights_s, _split(weights.detach(), world, rank, 2), f"{what} weights")
        else:
            indices, expected = _local(weights, world, rank, full.keys.shape[0])
            assert torch.equal(weights_s.indices, indices), what
            _close(weights_s.weights, expected, f"{what} weights")
        for name, p in sharded.named_parameters():
            grad, expected = p.grad, dict(full.named_parameters())[name].grad
            if name in ("keys", "values"):
                assert grad.is_sparse == sparse, what
                grad, expected = grad.to_dense(), _split(expected.to_dense(), world, rank, 0)
            _close(grad, expected, f"{what} d{name}")
    with pytest.raises(ValueError, match="topk=9 is more than the memory's 8 slots"):
        ShardedKeyValueMemory(6, keys=torch.zeros(8 // world + (rank < 8 % world), 4),
                              values=torch.zeros(8 // world + (rank < 8 % world), 3), topk=9)
    # Built from num_slots on ranks seeded apart: own slots, the same replicated layers.
    torch.manual_seed(rank)
    # topk may be the whole memory, past any rank's slots.
    learned = ShardedKeyValueMemory(6, num_slots=3 * world + 2, key_dim=4, value_dim=3,
                                    topk=3 * world + 2)
    assert learned.keys.shape == (3 + (rank < 2), 4) and learned.topk == 3 * world + 2
    for p in learned.parameters():
        if p is not learned.keys and p is not learned.values:
            parts = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(parts, p.detach())
            assert all(torch.equal(part, parts[0]) for part in parts)


def _autocast_case(rank, world):
    """ShardedKeyValueMemory under bfloat16 autocast: its query layer's bfloat16 keys read
    the float32 shards in float32 (the ops' promotion), as KeyValueMemory reads the whole
    memory, dense and top-k."""
    for topk in (None, 3):
        full = KeyValueMemory(6, num_slots=4 * world + 1, key_dim=4, value_dim=3, topk=topk)
        sharded = ShardedKeyValueMemory(
            6, keys=_split(full.keys, world, rank, 0), values=_split(full.values, world, rank, 0),
            learn=True, topk=topk)
        sharded.load_state_dict({**full.state_dict(), "keys": sharded.keys,
                                 "values": sharded.values})
        h = torch.randn(3, 2, 6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = full(h)
            out_s = sharded(h)
        assert out_s.dtype == out.dtype == torch.float32
        out.square().sum().backward()
        out_s.square().sum().backward()
        _close(out_s, out.detach(), f"autocast topk={topk} out", tol=2e-5)
        for name, p in sharded.named_parameters():
            expected = dict(full.named_parameters())[name].grad
            if name in ("keys", "values"):
                expected = _split(expected, world, rank, 0)
            _close(p.grad, expected, f"autocast topk={topk} d{name}", tol=2e-5)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed(world):
    cases = [_layout_and_errors, _attention_cases, _score_mod_cases, _memory_cases, _topk_cases,
             _module_case, _subgroup]
    if world == 2:  # on one world size
        cases += [_alibi_precision, _autocast_case]
        if INTERPRET:  # the triton kernels run gloo's CPU tensors only through the interpreter
            cases += [functools.partial(_attention_cases, backend="triton"),
                      functools.partial(_score_mod_cases, backend="triton"),
                      functools.partial(_memory_cases, dtype=torch.float32, backend="triton"),
                      functools.partial(_topk_cases, dtype=torch.float32, backend="triton")]
    _spawn(world, cases)


def test_float16_shard_lse_of_nearly_flat_weights():
    """Past 16k slots of near-uniform weights, float16's top weight is subnormal: the
    shard's logsumexp is then scored from the slots, not read off the weights."""
    memory = torch.randn(1, 20000, 2, dtype=torch.float16)
    keys = torch.randn(1, 1, 2, dtype=torch.float16)
    strength = torch.full((1, 1), 0.01, dtype=torch.float16)
    weights = attnmem.memory_address(memory, keys, strength=strength, similarity="dot")
    lse = distributed._shard_lse(memory, keys, strength, "dot", None, weights)
    scores = keys.double() @ memory.double().transpose(1, 2) * strength.double()[..., None]
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-5, rtol=0)
