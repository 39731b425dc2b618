"""Tiled softmax attention (FlashAttention-2 style): forward, backward and their launchers.

Layout: q, dq (B, H, Nq, D); out, dout (B, H, Nq, Ev); k, dk (B, Hkv, Nk, D); v, dv
(B, Hkv, Nk, Ev); lse, delta (B, H, Nq) float32. v's head dim Ev may differ from D (SDPA's;
multi-head latent attention's D = 192, Ev = 128): the kernels then take HEAD_DV and BLOCK_DV
for v's, out's and dO's columns, and run the configs of the larger head dim. Query head h
reads kv head h // (H // Hkv). A head dim D that is no power of 2 runs in a main tile of the
largest power of 2 below it and a tail tile, where the two stage fewer columns than one
padded tile (tail_head_dims_meta: D = 192 as 128 + 64 columns rather than 256, 96 as 64 + 32):
the kernels take BLOCK_DT, sum the two tiles' products for S and keep two accumulators for
dK and dQ; v's head dim keeps one tile (BLOCK_DV); the FP8 forward keeps one padded tile.
Masks are one window of key offsets around each query's bottom-right aligned position
a = i + Nk - Nq: key j is visible iff a - window_left <= j <= a + window_right and
j < kv_len (see attnmem.reference.attention).
Each program visits only the tiles its mask leaves non-empty, and evaluates the mask only on
the tiles at the edges of the visible band. There, keys that no query of the tile sees are
loaded as zeros, so that padding holding NaN or inf contributes nothing (a zero weight
times NaN is still NaN).

The forward is one body specialised at compile time: without a mask (and with Nk a multiple
of KEY_TILE_MULTIPLE) it compiles one unmasked loop; on sm_90 its configs may load and store
through TMA descriptors (USE_TMA, where strides are 16-byte aligned) and warp-specialize that
loop (WARP_SPECIALIZE). Masked, it runs the tiles that need the mask apart from those that
do not, in three loops; warp-specialized, in one loop that masks every tile. Results are the
same whichever config runs, up to rounding.

The backward's dK/dV programs own a key tile and loop over every (query head of their group,
query tile) pair. By default they also add dQ into a float32 buffer with atomics: 5 GEMMs
per pair, as FlashAttention-2 and -3 run. The deterministic backward (ATOMIC_DQ off, chosen
as torch chooses: torch.are_deterministic_algorithms_enabled()) leaves dQ to programs that
own a query tile: 7 GEMMs per pair, and nothing accumulates through atomics.

Packed variable-length batches (VARLEN, FlashAttention's varlen layout): q (total_q, H, D),
k, v (total_k, Hkv, D), sequence b in rows cu_seqlens[b] to cu_seqlens[b + 1]; lse and
delta (H, total_q). The launchers pass the tensors as (1, H, total, D) views with batch
stride 0 and launch the grid's last axis over sequences, sized by the longest: each program
reads its sequence's bounds, moves its bases to the sequence's first rows and runs the dense
body there, with the sequence's own lengths as Nq and Nk (so masks align to them); tiles past
a sequence's end exit at once. The other flags need nothing more: b, the sequence's index,
selects its row of (B, H) ALiBi slopes and is the batch word of its dropout counters, and the
sinks' gradient reduces over the packed lse and delta.
FP8 alone needs more: its V^T is laid out by the launcher with each sequence's keys from a
16-byte boundary (_packed_keys_major), and b selects the sequence's descales.

Dropout (DROPOUT, compiled out when off) zeroes the weights that _dropout_keep drops, from
a seed in device memory, and scales the rest; each kernel draws a pair's number from the
pair's own Philox counter, so the backward regenerates the forward's mask.

Score modifications are constexpr flags too, compiled out when off: SOFTCAP (Gemma 2's tanh
cap) and HAS_ALIBI (ALiBi's distance bias) in all three kernels, HAS_SINKS in the forward
only. A sink enters each row's softmax as a key seen first, of value zero, so lse includes
it: the backward's p = exp(s - lse) and delta = rowsum(dO * O) then need nothing more, and
the sinks' gradient is one reduction over lse and delta in the launcher.
"""

import contextlib
import contextvars

import torch
import triton
import triton.language as tl

from attnmem.kernels._launch import (
    block_width,
    interpreting,
    kv_length,
    lastdim_contiguous,
    length_bucket,
    run_tuned,
    tuning_options,
    within,
)
from attnmem.kernels._math import fast_tanh, tanh

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# FP8: the forward's weights are exp2(s - m + FP8_P_OFFSET), in [0, 2^8] (e4m3 holds up to 448).
FP8_P_OFFSET = tl.constexpr(8.0)
FP8_P_SCALE = tl.constexpr(256.0)

# Shared memory a block may use: sm_80 (A100) and sm_90 (H100) opt-in limits.
SMEM_LIMIT = {80: 166912, 90: 232448}


# ---------------------------------------------------------------------------------------
# Tile ranges
# ---------------------------------------------------------------------------------------


@triton.jit
def _key_range(row_first, row_last, offset, kv_len, window_left, window_right,
               BLOCK_N: tl.constexpr):
    """Key tiles for query rows [row_first, row_last]: keys in [lo, hi) are visible to some
    row; tiles in [full_lo, full_hi) are visible to every row and need no mask."""
    lo = tl.maximum(row_first + offset - window_left, 0)
    hi = tl.minimum(row_last + offset + window_right + 1, kv_len)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(row_last + offset - window_left, lo)
    full_hi = tl.minimum(row_first + offset + window_right + 1, hi)
    full_lo = tl.minimum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, tl.maximum(hi, lo))
    full_hi = tl.maximum((full_hi // BLOCK_N) * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(key_first, key_last, offset, n_q, kv_len, window_left, window_right,
                 BLOCK_M: tl.constexpr):
    """Query tiles for keys [key_first, key_last] (all below kv_len): rows in [lo, hi) see
    some key; tiles in [full_lo, full_hi) see every key of the tile."""
    lo = tl.maximum(key_first - offset - window_right, 0)
    hi = tl.minimum(key_last - offset + window_left + 1, n_q)
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = tl.maximum(key_last - offset - window_right, lo)
    full_hi = tl.minimum(key_first - offset + window_left + 1, hi)
    full_lo = tl.minimum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, tl.maximum(hi, lo))
    full_hi = tl.maximum((full_hi // BLOCK_M) * BLOCK_M, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _phase_range(phase: tl.constexpr, lo, full_lo, full_hi, hi):
    """Tiles [start, end) of phase 0, 1, 2 of a range split by _key_range or _query_range:
    the masked tiles before the full ones, the full ones (phase 1, unmasked), the masked
    ones after."""
    if phase == 0:
        start, end = lo, full_lo
    elif phase == 1:
        start, end = full_lo, full_hi
    else:
        start, end = full_hi, hi
    return start, end


@triton.jit
def _packed_sequence(cu_seqlens_ptr, b, total):
    """VARLEN: sequence b's first row in the packed rows and its length, from cumulative
    lengths; both clamped into [0, total], so that cumulative lengths that are not (checked
    on CPU tensors only) still read and write no row outside the tensors."""
    start = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + b), 0), total)
    end = tl.minimum(tl.maximum(tl.load(cu_seqlens_ptr + b + 1), start), total)
    return start.to(tl.int64), end - start


@triton.jit
def _varlen_sequences(cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, h, total_q, total_k):
    """VARLEN: sequence b of a packed batch, (q_start, n_q, k_start, n_k, lse_row). The
    kernels run it as a batch of one of their dense layout, moved to its first rows: its
    queries are rows [q_start, q_start + n_q) of the packed q (total_q, H, D), its keys rows
    [k_start, k_start + n_k) of k and v, and its lse row 0 of head h sits at lse_row of lse
    (H, total_q). The launchers pass 0 for the batch strides, and total_q, total_k as Nq, Nk."""
    q_start, n_q = _packed_sequence(cu_seqlens_q_ptr, b, total_q)
    k_start, n_k = _packed_sequence(cu_seqlens_k_ptr, b, total_k)
    return q_start, n_q, k_start, n_k, h * total_q + q_start


@triton.jit
def _visible(rows, keys, offset, n_q, kv_len, window_left, window_right):
    aligned = rows[:, None] + offset
    return ((keys[None, :] < kv_len) & (rows[:, None] < n_q)
            & (keys[None, :] >= aligned - window_left) & (keys[None, :] <= aligned + window_right))


@triton.jit
def _visible_span(rows, offset, n_q, kv_len, window_left, window_right):
    """(first, count): row i sees keys [first, first + count) (count uint32), those _visible
    keeps, so that a tile's mask is one unsigned compare a score, (key - first) < count:
    keys before first wrap to 2^32 - (first - key). The warp-specialized forward, which
    masks every tile, masks so: 3.6 instructions a score over the unmasked loop where
    _visible's four compares took 7.2 (sm_90 SASS, head dim 128, 128x128 tiles)."""
    aligned = rows + offset
    first = aligned - window_left
    last = tl.where(rows < n_q, tl.minimum(aligned + window_right, kv_len - 1), -1)
    return first, tl.maximum(last - first + 1, 0).to(tl.uint32, bitcast=True)


@triton.jit
def _dropout_keep(seed, b, h, rows, key0, dropout_cutoff, BLOCK_N: tl.constexpr):
    """(rows, BLOCK_N) bool: which pairs of query rows and keys [key0, key0 + BLOCK_N)
    (key0 a multiple of 4) of batch b, head h dropout keeps. Philox 4x32-10, keyed by the
    64-bit seed, on the counter (j // 4, query, head, batch) gives key j its word j % 4: one
    Philox round trip for four pairs, and the same number for a pair in every kernel,
    whatever its tiles. A pair is kept when the top 31 bits of its word exceed
    dropout_cutoff (round(p * 2^31) - 1)."""
    quads, rows = tl.broadcast((key0 // 4 + tl.arange(0, BLOCK_N // 4))[None, :], rows[:, None])
    w0, w1, w2, w3 = tl.philox(seed, quads, rows, h.to(tl.int32), b.to(tl.int32))
    words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), [rows.shape[0], BLOCK_N])
    return (words >> 1).to(tl.int32, bitcast=True) > dropout_cutoff


