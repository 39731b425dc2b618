"""The NTM's location addressing over (B, R, N) weights: forward, backward and launchers.

w_g = g w_c + (1 - g) w_prev; w~(i) = sum_j s_j w_g((i - (j - S//2)) mod N);
w = w~^gamma / sum_i w~^gamma. Rows (b, r) are independent and N may be millions, so each
program owns one row and one split of its slots. The forward runs twice: once for each
split's sum of w~^gamma, once to normalise; nothing between the passes is stored. The
backward recomputes w~ where it needs it (its own slots and their shifted neighbours) and
writes per-split partial sums of the gate, shift and gamma gradients.
"""

import torch
import triton
import triton.language as tl

from attnmem.kernels._launch import interpreting, slot_splits

BLOCK_N = 256
INTERPRET_BLOCK_N = 16


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
def _sharpen(shifted, gamma):
    """w~^gamma, 0 where w~ is 0 (no log(0))."""
    positive = shifted > 0
    return tl.where(positive, tl.math.exp2(gamma * tl.math.log2(tl.where(positive, shifted,
                                                                            1.0))), 0.0)


@triton.jit
def _location_fwd(content_ptr, prev_ptr, gate_ptr, shift_ptr, gamma_ptr, part_ptr, total_ptr,
                  out_ptr, n_slots, n_shift, split_len, NORMALIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    gate = tl.load(gate_ptr + row).to(tl.float32)
    gamma = tl.load(gamma_ptr + row).to(tl.float32)
    total = 1.0
    if NORMALIZE:
        total = tl.load(total_ptr + row)
        total = tl.where(total > 0, total, 1.0)
    start = split * split_len
    end = tl.minimum(start + split_len, n_slots)
    partial = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        ok = slots < end
        sharp = _sharpen(_shifted(content_ptr, prev_ptr, shift_ptr, row, slots, ok, gate,
                                  n_slots, n_shift), gamma)
        sharp = tl.where(ok, sharp, 0.0)
        if NORMALIZE:
            tl.store(out_ptr + row * n_slots + slots, (sharp / total).to(
                out_ptr.dtype.element_ty), mask=ok)
        else:
            partial += sharp
    if not NORMALIZE:
        tl.store(part_ptr + row * tl.num_programs(0) + split, tl.sum(partial, 0))


@triton.jit
def _dshifted(content_ptr, prev_ptr, shift_ptr, dout_ptr, row, slots, ok, gate, gamma, total,
              centre, n_slots, n_shift):
    """(dL/dw~, w~, w~^gamma) at `slots`: w = w~^gamma / T, so dL/dw~^gamma = (dw - c) / T
    with c = sum_i dw_i w_i, and dw~^gamma/dw~ = gamma w~^(gamma - 1)."""
    shifted = _shifted(content_ptr, prev_ptr, shift_ptr, row, slots, ok, gate, n_slots, n_shift)
    sharp = _sharpen(shifted, gamma)
    dout = tl.load(dout_ptr + row * n_slots + slots, mask=ok, other=0.0).to(tl.float32)
    dsharp = tl.where(total > 0, (dout - centre) / tl.where(total > 0, total, 1.0), 0.0)
    positive = shifted > 0
    dshifted = tl.where(positive, dsharp * gamma * sharp / tl.where(positive, shifted, 1.0), 0.0)
    return tl.where(ok, dshifted, 0.0), shifted, tl.where(ok, dsharp * sharp, 0.0)


@triton.jit
def _location_bwd(content_ptr, prev_ptr, gate_ptr, shift_ptr, gamma_ptr, total_ptr, centre_ptr,
                  dout_ptr, dcontent_ptr, dprev_ptr, part_dgate_ptr, part_dshift_ptr,
                  part_dgamma_ptr, n_slots, n_shift, split_len, BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(0)
    gate = tl.load(gate_ptr + row).to(tl.float32)
    gamma = tl.load(gamma_ptr + row).to(tl.float32)
    total = tl.load(total_ptr + row)
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
        dshifted, shifted, dsharp_sharp = _dshifted(content_ptr, prev_ptr, shift_ptr, dout_ptr,
                                                    row, slots, ok, gate, gamma, total, centre,
                                                    n_slots, n_shift)
        positive = shifted > 0
        dgamma += tl.where(positive, dsharp_sharp * tl.log(tl.where(positive, shifted, 1.0)),
                           0.0)
        for j in range(n_shift):
            src = ((slots - (j - half)) % n_slots + n_slots) % n_slots
            wc = tl.load(content_ptr + row * n_slots + src, mask=ok, other=0.0).to(tl.float32)
            wp = tl.load(prev_ptr + row * n_slots + src, mask=ok, other=0.0).to(tl.float32)
            ptr = part_dshift_ptr + (row * n_splits + split) * n_shift + j
            tl.store(ptr, tl.load(ptr) + tl.sum(dshifted * (gate * wc + (1.0 - gate) * wp), 0))
        # dL/dw_g at own slots gathers dL/dw~ from the slots each one moves to.
        dgated = tl.zeros([BLOCK_N], tl.float32)
        for j in range(n_shift):
            s_j = tl.load(shift_ptr + row * n_shift + j).to(tl.float32)
            dst = ((slots + (j - half)) % n_slots + n_slots) % n_slots
            d_dst, _s, _g = _dshifted(content_ptr, prev_ptr, shift_ptr, dout_ptr, row, dst, ok,
                                      gate, gamma, total, centre, n_slots, n_shift)
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
    block_n = INTERPRET_BLOCK_N if interpreting() else BLOCK_N
    return (block_n, *slot_splits(n_slots, rows, block_n, device))


def location_address_forward(content, prev, gate, shift, gamma):
    """-> (weights (B, R, N) in content's dtype, float32 row sums of w~^gamma (B, R))."""
    content, prev, gate, shift, gamma = (x.contiguous() for x in
                                         (content, prev, gate, shift, gamma))
    batch, heads, n_slots = content.shape
    rows = batch * heads
    block_n, split_len, n_splits = _splits(n_slots, rows, content.device)
    part = torch.empty((batch, heads, n_splits), dtype=torch.float32, device=content.device)
    out = torch.empty_like(content)
    if content.numel() == 0:
        return out, part.zero_().sum(-1)
    args = (content, prev, gate, shift, gamma)
    _location_fwd[(n_splits, rows)](*args, part, part, out, n_slots, shift.shape[-1], split_len,
                                    NORMALIZE=False, BLOCK_N=block_n)
    total = part.sum(-1)
    _location_fwd[(n_splits, rows)](*args, part, total, out, n_slots, shift.shape[-1],
                                    split_len, NORMALIZE=True, BLOCK_N=block_n)
    return out, total


def location_address_backward(dout, out, total, content, prev, gate, shift, gamma):
    """-> dcontent, dprev, dgate, dshift, dgamma in the inputs' dtypes."""
    content, prev, gate, shift, gamma = (x.contiguous() for x in
                                         (content, prev, gate, shift, gamma))
    dout = dout.contiguous()
    batch, heads, n_slots = content.shape
    rows = batch * heads
    block_n, split_len, n_splits = _splits(n_slots, rows, content.device)
    centre = (dout.float() * out.float()).sum(-1).contiguous()
    f32 = dict(dtype=torch.float32, device=content.device)
    dcontent, dprev = torch.empty_like(content), torch.empty_like(prev)
    part_dgate = torch.empty((batch, heads, n_splits), **f32)
    part_dgamma = torch.empty((batch, heads, n_splits), **f32)
    part_dshift = torch.zeros((batch, heads, n_splits, shift.shape[-1]), **f32)
    if content.numel() == 0:
        return (dcontent, dprev, gate.new_zeros(gate.shape), shift.new_zeros(shift.shape),
                gamma.new_zeros(gamma.shape))
    _location_bwd[(n_splits, rows)](
        content, prev, gate, shift, gamma, total.contiguous(), centre, dout, dcontent, dprev,
        part_dgate, part_dshift, part_dgamma, n_slots, shift.shape[-1], split_len,
        BLOCK_N=block_n)
    return (dcontent, dprev, part_dgate.sum(-1).to(gate.dtype),
            part_dshift.sum(2).to(shift.dtype), part_dgamma.sum(-1).to(gamma.dtype))
