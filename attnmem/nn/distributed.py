"""Modules over a memory split across the ranks of a torch.distributed process group."""

import torch.distributed as dist

from attnmem import distributed
from attnmem.nn import _checks
from attnmem.nn.memory import KeyValueMemory


class ShardedKeyValueMemory(KeyValueMemory):
    """KeyValueMemory whose slots are split across the ranks of group (the default group if
    None), so that a model reads a memory larger than one device holds: each rank holds its
    own keys (N_rank, Dk) and values (N_rank, Dv), and every read attends over all slots
    (attnmem.distributed.memory_attend).

    Pass this rank's keys and values, or num_slots, the memory's total slot count, to learn
    a memory from a random start: rank r then holds the r-th of world-size parts as
    torch.tensor_split cuts them (seed each rank differently for different slots). The
    query, output and gate layers are replicated: they start from group rank 0's, and every
    rank passes the same h and gets the same output and the same gradients for them; the
    slots' gradients stay on their rank. forward's mask (B, N_rank) and the weights it
    returns (B, N_rank) or (B, R, N_rank) cover this rank's slots.

    topk=K reads each query's K best-scoring slots over all ranks
    (attnmem.distributed.memory_attend's topk): each rank offers its own K best (all its
    slots where it holds fewer), and only the K chosen slots' keys and values get
    gradients, on the ranks that hold them. K must not exceed the total slot count (one
    all-reduce of the shard sizes checks it here) and may exceed a rank's; forward's
    weights are then SparseWeights (B, K) or (B, R, K) of this rank's slot indices, -1 and
    weight 0 where another rank holds the slot. sparse=True (with topk) makes the keys' and
    values' gradients sparse COO tensors of the touched slots, as in KeyValueMemory.
    Under torch.autocast the shards are read in their own dtype, as in KeyValueMemory.
    """

    def __init__(self, state_dim, num_slots=None, key_dim=None, value_dim=None, keys=None,
                 values=None, learn=None, similarity="scaled_dot", group=None, topk=None,
                 sparse=False):
        world, rank = distributed._group(group)
        total = None
        if num_slots is not None and keys is None:
            total = _checks.integer("num_slots", num_slots, 0)
            num_slots = total // world + (rank < total % world)
        topk = _checks.optional_integer("topk", topk)
        sparse = _checks.flag("sparse", sparse)
        if sparse and topk is None:
            raise ValueError("sparse=True needs topk: a dense read touches every slot")
        # KeyValueMemory would check topk against this rank's slots: it is checked against
        # all ranks' below.
        super().__init__(state_dim, num_slots, key_dim, value_dim, keys, values, learn,
                         similarity)
        if topk is not None:
            if total is None:
                sizes = [None] * world
                dist.all_gather_object(sizes, self.keys.shape[0], group=group)
                total = sum(sizes)
            if topk > total:
                raise ValueError(f"topk={topk} is more than the memory's {total} slots "
                                 f"(over all ranks)")
        self.topk, self.sparse = topk, sparse
        self.group = group
        # Object collectives: an NCCL group moves them through the current CUDA device,
        # while the layers may still sit on the CPU.
        source = 0 if group is None else dist.get_global_rank(group, 0)
        layers = (self.query, self.out, self.gate)
        states = [[layer.state_dict() for layer in layers]]
        dist.broadcast_object_list(states, src=source, group=group)
        for layer, state in zip(layers, states[0]):
            layer.load_state_dict(state)

    def _memory_attend(self, *args, **kwargs):
        return distributed.memory_attend(*args, group=self.group, **kwargs)