@triton.jit
def _modified_scores(dot, aligned, keys, qk_scale, softcap_scale, slope, SOFTCAP: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, FAST_TANH: tl.constexpr = False):
    """(scores in log2 units, t) from the raw products q.k: dot * qk_scale, or with SOFTCAP
    softcap_scale * t with t = tanh(dot * qk_scale) (the launcher then passes qk_scale =
    scale / softcap, softcap_scale = softcap * log2(e)); with HAS_ALIBI plus the bias
    -slope * |aligned - keys| (slope in log2 units; aligned and keys broadcast to dot).
    FAST_TANH: the hardware's tanh (kernels._math.tanh), for 16-bit inputs on CUDA."""
    if SOFTCAP:
        t = tanh(dot * qk_scale, FAST_TANH)
        s = t * softcap_scale
    else:
        t = dot
        s = dot * qk_scale
    if HAS_ALIBI:
        s -= slope * tl.abs(aligned - keys).to(tl.float32)
    return s, t


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _rows_source(base, lo, hi, stride_m, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """What _load_rows and _store_rows move tiles of rows [lo, hi) of the (rows, HEAD_DIM)
    matrix at `base` through: `base` itself, or a TMA descriptor of those rows alone, which
    reads zeros for every row outside them. Made on the device, per program: triton's warp
    specialization splits a device-made descriptor between its consumer warp groups, a host
    one it cannot. An empty range gets a descriptor of one row, which its caller must address
    only past its end: TMA through a descriptor of no rows raised an illegal instruction on
    the H100 (an empty packed sequence, whose warp-specialized programs take no early
    exit)."""
    if USE_TMA:
        src = tl.make_tensor_descriptor(base + lo * stride_m, [tl.maximum(hi - lo, 1), HEAD_DIM],
                                        [stride_m, 1], [BLOCK, BLOCK_D])
    else:
        src = base
    return src


@triton.jit
def _load_rows(src, row0, lo, hi, stride_m, offs_d, HEAD_DIM: tl.constexpr,
               MASK_ROWS: tl.constexpr, USE_TMA: tl.constexpr, BLOCK: tl.constexpr,
               TRANS: tl.constexpr = False):
    """Rows [row0, row0 + BLOCK) of the matrix of _rows_source(base, lo, hi, ...) as a
    (BLOCK, BLOCK_D) tile, or its transpose with TRANS; columns past HEAD_DIM and rows
    outside [lo, hi) read as zeros. Pointer loads check rows only with MASK_ROWS: without it
    they must lie in [lo, hi)."""
    if USE_TMA:
        # Coordinates are relative to row lo; TMA zero-fills outside the box, below it too.
        tile = src.load([row0 - lo, 0])
        if TRANS:
            tile = tl.trans(tile)
    else:
        rows = row0 + tl.arange(0, BLOCK)
        d_ok = within(offs_d, HEAD_DIM, HEAD_DIM == offs_d.shape[0])
        row_ok = (rows >= lo) & (rows < hi)
        # Transposed addressing rather than tl.trans: pre-Hopper dots take it as loaded.
        if TRANS:
            mask = d_ok[:, None]
            if MASK_ROWS:
                mask = mask & row_ok[None, :]
            tile = tl.load(src + rows[None, :] * stride_m + offs_d[:, None], mask=mask,
                           other=0.0)
        else:
            mask = d_ok[None, :]
            if MASK_ROWS:
                mask = mask & row_ok[:, None]
            tile = tl.load(src + rows[:, None] * stride_m + offs_d[None, :], mask=mask,
                           other=0.0)
    return tile


@triton.jit
def _store_rows(dst, row0, hi, stride_m, offs_d, tile, HEAD_DIM: tl.constexpr,
                MASK_ROWS: tl.constexpr, USE_TMA: tl.constexpr, BLOCK: tl.constexpr):
    """Stores a (BLOCK, BLOCK_D) tile at rows [row0, row0 + BLOCK) of the matrix of
    _rows_source(base, 0, hi, ...), dropping columns past HEAD_DIM and rows from hi on
    (pointer stores check rows only with MASK_ROWS)."""
    if USE_TMA:
        dst.store([row0, 0], tile)
    else:
        rows = row0 + tl.arange(0, BLOCK)
        mask = within(offs_d, HEAD_DIM, HEAD_DIM == offs_d.shape[0])[None, :]
        if MASK_ROWS:
            mask = mask & (rows < hi)[:, None]
        tl.store(dst + rows[:, None] * stride_m + offs_d[None, :], tile, mask=mask)


@triton.jit
def _keys_major_source(base, hi, stride_d, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """What _load_keys_major reads a (rows, HEAD_DIM) matrix stored transposed at `base`
    (row j, column d at base + d * stride_d + j) through: `base`, or a TMA descriptor of its
    rows [0, hi) (of the (HEAD_DIM, rows) matrix in memory, whose first row starts at
    `base`, 16-byte aligned where a descriptor starting at a later row would not be)."""
    if USE_TMA:
        src = tl.make_tensor_descriptor(base, [HEAD_DIM, hi], [stride_d, 1], [BLOCK_D, BLOCK])
    else:
        src = base
    return src


@triton.jit
def _load_keys_major(src, row0, lo, hi, stride_d, offs_d, HEAD_DIM: tl.constexpr,
                     MASK_ROWS: tl.constexpr, USE_TMA: tl.constexpr, BLOCK: tl.constexpr):
    """Rows [row0, row0 + BLOCK) of the matrix of _keys_major_source(base, hi, ...) as a
    (BLOCK, BLOCK_D) tile, read as _load_rows reads it (pointer loads check rows only with
    MASK_ROWS; a descriptor reads zeros from row hi on and reads rows below lo as they are,
    so it serves tiles that need no mask). sm_90's fp8 wgmma takes its B operand only
    K-major: V^T in memory makes the keys, PV's K dimension, the contiguous one (triton's
    fused-attention tutorial transposes V on the host for fp8 too)."""
    if USE_TMA:
        tile = tl.trans(src.load([0, row0]))
    else:
        rows = row0 + tl.arange(0, BLOCK)
        mask = within(offs_d, HEAD_DIM, HEAD_DIM == offs_d.shape[0])[None, :]
        if MASK_ROWS:
            mask = mask & ((rows >= lo) & (rows < hi))[:, None]
        tile = tl.load(src + offs_d[None, :] * stride_d + rows[:, None], mask=mask, other=0.0)
    return tile


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, rows, offs_d, start, end,
               key_lo, offset, n_q, kv_len, window_left, window_right, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
               DOT_PRECISION: tl.constexpr, seed, b, h, dropout_cutoff,
               DROPOUT: tl.constexpr, softcap_scale=1.0, slope=0.0,
               SOFTCAP: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False,
               FP8: tl.constexpr = False, V_TMA: tl.constexpr = False, offs_dv=None,
               HEAD_DV: tl.constexpr = None, FAST_TANH: tl.constexpr = False, q_t=None,
               kt_src=None, offs_dt=None, HEAD_DT: tl.constexpr = 0):
    """Key tiles [start, end). MASKED ones evaluate the mask, and their keys that no row of
    the tile sees (below key_lo or from kv_len on) read as zeros. DROPOUT zeroes the weights
    that _dropout_keep drops after they join the row sums, which stay those of the softmax.
    SOFTCAP and HAS_ALIBI modify the scores (see _modified_scores). FP8: v_src holds V
    transposed (see _load_keys_major; a TMA descriptor with V_TMA) and the weights are
    2^FP8_P_OFFSET times the softmax's, cast to e4m3 for the PV product. v has HEAD_DV
    columns (offs_dv their tile's), the accumulator too. HEAD_DT > 0: q's and k's columns
    from BLOCK_D on, HEAD_DT of them, are a tail tile (q_t, and k's through kt_src, offs_dt
    its columns; see _attn_fwd's BLOCK_DT), whose product adds to the main tile's."""
    if MASKED and WARP_SPECIALIZE:
        first, count = _visible_span(rows, offset, n_q, kv_len, window_left, window_right)
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kt = _load_rows(k_src, start_n, key_lo, kv_len, stride_kn, offs_d, HEAD_DIM, MASKED,
                        USE_TMA, BLOCK_N, True)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if HEAD_DT > 0:
            kt_t = _load_rows(kt_src, start_n, key_lo, kv_len, stride_kn, offs_dt, HEAD_DT,
                              MASKED, USE_TMA, BLOCK_N, True)
            qk = tl.dot(q_t, kt_t, qk, input_precision=DOT_PRECISION)
        s, _ = _modified_scores(qk, rows[:, None] + offset,
                                (start_n + tl.arange(0, BLOCK_N))[None, :], qk_scale,
                                softcap_scale, slope, SOFTCAP, HAS_ALIBI, FAST_TANH=FAST_TANH)
        if MASKED:
            keys = start_n + tl.arange(0, BLOCK_N)
            if WARP_SPECIALIZE:
                # Every tile is masked: one compare a score (_visible_span).
                keep = (keys[None, :] - first[:, None]).to(tl.uint32, bitcast=True) < count[:, None]
            else:
                keep = _visible(rows, keys, offset, n_q, kv_len, window_left, window_right)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf; shift it by 0 instead.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = m_new
        alpha = tl.math.exp2(m_i - m_shift)
        if FP8:
            # Weights in [0, 2^8] rather than [0, 1] use more of e4m3's exponents (as
            # FlashAttention-3 does); the row sums carry the same factor, which cancels.
            p = tl.math.exp2(s - (m_shift - FP8_P_OFFSET)[:, None])
        else:
            p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, b, h, rows, start_n, dropout_cutoff, BLOCK_N),
                         p, 0.0)
        if FP8:
            v = _load_keys_major(v_src, start_n, key_lo, kv_len, stride_vn, offs_dv, HEAD_DV,
                                 MASKED, V_TMA, BLOCK_N)
        else:
            v = _load_rows(v_src, start_n, key_lo, kv_len, stride_vn, offs_dv, HEAD_DV, MASKED,
                           USE_TMA, BLOCK_N)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.heuristics({"EVEN_M": lambda args: args["n_q"] % args["BLOCK_M"] == 0
                    and not args.get("VARLEN")})
