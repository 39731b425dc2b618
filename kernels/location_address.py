"""The NTM's location addressing over (B, R, N) weights: forward, backward and launchers.

w_g = g w_c + (1 - g) w_prev; w~(i) = sum_j s_j w_g((i - (j - S//2)) mod N);
w = w~^gamma / sum_i w~^gamma, computed as a softmax over slots of gamma log w~ so that a
sharp gamma never underflows a row to zeros. Rows (b, r) are independent and N may be
millions, so each program owns one row and one split of its slots. The forward runs twice:
once for each split's running max and sum of exp2(logit - max) (an online softmax), once to
normalise by the row's max and sum, kept apart: a logsumexp near gamma log2 w~ ~ -1000
would round every weight by float32's step there. Nothing between the passes is stored.
The backward recomputes w~ and w where it needs them (its own slots and their shifted
neighbours) and writes per-split partial sums of the gate, shift and gamma gradients.
"""

import torch
import triton
import triton.language as tl

from attnmem.kernels._launch import (
    combine_splits,
    interpreting,
    launch,
    slot_configs,
    slot_splits,
)

# (BLOCK_N, num_warps, num_stages), autotuned per kernel, dtype and shift count: slots are
# gathered through the circular shift, a few registers each; none spills on sm_90
# (tests/test_location_address.py). Splits are whole multiples of the largest BLOCK_N, so
# the grid is the same for every config.
CONFIGS = [(256, 4, 2), (512, 4, 2), (128, 4, 3), (512, 8, 2), (1024, 8, 2)]
SPLIT_QUANTUM = 1024
INTERPRET_CONFIG = dict(BLOCK_N=16, num_warps=1, num_stages=1)


@triton.jit
def _shifted(content_ptr, prev_ptr, shift_ptr, row, slots, ok, gate, n_slots, n_shift):
    """w~ at `slots` of one row."""
    half = n_shift // 2
    acc = tl.zeros(slots.shape, tl.float32)
    for j in range(n_shift):
        s_j = tl.load(shift_ptr + row * n_shift + j).to(tl.float32)
        src = ((slots - (j - half)) % n_slots + n_slots) % n_slots
        wc = tl.load(content_ptr + row * n_slots + src, mask=ok, other=0.0).to(tl.float32)
        wp = tl.load(prev_ptr + row * n_slots + src, mask=ok, other=0.0).to(tl.float32)
        acc += s_j * (gate * wc + (1.0 - gate) * wp)
    return acc


@triton.jit
def _logits(shifted, gamma):
    """gamma log2 w~, -inf where w~ is 0 (no log(0))."""
    positive = shifted > 0
    return tl.where(positive, gamma * tl.math.log2(tl.where(positive, shifted, 1.0)),
                    float("-inf"))


