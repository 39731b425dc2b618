"""Running top-k in registers, shared by the product-key selection and memory_attend's
top-k path: a float32 score and an int32 index packed into one int64 whose integer order is
(score, -index), so that one integer tl.topk orders by score and breaks ties towards the
lower index, as the torch twins' stable sorts do."""

import triton
import triton.language as tl

EMPTY = tl.constexpr(-(2**63))  # below every packed entry: a slot that holds nothing


@triton.jit
def pack(score, index, valid):
    """int64 keys ordered as (score, -index); invalid entries below every valid one."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 and 0.0 tie, as they compare
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    ordered = tl.where(valid, ordered, -2147483648)
    low = tl.where(valid, 0x7FFFFFFF - index, 0)
    return (ordered.to(tl.int64) << 32) | low.to(tl.int64)


@triton.jit
def unpack(packed):
    """-> (score float32, index int32) of keys made by pack."""
    ordered = (packed >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (packed & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def merge(best, new, K: tl.constexpr):
    """The K largest keys of best (BLOCK_B, K) and new (BLOCK_B, N >= K), in order."""
    if new.shape[1] > K:
        new = tl.topk(new, K)
    both = tl.reshape(tl.join(best, new), (best.shape[0], 2 * K))
    return tl.topk(both, K)