@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kv_lengths_ptr,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              n_heads, n_q, n_k, group, qk_scale, window_left, window_right, seq_bucket,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KV_LENGTHS: tl.constexpr,
              DOT_PRECISION: tl.constexpr, MASK_KEYS: tl.constexpr, EVEN_M: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr = False,
              WARP_SPECIALIZE: tl.constexpr = False, cu_seqlens_q_ptr=None,
              cu_seqlens_k_ptr=None, VARLEN: tl.constexpr = False,
              DROPOUT: tl.constexpr = False, seed_ptr=None, dropout_cutoff=0,
              dropout_scale=1.0, sinks_ptr=None, alibi_ptr=None, stride_alibi_b=0,
              softcap_scale=1.0, SOFTCAP: tl.constexpr = False,
              HAS_SINKS: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False,
              descale_ptr=None, FP8: tl.constexpr = False, HEAD_DV: tl.constexpr = None,
              BLOCK_DV: tl.constexpr = None, FAST_TANH: tl.constexpr = False,
              BLOCK_DT: tl.constexpr = 0):
    """One query tile of one head. MASK_KEYS: some key tile may need the mask (a causal mask,
    a window, lengths, or Nk not a multiple of KEY_TILE_MULTIPLE); without it one unmasked
    loop is all that is compiled. EVEN_M: Nq is a multiple of BLOCK_M, so rows need no
    bounds. USE_TMA: q, k, v and out move through TMA descriptors (sm_90+, 16-byte aligned
    strides).
    WARP_SPECIALIZE: producer and consumer warp groups run the loop (sm_90); triton's Hopper
    warp specialization takes kernels of one loop, so with MASK_KEYS one loop runs every
    visited key tile through the mask instead of three (masked, full, masked tiles).
    VARLEN: b is a sequence of a packed batch (see _varlen_sequences); tiles past its end
    exit at once (warp-specialized: run no key tile and store nothing).
    DROPOUT: drops weights as _dropout_keep draws them from the seed at seed_ptr and scales
    the survivors by dropout_scale; lse stays that of the undropped scores.
    SOFTCAP, HAS_ALIBI: scores capped and biased (_modified_scores; ALiBi slopes (B or 1, H)
    float32 at alibi_ptr, batch stride stride_alibi_b). HAS_SINKS: the row's softmax starts
    from the head's sink logit (float32 at sinks_ptr), a key of value zero, so out and lse
    include it.
    FP8: q, k, v in e4m3 (v as V^T, (B, Hkv, D, Nk) with stride_vn its head-dim stride) and
    float32 descales (B, Hkv, 3) of q, k, v at descale_ptr (contiguous): q's and k's fold
    into qk_scale, the weights go to e4m3 for PV (see _fwd_tiles) and v's scales the output,
    whose dtype is o_ptr's (FlashAttention-3's FP8 forward).
    HEAD_DV, BLOCK_DV: v's and out's head dim and its tile (SDPA's Ev, MLA's 128 beside
    q's and k's 192), HEAD_DIM and BLOCK_D when None.
    FAST_TANH: SOFTCAP's tanh is the hardware's (_modified_scores).
    BLOCK_DT > 0 (tail_head_dims_meta): q's and k's head dim in two tiles, columns [0,
    BLOCK_D) and a tail of BLOCK_DT from column BLOCK_D, read as a (rows, HEAD_DIM - BLOCK_D)
    matrix of its own (a second TMA descriptor, of its own block shape, with USE_TMA), the
    scores the sum of the two tiles' products (D = 192 as 128 + 64 columns, not 256). v keeps
    one tile (HEAD_DV and BLOCK_DV, always passed with a tail)."""
    HEAD_V: tl.constexpr = HEAD_DIM if HEAD_DV is None else HEAD_DV
    BLOCK_V: tl.constexpr = BLOCK_D if BLOCK_DV is None else BLOCK_DV
    # With a tail, the main tile's columns are all q's and k's (HEAD_Q), the rest HEAD_T.
    HEAD_Q: tl.constexpr = BLOCK_D if BLOCK_DT > 0 else HEAD_DIM
    HEAD_T: tl.constexpr = HEAD_DIM - BLOCK_D if BLOCK_DT > 0 else 0
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if VARLEN:
        q_start, n_q, k_start, n_k, lse_row = _varlen_sequences(
            cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, h, n_q, n_k)
        # Warp specialization takes no early exit: its tiles run no key tile instead.
        if not WARP_SPECIALIZE:
            if pid_m * BLOCK_M >= n_q:
                return
        q_ptr += q_start * stride_qm
        o_ptr += q_start * stride_om
        lse_ptr += lse_row
        k_ptr += k_start * stride_kn
        if FP8:
            # V^T, whose keys are contiguous, holds each sequence's from a 16-byte boundary
            # (_packed_keys_major): its loads stay aligned, and the kernel spills less.
            v_ptr += tl.multiple_of(16 * (b + tl.cdiv(k_start, 16)), 16)
        else:
            v_ptr += k_start * stride_vn
    hk = h // group
    kv_len = kv_length(kv_lengths_ptr, b, n_k, HAS_KV_LENGTHS)
    offset = n_k - n_q
    # One (b, h) slice of a long, strided sequence can pass 2^31 elements.
    stride_qm = tl.cast(stride_qm, tl.int64)
    stride_kn = tl.cast(stride_kn, tl.int64)
    stride_vn = tl.cast(stride_vn, tl.int64)
    stride_om = tl.cast(stride_om, tl.int64)

    row_first = pid_m * BLOCK_M
    rows = row_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_V)
    # Keys below key_lo or from kv_len on: no row of the tile sees them.
    key_lo = tl.maximum(row_first + offset - window_left, 0)
    q_src = _rows_source(q_ptr + b * stride_qb + h * stride_qh, 0, n_q, stride_qm, HEAD_Q,
                         USE_TMA, BLOCK_M, BLOCK_D)
    k_src = _rows_source(k_ptr + b * stride_kb + hk * stride_kh, key_lo, kv_len, stride_kn,
                         HEAD_Q, USE_TMA, BLOCK_N, BLOCK_D)
    if FP8:
        # Through TMA in the unmasked kernel only: there no key of a tile is below key_lo
        # (0), which a descriptor of V^T's rows from key 0 on would read as they are.
        v_src = _keys_major_source(v_ptr + b * stride_vb + hk * stride_vh, kv_len, stride_vn,
                                   HEAD_V, USE_TMA and not MASK_KEYS, BLOCK_N, BLOCK_V)
    else:
        v_src = _rows_source(v_ptr + b * stride_vb + hk * stride_vh, key_lo, kv_len,
                             stride_vn, HEAD_V, USE_TMA, BLOCK_N, BLOCK_V)
    # An empty packed sequence's warp-specialized programs move q and out through one-row
    # descriptors (_rows_source): addressed past that row, they read zeros and write nothing.
    q_row = row_first
    if VARLEN and WARP_SPECIALIZE:
        q_row = tl.where(n_q > 0, row_first, BLOCK_M)
    q = _load_rows(q_src, q_row, 0, n_q, stride_qm, offs_d, HEAD_Q, not EVEN_M, USE_TMA,
                   BLOCK_M)
    q_t, kt_src, offs_dt = None, None, None
    if BLOCK_DT > 0:
        offs_dt = tl.arange(0, BLOCK_DT)
        q_t = _load_rows(_rows_source(q_ptr + b * stride_qb + h * stride_qh + BLOCK_D, 0, n_q,
                                      stride_qm, HEAD_T, USE_TMA, BLOCK_M, BLOCK_DT),
                         q_row, 0, n_q, stride_qm, offs_dt, HEAD_T, not EVEN_M, USE_TMA,
                         BLOCK_M)
        kt_src = _rows_source(k_ptr + b * stride_kb + hk * stride_kh + BLOCK_D, key_lo, kv_len,
                              stride_kn, HEAD_T, USE_TMA, BLOCK_N, BLOCK_DT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:
        # The sink as a key seen first: exp(sink - m) = 1 at m = sink, and it adds no value.
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(sinks_ptr + h) * LOG2E
        l_i += 1.0
    if FP8:
        descales = descale_ptr + (b * (n_heads // group) + hk) * 3
        qk_scale = qk_scale * tl.load(descales) * tl.load(descales + 1)
        # Weights are 2^FP8_P_OFFSET times the softmax's (_fwd_tiles), a sink's too.
        l_i = l_i * FP8_P_SCALE
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + b * stride_alibi_b + h).to(tl.float32) * LOG2E
    if MASK_KEYS:
        row_last = tl.minimum(row_first + BLOCK_M, n_q) - 1
        lo, full_lo, full_hi, hi = _key_range(row_first, row_last, offset, kv_len, window_left,
                                              window_right, BLOCK_N)
        # No tile when no key is visible: a TMA descriptor of no rows is never read.
        hi = tl.where(hi > key_lo, hi, lo)
        full_hi = tl.minimum(full_hi, hi)
        full_lo = tl.minimum(full_lo, full_hi)
        if WARP_SPECIALIZE:
            # Triton's warp specialization takes a kernel of one loop: phase 0 runs every
            # tile, each through the mask; none for a packed tile past its sequence's end.
            hi = tl.where(row_first < n_q, hi, lo)
            full_lo = hi
        for phase in tl.static_range(1 if WARP_SPECIALIZE else 3):
            start, end = _phase_range(phase, lo, full_lo, full_hi, hi)
            acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn,
                                       rows, offs_d, start, end, key_lo, offset, n_q, kv_len,
                                       window_left, window_right, qk_scale, HEAD_Q, BLOCK_N,
                                       phase != 1, USE_TMA, WARP_SPECIALIZE, DOT_PRECISION,
                                       seed, b, h,
                                       dropout_cutoff, DROPOUT, softcap_scale, slope, SOFTCAP,
                                       HAS_ALIBI, FP8, offs_dv=offs_dv, HEAD_DV=HEAD_V,
                                       FAST_TANH=FAST_TANH, q_t=q_t, kt_src=kt_src,
                                       offs_dt=offs_dt, HEAD_DT=HEAD_T)
    else:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, rows,
                                   offs_d, 0, n_k, 0, offset, n_q, kv_len, window_left,
                                   window_right, qk_scale, HEAD_Q, BLOCK_N, False, USE_TMA,
                                   WARP_SPECIALIZE, DOT_PRECISION, seed, b, h, dropout_cutoff,
                                   DROPOUT, softcap_scale, slope, SOFTCAP, HAS_ALIBI, FP8,
                                   USE_TMA, offs_dv, HEAD_V, FAST_TANH=FAST_TANH, q_t=q_t,
                                   kt_src=kt_src, offs_dt=offs_dt, HEAD_DT=HEAD_T)

    if DROPOUT:
        acc = acc * dropout_scale
    if FP8:
        acc = acc * tl.load(descales + 2)
        m_i -= FP8_P_OFFSET  # the row sums' factor 2^FP8_P_OFFSET leaves lse
    # A query that saw no key outputs zeros and has lse = -inf.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty)
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    o_dst = _rows_source(o_ptr + b * stride_ob + h * stride_oh, 0, n_q, stride_om, HEAD_V,
                         USE_TMA, BLOCK_M, BLOCK_V)
    _store_rows(o_dst, q_row, n_q, stride_om, offs_dv, out, HEAD_V, not EVEN_M, USE_TMA,
                BLOCK_M)
    if not VARLEN:
        lse_ptr += (b * n_heads + h) * n_q
    tl.store(lse_ptr + rows, lse, mask=rows < n_q)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta(o_ptr, do_ptr, dlse_ptr, delta_ptr,
                    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                    n_heads, n_q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE: the softmax backward's per-row correction."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    stride_om = tl.cast(stride_om, tl.int64)
    stride_dom = tl.cast(stride_dom, tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom
                 + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_ids = (b * n_heads + h) * n_q + rows
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + row_ids, mask=rows < n_q, other=0.0)
    tl.store(delta_ptr + row_ids, delta, mask=rows < n_q)


@triton.jit
def _k_columns(k_base, keys, k_seen, stride_kn, offs_c, HEAD_DIM: tl.constexpr):
    """Columns offs_c of the keys' rows of k at k_base: zeros for unseen keys (k_seen
    false) and columns past HEAD_DIM, as _attn_bwd_dkdv loads k."""
    return tl.load(k_base + keys[:, None] * stride_kn + offs_c[None, :],
                   mask=k_seen[:, None] & (offs_c < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _atomic_dq(dq_h, rows, r_ok, stride_dqm, k, dst, offs_d, d_ok, scale,
               DOT_PRECISION: tl.constexpr):
    """Adds dS K * scale (columns offs_d of the query rows' dQ, k a tile of those columns, d_ok the
    real ones) into the float32 dQ of one head at dq_h. Transposed, the product has the head
    dim as its M side: 64 or more fills a warpgroup's wgmma on sm_90 where BLOCK_M does not
    (at D=128, 32x128 tiles and 8 warps: every product on wgmma, no spill, 16 KB less
    shared memory). Below 64 the query rows take the M side instead: wgmma with BLOCK_M >=
    64 (the sm_90 pruning keeps those tiles), where the transposed product fell back to
    mma.sync."""
    if offs_d.shape[0] >= 64:
        dqt = tl.dot(tl.trans(k), dst, input_precision=DOT_PRECISION) * scale
        tl.atomic_add(dq_h + rows[None, :] * stride_dqm + offs_d[:, None], dqt,
                      mask=r_ok[None, :] & d_ok[:, None], sem="relaxed")
    else:
        dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION) * scale
        tl.atomic_add(dq_h + rows[:, None] * stride_dqm + offs_d[None, :], dq,
                      mask=r_ok[:, None] & d_ok[None, :], sem="relaxed")


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_b, do_b, lse_b, delta_b, dq_b, head0, group,
                stride_qh, stride_qm, stride_doh, stride_dom, stride_dqh, stride_dqm,
                keys, offs_d, start, end, offset, n_q, kv_len, window_left, window_right,
                scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
                stride_stats_h, seed, b, key_first, dropout_cutoff, dropout_scale,
                DROPOUT: tl.constexpr, alibi_b=None, softcap_scale=1.0,
                SOFTCAP: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False, k_base=None,
                stride_kn=0, k_seen=None, offs_dv=None, HEAD_DV: tl.constexpr = None,
                FAST_TANH: tl.constexpr = False, dk_t=0, k_t=None, offs_t=None,
                TAIL: tl.constexpr = False):
    """Query tiles [start, end) of each query head head0 + g, g < group: one loop over
    (head, tile) pairs, so that a runtime group size adds no loop around the pipelined one.
    With ATOMIC_DQ, also adds each tile's dQ = dS K * scale into dq (float32). Head h's lse
    and delta rows start at h * stride_stats_h. DROPOUT regenerates the forward's keep
    mask: dv takes the kept weights (scaled by the caller), dP the kept, scaled gradients.
    SOFTCAP and HAS_ALIBI (slopes at alibi_b, per query head) as in the forward. k_base, at
    key 0 with key stride stride_kn: the keys of k (zeros where k_seen is false, as the
    caller loaded k), which 16-bit atomic dQ from head dim 256 reads in column chunks (see
    K_CHUNKS). v, dv and dO have HEAD_DV columns (offs_dv their tile's). TAIL: q's and k's
    columns offs_t (from BLOCK_D on; see _attn_bwd_dkdv's BLOCK_DT) are a tail tile, k_t of
    k, with its own accumulator dk_t (returned as given without a tail): S adds the tail's
    product, and dK and dQ get the tail's columns from products of their own."""
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    if TAIL:
        t_ok = offs_t < HEAD_DIM
    # From head dim 256, 16-bit atomic dQ: S and dQ take K in chunks of 64 columns, loaded
    # (pipelined) per query tile rather than held, and dQ goes out in chunks: only a chunk
    # of K^T dS^T is live beside dk and dv's 128 registers a thread (sm_90 16x64x8x2, ptxas
    # -v: spills 40/28 B -> 0 on triton 3.9, 8/4 -> 0 on 3.6; reports/hopper-attention.md 9).
    # With a tail, where v's tile is 256 (dv's accumulator alone holds 64 registers a thread
    # of 16x64x8x2): D = 160, Ev = 160 held K and its tail and spilled 152/180 B (triton 3.9).
    K_CHUNKS: tl.constexpr = ATOMIC_DQ and k.dtype != tl.float32 and (
        offs_d.shape[0] >= 256 or (TAIL and offs_dv.shape[0] >= 256))
    tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)
    for i in range(0, group * tiles):
        g = i // tiles
        h = head0 + g
        start_m = tl.multiple_of(start + (i - g * tiles) * BLOCK_M, BLOCK_M)
        rows = start_m + offs_m0
        if MASKED:
            r_ok = rows < n_q
        else:
            r_ok = rows >= 0
        qt = tl.load(q_b + h * stride_qh + rows[None, :] * stride_qm + offs_d[:, None],
                     mask=r_ok[None, :] & d_ok[:, None], other=0.0)
        if TAIL:
            qt_t = tl.load(q_b + h * stride_qh + rows[None, :] * stride_qm + offs_t[:, None],
                           mask=r_ok[None, :] & t_ok[:, None], other=0.0)
        lse = tl.load(lse_b + h * stride_stats_h + rows, mask=r_ok, other=0.0)
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(alibi_b + h).to(tl.float32) * LOG2E
        if K_CHUNKS:
            s = tl.zeros([keys.shape[0], BLOCK_M], dtype=tl.float32)
            for c in tl.static_range(offs_d.shape[0] // 64):
                offs_c = c * 64 + tl.arange(0, 64)
                qtc = tl.load(q_b + h * stride_qh + rows[None, :] * stride_qm + offs_c[:, None],
                              mask=r_ok[None, :] & (offs_c < HEAD_DIM)[:, None], other=0.0)
                s = tl.dot(_k_columns(k_base, keys, k_seen, stride_kn, offs_c, HEAD_DIM), qtc,
                           s, input_precision=DOT_PRECISION)
            if TAIL:
                s = tl.dot(_k_columns(k_base, keys, k_seen, stride_kn, offs_t, HEAD_DIM), qt_t,
                           s, input_precision=DOT_PRECISION)
        else:
            s = tl.dot(k, qt, input_precision=DOT_PRECISION)
            if TAIL:
                s = tl.dot(k_t, qt_t, s, input_precision=DOT_PRECISION)
        st, tt = _modified_scores(s,
                                  rows[None, :] + offset, keys[:, None], qk_scale,
                                  softcap_scale, slope, SOFTCAP, HAS_ALIBI, FAST_TANH=FAST_TANH)
        # Rows that see no key have lse = -inf, so exp2 gives inf there: the mask zeroes it.
        pt = tl.math.exp2(st - lse[None, :] * LOG2E)
        if MASKED:
            keep = _visible(rows, keys, offset, n_q, kv_len, window_left, window_right)
            pt = tl.where(tl.trans(keep), pt, 0.0)
        do = tl.load(do_b + h * stride_doh + rows[:, None] * stride_dom + offs_dv[None, :],
                     mask=r_ok[:, None] & (offs_dv < HEAD_DV)[None, :], other=0.0)
        if DROPOUT:
            keep = tl.trans(_dropout_keep(seed, b, h, rows, key_first, dropout_cutoff,
                                          keys.shape[0]))
            dv = tl.dot(tl.where(keep, pt, 0.0).to(do.dtype), do, dv,
                        input_precision=DOT_PRECISION)
        else:
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if SOFTCAP:
            pt *= 1.0 - tt * tt  # the cap's derivative, folded in while one tile is live
        delta = tl.load(delta_b + h * stride_stats_h + rows, mask=r_ok, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            dpt = tl.where(keep, dpt * dropout_scale, 0.0)
        dst = (pt * (dpt - delta[None, :])).to(qt.dtype)
        dk = tl.dot(dst, tl.trans(qt), dk, input_precision=DOT_PRECISION)
        if TAIL:
            dk_t = tl.dot(dst, tl.trans(qt_t), dk_t, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            # Unseen keys are zeros in k, so padding holding NaN adds nothing here either.
            dq_h = dq_b + h * stride_dqh
            if K_CHUNKS:
                for c in tl.static_range(offs_d.shape[0] // 64):
                    offs_c = c * 64 + tl.arange(0, 64)
                    kc = _k_columns(k_base, keys, k_seen, stride_kn, offs_c, HEAD_DIM)
                    dqt = tl.dot(tl.trans(kc), dst, input_precision=DOT_PRECISION) * scale
                    tl.atomic_add(dq_h + rows[None, :] * stride_dqm + offs_c[:, None], dqt,
                                  mask=r_ok[None, :] & (offs_c < HEAD_DIM)[:, None], sem="relaxed")
            else:
                _atomic_dq(dq_h, rows, r_ok, stride_dqm, k, dst, offs_d, d_ok, scale,
                           DOT_PRECISION)
            if TAIL and not K_CHUNKS and (offs_t.shape[0] >= 64 or BLOCK_M >= 64):
                _atomic_dq(dq_h, rows, r_ok, stride_dqm, k_t, dst, offs_t, t_ok, scale,
                           DOT_PRECISION)
            elif TAIL:
                # A tail under 64 columns with fewer query rows: neither side of its product
                # fills wgmma's M. The tail's dQ then takes 64 columns of K, read per query
                # tile as K_CHUNKS reads them (those past HEAD_DIM read and add nothing), as
                # it does under K_CHUNKS.
                offs_c = offs_d.shape[0] + tl.arange(0, 64)
                _atomic_dq(dq_h, rows, r_ok, stride_dqm,
                           _k_columns(k_base, keys, k_seen, stride_kn, offs_c, HEAD_DIM), dst,
                           offs_c, offs_c < HEAD_DIM, scale, DOT_PRECISION)
    return dk, dv, dk_t


@triton.jit
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr,
                   kv_lengths_ptr,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   stride_dqb, stride_dqh, stride_dqm,
                   n_heads, n_q, n_k, group, scale, qk_scale, window_left, window_right,
                   seq_bucket, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_KV_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   cu_seqlens_q_ptr=None, cu_seqlens_k_ptr=None, VARLEN: tl.constexpr = False,
                   DROPOUT: tl.constexpr = False, seed_ptr=None, dropout_cutoff=0,
                   dropout_scale=1.0, alibi_ptr=None, stride_alibi_b=0, softcap_scale=1.0,
                   SOFTCAP: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False,
                   HEAD_DV: tl.constexpr = None, BLOCK_DV: tl.constexpr = None,
                   FAST_TANH: tl.constexpr = False, BLOCK_DT: tl.constexpr = 0):
    """dK, dV of one key tile from every query head of its group; with ATOMIC_DQ also the
    dQ those query heads get from it, added into dq_ptr (float32, zeroed, scaled). VARLEN:
    b is a sequence of a packed batch (see _varlen_sequences). DROPOUT: the forward's
    dropout, regenerated from the seed at seed_ptr. SOFTCAP, HAS_ALIBI, FAST_TANH as in the
    forward. Sinks need nothing here: the forward's lse includes them, so p = exp(s - lse) and
    delta = rowsum(dO * O) already account for them. HEAD_DV, BLOCK_DV: v's, dO's and dV's
    head dim and its tile, as in the forward. BLOCK_DT > 0: q's, k's, dQ's and dK's head dim
    in a main tile and a tail, as in the forward (two dK accumulators; with ATOMIC_DQ two dQ
    products, each added as its width suits: _atomic_dq)."""
    HEAD_V: tl.constexpr = HEAD_DIM if HEAD_DV is None else HEAD_DV
    BLOCK_V: tl.constexpr = BLOCK_D if BLOCK_DV is None else BLOCK_DV
    TAIL: tl.constexpr = BLOCK_DT > 0
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if VARLEN:
        stride_stats_h = n_q  # total_q: lse and delta are (H, total_q)
        q_start, n_q, k_start, n_k, stats_b = _varlen_sequences(
            cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, 0, n_q, n_k)
        if pid_n * BLOCK_N >= n_k:
            return
        q_ptr += q_start * stride_qm
        do_ptr += q_start * stride_dom
        dq_ptr += q_start * stride_dqm
        k_ptr += k_start * stride_kn
        v_ptr += k_start * stride_vn
        dk_ptr += k_start * stride_dkn
        dv_ptr += k_start * stride_dvn
    kv_len = kv_length(kv_lengths_ptr, b, n_k, HAS_KV_LENGTHS)
    offset = n_k - n_q
    # One (b, h) slice, and a group's heads, of a long strided sequence can pass 2^31
    # elements: head offsets are computed from int64 strides too.
    stride_qh = tl.cast(stride_qh, tl.int64)
    stride_qm = tl.cast(stride_qm, tl.int64)
    stride_kn = tl.cast(stride_kn, tl.int64)
    stride_vn = tl.cast(stride_vn, tl.int64)
    stride_doh = tl.cast(stride_doh, tl.int64)
    stride_dom = tl.cast(stride_dom, tl.int64)
    stride_dkn = tl.cast(stride_dkn, tl.int64)
    stride_dvn = tl.cast(stride_dvn, tl.int64)
    stride_dqh = tl.cast(stride_dqh, tl.int64)
    stride_dqm = tl.cast(stride_dqm, tl.int64)

    key_first = pid_n * BLOCK_N
    keys = key_first + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_V)
    kv_mask = (keys[:, None] < n_k) & (offs_d[None, :] < HEAD_DIM)
    v_mask = (keys[:, None] < n_k) & (offs_dv[None, :] < HEAD_V)
    # Keys that no query sees load as zeros: their dk and dv come out zero whatever they hold.
    seen = (keys < kv_len) & (keys >= offset - window_left)
    k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + keys[:, None] * stride_kn
                + offs_d[None, :], mask=kv_mask & seen[:, None], other=0.0)
    v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + keys[:, None] * stride_vn
                + offs_dv[None, :], mask=v_mask & seen[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    # Without a tail, placeholders that the loops carry through untouched.
    k_t, dk_t, offs_t, kt_mask = None, 0, None, None
    if TAIL:
        offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)
        kt_mask = (keys[:, None] < n_k) & (offs_t[None, :] < HEAD_DIM)
        k_t = tl.load(k_ptr + b * stride_kb + hk * stride_kh + keys[:, None] * stride_kn
                      + offs_t[None, :], mask=kt_mask & seen[:, None], other=0.0)
        dk_t = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)

    key_last = tl.minimum(key_first + BLOCK_N, kv_len) - 1
    lo, full_lo, full_hi, hi = _query_range(key_first, key_last, offset, n_q, kv_len,
                                            window_left, window_right, BLOCK_M)
    # Keys past kv_len sit in this tile: every query tile needs the mask. Selects, not
    # branches: triton 3.4 and 3.5 crash in TritonGPUCoalesce on the reassigning if-blocks.
    past = key_first + BLOCK_N > kv_len
    hi = tl.where(key_first >= kv_len, lo, hi)
    full_lo = tl.where(past, tl.maximum(hi, lo), full_lo)
    full_hi = tl.where(past, full_lo, full_hi)
    head0 = hk * group
    q_b = q_ptr + b * stride_qb
    do_b = do_ptr + b * stride_dob
    dq_b = dq_ptr + b * stride_dqb
    if VARLEN:
        lse_b = lse_ptr + stats_b
        delta_b = delta_ptr + stats_b
    else:
        stride_stats_h = n_q
        lse_b = lse_ptr + b * n_heads * n_q
        delta_b = delta_ptr + b * n_heads * n_q
    alibi_b = alibi_ptr
    if HAS_ALIBI:
        alibi_b = alibi_ptr + b * stride_alibi_b
    # From head dim 256 one masked loop over every query tile, not three phases: what the
    # later phases need is then not live across the first loop, beside dk and dv's 128
    # registers a thread (sm_90, 16x64 tiles, 8 warps, triton 3.9: deterministic spills 16 B
    # -> 0, atomic 100 -> 40 B). The mask costs 64x16 compares a tile against 5 GEMMs of
    # 2x64x16x256 FLOPs. So too with a tail beside v's tile of 256 (D = Ev = 160, atomic,
    # K in chunks: three phases spilled 12/20 B on triton 3.6).
    ONE_LOOP: tl.constexpr = BLOCK_D >= 256 or (TAIL and BLOCK_V >= 256)
    for phase in tl.static_range(1 if ONE_LOOP else 3):
        start, end = _phase_range(phase, lo, full_lo, full_hi, hi)
        if ONE_LOOP:
            end = hi
        dk, dv, dk_t = _dkdv_tiles(
            dk, dv, k, v, q_b, do_b, lse_b, delta_b, dq_b, head0, group, stride_qh, stride_qm,
            stride_doh, stride_dom, stride_dqh, stride_dqm, keys, offs_d, start, end, offset,
            n_q, kv_len, window_left, window_right, scale, qk_scale, HEAD_DIM, BLOCK_M,
            phase != 1, ATOMIC_DQ, DOT_PRECISION, stride_stats_h, seed, b, key_first,
            dropout_cutoff, dropout_scale, DROPOUT, alibi_b, softcap_scale, SOFTCAP, HAS_ALIBI,
            k_ptr + b * stride_kb + hk * stride_kh, stride_kn, seen, offs_dv, HEAD_V,
            FAST_TANH=FAST_TANH, dk_t=dk_t, k_t=k_t, offs_t=offs_t, TAIL=TAIL)
    if DROPOUT:
        dv = dv * dropout_scale
    tl.store(dk_ptr + b * stride_dkb + hk * stride_dkh + keys[:, None] * stride_dkn
             + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    if TAIL:
        tl.store(dk_ptr + b * stride_dkb + hk * stride_dkh + keys[:, None] * stride_dkn
                 + offs_t[None, :], (dk_t * scale).to(dk_ptr.dtype.element_ty), mask=kt_mask)
    tl.store(dv_ptr + b * stride_dvb + hk * stride_dvh + keys[:, None] * stride_dvn
             + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=v_mask)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, rows, offs_d,
              start, end, key_lo, offset, n_q, kv_len, window_left, window_right, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr, seed, b, h, dropout_cutoff, dropout_scale,
              DROPOUT: tl.constexpr, softcap_scale=1.0, slope=0.0,
              SOFTCAP: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False, offs_dv=None,
              HEAD_DV: tl.constexpr = None, FAST_TANH: tl.constexpr = False, dq_t=0, q_t=None,
              offs_t=None, TAIL: tl.constexpr = False):
    """Key tiles [start, end) of dQ's loop; v and dO have HEAD_DV columns (offs_dv). TAIL:
    q's and k's columns offs_t are a tail tile (q_t of q), whose product adds to S, and dQ's
    an accumulator of their own, dq_t (returned as given without a tail)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    if TAIL:
        t_ok = offs_t < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n0
        if MASKED:
            k_ok = (keys < kv_len) & (keys >= key_lo)
        else:
            k_ok = keys >= 0
        kt = tl.load(k_base + keys[None, :] * stride_kn + offs_d[:, None],
                     mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + keys[None, :] * stride_vn + offs_dv[:, None],
                     mask=k_ok[None, :] & (offs_dv < HEAD_DV)[:, None], other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if TAIL:
            kt_t = tl.load(k_base + keys[None, :] * stride_kn + offs_t[:, None],
                           mask=k_ok[None, :] & t_ok[:, None], other=0.0)
            qk = tl.dot(q_t, kt_t, qk, input_precision=DOT_PRECISION)
        s, t = _modified_scores(qk, rows[:, None] + offset, keys[None, :], qk_scale,
                                softcap_scale, slope, SOFTCAP, HAS_ALIBI, FAST_TANH=FAST_TANH)
        p = tl.math.exp2(s - lse[:, None] * LOG2E)
        if MASKED:
            keep = _visible(rows, keys, offset, n_q, kv_len, window_left, window_right)
            p = tl.where(keep, p, 0.0)
        if SOFTCAP:
            p *= 1.0 - t * t  # the cap's derivative, folded in while one tile is live
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed, b, h, rows, start_n, dropout_cutoff, BLOCK_N),
                          dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
        if TAIL:
            dq_t = tl.dot(ds.to(kt.dtype), tl.trans(kt_t), dq_t, input_precision=DOT_PRECISION)
    return dq, dq_t


@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kv_lengths_ptr,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm,
                 n_heads, n_q, n_k, group, scale, qk_scale, window_left, window_right,
                 seq_bucket, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_KV_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, cu_seqlens_q_ptr=None,
                 cu_seqlens_k_ptr=None, VARLEN: tl.constexpr = False,
                 DROPOUT: tl.constexpr = False, seed_ptr=None, dropout_cutoff=0,
                 dropout_scale=1.0, alibi_ptr=None, stride_alibi_b=0, softcap_scale=1.0,
                 SOFTCAP: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False,
                 HEAD_DV: tl.constexpr = None, BLOCK_DV: tl.constexpr = None,
                 FAST_TANH: tl.constexpr = False, BLOCK_DT: tl.constexpr = 0):
    """dQ of one query tile of one head. VARLEN: b is a sequence of a packed batch (see
    _varlen_sequences). DROPOUT, SOFTCAP, HAS_ALIBI, HEAD_DV, BLOCK_DV, FAST_TANH and
    BLOCK_DT (two dQ accumulators) as in the dK/dV kernel."""
    HEAD_V: tl.constexpr = HEAD_DIM if HEAD_DV is None else HEAD_DV
    BLOCK_V: tl.constexpr = BLOCK_D if BLOCK_DV is None else BLOCK_DV
    TAIL: tl.constexpr = BLOCK_DT > 0
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if VARLEN:
        q_start, n_q, k_start, n_k, lse_row = _varlen_sequences(
            cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, h, n_q, n_k)
        if pid_m * BLOCK_M >= n_q:
            return
        q_ptr += q_start * stride_qm
        do_ptr += q_start * stride_dom
        dq_ptr += q_start * stride_dqm
        k_ptr += k_start * stride_kn
        v_ptr += k_start * stride_vn
    hk = h // group
    kv_len = kv_length(kv_lengths_ptr, b, n_k, HAS_KV_LENGTHS)
    offset = n_k - n_q
    stride_qm = tl.cast(stride_qm, tl.int64)
    stride_kn = tl.cast(stride_kn, tl.int64)
    stride_vn = tl.cast(stride_vn, tl.int64)
    stride_dom = tl.cast(stride_dom, tl.int64)
    stride_dqm = tl.cast(stride_dqm, tl.int64)

    row_first = pid_m * BLOCK_M
    rows = row_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_V)
    mask = (rows[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom
                 + offs_dv[None, :], mask=(rows[:, None] < n_q) & (offs_dv[None, :] < HEAD_V),
                 other=0.0)
    if not VARLEN:
        lse_row = (b * n_heads + h) * n_q
    row_ids = lse_row + rows
    lse = tl.load(lse_ptr + row_ids, mask=rows < n_q, other=0.0)
    delta = tl.load(delta_ptr + row_ids, mask=rows < n_q, other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Without a tail, placeholders that the loops carry through untouched.
    q_t, dq_t, offs_t, mask_t = None, 0, None, None
    if TAIL:
        offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)
        mask_t = (rows[:, None] < n_q) & (offs_t[None, :] < HEAD_DIM)
        q_t = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm
                      + offs_t[None, :], mask=mask_t, other=0.0)
        dq_t = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)

    row_last = tl.minimum(row_first + BLOCK_M, n_q) - 1
    lo, full_lo, full_hi, hi = _key_range(row_first, row_last, offset, kv_len, window_left,
                                          window_right, BLOCK_N)
    key_lo = row_first + offset - window_left
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + b * stride_alibi_b + h).to(tl.float32) * LOG2E
    for phase in tl.static_range(3):
        start, end = _phase_range(phase, lo, full_lo, full_hi, hi)
        dq, dq_t = _dq_tiles(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, rows, offs_d, start,
            end, key_lo, offset, n_q, kv_len, window_left, window_right, qk_scale, HEAD_DIM,
            BLOCK_N, phase != 1, DOT_PRECISION, seed, b, h, dropout_cutoff, dropout_scale,
            DROPOUT, softcap_scale, slope, SOFTCAP, HAS_ALIBI, offs_dv, HEAD_V,
            FAST_TANH=FAST_TANH, dq_t=dq_t, q_t=q_t, offs_t=offs_t, TAIL=TAIL)
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm
             + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)
    if TAIL:
        tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm
                 + offs_t[None, :], (dq_t * scale).to(dq_ptr.dtype.element_ty), mask=mask_t)


@triton.jit
def _dropout_keep_mask(seed_ptr, keep_ptr, n_heads, n_q, n_k, dropout_cutoff,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep (B, H, Nq, Nk) int8: 1 where _dropout_keep keeps the pair in every kernel."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    seed = tl.load(seed_ptr)
    row_ptr = keep_ptr + ((b * n_heads + h) * n_q + rows.to(tl.int64)) * n_k
    for start_n in range(0, n_k, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, b, h, rows, start_n, dropout_cutoff, BLOCK_N)
        tl.store(row_ptr[:, None] + keys[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < n_q) & (keys[None, :] < n_k))


# ---------------------------------------------------------------------------------------
# Configs and launchers
# ---------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, largest head dim]). Forward and dQ tile queries
# by BLOCK_M and walk keys by BLOCK_N; dK/dV tiles keys by BLOCK_N and walks queries by BLOCK_M.
FWD_CONFIGS = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 32, 4, 4),
               (64, 64, 4, 3), (64, 32, 4, 4), (64, 128, 4, 2), (32, 32, 4, 2)]
# The backward's tiles on sm_90, 16-bit inputs (tests/aot.py: ptxas -v): the tile that
# wgmma's M walks (BLOCK_N for dK/dV, BLOCK_M for dQ) is 64 or more, and each config is kept
# up to the largest head dim at which neither the atomic nor the deterministic variant
# spills. At head dim 256 dK/dV's dk and dv accumulators alone fill 128 registers a thread:
# its one sm_90 tile, 16x64x8x2, spills with atomic dQ unless K is read in column chunks
# (_dkdv_tiles' K_CHUNKS; with dropout, alone or with softcap and ALiBi, it still does). The
# last tile of each table takes the least shared memory at head dim 256, for GPUs with less
# than sm_80 (dK/dV's holds k and v of 32 keys, too few rows for wgmma: mma.sync). Float32
# inputs take FP32_CONFIGS.
DKDV_CONFIGS = [(32, 128, 8, 3, 128), (64, 128, 8, 2, 64), (32, 64, 8, 2, 128),
                (32, 64, 4, 3, 64), (64, 64, 4, 2, 64), (16, 64, 4, 2, 128),
                (16, 64, 8, 2, 256), (16, 32, 4, 2, 256)]
DQ_CONFIGS = [(128, 32, 8, 3, 256), (128, 64, 8, 2, 128), (64, 32, 4, 3, 128),
              (64, 32, 8, 2, 128), (64, 64, 4, 2, 64), (64, 16, 4, 2, 256), (64, 16, 4, 1, 256)]
# On sm_90 with 16-bit inputs, tiles that flags need to compile without spills on triton 3.6
# and 3.9 (with dropout, softcap and ALiBi on): dQ at head dim 256 (128x16; sm_80 spills 480 B
# with it, so it is not tried there); atomic dK/dV up to head dim 32, which keeps 64 query rows
# for its dQ product's wgmma (64x64 with 8 warps: half the scores a thread of 4 warps holds).
DQ_CONFIGS_SM90 = DQ_CONFIGS + [(128, 16, 8, 2, 256)]
DKDV_CONFIGS_SM90 = DKDV_CONFIGS + [(64, 64, 8, 2, 32)]
# Under the interpreter: small tiles, so that short test sequences span several of them.
INTERPRET_CONFIG = (16, 16, 1, 1)
# The forward on sm_90 with 16-bit inputs, per head dim: tiles that use wgmma and spill no
# register with and without masks (ptxas -v, tests/test_attention_targets.py), among them
# 4-warp (one warpgroup) and 8-warp ones. Flags: USE_TMA loads and stores through tensor
# descriptors (kept only for 16-byte aligned strides); WARP_SPECIALIZE adds a producer warp
# group to two consumer ones, which split BLOCK_M (masked calls: one loop, every tile masked).
# Every config that could be the fastest stays a candidate: the pointer twins too.
_TMA, _WS = "USE_TMA", "WARP_SPECIALIZE"
_FWD_SM90_SMALL_D = [(128, 128, 4, 3, _TMA, _WS), (128, 64, 4, 3, _TMA, _WS),
                     (128, 128, 8, 3, _TMA), (128, 64, 4, 3, _TMA), (128, 128, 8, 3),
                     (128, 64, 4, 3), (64, 64, 4, 3)]
FWD_CONFIGS_SM90 = {
    16: _FWD_SM90_SMALL_D, 32: _FWD_SM90_SMALL_D, 64: _FWD_SM90_SMALL_D,
    128: [(128, 128, 4, 2, _TMA, _WS), (128, 64, 4, 3, _TMA, _WS), (128, 128, 8, 2, _TMA),
          (128, 64, 8, 3, _TMA), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
    256: [(128, 32, 4, 2, _TMA, _WS), (128, 64, 8, 2, _TMA), (128, 32, 8, 3, _TMA),
          (64, 64, 4, 2, _TMA), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 8, 3)],
    # q's and k's 192 columns as 128 + 64 (tail_head_dims_meta), v's 128 or fewer: the table
    # of 256 and of 128 compiled (reports/hopper-attention.md 12: masked and unmasked, triton
    # 3.9 and 3.6, every one wgmma and spill-free); kept, those that fit in shared memory
    # (128x128x4x2 warp-specialized allocates 246 KB), larger tiles or more stages first,
    # and the 256 table's 64x32x8x3, whose 8 scores a thread dropout's budget keeps.
    192: [(128, 64, 4, 3, _TMA, _WS), (128, 32, 4, 2, _TMA, _WS), (128, 128, 8, 2, _TMA),
          (128, 64, 8, 3, _TMA), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3),
          (64, 32, 8, 3)],
}
# The FP8 forward on sm_90, per head dim (tests/test_attention_fp8.py: ptxas -v, triton 3.9
# and 3.6): tiles that use e4m3 wgmma and spill no register with and without masks (the
# warp-specialized ones without, the only kernel they specialize). e4m3 tiles take half the
# shared memory of 16-bit ones: 128x256 tiles fit with warp specialization at head dims up to
# 128, and 3 stages where 16-bit tiles keep 2. Dropped because the masked kernel spills
# (triton 3.9): 128x256x8x2 TMA (16 B at D=64, 2.5 KB at D=128), 128x64x4x3 TMA (D=128,
# 668 B), 128x64x8x2 (D=256, 32-104 B), 64x64x4x2 TMA (D=256, 1 KB); (triton 3.6, D=128)
# 128x128x8x3 (136 B) and 64x64x4x3 (16 B), whose 2-stage twins spill on neither. Masked
# calls with a score modification or a float32 output tune fewer (_sm90_fp8_prune).
_FWD_FP8_SM90_SMALL_D = [(128, 256, 4, 2, _TMA, _WS), (128, 128, 4, 3, _TMA, _WS),
                         (128, 128, 8, 3, _TMA), (128, 64, 4, 3, _TMA), (128, 128, 8, 3),
                         (128, 64, 4, 3), (64, 64, 4, 3)]
FWD_FP8_CONFIGS_SM90 = {
    16: _FWD_FP8_SM90_SMALL_D, 32: _FWD_FP8_SM90_SMALL_D, 64: _FWD_FP8_SM90_SMALL_D,
    128: [(128, 256, 4, 2, _TMA, _WS), (128, 128, 4, 3, _TMA, _WS), (128, 128, 8, 3, _TMA),
          (128, 64, 8, 3, _TMA), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2)],
    256: [(128, 64, 4, 2, _TMA, _WS), (128, 32, 4, 2, _TMA, _WS), (128, 32, 8, 3, _TMA),
          (128, 32, 8, 3), (64, 32, 8, 3)],
}
# The FP8 forward of packed sequences (VARLEN) on sm_90: configs of FWD_FP8_CONFIGS_SM90 that
# spill there, where the dense masked kernel does not (ptxas -v, every config without warp
# specialization at head dims 32 to 256, tests/test_attention_varlen_fp8.py): at head dim 128
# 128x128x8x3 TMA (12 B, triton 3.6) and 128x128x8x2 (4 B, triton 3.9). Before V^T's
# sequences started on 16-byte boundaries six configs at head dims 64 to 256 spilled 8 to 744 B
# (triton 3.9; reports/fp8-varlen.md).
FWD_FP8_VARLEN_SPILLS_SM90 = {128: [(128, 128, 8, 3, _TMA), (128, 128, 8, 2)]}
# The masked FP8 forward on sm_90 with a float32 output, where the same config with a 16-bit
# one does not spill: 128x128x8x2 at head dim 128 (8 B, triton 3.9; reports/hopper-attention.md
# 11). No rule of sizes fits it: its 3-stage TMA twin and 128x64x4x3 at head dim 64, as many
# values a thread, spill on neither triton.
FWD_FP8_FLOAT32_OUT_SPILLS_SM90 = {128: [(128, 128, 8, 2)]}
# Float32 inputs, every GPU, per head dim (16 takes the table of 32; the backward's 16 and 32
# that of 64): their dots run on FMA units (ieee), whose operands sit in registers, so only
# small tiles hold a head dim's rows without spilling. Each config compiles without spills
# on triton 3.6 and 3.9 (ptxas -v; sm_90: masked, the forward unmasked too, dK/dV atomic and
# deterministic; sm_80: masked, dK/dV both ways, and with dropout, softcap and ALiBi on;
# reports/hopper-attention.md 14); the 16-bit tables' tiles spilled 24 B to 120 KB on sm_90.
# The forward's 128x16x8x2 and 32x64x8x2 spill below head dim 64 (4 to 16 B, triton 3.9):
# not in the table of 32.
FP32_CONFIGS = {
    "fwd": {32: [(64, 32, 8, 2), (32, 32, 8, 2), (64, 16, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2)],
            64: [(128, 16, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2),
                 (64, 16, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2)],
            128: [(64, 16, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2), (32, 16, 4, 2),
                  (16, 16, 4, 2)],
            256: [(64, 16, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)]},
    "dkdv": {64: [(16, 64, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2),
                  (16, 32, 4, 2)],
             128: [(16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)],
             256: [(16, 32, 8, 2), (16, 16, 8, 2)]},
    "dq": {64: [(64, 32, 8, 1), (64, 16, 8, 2), (32, 32, 8, 2), (64, 16, 4, 1), (32, 16, 4, 2)],
           128: [(32, 16, 8, 2), (16, 16, 4, 2)],
           256: [(16, 16, 8, 2)]},
}
# The float32 configs that spill on sm_90 (ptxas -v, triton 3.9 and 3.6, masked, dK/dV
# atomic and deterministic), per kernel, which _fp32_prune drops: with dropout, softcap and
# ALiBi on (4 to 64 B), per head dim, when any of the three is on (subsets were not compiled);
# with q's and k's head dim in a main tile and a tail (tail_head_dims_meta), per (main, tail)
# (8 to 1032 B; 96, 80 and 192 spill in none); packed (VARLEN), per head dim (4 to 32 B).
FP32_FLAG_SPILLS_SM90 = {
    "fwd": {64: [(32, 32, 8, 2)], 128: [(32, 16, 8, 2), (16, 16, 4, 2)], 256: [(64, 16, 8, 2)]},
    "dkdv": {16: [(32, 32, 8, 2)], 32: [(16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
             64: [(16, 64, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2), (16, 32, 4, 2)],
             256: [(16, 32, 8, 2)]},
    "dq": {64: [(32, 32, 8, 2)]},
}
FP32_TAIL_SPILLS_SM90 = {
    "fwd": {(128, 32): [(64, 16, 8, 2)], (32, 16): [(64, 32, 8, 2), (128, 16, 8, 2)]},
    "dkdv": {(128, 32): [(16, 32, 8, 2)], (32, 16): [(32, 32, 8, 2), (16, 64, 8, 2)]},
    "dq": {(32, 16): [(32, 32, 8, 2), (64, 16, 4, 1)]},
}
FP32_VARLEN_SPILLS_SM90 = {"fwd": {64: [(64, 16, 4, 2), (32, 16, 4, 2)]},
                           "dkdv": {64: [(16, 64, 8, 2)]}, "dq": {}}
# Every forward BLOCK_N divides it: with Nk a multiple, no key tile is partial.
KEY_TILE_MULTIPLE = 128


def smem_estimate(kernel: str, block_m: int, block_n: int, block_d: int, stages: int,
                  elem: int, flags=(), arch=None, tail: int = 0, block_dv=None) -> int:
    """Bytes of shared memory a config allocates: the streamed tiles times the pipeline depth,
    the tiles held across the loop and the buffers the epilogue and layout changes take. An
    upper bound, to 256 B, of what triton 3.6 and 3.9 allocate for sm_90 (every sm_90 config
    the tables keep, compiled: reports/hopper-attention.md 10), used to prune configs.
    flags: the config's (USE_TMA, WARP_SPECIALIZE). arch: 90 counts the K column chunks of
    16-bit atomic dK/dV from head dim 256 (_dkdv_tiles' K_CHUNKS) as sm_90 stages them
    (sm_80's kernel allocates less than the unchunked count: 86 KB at 16x64x8x2). tail: the
    launch's BLOCK_DT (tail_head_dims_meta; block_d is then its staged width, or v's if
    wider). block_dv: v's and the output's tile where the forward counts it apart (launches
    with a tail: at (192, 128) the estimate of each sm_90 table config without warp
    specialization is what triton 3.9 allocates, to the byte); block_d when None."""
    if kernel == "fwd":
        block_dv = block_dv or block_d
        size = elem * (block_d * (block_m + stages * block_n) + block_dv * stages * block_n)
        # FP8 inputs (elem 1): the output is 16- or 32-bit, as the caller asks: 4 bytes.
        out = 4 if elem == 1 else elem
        if "WARP_SPECIALIZE" in flags:
            # Each of the two consumer warp groups stages its output rows, 64 at least, and
            # the producer and consumers share barriers.
            size += out * block_dv * max(block_m, 128) + 1024
        else:
            # The output tile's layout change before its store reuses the pipeline's buffers.
            size = max(size, out * block_m * block_dv)
        if "USE_TMA" in flags:
            size += 1024  # the pipeline's mbarriers
        return size
    if kernel == "dkdv":
        # Each stage holds the query tile's q^T and dO rows and their lse and delta (float32).
        # 16-bit atomic dQ, which allocates more than the deterministic variant, is counted:
        # its float32 dQ^T tile (from head dim 64; dS^T below) passes through shared memory
        # (float32 inputs allocate less than the rest of the count: 213 of 230 KB at 32x128x8x3
        # and head dim 128, both variants).
        stats = 8 * stages * block_m
        if arch == 90 and elem == 2 and block_d >= 256:
            # K_CHUNKS: v held, no K tile; each stage holds the column chunks of K for S and
            # for dQ (a key tile each; triton allocates 7 of their 8 chunks at 16x64) and of
            # q^T for S; dS^T and one float32 dQ^T chunk of 64 columns pass through.
            return (elem * block_d * (block_n + stages * (2 * block_n + 3 * block_m))
                    + 4 * 64 * block_m + elem * block_m * block_n + stats)
        atomic_dq = max(4 * block_m * block_d, 2 * block_m * block_n) if elem == 2 else 0
        if 0 < tail < 64 and block_m < 64:
            # The tail's dQ product reads 64 columns of K a query tile (_dkdv_tiles): one
            # more streamed key tile (sm_90, D = 96, 16x64x8x2: 66560 B compiled against
            # 57600 without it).
            atomic_dq += elem * 64 * block_n * stages
        return elem * block_d * (2 * block_n + 2 * stages * block_m) + stats + atomic_dq
    return elem * block_d * (2 * block_m + 2 * stages * block_n)


def configs_for(kernel: str, block_d: int, elem: int, smem_limit: int, arch=None,
                tma: bool = False, tail: int = 0, block_dv=None):
    """The configs of `kernel` that fit smem_limit bytes of shared memory at head dim block_d (a
    power of two, or the staged width of a main tile and a tail: tile_head_dim's) with elem-byte
    inputs. arch: the GPU's compute capability (90 for sm_90); None, or any other than 90, takes
    the tables every GPU from sm_80 on runs (the FP8 forward's, elem 1, too). TMA configs only
    with `tma` (the tensors allow descriptors). tail, block_dv: smem_estimate's.
    On sm_90 with 16-bit inputs, only tiles whose wgmma M side holds 64 rows, and no backward
    tile of one warp group with ONE_WARPGROUP_ACCUMULATORS_SM90 accumulator registers a thread."""
    # A head dim in a main tile and a tail (tail_head_dims_meta) stages block_d columns, no
    # power of 2: the padded tile's table and tile-size rule, shared memory at block_d.
    bucket = block_width(block_d)
    if kernel == "fwd" and arch == 90 and elem <= 2:
        tables = FWD_CONFIGS_SM90 if elem == 2 else FWD_FP8_CONFIGS_SM90
        table, small = tables.get(block_d, tables[bucket]), False
    elif elem == 4:
        tables = FP32_CONFIGS[kernel]
        table, small = tables.get(max(bucket, 32), tables[64]), False
    else:
        hopper_16bit = arch == 90 and elem == 2
        table = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS_SM90 if hopper_16bit else DKDV_CONFIGS,
                 "dq": DQ_CONFIGS_SM90 if hopper_16bit else DQ_CONFIGS}[kernel]
        # 256-wide 16-bit rows fill the registers: small tiles.
        small = bucket * elem >= 512
    out = []
    for block_m, block_n, warps, stages, *extra in table:
        # Strings are flags; a number bounds the head dims a config serves (past it, it spills).
        flags = tuple(e for e in extra if isinstance(e, str))
        if any(isinstance(e, int) and block_d > e for e in extra):
            continue
        if (small and block_m * block_n > 64 * 64) or ("USE_TMA" in flags and not tma):
            continue
        # Hopper's warpgroup MMA takes 64 rows at least: fewer fall back to mma.sync.
        if arch == 90 and elem == 2 and (block_n if kernel == "dkdv" else block_m) < 64:
            continue
        # Nor one warp group holding 128 accumulator registers a thread in the backward
        # (spills on triton 3.6: ONE_WARPGROUP_ACCUMULATORS_SM90).
        if arch == 90 and elem == 2 and kernel != "fwd" and warps == 4 and (
                (2 * block_n if kernel == "dkdv" else block_m) * block_d
                >= ONE_WARPGROUP_ACCUMULATORS_SM90 * 32 * warps):
            continue
        # Fewer stages fit more, but an unpipelined loop is no config worth tuning.
        while stages > 2 and smem_estimate(kernel, block_m, block_n, block_d, stages, elem,
                                           flags, arch, tail, block_dv) > smem_limit:
            stages -= 1
        if smem_estimate(kernel, block_m, block_n, block_d, stages, elem, flags,
                         arch, tail, block_dv) <= smem_limit:
            out.append((block_m, block_n, warps, stages, *flags))
    return list(dict.fromkeys(out))


def _smem_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT[80])


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _tma_aligned(*tensors) -> bool:
    """TMA descriptors can address the rows of these tensors: 16-byte aligned data and every
    stride but the last (1) a multiple of 16 bytes, as Hopper's tensor memory accelerator
    requires. Dimensions of size 1 are never stepped over, whatever their stride."""
    return all(x.data_ptr() % 16 == 0 and all(
        (stride * x.element_size()) % 16 == 0 for size, stride in zip(x.shape[:-1], x.stride())
        if size > 1) for x in tensors)


@contextlib.contextmanager
def _descriptor_scratch(needed: bool):
    """Device-made TMA descriptors live in global scratch memory that triton asks its
    allocator for at launch: torch's, for the launch, unless the caller has set one."""
    from triton.runtime import _allocation

    current = _allocation._allocator  # a ContextVar from triton 3.5 on, the allocator before
    current = current.get() if isinstance(current, contextvars.ContextVar) else current
    if not needed or interpreting() or not isinstance(current, _allocation.NullAllocator):
        yield
        return
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8,
                                                                     device="cuda"))
    try:
        yield
    finally:
        triton.set_allocator(current)


def _config_meta(config) -> dict:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, *flags) -> the kernel's tile sizes and each
    flag (the name of a constexpr, e.g. USE_TMA) set True."""
    return {"BLOCK_M": config[0], "BLOCK_N": config[1], **dict.fromkeys(config[4:], True)}


def triton_configs(configs) -> list:
    """The triton.Configs of (BLOCK_M, BLOCK_N, num_warps, num_stages, *flags) tuples, as the
    autotuner holds them."""
    return [triton.Config(_config_meta(c), num_warps=c[2], num_stages=c[3]) for c in configs]


# With dropout the forward draws Philox words for the scores a thread holds: past 32 scores a
# thread (BLOCK_M x BLOCK_N over the warps) most sm_90 16-bit configs spill (ptxas -v, triton
# 3.9, head dims 64 and 128: 8 to 340 bytes; 2 to 4.5 KB when each score took its own
# Philox); those within 32 that were compiled (64x64, 4 warps; 128x64, 8 warps) spill none.
DROPOUT_SCORES_PER_THREAD = 32


def _forward_prune(configs, nargs, **meta):
    """On sm_90 with 16-bit inputs _sm90_flag_prune first. With DROPOUT, only the configs
    within DROPOUT_SCORES_PER_THREAD (all, if none is), none warp-specialized: triton 3.4 to
    3.6 fail to warp-specialize the loop with dropout's Philox (NVGPUWarpSpecialization).
    FP8 with MASK_KEYS: none warp-specialized either (its masked tiles load V^T through
    pointers, which the pass rejects in one loop on triton 3.9), and on sm_90
    _sm90_fp8_prune's. FP8 with VARLEN on sm_90: none of FWD_FP8_VARLEN_SPILLS_SM90 either.
    Float32: _fp32_prune. Every other call, masked or not, packed or dense, keeps every
    config."""
    if _sm90_inputs(nargs, 2):
        configs = _sm90_flag_prune("fwd", configs, **meta)
    configs = _fp32_prune("fwd", configs, nargs, **meta)
    if meta.get("FP8") and meta.get("VARLEN"):
        configs = _without_listed_spills(configs, nargs, tile_head_dim(meta),
                                         FWD_FP8_VARLEN_SPILLS_SM90)
    if meta.get("FP8") and meta.get("MASK_KEYS"):
        return _sm90_fp8_prune([c for c in configs if not c.kwargs.get("WARP_SPECIALIZE")],
                               nargs, **meta)
    if not meta.get("DROPOUT"):
        return configs
    return [c for c in configs if not c.kwargs.get("WARP_SPECIALIZE") and c.kwargs["BLOCK_M"]
            * c.kwargs["BLOCK_N"] <= DROPOUT_SCORES_PER_THREAD * 32 * c.num_warps] or configs


def _fp32_prune(kernel: str, configs, nargs, **meta):
    """Float32 inputs on sm_90: with a tail, none of FP32_TAIL_SPILLS_SM90's configs of
    `kernel` at (BLOCK_D, BLOCK_DT); with DROPOUT, SOFTCAP or HAS_ALIBI, none of
    FP32_FLAG_SPILLS_SM90's at the launch's head dim; with VARLEN, none of
    FP32_VARLEN_SPILLS_SM90's."""
    if not _sm90_inputs(nargs, 4):
        return configs
    if meta.get("VARLEN"):
        configs = _without_listed_spills(configs, nargs, tile_head_dim(meta),
                                         FP32_VARLEN_SPILLS_SM90[kernel])
    if "BLOCK_DT" in meta:
        configs = _without_listed_spills(configs, nargs, (meta["BLOCK_D"], meta["BLOCK_DT"]),
                                         FP32_TAIL_SPILLS_SM90[kernel])
    if any(meta.get(flag) for flag in ("DROPOUT", "SOFTCAP", "HAS_ALIBI")):
        configs = _without_listed_spills(configs, nargs, tile_head_dim(meta),
                                         FP32_FLAG_SPILLS_SM90[kernel])
    return configs


