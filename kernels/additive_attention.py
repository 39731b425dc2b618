"""Additive (Bahdanau) attention: score(i, j) = v . tanh(q_i + k_j) over projected queries
q (B, Nq, A) and keys k (B, Nk, A), softmax over the keys, weighted sum of values (B, Nk, Dv).

The scores are never held as a (B, Nq, Nk, A) tensor: programs walk (query, key) tiles and
the attention width A in chunks, with an online softmax over the key tiles (flash-style).
The backward recomputes the scores from the logsumexp. One kernel serves both of its
halves: programs that own a key tile (dK, dValues and partial dv) or a query tile (dQ);
each program is the only writer of what it accumulates, so nothing uses atomics.
Tiles and warps are autotuned over the configs of CONFIGS, none of which spills registers
on sm_90, per value-width bucket, bucketed lengths, attention width and dtype.
The kernels are bound by that tanh: float16 and bfloat16 inputs with values on CUDA take the
hardware's (FAST_TANH: tanh.approx.f32, about 2^-11 relative error; kernels/_math.py),
float32 inputs and pointer attention (no values: float32 log-probabilities) an exact form.
"""

import torch
import triton
import triton.language as tl

from attnmem.kernels._launch import (
    block_width,
    kv_length,
    lastdim_contiguous,
    launch,
    length_bucket,
)
from attnmem.kernels._math import fast_tanh, tanh

LOG2E = tl.constexpr(1.4426950408889634)
# Value-width buckets per element size: a BLOCK_DV tunes over the configs of the first
# bucket at least as wide (float32 holds its value tiles in registers for the FMA dots, so
# 256 needs smaller tiles than 128).
VALUE_BUCKETS = {2: (64, 256), 4: (64, 128, 256)}
# (BLOCK_M, BLOCK_N, BLOCK_A, num_warps) autotuning candidates per kernel ("fwd", the
# backward's key-owning "dkv" and query-owning "dq" programs), element size and value-width
# bucket. Chosen from a sweep of BLOCK_M and BLOCK_N in 16 to 128, BLOCK_A in 4 to 32 and 4
# or 8 warps, compiled for sm_90 on triton 3.9 and 3.6 at the bucket's widest value width:
# each compiles without register spills on both there and at the bucket's narrower widths
# (ptxas is not monotonic: the float32 key-owning programs spill at 16 or 32 wide in tiles
# that do not at 64), fits sm_80's shared memory, and runs 16-bit value products on tensor
# cores (tests/test_additive_attention.py; reports/additive-tuning.md has the sweep). A
# table holds the earlier fixed config first where it still qualifies (the key-owning
# programs' spilled on triton 3.6 in float32 and at 256 in 16-bit; float32 at 256, where
# the earlier configs spilled, has a table of its own), a tile of 16 queries for decoding
# steps and short sequences, a larger tile, and another warp count, where such compile
# without spills. One stage: no loop of these kernels is pipelined (the loads that feed
# the dots sit outside the innermost loop), and 2 stages compiled to the same code.
CONFIGS = {
    ("fwd", 2, 64): [(64, 32, 8, 8), (16, 128, 8, 8), (32, 32, 4, 4)],
    ("fwd", 2, 256): [(64, 32, 8, 8), (16, 64, 16, 8), (32, 16, 8, 4)],
    ("fwd", 4, 64): [(64, 32, 8, 8), (16, 64, 16, 8), (32, 16, 8, 4)],
    ("fwd", 4, 128): [(32, 32, 8, 8), (16, 32, 16, 8), (32, 16, 8, 4)],
    ("fwd", 4, 256): [(32, 16, 8, 8), (16, 32, 16, 8), (16, 16, 8, 4)],
    ("dkv", 2, 64): [(64, 16, 8, 8), (16, 64, 4, 8), (32, 32, 4, 4)],
    ("dkv", 2, 256): [(32, 16, 16, 8), (16, 32, 16, 8), (16, 16, 16, 4)],
    ("dkv", 4, 64): [(16, 32, 16, 8), (16, 16, 16, 4)],
    ("dkv", 4, 128): [(32, 16, 8, 8), (16, 64, 8, 8), (16, 16, 16, 4)],
    ("dkv", 4, 256): [(32, 16, 8, 8), (16, 32, 8, 8), (16, 16, 8, 4)],
    ("dq", 2, 64): [(32, 16, 8, 4), (16, 128, 8, 8), (64, 16, 4, 8)],
    ("dq", 2, 256): [(32, 16, 8, 4), (16, 32, 16, 8), (32, 32, 8, 8)],
    ("dq", 4, 64): [(32, 16, 8, 4), (16, 64, 8, 8), (64, 16, 8, 8)],
    ("dq", 4, 128): [(32, 16, 8, 4), (16, 32, 8, 8), (32, 32, 8, 8)],
    ("dq", 4, 256): [(32, 16, 8, 4), (16, 32, 16, 8), (32, 32, 16, 8)],
}
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_A=8, num_warps=1, num_stages=1)
# dv_part holds a row per key tile of this many keys: tl.dot's smallest N, so that no
# config's key tiles are shorter and the buffer does not depend on the config.
DV_PART_BLOCK_N = 16
# The autotuning key beyond each launch's own flags (triton adds the dtypes).
TUNING_KEY = ["BLOCK_DV", "HAS_VALUES", "q_bucket", "k_bucket", "attn_bucket"]