@triton.jit
def _location_fwd(content_ptr, prev_ptr, gate_ptr, shift_ptr, gamma_ptr, part_max_ptr,
                  part_sum_ptr, row_max_ptr, row_sum_ptr, out_ptr, n_slots, n_shift, split_len,
                  NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    gate = tl.load(gate_ptr + row).to(tl.float32)
    gamma = tl.load(gamma_ptr + row).to(tl.float32)
    row_max = 0.0
    row_sum = 1.0
    if NORMALIZE:
        row_max = tl.load(row_max_ptr + row)
        row_sum = tl.load(row_sum_ptr + row)
    start = split * split_len
    end = tl.minimum(start + split_len, n_slots)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        ok = slots < end
        logits = _logits(_shifted(content_ptr, prev_ptr, shift_ptr, row, slots, ok, gate,
                                  n_slots, n_shift), gamma)
        logits = tl.where(ok, logits, float("-inf"))
        if NORMALIZE:
            tl.store(out_ptr + row * n_slots + slots,
                     (tl.math.exp2(logits - row_max) / row_sum).to(out_ptr.dtype.element_ty),
                     mask=ok)
        else:
            m_new = tl.maximum(m_i, logits)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.math.exp2(logits - m_safe)
            m_i = m_new
    if not NORMALIZE:
        m = tl.max(m_i, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        part = row * tl.num_programs(0) + split
        tl.store(part_max_ptr + part, m)
        tl.store(part_sum_ptr + part, tl.sum(l_i * tl.math.exp2(m_i - m_safe), 0))


@triton.jit
def _dshifted(content_ptr, prev_ptr, shift_ptr, dout_ptr, row, slots, ok, gate, gamma,
              row_max, row_sum, centre, n_slots, n_shift):
    """(dL/dw~, w~, dL/dlogit) at `slots`. w = softmax(gamma ln w~), so the gradient of the
    logit gamma ln w~ is w (dw - c) with c = sum_i dw_i w_i, and dL/dw~ = gamma/w~ times it."""
    shifted = _shifted(content_ptr, prev_ptr, shift_ptr, row, slots, ok, gate, n_slots, n_shift)
    weight = tl.math.exp2(_logits(shifted, gamma) - row_max) / row_sum
    dout = tl.load(dout_ptr + row * n_slots + slots, mask=ok, other=0.0).to(tl.float32)
    dlogit = tl.where(ok, weight * (dout - centre), 0.0)
    positive = shifted > 0
    dshifted = tl.where(positive, dlogit * gamma / tl.where(positive, shifted, 1.0), 0.0)
    return dshifted, shifted, dlogit


@triton.jit
def _location_bwd(content_ptr, prev_ptr, gate_ptr, shift_ptr, gamma_ptr, row_max_ptr,
                  row_sum_ptr, centre_ptr, dout_ptr, dcontent_ptr, dprev_ptr, part_dgate_ptr,
                  part_dshift_ptr, part_dgamma_ptr, n_slots, n_shift, split_len,
                  BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(0)
    gate = tl.load(gate_ptr + row).to(tl.float32)
    gamma = tl.load(gamma_ptr + row).to(tl.float32)
    row_max = tl.load(row_max_ptr + row)
    row_sum = tl.load(row_sum_ptr + row)
    centre = tl.load(centre_ptr + row)
    half = n_shift // 2
    start = split * split_len
    end = tl.minimum(start + split_len, n_slots)
    dgate = tl.zeros([BLOCK_N], tl.float32)
    dgamma = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        ok = slots < end
        # Own slots: the gamma and shift gradients.
        dshifted, shifted, dlogit = _dshifted(content_ptr, prev_ptr, shift_ptr, dout_ptr, row,
                                              slots, ok, gate, gamma, row_max, row_sum, centre,
                                              n_slots, n_shift)
        positive = shifted > 0
        dgamma += tl.where(positive, dlogit * tl.log(tl.where(positive, shifted, 1.0)), 0.0)
        for j in range(n_shift):
            src = ((slots - (j - half)) % n_slots + n_slots) % n_slots
            wc = tl.load(content_ptr + row * n_slots + src, mask=ok, other=0.0).to(tl.float32)
            wp = tl.load(prev_ptr + row * n_slots + src, mask=ok, other=0.0).to(tl.float32)
            ptr = part_dshift_ptr + (row * n_splits + split) * n_shift + j
            tl.store(ptr, tl.load(ptr) + tl.sum(dshifted * (gate * wc + (1.0 - gate) * wp), 0))
        # The next tile reads these sums back, possibly in other threads than stored them.
        tl.debug_barrier()
        # dL/dw_g at own slots gathers dL/dw~ from the slots each one moves to.
        dgated = tl.zeros([BLOCK_N], tl.float32)
        for j in range(n_shift):
            s_j = tl.load(shift_ptr + row * n_shift + j).to(tl.float32)
            dst = ((slots + (j - half)) % n_slots + n_slots) % n_slots
            d_dst, _s, _g = _dshifted(content_ptr, prev_ptr, shift_ptr, dout_ptr, row, dst, ok,
                                      gate, gamma, row_max, row_sum, centre, n_slots, n_shift)
            dgated += s_j * d_dst
        wc = tl.load(content_ptr + row * n_slots + slots, mask=ok, other=0.0).to(tl.float32)
        wp = tl.load(prev_ptr + row * n_slots + slots, mask=ok, other=0.0).to(tl.float32)
        dgate += tl.where(ok, dgated * (wc - wp), 0.0)
        tl.store(dcontent_ptr + row * n_slots + slots,
                 (gate * dgated).to(dcontent_ptr.dtype.element_ty), mask=ok)
        tl.store(dprev_ptr + row * n_slots + slots,
                 ((1.0 - gate) * dgated).to(dprev_ptr.dtype.element_ty), mask=ok)
    tl.store(part_dgate_ptr + row * n_splits + split, tl.sum(dgate, 0))
    tl.store(part_dgamma_ptr + row * n_splits + split, tl.sum(dgamma, 0))


def _splits(n_slots, rows, device):
    quantum = INTERPRET_CONFIG["BLOCK_N"] if interpreting() else SPLIT_QUANTUM
    return slot_splits(n_slots, rows, quantum, device)


def _launch(kernel, grid, args, meta, **options):
    launch(kernel, lambda m: grid, args, meta, slot_configs(CONFIGS), ["n_shift", "NORMALIZE"]
           if kernel is _location_fwd else ["n_shift"], INTERPRET_CONFIG, **options)


def location_address_forward(content, prev, gate, shift, gamma):
    """-> (weights (B, R, N) in content's dtype, float32 (2, B, R) row statistics: the max
    of gamma log2 w~ and the sum of exp2(gamma log2 w~ - max); 0 and 1 for a row of zeros,
    whose weights stay 0)."""
    content, prev, gate, shift, gamma = (x.contiguous() for x in
                                         (content, prev, gate, shift, gamma))
    batch, heads, n_slots = content.shape
    rows = batch * heads
    split_len, n_splits = _splits(n_slots, rows, content.device)
    f32 = dict(dtype=torch.float32, device=content.device)
    out = torch.empty_like(content)
    if content.numel() == 0:
        return out, torch.stack([torch.zeros((batch, heads), **f32),
                                 torch.ones((batch, heads), **f32)])
    part_max = torch.empty((batch, heads, n_splits), **f32)
    part_sum = torch.empty((batch, heads, n_splits), **f32)
    args = (content, prev, gate, shift, gamma, part_max, part_sum)
    # The first pass writes the splits' statistics and reads no row statistics (the
    # partials stand in for them).
    _launch(_location_fwd, (n_splits, rows),
            (*args, part_max, part_sum, out, n_slots, shift.shape[-1], split_len),
            dict(NORMALIZE=False))
    stats, _ = combine_splits(part_max.transpose(1, 2), part_sum.transpose(1, 2), exp2=True)
    _launch(_location_fwd, (n_splits, rows),
            (*args, *stats, out, n_slots, shift.shape[-1], split_len), dict(NORMALIZE=True))
    return out, stats


def location_address_backward(dout, out, stats, content, prev, gate, shift, gamma):
    """-> dcontent, dprev, dgate, dshift, dgamma in the inputs' dtypes."""
    content, prev, gate, shift, gamma = (x.contiguous() for x in
                                         (content, prev, gate, shift, gamma))
    dout = dout.contiguous()
    batch, heads, n_slots = content.shape
    rows = batch * heads
    split_len, n_splits = _splits(n_slots, rows, content.device)
    centre = (dout.float() * out.float()).sum(-1).contiguous()
    f32 = dict(dtype=torch.float32, device=content.device)
    dcontent, dprev = torch.empty_like(content), torch.empty_like(prev)
    part_dgate = torch.empty((batch, heads, n_splits), **f32)
    part_dgamma = torch.empty((batch, heads, n_splits), **f32)
    part_dshift = torch.zeros((batch, heads, n_splits, shift.shape[-1]), **f32)
    if content.numel() == 0:
        return (dcontent, dprev, gate.new_zeros(gate.shape), shift.new_zeros(shift.shape),
                gamma.new_zeros(gamma.shape))
    _launch(_location_bwd, (n_splits, rows),
            (content, prev, gate, shift, gamma, *stats.contiguous(), centre, dout, dcontent,
             dprev, part_dgate, part_dshift, part_dgamma, n_slots, shift.shape[-1], split_len),
            {}, reset_to_zero=["part_dshift_ptr"])
    return (dcontent, dprev, part_dgate.sum(-1).to(gate.dtype),
            part_dshift.sum(2).to(shift.dtype), part_dgamma.sum(-1).to(gamma.dtype))