def _without_listed_spills(configs, nargs, block_d, spills):
    """On sm_90, no config that `spills` (a table head dim -> configs, as
    FWD_FP8_VARLEN_SPILLS_SM90; or (BLOCK_D, BLOCK_DV) -> configs) lists at block_d (all, if
    it lists every one)."""
    q = nargs["q_ptr"]
    if not q.is_cuda or _arch(q.device) != 90:
        return configs
    spills = spills.get(block_d, ())
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                   c.num_stages, *(f for f in (_TMA, _WS) if c.kwargs.get(f)))
            not in spills] or configs


# The masked FP8 forward on sm_90 (dense or packed) with any score modification (SOFTCAP,
# HAS_SINKS, HAS_ALIBI): the float32 values a thread holds for its tile, scores (BLOCK_M x
# BLOCK_N) and output accumulators (BLOCK_M x head dim) over the threads, past which the
# table's 8-warp tiles spill (ptxas -v, triton 3.9 and 3.6, combinations of softcap, sinks and
# ALiBi with 16- and 32-bit outputs, head dims 32 to 256; reports/hopper-attention.md 11):
# 128 at head dim 128 (128x128: 4 to 524 B; sinks alone 8 to 36 B, ALiBi alone 16 B), 144 at
# 256 (128x32: 4 to 16 B, triton 3.6); within 96 none spilled. One warp group (4 warps)
# spills past SCORE_MODS_ONE_WARPGROUP_SCORES_SM90 scores a thread, as in 16-bit: 128x64 at
# head dims 32 (4 to 20 B, triton 3.6, all three) and 64 (16 to 224 B; ALiBi alone 32 to
# 48 B). Unmasked calls: none spilled.
FP8_SCORE_MODS_VALUES_SM90 = 96