def configs_for(kernel, elem, block_dv):
    """The autotuning configs of kernel ("fwd", "dkv" or "dq") at this element size and
    BLOCK_DV."""
    bucket = next(width for width in VALUE_BUCKETS[elem] if block_dv <= width)
    return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_A=a, num_warps=w, num_stages=1)
            for m, n, a, w in CONFIGS[(kernel, elem, bucket)]]


@triton.jit
def _tanh_tile(q_base, k_base, v_ptr, offs_m, offs_n, stride_qm, stride_kn, n_q, n_k, a0,
               attn_dim, BLOCK_A: tl.constexpr, FAST_TANH: tl.constexpr):
    """tanh(q_i + k_j) on the (M, N, BLOCK_A) tile of width chunk a0, and that chunk of v;
    keys j >= n_k read as zeros. FAST_TANH: the hardware's tanh (kernels._math.tanh)."""
    offs_a = a0 + tl.arange(0, BLOCK_A)
    in_a = offs_a < attn_dim
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_a[None, :],
                mask=(offs_m[:, None] < n_q) & in_a[None, :], other=0.0).to(tl.float32)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_a[None, :],
                mask=(offs_n[:, None] < n_k) & in_a[None, :], other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs_a, mask=in_a, other=0.0).to(tl.float32)
    return tanh(q[:, None, :] + k[None, :, :], FAST_TANH, SYMMETRIC=False), v


@triton.jit
def _scores(q_base, k_base, v_ptr, offs_m, offs_n, stride_qm, stride_kn, n_q, n_k, attn_dim,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
            FAST_TANH: tl.constexpr):
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for a0 in range(0, attn_dim, BLOCK_A):
        t, v = _tanh_tile(q_base, k_base, v_ptr, offs_m, offs_n, stride_qm, stride_kn, n_q, n_k,
                          a0, attn_dim, BLOCK_A, FAST_TANH)
        s += tl.sum(t * v[None, None, :], axis=2)
    return s


