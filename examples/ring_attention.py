"""Context-parallel attention and a sharded external memory over N processes.

Each rank holds 1/N of the sequence (the zig-zag layout when causal) and runs
attnmem.distributed.ring_attention forward and backward; the result is checked against
attnmem.attention on the whole sequence in one process, and both are timed. Then a memory of
--slots slots, split across the ranks, is read with attnmem.distributed.memory_attend and
checked the same way.

    torchrun --nproc-per-node N examples/ring_attention.py [--seq 4096] [--causal]
    python examples/ring_attention.py --nproc 2 [--seq 4096]   # spawns N CPU processes

On CUDA devices (under torchrun, one GPU a rank) the ranks talk over NCCL; on the CPU over
gloo, where attnmem runs its pure-torch fallback: CPU timings say nothing about the kernels
or about NVLink.
"""

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnmem
from attnmem import distributed


def median_ms(fn, device, reps):
    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))
                          ) if dist.get_backend() == "nccl" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"attnmem {attnmem.__version__} | {world} ranks over {dist.get_backend()} on "
        f"{device.type} | torch {torch.__version__} | {torch.get_num_threads()} threads a rank")
    b, h, hkv, n, d = args.batch, args.heads, args.kv_heads, args.seq, args.head_dim
    ev = args.value_head_dim or d
    say(f"B={b} H={h} Hkv={hkv} N={n} D={d} Ev={ev} causal={args.causal} {dtype}; "
        f"{n // world} positions a rank\n")

    torch.manual_seed(0)  # the same full tensors on every rank
    full = [torch.randn(b, heads, n, dim, device=device, dtype=dtype)
            for heads, dim in ((h, d), (hkv, d), (hkv, ev))]
    dout = torch.randn(b, h, n, ev, device=device, dtype=dtype)
    shard = [distributed.shard_sequence(x, causal=args.causal).requires_grad_() for x in full]
    dout_shard = distributed.shard_sequence(dout, causal=args.causal)

    def ring_step():
        out = distributed.ring_attention(*shard, causal=args.causal)
        return out, torch.autograd.grad(out, shard, dout_shard)

    whole = [x.clone().requires_grad_() for x in full]

    def whole_step():
        out = attnmem.attention(*whole, causal=args.causal)
        return out, torch.autograd.grad(out, whole, dout)

    out, grads = ring_step()
    ref_out, ref_grads = whole_step()
    err = max((a.float() - distributed.shard_sequence(e, causal=args.causal).float()
               ).abs().max().item() for a, e in zip((out, *grads), (ref_out, *ref_grads)))
    err = torch.tensor(err, device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    say(f"max |ring - one process| over out, dq, dk, dv, all ranks: {err.item():.2e}")

    elements = b * hkv * (n // world) * (d + ev)  # of a rank's k and v
    say(f"each rank sends {world - 1} x {elements * full[1].element_size() / 2**20:.2f} MiB "
        f"of k, v forward; backward {world - 1} x that and {world} x "
        f"{elements * 4 / 2**20:.2f} MiB of float32 dk, dv")
    ring_ms = torch.tensor(median_ms(ring_step, device, args.reps), device=device)
    dist.all_reduce(ring_ms, op=dist.ReduceOp.MAX)
    say(f"ring attention forward+backward: {ring_ms.item():.1f} ms a step (median of "
        f"{args.reps}, slowest rank)")
    if args.time_whole:
        whole_ms = median_ms(whole_step, device, args.reps)
        say(f"one process, whole sequence, same threads: {whole_ms:.1f} ms a step")

    # A memory of --slots slots, split across the ranks along the slots.
    slots = args.slots
    memory = torch.randn(b, slots, d, device=device, dtype=dtype)
    keys = torch.randn(b, 4, d, device=device, dtype=dtype, requires_grad=True)
    mine = torch.tensor_split(memory, world, 1)[rank].clone().requires_grad_()
    whole_memory = memory.clone().requires_grad_()

    def sharded_step():
        read = distributed.memory_attend(mine, keys, similarity="scaled_dot")
        return read, torch.autograd.grad(read.sum(), (mine, keys))

    def whole_memory_step():
        read = attnmem.memory_attend(whole_memory, keys, similarity="scaled_dot")
        return read, torch.autograd.grad(read.sum(), (whole_memory, keys))

    (read, (_, dkeys)), (expect, (_, expect_dkeys)) = sharded_step(), whole_memory_step()
    err = torch.tensor(max((read.float() - expect.float()).abs().max().item(),
                           (dkeys.float() - expect_dkeys.float()).abs().max().item()),
                       device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    say(f"\nsharded memory: {slots} slots, {mine.shape[1]} on rank 0; max |sharded - one "
        f"process| over the read and dkeys {err.item():.2e}")
    memory_ms = torch.tensor(median_ms(sharded_step, device, args.reps), device=device)
    dist.all_reduce(memory_ms, op=dist.ReduceOp.MAX)
    say(f"sharded memory_attend forward+backward: {memory_ms.item():.1f} ms a step")
    if args.time_whole:
        say(f"one process, whole memory: {median_ms(whole_memory_step, device, args.reps):.1f}"
            " ms a step")


def worker(rank, world, port, args):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2,
                        help="processes to spawn when not started by torchrun")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--value-head-dim", type=int, default=None,
                        help="v's head dim, apart from q's and k's (MLA's 128 under 192); "
                        "default --head-dim")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--slots", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--time-whole", action="store_true",
                        help="also time attention on the whole sequence, and the whole "
                        "memory, in each process")
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
        try:
            run(args)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.nproc, port, args), nprocs=args.nproc)


if __name__ == "__main__":
    main()