def _values_per_thread(config, block_d: int) -> int:
    return config.kwargs["BLOCK_M"] * (config.kwargs["BLOCK_N"] + block_d) // (
        32 * config.num_warps)


def _sm90_fp8_prune(configs, nargs, **meta):
    """The masked FP8 forward's configs (none warp-specialized) that compile without spills
    on sm_90 under the launch's score modifications (meta) and output dtype (o_ptr's, which
    triton's autotuner keys on): with a score modification (SCORE_MOD_FLAGS) one-warpgroup
    tiles within SCORE_MODS_ONE_WARPGROUP_SCORES_SM90 scores a thread and every tile within
    FP8_SCORE_MODS_VALUES_SM90 values (where none is, the lightest); with a float32 output
    none of FWD_FP8_FLOAT32_OUT_SPILLS_SM90. Elsewhere all."""
    q, out = nargs["q_ptr"], nargs.get("o_ptr")
    if not configs or not q.is_cuda or _arch(q.device) != 90:
        return configs
    block_d = tile_head_dim(meta)
    if any(meta.get(flag) for flag in SCORE_MOD_FLAGS):
        configs = _within_scores(configs, SCORE_MODS_ONE_WARPGROUP_SCORES_SM90,
                                 lambda c: c.num_warps == 4)
        configs = _within_scores(configs, FP8_SCORE_MODS_VALUES_SM90,
                                 per_thread=lambda c: _values_per_thread(c, block_d))
    if out is not None and out.element_size() == 4:
        configs = _without_listed_spills(configs, nargs, block_d,
                                         FWD_FP8_FLOAT32_OUT_SPILLS_SM90)
    return configs