@triton.jit
def _additive_fwd(q_ptr, k_ptr, v_ptr, val_ptr, lengths_ptr, out_ptr, lse_ptr, scores_ptr,
                  stride_qb, stride_qm, stride_kb, stride_kn, stride_valb, stride_valn,
                  n_q, n_k, attn_dim, value_dim, q_bucket, k_bucket, attn_bucket,
                  HAS_LENGTHS: tl.constexpr, HAS_VALUES: tl.constexpr,
                  STORE_SCORES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
                  BLOCK_DV: tl.constexpr, FAST_TANH: tl.constexpr = False):
    """Programs own BLOCK_M queries of a batch entry. q_bucket, k_bucket and attn_bucket
    are the autotuning key only (see _buckets). FAST_TANH: the hardware's tanh
    (kernels._math.tanh; the launchers set it where fast_tanh allows)."""
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = q_ptr + b * stride_qb
    k_base = k_ptr + b * stride_kb
    stride_qm = tl.cast(stride_qm, tl.int64)
    stride_kn = tl.cast(stride_kn, tl.int64)
    stride_valn = tl.cast(stride_valn, tl.int64)
    rows = b * n_q + offs_m
    n_valid = kv_length(lengths_ptr, b, n_k, HAS_LENGTHS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Every visited tile holds a valid key, so the running max is finite after the first.
    for n0 in range(0, n_valid, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # Keys past n_valid load as zeros: whatever padding holds stays out of the tanh.
        s = _scores(q_base, k_base, v_ptr, offs_m, offs_n, stride_qm, stride_kn, n_q, n_valid,
                    attn_dim, BLOCK_M, BLOCK_N, BLOCK_A, FAST_TANH)
        s = tl.where(offs_n[None, :] < n_valid, s, float("-inf"))
        if STORE_SCORES:
            tl.store(scores_ptr + rows[:, None] * n_k + offs_n[None, :], s,
                     mask=(offs_m[:, None] < n_q) & (offs_n[None, :] < n_valid))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        p = tl.exp2((s - m_new[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if HAS_VALUES:
            vals = tl.load(val_ptr + b * stride_valb + offs_n[:, None] * stride_valn
                           + offs_dv[None, :],
                           mask=(offs_n[:, None] < n_valid) & (offs_dv[None, :] < value_dim),
                           other=0.0)
            acc = tl.dot(p.to(vals.dtype), vals, acc * alpha[:, None],
                         input_precision=DOT_PRECISION)
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=offs_m < n_q)
    if HAS_VALUES:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * value_dim + offs_dv[None, :],
                 out.to(out_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < n_q) & (offs_dv[None, :] < value_dim))


@triton.jit
def _additive_bwd(q_ptr, k_ptr, v_ptr, val_ptr, lengths_ptr, lse_ptr, delta_ptr, dout_ptr,
                  dscores_ptr, dq_ptr, dk_ptr, dval_ptr, dv_part_ptr,
                  stride_qb, stride_qm, stride_kb, stride_kn, stride_valb, stride_valn,
                  n_q, n_k, attn_dim, value_dim, q_bucket, k_bucket, attn_bucket,
                  OWN_KEYS: tl.constexpr,
                  HAS_LENGTHS: tl.constexpr, HAS_VALUES: tl.constexpr,
                  HAS_DSCORES: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
                  BLOCK_DV: tl.constexpr, FAST_TANH: tl.constexpr = False):
    """dS = P (dP - delta) + dScores, then dQ_i = sum_j dS_ij v (1 - t_ij^2), dK_j the same
    summed over i, dv = sum_ij dS_ij t_ij and dValues_j = sum_i P_ij dO_i. dq, dk and dv_part
    are float32 accumulators the owning program updates in place, chunk by chunk of A.
    FAST_TANH as in the forward."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_base = q_ptr + b * stride_qb
    k_base = k_ptr + b * stride_kb
    stride_qm = tl.cast(stride_qm, tl.int64)
    stride_kn = tl.cast(stride_kn, tl.int64)
    stride_valn = tl.cast(stride_valn, tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_valid = kv_length(lengths_ptr, b, n_k, HAS_LENGTHS)
    if OWN_KEYS:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        loop_end = tl.where(pid * BLOCK_N < n_valid, n_q, 0)
        step = BLOCK_M
        dval = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        if HAS_VALUES:
            vals = tl.load(val_ptr + b * stride_valb + offs_n[:, None] * stride_valn
                           + offs_dv[None, :],
                           mask=(offs_n[:, None] < n_valid) & (offs_dv[None, :] < value_dim),
                           other=0.0)
    else:
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        loop_end = n_valid
        step = BLOCK_N
    for start in range(0, loop_end, step):
        if OWN_KEYS:
            offs_m = start + tl.arange(0, BLOCK_M)
        else:
            offs_n = start + tl.arange(0, BLOCK_N)
        rows = b * n_q + offs_m
        valid = (offs_m[:, None] < n_q) & (offs_n[None, :] < n_valid)
        s = _scores(q_base, k_base, v_ptr, offs_m, offs_n, stride_qm, stride_kn, n_q, n_valid,
                    attn_dim, BLOCK_M, BLOCK_N, BLOCK_A, FAST_TANH)
        lse = tl.load(lse_ptr + rows, mask=offs_m < n_q, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        p = tl.where(valid, tl.exp2((s - lse[:, None]) * LOG2E), 0.0)
        delta = tl.load(delta_ptr + rows, mask=offs_m < n_q, other=0.0)
        dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_VALUES:
            dout = tl.load(dout_ptr + rows[:, None] * value_dim + offs_dv[None, :],
                           mask=(offs_m[:, None] < n_q) & (offs_dv[None, :] < value_dim),
                           other=0.0)
            if not OWN_KEYS:
                vals = tl.load(val_ptr + b * stride_valb + offs_n[:, None] * stride_valn
                               + offs_dv[None, :],
                               mask=(offs_n[:, None] < n_valid) & (offs_dv[None, :] < value_dim),
                               other=0.0)
            dp = tl.dot(dout, tl.trans(vals.to(dout.dtype)), input_precision=DOT_PRECISION)
            if OWN_KEYS:
                dval = tl.dot(tl.trans(p.to(dout.dtype)), dout, dval,
                              input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_DSCORES:
            ds += tl.load(dscores_ptr + rows[:, None] * n_k + offs_n[None, :], mask=valid,
                          other=0.0)
        for a0 in range(0, attn_dim, BLOCK_A):
            t, v = _tanh_tile(q_base, k_base, v_ptr, offs_m, offs_n, stride_qm, stride_kn, n_q,
                              n_valid, a0, attn_dim, BLOCK_A, FAST_TANH)
            offs_a = a0 + tl.arange(0, BLOCK_A)
            g = ds[:, :, None] * (1.0 - t * t) * v[None, None, :]
            if OWN_KEYS:
                ptrs = dk_ptr + (b * n_k + offs_n[:, None]) * attn_dim + offs_a[None, :]
                tile = (offs_n[:, None] < n_k) & (offs_a[None, :] < attn_dim)
                tl.store(ptrs, tl.load(ptrs, mask=tile) + tl.sum(g, 0), mask=tile)
                part = dv_part_ptr + (b * tl.num_programs(0) + pid) * attn_dim + offs_a
                dv = tl.sum(tl.sum(ds[:, :, None] * t, 0), 0)
                tl.store(part, tl.load(part, mask=offs_a < attn_dim) + dv,
                         mask=offs_a < attn_dim)
            else:
                ptrs = dq_ptr + (b * n_q + offs_m[:, None]) * attn_dim + offs_a[None, :]
                tile = (offs_m[:, None] < n_q) & (offs_a[None, :] < attn_dim)
                tl.store(ptrs, tl.load(ptrs, mask=tile) + tl.sum(g, 1), mask=tile)
        # The next tile reads back these accumulators, possibly from other threads.
        tl.debug_barrier()
    if OWN_KEYS and HAS_VALUES:
        tl.store(dval_ptr + b * n_k * value_dim + offs_n[:, None] * value_dim + offs_dv[None, :],
                 dval.to(dval_ptr.dtype.element_ty),
                 mask=(offs_n[:, None] < n_k) & (offs_dv[None, :] < value_dim))


def _meta(q, values):
    """The launches' shared constexprs. The hardware tanh where fast_tanh allows and there
    are values: without them (pointer attention) the scores leave as float32
    log-probabilities, which its 2^-11 relative error would move by up to 2^-11 of the
    scores' range (5e-3 at a range of 10, where 16-bit inputs get 4e-3:
    tests/test_fast_tanh.py)."""
    value_dim = 1 if values is None else values.shape[2]
    return dict(DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_DV=block_width(value_dim),
                FAST_TANH=values is not None and fast_tanh(q))


def _buckets(n_q, n_k, attn_dim):
    """(q_bucket, k_bucket, attn_bucket): the shape as the autotuning key sees it, coarse
    enough that one model tunes a handful of times; the query bucket tells a decoding step
    (a tile of BLOCK_M queries holding one) from a whole sequence."""
    return length_bucket(n_q, 4), length_bucket(n_k, 4), triton.next_power_of_2(attn_dim)


def _strides(q, k, values):
    return (q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            0 if values is None else values.stride(0), 0 if values is None else values.stride(1))


def additive_attention_forward(q, k, v, values, kv_lengths, need_scores):
    """-> out (B, Nq, Dv) (empty without values), lse (B, Nq) float32, and scores
    (B, Nq, Nk) float32 with -inf past the lengths (empty unless need_scores)."""
    q, k, v, values = (lastdim_contiguous(x) for x in (q, k, v.contiguous(), values))
    batch, n_q, attn_dim = q.shape
    n_k = k.shape[1]
    value_dim = 0 if values is None else values.shape[2]
    out = torch.empty((batch, n_q, value_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_q), dtype=torch.float32, device=q.device)
    scores = torch.full((batch, n_q, n_k) if need_scores else (0,), float("-inf"),
                        dtype=torch.float32, device=q.device)
    if batch * n_q == 0:
        return out, lse, scores
    meta = _meta(q, values)
    launch(_additive_fwd, lambda c: (triton.cdiv(n_q, c["BLOCK_M"]), batch),
           (q, k, v, values, kv_lengths, None if values is None else out, lse,
            scores if need_scores else None, *_strides(q, k, values), n_q, n_k, attn_dim,
            value_dim, *_buckets(n_q, n_k, attn_dim)),
           dict(meta, HAS_LENGTHS=kv_lengths is not None, HAS_VALUES=values is not None,
                STORE_SCORES=need_scores),
           configs_for("fwd", q.element_size(), meta["BLOCK_DV"]),
           [*TUNING_KEY, "STORE_SCORES"], INTERPRET_CONFIG)
    return out, lse, scores


def additive_attention_backward(dout, dscores, dlse, q, k, v, values, kv_lengths, out, lse):
    """-> dq, dk, dv, dvalues (None without values) in the inputs' dtypes. dout may be None
    (no values), dscores and dlse None when those outputs got no gradient."""
    q, k, values = (lastdim_contiguous(x) for x in (q, k, values))
    v = v.contiguous()
    batch, n_q, attn_dim = q.shape
    n_k = k.shape[1]
    value_dim = 0 if values is None else values.shape[2]
    delta = torch.zeros((batch, n_q), dtype=torch.float32, device=q.device)
    if values is not None:
        dout = dout.to(q.dtype).contiguous()
        delta += (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta -= dlse.float()
    if dscores is not None:
        dscores = dscores.float().contiguous()
    dq = torch.zeros((batch, n_q, attn_dim), dtype=torch.float32, device=q.device)
    dk = torch.zeros((batch, n_k, attn_dim), dtype=torch.float32, device=q.device)
    # Row b * (key tiles) + tile: as many rows as the smallest key tile makes, whichever
    # config runs; larger tiles leave the last rows zero.
    dv_part = torch.zeros((batch * triton.cdiv(n_k, DV_PART_BLOCK_N), attn_dim),
                          dtype=torch.float32, device=q.device)
    dvalues = None if values is None else torch.zeros(
        (batch, n_k, value_dim), dtype=values.dtype, device=q.device)
    if batch * n_q * n_k > 0:
        args = (q, k, v, values, kv_lengths, lse, delta, dout, dscores, dq, dk, dvalues,
                dv_part, *_strides(q, k, values), n_q, n_k, attn_dim, value_dim,
                *_buckets(n_q, n_k, attn_dim))
        meta = dict(_meta(q, values), HAS_LENGTHS=kv_lengths is not None,
                    HAS_VALUES=values is not None, HAS_DSCORES=dscores is not None)
        key = [*TUNING_KEY, "HAS_DSCORES", "OWN_KEYS"]
        # Both halves add into float32 accumulators: zeroed before every timed launch.
        launch(_additive_bwd, lambda c: (triton.cdiv(n_k, c["BLOCK_N"]), batch), args,
               dict(meta, OWN_KEYS=True),
               configs_for("dkv", q.element_size(), meta["BLOCK_DV"]), key, INTERPRET_CONFIG,
               reset_to_zero=["dk_ptr", "dv_part_ptr"])
        launch(_additive_bwd, lambda c: (triton.cdiv(n_q, c["BLOCK_M"]), batch), args,
               dict(meta, OWN_KEYS=False),
               configs_for("dq", q.element_size(), meta["BLOCK_DV"]), key, INTERPRET_CONFIG,
               reset_to_zero=["dq_ptr"])
    return (dq.to(q.dtype), dk.to(k.dtype), dv_part.sum(0).to(v.dtype), dvalues)