# Scores (BLOCK_M x BLOCK_N over the threads) a thread may hold on sm_90 with 16-bit inputs
# when flags add registers, per kernel and up to the head dim keying each budget: past them
# tiles of the tables spill (ptxas -v, triton 3.9 and 3.6, with every combination of dropout,
# softcap and ALiBi; reports/hopper-attention.md, tests/test_attention_flag_spills.py).
# Dropout's Philox words for those scores are live with the accumulators, which grow with the
# head dim; dK/dV with atomic dQ also holds the dQ product and its atomics' addresses.
DROPOUT_SCORES_SM90 = {"fwd": {128: 32, 256: 16}, "dq": {64: 16, 128: 8, 256: 4},
                       "dkdv": {64: 16, 128: 8, 256: 4},
                       "dkdv-atomic": {32: 16, 64: 8, 128: 4, 256: 4}}
# ALiBi in dK/dV with atomic dQ, from head dim 64 (triton 3.6: 32x128 tiles, 8 warps, at head
# dim 128 12 B spilled, 24 B with softcap too; 64x128 at head dim 64 with softcap 4 B).
ALIBI_ATOMIC_SCORES_SM90 = {64: 16, 128: 8}
# A backward tile whose accumulators (dK/dV's dk and dv, dQ's dq) take 128 registers a thread
# of one warp group (4 warps: dK/dV's 16x64 tiles at head dim 128, dQ's 64x16 at 256) spills
# on triton 3.6, the flags off too (atomic dK/dV 12/20 B, dQ 80/80 and 592/632 B; with flags
# 4 to 612 B), where the 8-warp tiles holding as many do not: configs_for leaves them out on
# sm_90 with 16-bit inputs (triton 3.9 compiles them without spills with the flags off;
# reports/hopper-attention.md 10).
ONE_WARPGROUP_ACCUMULATORS_SM90 = 128
# Softcap and ALiBi together in a forward tile that one warp group runs (4 warps, not warp
# specialized), from head dim 64 (triton 3.9, 128x64 tiles with TMA: 16 B spilled).
SCORE_MODS_ONE_WARPGROUP_SCORES_SM90 = 32


def _sm90_inputs(nargs, elem: int) -> bool:
    """The launch's q has elem-byte elements on an sm_90 GPU (elem 2: where the budgets above
    hold)."""
    q = nargs["q_ptr"]
    return q.is_cuda and q.element_size() == elem and _arch(q.device) == 90


def _scores_per_thread(config) -> int:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps)


def _within_scores(configs, budget, applies=lambda config: True,
                   per_thread=_scores_per_thread):
    """The configs within `budget` scores a thread (those `applies` exempts count as within);
    if none is, the lightest: fewest scores a thread, then most warps, then fewest stages (dQ
    at head dim 256 with dropout: DQ_CONFIGS_SM90's 128x16 tiles, the only ones kept).
    per_thread: what a config holds a thread, if not its scores."""
    kept = [c for c in configs if not applies(c) or per_thread(c) <= budget]
    weight = {id(c): (per_thread(c), -c.num_warps, c.num_stages) for c in configs}
    lightest = min(weight.values(), default=None)
    return kept or [c for c in configs if weight[id(c)] == lightest]


def _per_head_dim(budgets: dict, block_d: int) -> int:
    """The budget of the smallest head dim keying `budgets` that is block_d or more (else of
    the largest)."""
    return budgets[min([d for d in budgets if d >= block_d], default=max(budgets))]


def _sm90_flag_prune(kernel: str, configs, **meta):
    """The configs of `kernel` ("fwd", "dkdv", "dq") that compile without spills on sm_90 with
    16-bit inputs under the launch's flags (meta): with DROPOUT within
    DROPOUT_SCORES_SM90, with HAS_ALIBI and atomic dQ within ALIBI_ATOMIC_SCORES_SM90, with
    SOFTCAP and HAS_ALIBI the forward's one-warpgroup tiles within
    SCORE_MODS_ONE_WARPGROUP_SCORES_SM90 (the backward's one-warpgroup tiles past
    ONE_WARPGROUP_ACCUMULATORS_SM90 are not in configs_for's list). dK/dV with atomic dQ
    below head dim 64 (or a main tile below 64 beside a tail) keeps tiles of 64 query rows
    or more, the M side of its dQ product there: wgmma, not mma.sync."""
    if not configs:
        return configs
    block_d, atomic = tile_head_dim(meta), meta.get("ATOMIC_DQ")
    if kernel == "dkdv" and atomic:
        kernel = "dkdv-atomic"
        # With a tail, the main tile's dQ product below 64 columns too (_atomic_dq).
        if block_d < 64 or ("BLOCK_DT" in meta and meta["BLOCK_D"] < 64):
            configs = [c for c in configs if c.kwargs["BLOCK_M"] >= 64] or configs
    if meta.get("DROPOUT"):
        configs = _within_scores(configs, _per_head_dim(DROPOUT_SCORES_SM90[kernel], block_d))
    if kernel == "dkdv-atomic" and meta.get("HAS_ALIBI") and block_d >= 64:
        configs = _within_scores(configs, _per_head_dim(ALIBI_ATOMIC_SCORES_SM90, block_d))
    if kernel == "fwd" and meta.get("SOFTCAP") and meta.get("HAS_ALIBI") and block_d >= 64:
        configs = _within_scores(configs, SCORE_MODS_ONE_WARPGROUP_SCORES_SM90, lambda c: (
            c.num_warps == 4 and not c.kwargs.get("WARP_SPECIALIZE")))
    return configs


# dQ on sm_90 with 16-bit inputs and v's head dim apart from q's: tiles that spill there where
# the same tile with equal head dims does not (ptxas -v, triton 3.9; 3.6 spills none):
# 128x32x8x3 at (BLOCK_D, BLOCK_DV) = (256, 128), head dims 192 or 256 and 128 (72 B; 20 to
# 44 B with softcap or ALiBi). The tile left there, 128x16x8x2, spills 12 B with dropout and
# softcap together (none with either alone, or with ALiBi too; none on triton 3.6); the
# table holds no lighter one (every combination of dropout, softcap and ALiBi at head dims
# (192, 128) and (128, 64) compiled: tests/test_attention_mla.py). D = 192 has since run in
# a main tile and a tail (tail_head_dims_meta), keyed (128, 128) here: 128x32x8x3 spills
# nothing there, flags off (reports/hopper-attention.md 12) or softcap and ALiBi on (ptxas -v,
# 244 registers on triton 3.9, 238 on 3.6), so (256, 128) is left to D from 193 to 256.
DQ_VALUE_HEAD_DIM_SPILLS_SM90 = {(256, 128): [(128, 32, 8, 3)]}


# Atomic dK/dV on sm_90 with 16-bit inputs and a tail (tail_head_dims_meta), keyed (BLOCK_D,
# BLOCK_DT): tiles that spill there where the padded tile's kernel does not (ptxas -v; every
# config the pruning keeps at D = 192/128, 160, 96, 80 and 48 compiled, flags off,
# reports/hopper-attention.md 12): 32x128x8x3 at 96 = 64 + 32 (16/28 B on triton 3.9, 20/36 B
# on 3.6) and at 80 = 64 + 16 (20/36 B, 3.6), whose tail's dQ product reads 64 columns of K a
# query tile (_dkdv_tiles).
DKDV_TAIL_SPILLS_SM90 = {(64, 32): [(32, 128, 8, 3)], (64, 16): [(32, 128, 8, 3)]}


def _backward_prune(configs, nargs, **meta):
    """dK/dV's (ATOMIC_DQ in meta) and dQ's _sm90_flag_prune on sm_90, for dQ with v's head
    dim apart none of DQ_VALUE_HEAD_DIM_SPILLS_SM90, for atomic dK/dV with a tail none of
    DKDV_TAIL_SPILLS_SM90; float32: _fp32_prune; elsewhere all."""
    kernel = "dkdv" if "ATOMIC_DQ" in meta else "dq"
    configs = _fp32_prune(kernel, configs, nargs, **meta)
    if not _sm90_inputs(nargs, 2):
        return configs
    if "ATOMIC_DQ" not in meta and "BLOCK_DV" in meta:
        configs = _without_listed_spills(configs, nargs, (meta["BLOCK_D"], meta["BLOCK_DV"]),
                                         DQ_VALUE_HEAD_DIM_SPILLS_SM90)
    if meta.get("ATOMIC_DQ") and "BLOCK_DT" in meta:
        configs = _without_listed_spills(configs, nargs, (meta["BLOCK_D"], meta["BLOCK_DT"]),
                                         DKDV_TAIL_SPILLS_SM90)
    return _sm90_flag_prune(kernel, configs, **meta)


# Each kernel's autotuning beyond the shared key (head dim, sequence-length bucket, dtypes):
# the forward tunes masked and unmasked calls apart and times no warp-specialized config with
# dropout, where it cannot compile; the atomic dK/dV variant adds into dq, which every
# benchmarked launch must find zeroed, and tunes apart from the deterministic variant; packed
# variable-length batches (VARLEN) tune apart from dense ones.
TUNING = {"fwd": {"key": ["MASK_KEYS", "VARLEN"], "prune": _forward_prune},
          "dkdv": {"key": ["ATOMIC_DQ", "VARLEN"], "reset_to_zero": ["dq_ptr"],
                   "prune": _backward_prune},
          "dq": {"key": ["VARLEN"], "prune": _backward_prune}}
_autotuned = {}
# The score modifications' flags: tuned apart from the plain kernels (absent when off).
SCORE_MOD_FLAGS = ("SOFTCAP", "HAS_SINKS", "HAS_ALIBI")


def _launcher(kernel: str, fn, device, block_d: int, elem: int, arch=None, tma: bool = False,
              tail: int = 0, block_dv=None):
    """The kernel under an autotuner whose configs fit this device at head dim block_d
    (tile_head_dim's), tail and block_dv (see configs_for); key: the head dims, the
    sequence-length bucket, dropout, whether the forward masks keys and (added by triton) the
    argument dtypes."""
    smem = _smem_limit(device)
    cache_key = (kernel, block_d, elem, smem, arch, tma, tail, block_dv)
    if cache_key not in _autotuned:
        configs = triton_configs(configs_for(kernel, block_d, elem, smem, arch, tma, tail,
                                             block_dv))
        extra = TUNING.get(kernel, {})
        # BLOCK_DV, v's head dim tile, is passed only where it differs from BLOCK_D, and
        # BLOCK_DT, the tail of q's and k's, only where they have one (tail_head_dims_meta).
        key = ["BLOCK_D", "BLOCK_DV", "BLOCK_DT", "seq_bucket", "DROPOUT", *extra.get("key", ()),
               *(f for f in SCORE_MOD_FLAGS if f in fn.arg_names)]
        _autotuned[cache_key] = triton.autotune(
            configs, key=key, reset_to_zero=extra.get("reset_to_zero"),
            **tuning_options(key, extra.get("prune")))(fn)
    return _autotuned[cache_key]


def _run(kernel: str, fn, grid, args, meta, device, config, tma: bool = False):
    """Launch fn with a fixed config (given, or the interpreter's) or through autotuning.
    tma: the tensors allow TMA descriptors, so TMA configs may run."""
    if config is None and interpreting():
        config = INTERPRET_CONFIG
    if config is not None and "USE_TMA" in config and not tma:
        raise ValueError(f"config {config} loads through TMA descriptors: only the forward "
                         "does, on tensors with 16-byte aligned data and strides")
    with _descriptor_scratch(tma):
        if config is not None:
            fn[grid(config[0], config[1])](*args, **meta, **_config_meta(config),
                                           num_warps=config[2], num_stages=config[3])
            return
        elem = args[0].element_size()
        block_d, tail, block_dv = config_widths(meta)
        tuned = _launcher(kernel, fn, device, block_d, elem, _arch(device), tma, tail,
                          block_dv)
        run_tuned(tuned, lambda m: grid(m["BLOCK_M"], m["BLOCK_N"]), args, meta)


def tile_head_dim(meta) -> int:
    """The head dim that picks a launch's configs (tables, pruning budgets, shared memory
    estimates): the larger of q's and k's staged width (BLOCK_D, plus the tail BLOCK_DT where
    meta has one: 192 for D = 192 in 128 + 64 columns) and v's tile (BLOCK_DV, in meta where
    v's head dim differs). The larger one's configs hold the smaller one's tiles too."""
    return max(meta["BLOCK_D"] + meta.get("BLOCK_DT", 0), meta.get("BLOCK_DV") or 0)


def config_widths(meta) -> tuple:
    """(block_d, tail, block_dv) of configs_for for a launch's meta: tile_head_dim's, its
    BLOCK_DT (0 without) and, with a tail, v's tile, which the forward's shared memory then
    counts apart (smem_estimate; None without)."""
    tail = meta.get("BLOCK_DT", 0)
    return tile_head_dim(meta), tail, meta["BLOCK_DV"] if tail else None


def head_dim_tiles(head_dim: int) -> tuple[int, int]:
    """(main, tail) tile widths for a head dim that is no power of 2: the largest power of 2
    below it and the tile holding the rest (block_width: 16 at least, tl.dot's K)."""
    main = 1 << (head_dim.bit_length() - 1)
    return main, block_width(head_dim - main)


def tail_head_dims_meta(head_dim: int, head_dim_v: int) -> dict:
    """head_dims_meta's, with q's and k's head dim in a main tile and a tail (head_dim_tiles)
    wherever the two stage fewer columns than one padded tile: 192 = 128 + 64 (not 256),
    96 = 64 + 32, 160 = 128 + 32, 80 = 64 + 16, 48 and 40 = 32 + 16; 112 and 224 keep one
    padded tile (64 + 64 = 128, 128 + 128 = 256). With a tail, BLOCK_D is the main tile's,
    BLOCK_DT the tail's, and v's HEAD_DV and BLOCK_DV are always passed, as BLOCK_D no longer
    holds v's head dim. The attention kernels' launchers all take their meta from here."""
    meta = head_dims_meta(head_dim, head_dim_v)
    main, tail = head_dim_tiles(head_dim)
    if main + tail < block_width(head_dim):
        meta.update(BLOCK_D=main, BLOCK_DT=tail, HEAD_DV=head_dim_v,
                    BLOCK_DV=block_width(head_dim_v))
    return meta


def _backward_tails(head_dim: int, dropout_p: float) -> bool:
    """Whether the backward runs q's and k's head dim in a main tile and a tail: not with
    dropout where the main tile is 64 columns or fewer. There, on sm_90 with 16-bit inputs,
    the tail's atomic dK/dV kept one config, which spilled where one padded tile's first
    config does not (ptxas -v: D = 40 and 48, 64x128x8x2, 52/40 and 8/12 B on triton 3.9,
    24/44 and 16/28 B on 3.6; D = 96, 16x64x8x2, 4/4 B on 3.6; reports/hopper-attention.md
    12). The forward keeps its tail (with dropout too; its lse and output are the same)."""
    return not (dropout_p > 0 and head_dim_tiles(head_dim)[0] <= 64)


def head_dims_meta(head_dim: int, head_dim_v: int) -> dict:
    """The kernels' HEAD_DIM and BLOCK_D (q's and k's), with HEAD_DV and BLOCK_DV (v's) only
    where v's head dim differs: left out where they are equal, so the kernels compile as
    they do without v's own head dim, and tune under the same key."""
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_width(head_dim))
    if head_dim_v != head_dim:
        meta.update(HEAD_DV=head_dim_v, BLOCK_DV=block_width(head_dim_v))
    return meta


def _common(q, k, kv_lengths, window_left, window_right, head_dim_v=None, tails=True):
    """The kernels' shared arguments; with v's head dim head_dim_v (Ev), tail_head_dims_meta's
    (head_dims_meta's, one padded tile for q's and k's head dim, without `tails`)."""
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    unbounded = n_q + n_k
    dims = tail_head_dims_meta if tails else head_dims_meta
    meta = dict(dims(head_dim, head_dim if head_dim_v is None else head_dim_v),
                HAS_KV_LENGTHS=kv_lengths is not None,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    scalars = (heads, n_q, n_k, heads // k.shape[1])
    window = (unbounded if window_left < 0 else window_left,
              unbounded if window_right < 0 else window_right,
              length_bucket(max(n_q, n_k)))
    dummy = kv_lengths if kv_lengths is not None else q
    return meta, scalars, window, dummy


def dropout_meta(dropout_p, seed) -> dict:
    """The kernels' dropout arguments: with dropout_p > 0, the seed (an int64 tensor whose
    first element keys the draws), the cutoff that _dropout_keep compares 31 random bits with
    (so that round(p * 2^31) of every 2^31 draws drop) and the survivors' scale 1 / (1 - p),
    0 at p = 1, where none survives. dropout_p = 0 compiles dropout out."""
    if dropout_p == 0:
        return dict(DROPOUT=False)
    return dict(DROPOUT=True, seed_ptr=seed, dropout_cutoff=round(dropout_p * 2**31) - 1,
                dropout_scale=1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0)


def keys_major(v):
    """v (B, Hkv, Nk, D) as _attn_fwd's FP8 reads it: V^T, (B, Hkv, D, Nk) with the keys
    contiguous (see _load_keys_major). A v whose keys are contiguous already (a transposed
    view of such memory) is viewed as it is; any other is copied once, into rows padded to
    16 bytes, as TMA's strides must be."""
    if v.stride(2) == 1:
        return v.transpose(2, 3)
    n_k = v.shape[2]
    v_t = torch.empty((*v.shape[:2], v.shape[3], triton.cdiv(n_k, 16) * 16), dtype=v.dtype,
                      device=v.device)[..., :n_k]
    return v_t.copy_(v.transpose(2, 3))


def fp8_meta(descales, meta) -> dict:
    """The forward's FP8 arguments: descales (B, Hkv, 3) (q's, k's, v's) as contiguous
    float32, and the head dims' tiles of meta (_common's) padded to 32 columns at least (an
    e4m3 dot's K; v's as q's, so that they stay equal where the head dims are)."""
    tiles = {name: max(meta[name], 32) for name in ("BLOCK_D", "BLOCK_DV") if name in meta}
    return dict(FP8=True, descale_ptr=descales.to(torch.float32).contiguous(), **tiles)


def _score_mods(scale, softcap, alibi_slopes, sinks=None, q=None) -> tuple[float, dict]:
    """(qk_scale, the kernels' keyword arguments) for a softcap (0: none), ALiBi slopes
    (None, or (H,) or (B, H)) and, for the forward, sinks (None or (H,)); nothing is passed
    for what is off, so the flags compile out. q: the launch's query tensor, whose softcap
    takes the hardware's tanh where kernels._math.fast_tanh allows (FAST_TANH); None: the
    exact one."""
    qk_scale, extra = scale * LOG2E.value, {}
    if softcap:
        # tanh takes the scaled scores over the cap; the cap brings them back, in log2 units.
        qk_scale = scale / softcap
        extra.update(softcap_scale=softcap * LOG2E.value, SOFTCAP=True)
        if q is not None and fast_tanh(q):
            extra.update(FAST_TANH=True)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32).contiguous()
        extra.update(alibi_ptr=slopes, stride_alibi_b=slopes.stride(0) if slopes.ndim == 2 else 0,
                     HAS_ALIBI=True)
    if sinks is not None:
        extra.update(sinks_ptr=sinks.to(torch.float32).contiguous(), HAS_SINKS=True)
    return qk_scale, extra


def attention_forward(q, k, v, kv_lengths, scale, window_left, window_right, config=None,
                      softcap=0.0, sinks=None, alibi_slopes=None, dropout_p=0.0, seed=None,
                      descales=None, out_dtype=None):
    """-> out (B, H, Nq, D) in q's dtype (out_dtype if given), lse (B, H, Nq) float32
    natural log.

    softcap > 0 caps the scaled scores at softcap * tanh(s / softcap); sinks (H,) adds one
    logit per query head to every row's softmax (lse includes it); alibi_slopes (H,) or
    (B, H) adds -slope * |i + Nk - Nq - j| to the scaled (capped) scores. dropout_p > 0
    drops weights as dropout_keep_mask(seed, ...) says (see dropout_meta).
    descales (B, Hkv, 3) float32: FlashAttention-3's FP8 forward (see fp8_meta), q, k, v in
    float8_e4m3fn, the attention of q * descales[b, h // G, 0], k * descales[..., 1] and
    v * descales[..., 2] up to e4m3's rounding of the softmax weights.
    v (B, Hkv, Nk, Ev) may have a head dim Ev of its own (SDPA's): out is (B, H, Nq, Ev)."""
    head_dim_v = v.shape[-1]
    if descales is not None:
        v = keys_major(v)
    q, k, v = (lastdim_contiguous(x) for x in (q, k, v))
    batch, heads, n_q, _ = q.shape
    out = torch.empty((batch, heads, n_q, head_dim_v), dtype=out_dtype or q.dtype,
                      device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    # FP8 keeps q's and k's head dim in one padded tile: e4m3 dots take K in 32 columns.
    meta, scalars, window, dummy = _common(q, k, kv_lengths, window_left, window_right,
                                           head_dim_v, tails=descales is None)
    qk_scale, mods = _score_mods(scale, softcap, alibi_slopes, sinks, q)
    # Nk a multiple of every forward BLOCK_N: no key tile is partial, whichever config runs.
    meta["MASK_KEYS"] = (kv_lengths is not None or window_left >= 0 or window_right >= 0
                         or k.shape[2] % KEY_TILE_MULTIPLE != 0)
    meta.update(dropout_meta(dropout_p, seed))
    if descales is not None:
        meta.update(fp8_meta(descales, meta))
    args = (q, k, v, out, lse, dummy, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], *scalars, qk_scale, *window)
    _run("fwd", _attn_fwd, lambda bm, bn: (triton.cdiv(n_q, bm), heads, batch), args,
         dict(meta, **mods), q.device, config, tma=_tma_aligned(q, k, v, out))
    return out, lse


# Launch options of the backward's kernels. Without a register cap in the PTX, ptxas (12.8 in
# triton 3.6, 12.9 in 3.9) at -O3 gives a tile that must spill on sm_80 far fewer registers
# than it may use: dK/dV at D=128, 64x64 tiles, 4 warps got 32 registers and 38 KB of spills
# where a cap at the architectural 255 gives 255 registers and 4 KB.
BACKWARD_OPTIONS = {"maxnreg": 255}


def attention_backward(dout, q, k, v, out, lse, dlse, kv_lengths, scale, window_left,
                       window_right, config=None, deterministic=None, softcap=0.0, sinks=None,
                       alibi_slopes=None, dropout_p=0.0, seed=None):
    """-> dq, dk, dv in the dtypes of q, k, v, and with sinks also dsinks in theirs. dlse,
    the gradient of lse, may be None. softcap, sinks and alibi_slopes as the forward took
    them (its lse includes the sinks); alibi_slopes get no gradient. dropout_p and seed: the
    forward's, whose keep mask both kernels regenerate.

    By default 5 GEMMs per (query tile, key tile) pair: the dK/dV programs also add dQ into
    a float32 buffer with atomics, in an order that varies from run to run. deterministic=True
    runs 7: dK/dV, then a dQ kernel whose programs own their query rows, so that results are
    bit-for-bit repeatable. None (default) follows torch.are_deterministic_algorithms_enabled(),
    as torch's own attention backward does.
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    dout, q, k, v, out = (lastdim_contiguous(x) for x in (dout, q, k, v, out))
    # Row statistics are indexed as dense (B, H, Nq); autograd may hand dlse in expanded.
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    batch, heads, n_q, _ = q.shape
    kv_heads, n_k, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if deterministic or q.numel() == 0 or k.numel() == 0:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if dk.numel() == 0 or dq.numel() == 0:
        grads = dq.zero_(), dk.zero_(), dv.zero_()
        if sinks is None:
            return grads
        delta = -dlse if dlse is not None else torch.zeros_like(lse)
        return (*grads, _sinks_grad(sinks, lse, delta))
    meta, scalars, window, dummy = _common(q, k, kv_lengths, window_left, window_right,
                                           head_dim_v, _backward_tails(q.shape[-1], dropout_p))
    meta.update(dropout_meta(dropout_p, seed))
    qk_scale, mods = _score_mods(scale, softcap, alibi_slopes, q=q)

    delta = torch.empty_like(lse)
    rows = 16 if interpreting() else 64
    # delta = rowsum(dO * O) runs over out's and dO's columns: v's head dim.
    _attn_bwd_delta[(triton.cdiv(n_q, rows), heads, batch)](
        out, dout, dlse if dlse is not None else lse, delta, *out.stride()[:3],
        *dout.stride()[:3], heads, n_q, HEAD_DIM=head_dim_v, BLOCK_D=block_width(head_dim_v),
        HAS_DLSE=dlse is not None, BLOCK_M=rows)

    common = (q, k, v, dout, lse, delta)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    tail = (*scalars, scale, qk_scale, *window)
    _run("dkdv", _attn_bwd_dkdv,
         lambda bm, bn: (triton.cdiv(n_k, bn), kv_heads, batch),
         (*common, dk, dv, dq, dummy, *strides, *dk.stride()[:3], *dv.stride()[:3],
          *dq.stride()[:3], *tail),
         dict(meta, ATOMIC_DQ=not deterministic, **BACKWARD_OPTIONS, **mods), q.device, config)
    if not deterministic:
        dq = dq.to(q.dtype)
    else:
        _run("dq", _attn_bwd_dq,
             lambda bm, bn: (triton.cdiv(n_q, bm), heads, batch),
             (*common, dq, dummy, *strides, *dq.stride()[:3], *tail),
             dict(meta, **BACKWARD_OPTIONS, **mods), q.device, config)
    if sinks is None:
        return dq, dk, dv
    return dq, dk, dv, _sinks_grad(sinks, lse, delta)


def _sinks_grad(sinks, lse, delta):
    """d sink_h = -sum over batches and rows of p_sink * delta, p_sink = exp(sink_h - lse):
    the sink's score enters the softmax like a key's, with dO . v = 0 for its zero value.
    Rows with lse = -inf (a -inf sink and no key) add nothing."""
    p_sink = torch.exp(sinks.float()[None, :, None] - lse)
    return -torch.where(lse == float("-inf"), 0.0, p_sink * delta).sum((0, 2)).to(sinks.dtype)


def dropout_keep_mask(seed, shape, dropout_p):
    """The keep mask (B, H, Nq, Nk) bool that the kernels apply for this seed (an int64
    tensor) and dropout_p > 0, at every element (masked ones too): the tests run the float64
    twin with it."""
    batch, heads, n_q, n_k = shape
    keep = torch.empty(shape, dtype=torch.int8, device=seed.device)
    if keep.numel():
        rows, keys = (16, 16) if interpreting() else (64, 64)
        _dropout_keep_mask[(triton.cdiv(n_q, rows), heads, batch)](
            seed, keep, heads, n_q, n_k, dropout_meta(dropout_p, seed)["dropout_cutoff"],
            BLOCK_M=rows, BLOCK_N=keys)
    return keep.bool()


# ---------------------------------------------------------------------------------------
# Packed variable-length batches (VARLEN)
# ---------------------------------------------------------------------------------------


def _packed(x):
    """A packed (total, H, D) tensor as the dense kernels' (1, H, total, D), batch stride 0:
    with VARLEN each program moves its bases to its own sequence's rows instead."""
    rows, heads, dim = x.shape
    return x.as_strided((1, heads, rows, dim), (0, x.stride(1), x.stride(0), x.stride(2)))


def _packed_keys_major(v, cu_seqlens_k):
    """A packed v (total_k, Hkv, D) as _attn_fwd's FP8 reads it with VARLEN: V^T, (1, Hkv, D,
    L) with the keys contiguous and batch stride 0, sequence b's keys from key
    16 * (b + ceil(start / 16)) on, start its first packed row (clamped into [0, total_k], as
    _packed_sequence clamps it): a 16-byte boundary, and past the previous sequence's end.
    The copy runs on the device (no host sync); the gaps are never read."""
    total, kv_heads, dim = v.shape
    batch = cu_seqlens_k.shape[0] - 1
    rows = torch.arange(total, device=v.device)
    sequence = torch.searchsorted(cu_seqlens_k, rows.to(cu_seqlens_k.dtype), right=True) - 1
    start = cu_seqlens_k.long().clamp(0, total)[sequence.clamp_(0, max(batch - 1, 0))]
    keys = rows - start + 16 * (sequence + triton.cdiv(start, 16))
    # As bytes: torch's indexed copies take no float8.
    v_t = torch.empty((1, kv_heads, dim, triton.cdiv(total, 16) * 16 + 16 * batch),
                      dtype=torch.uint8, device=v.device)
    v_t[..., keys] = _packed(v).transpose(2, 3).view(torch.uint8)
    v_t = v_t.view(v.dtype)
    return v_t.as_strided(v_t.shape, (0, *v_t.stride()[1:]))


def _varlen_common(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                   window_right, head_dim_v=None, tails=True):
    """_common for packed (1, H, total, D) views: total_q and total_k go in as Nq and Nk
    (the kernels read them as the packed sizes), the longest sequences size the tiling key."""
    meta, scalars, window, dummy = _common(q, k, None, window_left, window_right, head_dim_v,
                                           tails)
    meta.update(VARLEN=True, cu_seqlens_q_ptr=cu_seqlens_q, cu_seqlens_k_ptr=cu_seqlens_k)
    return meta, scalars, (*window[:2], length_bucket(max(max_seqlen_q, max_seqlen_k))), dummy


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             scale, window_left, window_right, config=None, softcap=0.0,
                             sinks=None, alibi_slopes=None, dropout_p=0.0, seed=None,
                             descales=None, out_dtype=None):
    """Packed q (total_q, H, D), k, v (total_k, Hkv, D): sequence b is rows cu_seqlens[b] to
    cu_seqlens[b + 1] (int32, (B + 1,)), at most max_seqlen rows long, its masks aligned to
    its own lengths. -> out (total_q, H, D) in q's dtype, lse (H, total_q) float32. The grid
    runs ceil(max_seqlen_q / BLOCK_M) query tiles per sequence and head; those past a
    sequence's end exit at once.

    softcap, sinks (H,) and alibi_slopes ((H,) or (B, H), row b for sequence b) as in
    attention_forward, ALiBi's distance measured from each sequence's own bottom-right
    aligned position. dropout_p > 0: sequence b's mask is dropout_keep_mask(seed, (B, H,
    max_seqlen_q, max_seqlen_k), dropout_p)[b, :, :Lq, :Lk] (the sequence index is Philox's
    batch word, its own rows and keys the others).

    descales (B, Hkv, 3) float32, row b for sequence b: the FP8 forward, as in
    attention_forward (out in out_dtype); v is read as V^T (see _packed_keys_major)."""
    q, k = (lastdim_contiguous(x) for x in (q, k))
    if descales is None:
        v = lastdim_contiguous(v)
    total_q, heads, _ = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    out = torch.empty((total_q, heads, v.shape[-1]), dtype=out_dtype or q.dtype,
                      device=q.device)
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    views = [_packed(x) for x in (q, k, v, out)]
    if descales is not None:
        views[2] = _packed_keys_major(v, cu_seqlens_k)
    meta, scalars, window, dummy = _varlen_common(*views[:2], cu_seqlens_q, cu_seqlens_k,
                                                  max_seqlen_q, max_seqlen_k, window_left,
                                                  window_right, v.shape[-1], descales is None)
    meta["MASK_KEYS"] = True
    meta.update(dropout_meta(dropout_p, seed))
    if descales is not None:
        meta.update(fp8_meta(descales, meta))
    qk_scale, mods = _score_mods(scale, softcap, alibi_slopes, sinks, q)
    args = (*views, lse, dummy, *(s for x in views for s in x.stride()[:3]), *scalars,
            qk_scale, *window)
    longest_q = min(max_seqlen_q, total_q)
    _run("fwd", _attn_fwd, lambda bm, bn: (triton.cdiv(longest_q, bm), heads, batch), args,
         dict(meta, **mods), q.device, config, tma=_tma_aligned(q, k, v, out))
    return out, lse


def attention_varlen_backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
                              config=None, deterministic=None, softcap=0.0, sinks=None,
                              alibi_slopes=None, dropout_p=0.0, seed=None):
    """-> dq, dk, dv (packed, contiguous, in the dtypes of q, k, v) of
    attention_varlen_forward, and with sinks also dsinks in their dtype (one reduction over
    the packed lse and delta (H, total_q)); dlse (H, total_q) may be None. deterministic: as
    in attention_backward (None follows torch.are_deterministic_algorithms_enabled()).
    softcap, sinks, alibi_slopes, dropout_p and seed: the forward's."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    total_q, heads, _ = q.shape
    head_dim_v = v.shape[-1]
    total_k, kv_heads, _ = k.shape
    batch = cu_seqlens_q.shape[0] - 1
    atomic = not deterministic and q.numel() > 0 and k.numel() > 0
    dq = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic
          else torch.empty(q.shape, dtype=q.dtype, device=q.device))
    dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (k, v))
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    if q.numel() == 0 or k.numel() == 0:
        grads = dq.zero_(), dk.zero_(), dv.zero_()
        if sinks is None:
            return grads
        delta = -dlse if dlse is not None else torch.zeros_like(lse)
        return (*grads, _sinks_grad(sinks, lse[None], delta[None]))
    dout, q, k, v, out, dq_v, dk_v, dv_v = (_packed(lastdim_contiguous(x)) for x in
                                            (dout, q, k, v, out, dq, dk, dv))
    meta, scalars, window, dummy = _varlen_common(q, k, cu_seqlens_q, cu_seqlens_k,
                                                  max_seqlen_q, max_seqlen_k, window_left,
                                                  window_right, head_dim_v,
                                                  _backward_tails(q.shape[-1], dropout_p))
    meta.update(dropout_meta(dropout_p, seed))
    qk_scale, mods = _score_mods(scale, softcap, alibi_slopes, q=q)
    # delta needs no sequence bounds: a dense batch of one over every packed row.
    delta = torch.empty_like(lse)
    rows = 16 if interpreting() else 64
    _attn_bwd_delta[(triton.cdiv(total_q, rows), heads, 1)](
        out, dout, lse if dlse is None else dlse, delta, *out.stride()[:3], *dout.stride()[:3],
        heads, total_q, HEAD_DIM=head_dim_v, BLOCK_D=block_width(head_dim_v),
        HAS_DLSE=dlse is not None, BLOCK_M=rows)
    inputs = (q, k, v, dout, lse, delta)
    strides = [s for x in inputs[:4] for s in x.stride()[:3]]
    tail = (*scalars, scale, qk_scale, *window)
    longest_k, longest_q = min(max_seqlen_k, total_k), min(max_seqlen_q, total_q)
    _run("dkdv", _attn_bwd_dkdv, lambda bm, bn: (triton.cdiv(longest_k, bn), kv_heads, batch),
         (*inputs, dk_v, dv_v, dq_v, dummy, *strides,
          *(s for x in (dk_v, dv_v, dq_v) for s in x.stride()[:3]), *tail),
         dict(meta, ATOMIC_DQ=atomic, **BACKWARD_OPTIONS, **mods), q.device, config)
    if not deterministic:
        dq = dq.to(q.dtype)
    else:
        _run("dq", _attn_bwd_dq, lambda bm, bn: (triton.cdiv(longest_q, bm), heads, batch),
             (*inputs, dq_v, dummy, *strides, *dq_v.stride()[:3], *tail),
             dict(meta, **BACKWARD_OPTIONS, **mods), q.device, config)
    if sinks is None:
        return dq, dk, dv
    return dq, dk, dv, _sinks_grad(sinks, lse[None], delta[None])
