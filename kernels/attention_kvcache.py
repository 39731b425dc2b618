"""Decoding from a KV cache (flash-decoding): the append, the split-KV attention and the
combine of its splits, and their launcher.

Layout as FlashAttention's flash_attn_with_kvcache: q, out (B, Sq, H, D); a contiguous cache
(B, S_max, Hkv, D), or a paged one (num_pages, page_size, Hkv, D) read through block_table
(B, max_blocks) int32: token t of sequence b sits in page block_table[b, t // page_size] at
offset t % page_size. cache_seqlens (B,) int32 holds each sequence's tokens before the new
ones (clamped to [0, capacity - n_new] in the kernels, capacity = S_max or max_blocks *
page_size), and query i of sequence b sits at a = cache_seqlens[b] + n_new - Sq + i: it sees
key j iff j < cache_seqlens[b] + n_new and a - window_left <= j <= a + window_right.
The value cache, the new values and out may have a head dim Ev of their own (FlashAttention's
headdim_v; multi-head latent attention's D = 192, Ev = 128): the kernels then take HEAD_DV and
BLOCK_DV, passed only where Ev != D, so that equal head dims compile as without them.
Head dims past 256 (absorbed multi-head latent attention's decoding, DeepSeek-V2/V3's D = 576,
Ev = 512, the values often the keys' first 512 columns: v_cache = k_cache[..., :512]): the
attention takes a D that is no power of 2 as a tile of BLOCK_D columns, the largest power of
2 below D, and a tail tile of BLOCK_DT (wide_head_dims_meta: 576 = 512 + 64, not one tile of
1024), whose dots with the key tiles add; both tiles rotate with ROTARY_DIM (each pair's
partner is loaded by its column, in whichever tile it lies). D up to 768 (512 + 256), Ev up
to 512 in one tile (a float32 accumulator of (32, 512) stays in registers at 8 warps);
BLOCK_DT is passed only where D > 256, so that narrower head dims compile as without it.
The append and the combine take these widths in single tiles (BLOCK_D = 1024 for D = 576).

Decoding one token gives each (b, kv head) a single row of work, so the attention kernel
packs the H // Hkv query heads that share a kv head, times Sq, into the rows of one tile
(GQA packing), and splits each sequence's visible keys evenly across a grid dimension of
programs (flash-decoding). Each split writes its normalised partial output and logsumexp;
the combine kernel merges them by logsumexp. With one split the attention kernel writes the
output directly. Keys that no row of a tile sees are loaded as zeros, so cache slots past a
sequence's length (or before every row's window) count for nothing whatever they hold.

PACKED_Q (FlashAttention-3's packed queries, mixed prefill and decode in one batch): q, out
(total_q, H, D) with sequence b's queries in rows cu_seqlens_q[b] to cu_seqlens_q[b + 1]
(int32 (B + 1,) at cu_seqlens_q_ptr), lse (H, total_q); the new tokens, if any, are the
queries' tokens, packed alike (appended as PACKED_K below, with cu_seqlens_q for their
cumulative lengths). The attention's grid is sized by max_seqlen_q as the dense grid by Sq
(passed as n_q; n_new 1 when appending), and each program finds its sequence's rows
from cu_seqlens_q, so the launch needs no host sync: tiles and tokens past a sequence's own
length exit at once. Inside, a sequence is a dense batch of one moved to its first rows.

PACKED_K (FlashAttention-3's cu_seqlens_k_new): the new keys and values packed on their own,
k (total_k_new, Hkv, D) and v (total_k_new, Hkv, Ev) with sequence b's n_new[b] tokens in
rows cu_seqlens_k_new[b] to cu_seqlens_k_new[b + 1] (int32 (B + 1,) at cu_seqlens_k_new_ptr),
whatever the queries' layout, padded or PACKED_Q. The append runs one program per packed row,
which finds its sequence by bisection in cu_seqlens_k_new, so that its grid is k's rows and
no longest count is needed; the attention reads n_new[b] there in place of n_new, so that
sequence b holds L = cache_seqlens[b] + n_new[b] keys (cache_seqlens[b] clamped to [0,
capacity - n_new[b]]) and its query i sits at L - Sq + i (Sq its own count of queries); with
ROTARY_PER_QUERY a query is rotated at that position too (one at a negative position, before
the first key, passes through unrotated: the tables have no row there).

The score modifications of attnmem.attention are flags of the attention kernel: SOFTCAP and
HAS_ALIBI modify each score as the attention kernels do (kernels/attention.py, with each
packed row's own head's slope, its distance measured from its position a); HAS_SINKS starts
split 0's softmax of each row from its head's sink logit (a key of value zero), so that the
combine by logsumexp counts the sink once.

FP8_KV: the caches hold float8_e4m3fn with float32 descales (B, Hkv, 2) (k's, v's) at
descale_ptr, so that a cached key is k_fp8 * descale[b, hk, 0] (vLLM's kv_cache_dtype="fp8",
FlashAttention-3's e4m3 caches). The append quantizes the new tokens, given in q's dtype:
x / descale in float32 (rounded to nearest), saturated to e4m3's +-448, rounded to nearest
even (torch's cast of the saturated value). The attention loads e4m3 tiles, which halve
the bytes it streams, and widens them exactly to q's 16-bit dtype in registers for the
dots: k's descale folds into the softmax scale and v's scales the output.

ROTARY_DIM > 0 (FlashAttention's rotary_cos and rotary_sin, contiguous (seqlen_ro,
ROTARY_DIM / 2) at cos_ptr and sin_ptr, any float dtype): the append rotates each new key
at its slot cache_seqlens[b] + i before it writes (and quantizes) it, and the attention
rotates its q tile after loading it, query i at position cache_seqlens[b] + i with
ROTARY_PER_QUERY, else at cache_seqlens[b]. Dims d < ROTARY_DIM pair up as (d, d +
ROTARY_DIM / 2), or (2i, 2i + 1) with INTERLEAVED: the first of a pair becomes x * cos -
x_pair * sin, the second x * cos + x_pair * sin, in float32, rounded to x's dtype; a second
load of the tile at the pair's columns supplies x_pair, and cos and sin are gathered by
each row's position.
LEFTPAD (FlashAttention's cache_leftpad, int32 (B,) at leftpad_ptr, in [0, capacity]):
sequence b's keys start at slot leftpad[b], a lower bound on every row's key range (the
splits start there too). Positions stay the slots': FlashAttention counts its queries'
and keys' positions from leftpad[b] alike, which no difference of the two sees.

Tiles: on a GPU the attention kernel is autotuned (kernels/_launch.py's launch) over the
(BLOCK_N, num_warps, num_stages) of CONFIGS per head-dim tile, element size and FP8 cache,
with BLOCK_M from config_for's rule and the split count fixed before the launch
(_splits), so that neither the grid nor the partial buffers depend on the config;
TUNING_KEY says what it tunes apart. The interpreter runs INTERPRET_CONFIG. Tuning runs on
the first call of each key and times every candidate, synchronizing the device
(triton.testing.do_bench, as the installed tritons' autotuners call it, 3.6 and 3.9 alike):
a CUDA-graph capture must come after a warm-up call with the same key (same head dim,
dtypes, paged or not, split or not, capacity bucket), which the capture then replays
without tuning. ATTNMEM_TUNING=one runs one config per key instead of timing them.
"""

import torch
import triton
import triton.language as tl

from attnmem.kernels._launch import (
    block_width,
    interpreting,
    kv_length,
    lastdim_contiguous,
    launch,
    length_bucket,
    slot_configs,
    slot_splits,
    within,
)
from attnmem.kernels.attention import (
    _arch,
    _modified_scores,
    _packed_sequence,
    _score_mods,
    _smem_limit,
    head_dim_tiles,
    head_dims_meta,
    tile_head_dim,
)
from attnmem.kernels.rotary import _rotary

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Shared memory a block may use: sm_80 (A100) and sm_90 (H100) opt-in limits.
SMEM_LIMIT = {80: 166912, 90: 232448}
MAX_SPLITS = 128
E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def _cache_rows(cache_ptr, table_ptr, b, tokens, ok, page_size, n_pages, stride_cb,
                stride_cn, stride_tb, stride_tn, PAGED: tl.constexpr):
    """Pointers to the rows of tokens of sequence b in a cache (at kv head 0, dim 0), and
    ok narrowed to the tokens whose page lies in the pool."""
    if PAGED:
        page = tl.load(table_ptr + b * stride_tb + (tokens // page_size) * stride_tn, mask=ok,
                       other=0).to(tl.int64)
        ok = ok & (page >= 0) & (page < n_pages)
        rows = cache_ptr + page * stride_cb + (tokens % page_size).to(tl.int64) * stride_cn
    else:
        rows = cache_ptr + b * stride_cb + tokens.to(tl.int64) * stride_cn
    return rows, ok


@triton.jit
def _to_e4m3(x, descale):
    """x / descale in float32 (IEEE division, as torch's), saturated to +-E4M3_MAX (NaN
    stays NaN), rounded to e4m3 (to nearest even). sm_90's cvt.rn.satfinite saturates too;
    the clamp makes the result the documented one whatever the cast does past 448."""
    x = tl.math.div_rn(x.to(tl.float32), descale)
    return tl.clamp(x, -E4M3_MAX, E4M3_MAX, propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv)


@triton.jit
def _sequence_of_row(cu_seqlens_ptr, row, batch):
    """The sequence b < batch whose rows [cu_seqlens[b], cu_seqlens[b + 1]) hold packed row
    `row`: the last b with cu_seqlens[b] <= row, by bisection (sequences of no rows are
    passed over). Any cumulative lengths give some b in [0, batch) (0 for batch 0)."""
    lo = tl.zeros([], tl.int64)
    hi = lo + tl.maximum(batch - 1, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        below = tl.load(cu_seqlens_ptr + mid) <= row
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    return lo


@triton.jit
def _kvcache_append(k_ptr, v_ptr, kc_ptr, vc_ptr, seqlens_ptr, table_ptr,
                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch,
                    stride_tb, stride_tn, n_new, n_kv_heads, capacity, page_size, n_pages,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
                    BLOCK_H: tl.constexpr, descale_ptr=None, FP8_KV: tl.constexpr = False,
                    cos_ptr=None, sin_ptr=None, ROTARY_DIM: tl.constexpr = 0,
                    INTERLEAVED: tl.constexpr = False, HEAD_DV: tl.constexpr = None,
                    BLOCK_DV: tl.constexpr = None, cu_seqlens_k_new_ptr=None,
                    PACKED_K: tl.constexpr = False):
    """New token i of sequence b, every kv head: k and v into cache slot seqlens[b] + i
    (k rotated there with ROTARY_DIM, quantized with FP8_KV: see the module's docstring).
    Program b * n_new + i: one grid axis, which CUDA allows 2^31 - 1 programs. HEAD_DV,
    BLOCK_DV: v's head dim and its tile (the module's docstring), HEAD_DIM and BLOCK_D when
    None. PACKED_K (the module's docstring; new tokens packed as the queries or on their
    own): program r for packed row r of k and v (batch strides 0), which finds its sequence
    b among the n_new (here the batch B) in cu_seqlens_k_new and is its token i = r -
    cu_seqlens_k_new[b]; the grid's rows bound r, so no row count is needed."""
    HEAD_V: tl.constexpr = HEAD_DIM if HEAD_DV is None else HEAD_DV
    BLOCK_V: tl.constexpr = BLOCK_D if BLOCK_DV is None else BLOCK_DV
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_new
    i = (pid % n_new).to(tl.int32)
    if PACKED_K:
        b = _sequence_of_row(cu_seqlens_k_new_ptr, pid, n_new)
        start = tl.load(cu_seqlens_k_new_ptr + b).to(tl.int64)
        # Clamped to the capacity, as the cumulative lengths are checked on CPU tensors only:
        # wrong ones then write no slot outside the cache (and row pid is in k: the grid).
        n_new = tl.minimum(tl.load(cu_seqlens_k_new_ptr + b + 1) - start, capacity)
        if (pid < start) | (pid - start >= n_new):
            return
        i = (pid - start).to(tl.int32)
        k_ptr += start * stride_ks
        v_ptr += start * stride_vs
    seqlen = kv_length(seqlens_ptr, b, capacity - n_new, True)
    heads = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_V)
    token = tl.full([1], 0, tl.int32) + seqlen + i
    inside = (heads[:, None] < n_kv_heads) & (offs_d[None, :] < HEAD_DIM)
    inside_v = (heads[:, None] < n_kv_heads) & (offs_dv[None, :] < HEAD_V)
    # Rows of k and v in int64: a long sequence's i * stride passes 2^31.
    row = i.to(tl.int64)
    k = tl.load(k_ptr + b * stride_kb + row * stride_ks + heads[:, None] * stride_kh
                + offs_d[None, :], mask=inside)
    v = tl.load(v_ptr + b * stride_vb + row * stride_vs + heads[:, None] * stride_vh
                + offs_dv[None, :], mask=inside_v)
    if ROTARY_DIM > 0:
        k = _rotary(k, k_ptr + b * stride_kb + row * stride_ks + heads * stride_kh, offs_d,
                    inside, cos_ptr, sin_ptr, heads * 0 + seqlen + i, ROTARY_DIM, INTERLEAVED)
    if FP8_KV:
        descales = descale_ptr + (b * n_kv_heads + heads[:, None]) * 2
        head_ok = heads[:, None] < n_kv_heads
        k = _to_e4m3(k, tl.load(descales, mask=head_ok, other=1.0))
        v = _to_e4m3(v, tl.load(descales + 1, mask=head_ok, other=1.0))
    full = tl.full([1], 1, tl.int1)
    kc_rows, ok = _cache_rows(kc_ptr, table_ptr, b, token, full, page_size, n_pages,
                              stride_kcb, stride_kcn, stride_tb, stride_tn, PAGED)
    vc_rows, _ = _cache_rows(vc_ptr, table_ptr, b, token, full, page_size, n_pages,
                             stride_vcb, stride_vcn, stride_tb, stride_tn, PAGED)
    tl.store(kc_rows[:, None] + heads[:, None] * stride_kch + offs_d[None, :], k,
             mask=inside & ok[:, None])
    tl.store(vc_rows[:, None] + heads[:, None] * stride_vch + offs_dv[None, :], v,
             mask=inside_v & ok[:, None])


@triton.jit
def _kvcache_attend(q_ptr, kc_ptr, vc_ptr, seqlens_ptr, table_ptr, o_ptr, lse_ptr,
                    stride_qb, stride_qs, stride_qh, stride_kcb, stride_kcn, stride_kch,
                    stride_vcb, stride_vcn, stride_vch, stride_tb, stride_tn,
                    stride_osplit, stride_ob, stride_os, stride_oh, stride_lsplit,
                    n_heads, n_q, n_new, capacity, page_size, n_pages, group, qk_scale,
                    window_left, window_right,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    sinks_ptr=None, alibi_ptr=None, stride_alibi_b=0, softcap_scale=1.0,
                    SOFTCAP: tl.constexpr = False, HAS_SINKS: tl.constexpr = False,
                    HAS_ALIBI: tl.constexpr = False, descale_ptr=None,
                    FP8_KV: tl.constexpr = False, cu_seqlens_q_ptr=None, total_q=0,
                    PACKED_Q: tl.constexpr = False, cos_ptr=None, sin_ptr=None,
                    leftpad_ptr=None, ROTARY_DIM: tl.constexpr = 0,
                    INTERLEAVED: tl.constexpr = False, ROTARY_PER_QUERY: tl.constexpr = False,
                    LEFTPAD: tl.constexpr = False, capacity_bucket=0,
                    HEAD_DV: tl.constexpr = None, BLOCK_DV: tl.constexpr = None,
                    FAST_TANH: tl.constexpr = False, cu_seqlens_k_new_ptr=None,
                    PACKED_K: tl.constexpr = False, BLOCK_DT: tl.constexpr = 0):
    """One split of the visible keys of sequence b, kv head hk, for a tile of rows r =
    i * group + g (query i, head hk * group + g). Writes the tile's output normalised by
    its own softmax sum, and its natural-log logsumexp (-inf for a row that saw no key), at
    split `split` of o_ptr and lse_ptr. SOFTCAP, HAS_SINKS, HAS_ALIBI: see the module's
    docstring (sinks float32 (H,), slopes float32 (B or 1, H) with batch stride
    stride_alibi_b). FP8_KV: e4m3 caches with descales at descale_ptr (the module's
    docstring). Program (bh * m_tiles + pid_m, split): the row tiles share the 1st grid
    axis with (b, kv head), as CUDA's 2nd allows only 65535 programs.
    PACKED_Q (the module's docstring): n_q is max_seqlen_q, n_new 1 when each sequence's
    queries are its new tokens (else 0), the batch strides of q and the output 0, and the
    lse rows (H, total_q). ROTARY_DIM, INTERLEAVED, ROTARY_PER_QUERY, LEFTPAD: the module's
    docstring. HEAD_DV, BLOCK_DV: v's and the output's head dim and its tile, HEAD_DIM and
    BLOCK_D when None. FAST_TANH: SOFTCAP's tanh is the hardware's (attention's
    _modified_scores), for 16-bit queries on CUDA. PACKED_K (the module's docstring): n_new
    is sequence b's own count in cu_seqlens_k_new. BLOCK_DT > 0 (wide_head_dims_meta): q's
    and k's head dim in two tiles, BLOCK_D columns and a tail of BLOCK_DT from column
    BLOCK_D, masked to HEAD_DIM, whose dots add."""
    HEAD_V: tl.constexpr = HEAD_DIM if HEAD_DV is None else HEAD_DV
    BLOCK_V: tl.constexpr = BLOCK_D if BLOCK_DV is None else BLOCK_DV
    m_tiles = tl.cdiv(n_q * group, BLOCK_M)
    bh = tl.program_id(0).to(tl.int64) // m_tiles
    pid_m = (tl.program_id(0).to(tl.int64) % m_tiles).to(tl.int32)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = bh // (n_heads // group)
    hk = bh % (n_heads // group)
    if PACKED_Q:
        start, n_q = _packed_sequence(cu_seqlens_q_ptr, b, total_q)
        if pid_m * BLOCK_M >= n_q * group:
            return
        n_new = tl.minimum(n_new * n_q, capacity)  # as the append clamps it
        q_ptr += start * stride_qs
        o_ptr += start * stride_os
        lse_ptr += start
    if PACKED_K:
        # Clamped to [0, capacity] as the append clamps it (the lengths are checked on CPU
        # tensors only); the attention reads the counts, no row of k.
        n_new = (tl.load(cu_seqlens_k_new_ptr + b + 1).to(tl.int64)
                 - tl.load(cu_seqlens_k_new_ptr + b).to(tl.int64))
        n_new = tl.minimum(tl.maximum(n_new, 0), capacity).to(tl.int32)
    total = kv_length(seqlens_ptr, b, capacity - n_new, True) + n_new
    offset = total - n_q  # query i sits at key position i + offset

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q * group
    pos = rows // group
    heads = hk * group + rows % group
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = within(offs_d, HEAD_DIM, HEAD_DIM >= BLOCK_D)  # a tail's BLOCK_D is whole
    q = tl.load(q_ptr + b * stride_qb + pos[:, None].to(tl.int64) * stride_qs
                + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if ROTARY_DIM > 0:
        q_pos = total - n_new + tl.zeros_like(pos)  # cache_seqlens[b]
        rot_ok = row_ok
        if ROTARY_PER_QUERY:
            q_pos += pos
            if PACKED_K:
                q_pos += n_new - n_q  # query i at its position a, as the mask places it
                # A query before the first key (a < 0) passes through: no table row is there.
                rot_ok = rot_ok & (q_pos >= 0)
        q = _rotary(q, q_ptr + b * stride_qb + pos.to(tl.int64) * stride_qs + heads * stride_qh,
                    offs_d, rot_ok[:, None] & d_ok[None, :], cos_ptr, sin_ptr, q_pos,
                    ROTARY_DIM, INTERLEAVED)
    if BLOCK_DT > 0:
        offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)
        t_ok = within(offs_t, HEAD_DIM, HEAD_DIM == BLOCK_D + BLOCK_DT)
        q_t = tl.load(q_ptr + b * stride_qb + pos[:, None].to(tl.int64) * stride_qs
                      + heads[:, None] * stride_qh + offs_t[None, :],
                      mask=row_ok[:, None] & t_ok[None, :], other=0.0)
        if ROTARY_DIM > BLOCK_D:
            # _rotary loads each column's pair by its column, in whichever tile it lies.
            q_t = _rotary(q_t, q_ptr + b * stride_qb + pos.to(tl.int64) * stride_qs
                          + heads * stride_qh, offs_t, rot_ok[:, None] & t_ok[None, :],
                          cos_ptr, sin_ptr, q_pos, ROTARY_DIM, INTERLEAVED)

    # Keys some row of the tile sees, split evenly (in whole tiles) across the programs.
    pos_first = pid_m * BLOCK_M // group
    pos_last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_q * group) - 1) // group
    first_key = 0
    if LEFTPAD:
        first_key = tl.load(leftpad_ptr + b)
    key_lo = tl.maximum(pos_first + offset - window_left, first_key)
    hi = tl.minimum(pos_last + offset + window_right, total - 1) + 1
    lo = (key_lo // BLOCK_N) * BLOCK_N
    tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    split_len = tl.cdiv(tiles, n_splits) * BLOCK_N
    start = lo + split * split_len
    end = tl.minimum(start + split_len, hi)

    if FP8_KV:
        descales = descale_ptr + (b * (n_heads // group) + hk) * 2
        qk_scale = qk_scale * tl.load(descales)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:
        # Split 0 starts from the sink: exp(sink - m) = 1 at m = sink.
        sink = tl.load(sinks_ptr + heads, mask=row_ok, other=0.0) * LOG2E
        m_i = tl.where(split == 0, sink, m_i)
        l_i = tl.where(split == 0, 1.0, l_i)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + b * stride_alibi_b + heads, mask=row_ok, other=0.0)
        slope = (slope * LOG2E)[:, None]
    offs_dv = tl.arange(0, BLOCK_V)
    dv_ok = within(offs_dv, HEAD_V, HEAD_V == BLOCK_V)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    aligned = pos + offset
    for start_n in range(start, end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k_ok = (keys < hi) & (keys >= key_lo)
        k_rows, k_ok = _cache_rows(kc_ptr, table_ptr, b, keys, k_ok, page_size, n_pages,
                                   stride_kcb, stride_kcn, stride_tb, stride_tn, PAGED)
        v_rows, _ = _cache_rows(vc_ptr, table_ptr, b, keys, k_ok, page_size, n_pages,
                                stride_vcb, stride_vcn, stride_tb, stride_tn, PAGED)
        kt = tl.load(k_rows[None, :] + hk * stride_kch + offs_d[:, None],
                     mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        if FP8_KV:
            kt = kt.to(q.dtype)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if BLOCK_DT > 0:
            kt_t = tl.load(k_rows[None, :] + hk * stride_kch + offs_t[:, None],
                           mask=k_ok[None, :] & t_ok[:, None], other=0.0)
            if FP8_KV:
                kt_t = kt_t.to(q.dtype)
            qk = tl.dot(q_t, kt_t, qk, input_precision=DOT_PRECISION)
        s, _ = _modified_scores(qk, aligned[:, None], keys[None, :], qk_scale, softcap_scale,
                                slope, SOFTCAP, HAS_ALIBI, FAST_TANH)
        keep = ((keys[None, :] < hi) & (keys[None, :] >= aligned[:, None] - window_left)
                & (keys[None, :] <= aligned[:, None] + window_right) & row_ok[:, None])
        if LEFTPAD:
            keep = keep & (keys[None, :] >= first_key)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; shift it by 0 instead.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_rows[:, None] + hk * stride_vch + offs_dv[None, :],
                    mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
        if FP8_KV:
            v = v.to(q.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if FP8_KV:
        acc = acc * tl.load(descales + 1)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    o_rows = (split * stride_osplit + b * stride_ob + pos.to(tl.int64) * stride_os
              + heads * stride_oh)
    tl.store(o_ptr + o_rows[:, None] + offs_dv[None, :],
             (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])
    if PACKED_Q:
        lse_rows = heads.to(tl.int64) * total_q + pos
    else:
        lse_rows = (b * n_heads + heads) * n_q + pos
    tl.store(lse_ptr + split * stride_lsplit + lse_rows, lse, mask=row_ok)


@triton.jit
def _kvcache_combine(part_o_ptr, part_lse_ptr, o_ptr, lse_ptr, stride_ob, stride_os,
                     stride_oh, n_splits, n_heads, n_q, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Row (b, i, h): out = sum_s exp(lse_s - lse) out_s with lse = logsumexp_s lse_s.
    Partials are dense: out (n_splits, B, Sq, H, HEAD_DIM) float32 (HEAD_DIM the output's,
    v's head dim), lse (n_splits, B, H, Sq).
    The splits' outputs stream through one at a time: a (splits, D) tile would spill."""
    row = tl.program_id(0).to(tl.int64)  # (b * n_q + i) * n_heads + h
    n_rows = tl.num_programs(0)
    h = row % n_heads
    i = (row // n_heads) % n_q
    b = row // (n_heads * n_q)
    lse_row = (b * n_heads + h) * n_q + i
    splits = tl.arange(0, BLOCK_S).to(tl.int64)
    part_lse = tl.load(part_lse_ptr + splits * n_rows + lse_row, mask=splits < n_splits,
                       other=float("-inf"))
    top = tl.max(part_lse, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(part_lse - shift), 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = within(offs_d, HEAD_DIM, HEAD_DIM == BLOCK_D)
    part_o = part_o_ptr + row * HEAD_DIM + offs_d
    acc = tl.zeros([BLOCK_D], tl.float32)
    for split in range(n_splits):
        weight = tl.exp(tl.load(part_lse_ptr + split * n_rows + lse_row) - shift)
        acc += weight * tl.load(part_o + split * n_rows * HEAD_DIM, mask=d_ok, other=0.0)
    seen = total > 0
    total = tl.where(seen, total, 1.0)
    tl.store(o_ptr + b * stride_ob + i * stride_os + h * stride_oh + offs_d,
             (acc / total).to(o_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + lse_row, tl.where(seen, top + tl.log(total), float("-inf")))


# ---------------------------------------------------------------------------------------
# Configs and launcher
# ---------------------------------------------------------------------------------------


# (BLOCK_N, num_warps, num_stages) autotuning candidates of the attention kernel per
# (head-dim tile bucket, q's element size, FP8 cache). BLOCK_M comes from config_for's rule
# (the rows per kv head), so the grid does not depend on the config, and launch_configs adds
# the rule's own config for that BLOCK_M where the table lacks it. Each config here compiles
# for sm_90 without register spills on triton 3.9 and 3.6 at every BLOCK_M the rule gives
# (8 warps only at 64 rows), for float16, bfloat16 and float32 (q's dtype for the e4m3
# caches: float16 and bfloat16), head dims 64, 128 and 256, contiguous and paged, split and
# not, with no flag and with packed queries, rotary, left padding, softcap, sinks and ALiBi
# on (with all of those on at once, a combination no model uses, some spill 4 to 8 B in the
# dtype the sweep left out: reports/kvcache-tuning.md's re-check); its cache tiles give each
# thread 16 bytes or more (BLOCK_N x head dim x element size >= 16 x 32 x warps), so they
# load 16 bytes at a time. Compiled, not timed: a sweep of
# BLOCK_N, 4 or 8 warps and 1 to 4 stages (reports/kvcache-tuning.md). ptxas is not
# monotonic in the tile (8-warp tiles of 16 rows spill where those of 64 do not), hence a
# measured table. The rule's configs for 16-bit head dim 256 and FP8 at 64 and 256 (32 or
# 64 keys, 4 warps, 3 stages) and float32 at 64 and 128 (32 keys, 8 warps, 2 stages) spill
# 4 to 20 bytes with every flag on; they stay candidates, as the fixed choice they were.
CONFIGS = {
    (64, 2, False): [(64, 4, 3), (64, 8, 4), (128, 8, 3), (32, 8, 4)],
    (128, 2, False): [(64, 4, 3), (64, 8, 3), (64, 8, 4)],
    (256, 2, False): [(32, 4, 1), (16, 4, 4)],
    (64, 4, False): [(64, 8, 2), (16, 8, 2), (16, 8, 3)],
    (128, 4, False): [(16, 8, 2), (16, 8, 3)],
    (256, 4, False): [(16, 8, 2), (16, 8, 3)],
    (64, 2, True): [(64, 8, 4), (128, 8, 2), (128, 8, 3), (128, 4, 2)],
    (128, 2, True): [(64, 4, 3), (32, 8, 3), (32, 4, 2)],
    (256, 2, True): [(32, 8, 2), (32, 8, 3), (32, 8, 4), (64, 8, 2)],
    # Tiles past 256 (absorbed multi-head latent attention's D = 576 = 512 + 64, Ev = 512):
    # 8 warps only, as 4 spill at 32 rows (reports/kvcache-tuning.md's wide section).
    (768, 2, False): [(32, 8, 2), (32, 8, 3), (16, 8, 3)],
    (768, 4, False): [(16, 8, 2)],
    (768, 2, True): [(32, 8, 3), (16, 8, 3)],
}
HEAD_DIM_BUCKETS = (64, 128, 256, 768)
# Under the interpreter: tiles small enough that test caches span several (BLOCK_M from
# config_for, 16 there), and splits of whole such tiles.
INTERPRET_CONFIG = dict(BLOCK_N=16, num_warps=1, num_stages=1)
# The autotuning key (triton adds every tensor argument's dtype: q's, the caches' (FP8),
# the output's, float32 partials when split, and the rotary tables'): the head-dim tile,
# BLOCK_M (config_for's bucket of the rows per kv head), a paged cache, packed queries, and
# capacity_bucket, the kernel argument that only the tuner reads: the cache capacity rounded
# up to a power of 4; BLOCK_DV, v's head-dim tile, passed only where v's head dim differs
# from q's (absent, it leaves the key as it was), and BLOCK_DT, the tail of a head dim past 256
# (absent below). Nothing in it changes from one decoding step
# to the next (the lengths in cache_seqlens and the batch stay out), so steps reuse the tuned
# config.
TUNING_KEY = ["BLOCK_D", "BLOCK_M", "PAGED", "FP8_KV", "PACKED_Q", "capacity_bucket",
              "BLOCK_DV", "BLOCK_DT"]


def config_for(rows: int, block_d: int, elem: int, interpret=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the fixed rule that preceded autotuning
    for `rows` packed query rows per kv head; the launch keeps its BLOCK_M and tunes the rest
    (launch_configs: CONFIGS and this rule's choice). Decoding streams the cache once, so the
    tile is the least that keeps the tensor cores' 16-row minimum, and keys stream in tiles
    deep enough to keep several loads in flight. Under the interpreter (interpret=None:
    whether it runs), small tiles, so that short test caches span several of them."""
    if interpreting() if interpret is None else interpret:
        return 16, 16, 1, 1
    wide = block_d >= 256
    if block_d > 256:
        # Tiles past 256 (wide_head_dims_meta's; v's up to 512): at most 32 rows and 8 warps,
        # as 64 rows or 4 warps spill on sm_90 (a (32, 512) float32 accumulator is 64
        # registers a thread at 8 warps, 128 at 4).
        return (16, 16, 8, 2) if elem == 4 else (min(block_width(rows), 32), 16, 8, 3)
    if elem == 4:
        # float32 dots run on FMA units: wider tiles, or fewer warps, spill on sm_90.
        return 16, 16 if wide else 32, 8, 2
    block_m = min(block_width(rows), 32 if wide else 64)
    return block_m, 32 if wide else 64, 8 if block_m >= 64 else 4, 3


def configs_for(block_d: int, elem: int, fp8_kv: bool):
    """The attention kernel's autotuning configs (dicts of BLOCK_N, num_warps, num_stages)
    for a head-dim tile block_d, q's element size and an FP8 cache or not."""
    bucket = next(width for width in HEAD_DIM_BUCKETS if block_d <= width)
    return slot_configs(CONFIGS[(bucket, elem, fp8_kv)])


# sm_90 with v's head dim apart from q's: configs of CONFIGS (or the rule's) that spill there,
# keyed (BLOCK_D, BLOCK_DV, q's element size, FP8 cache) -> (BLOCK_M, BLOCK_N, warps, stages).
# ptxas -v on triton 3.9 and 3.6, _kvcache_attend at (D, Ev) = (192, 128), (64, 128) and
# (128, 256), every candidate launch_configs gives at every BLOCK_M the rule gives, paged and
# split, plus packed queries, rotary, left padding, softcap, sinks and ALiBi all on at the
# largest BLOCK_M (float16, bfloat16, float32, e4m3 caches with bfloat16 q; 81 jobs per triton;
# reports/kvcache-tuning.md): at (192, 128), 16-bit (32, 4, 1) at BLOCK_M 16 spills 4 B
# (3.9), e4m3 (32, 8, 2) at 32 16 B (3.9) and (32, 8, 3) at 16 8 B (3.6); nothing else
# spilled (with every flag on, none), and each of these spills nowhere else in the sweep.
VALUE_HEAD_DIM_SPILLS_SM90 = {(256, 128, 2, False): [(16, 32, 4, 1)],
                              (256, 128, 2, True): [(32, 32, 8, 2), (16, 32, 8, 3)]}


def without_value_spills(configs, block_m: int, dims: dict, elem: int, fp8_kv: bool):
    """configs (launch_configs') less those VALUE_HEAD_DIM_SPILLS_SM90 lists at BLOCK_M block_m
    for dims (head_dims_meta's; none without BLOCK_DV), or all of them if it lists every one.
    For sm_90 launches only."""
    spills = VALUE_HEAD_DIM_SPILLS_SM90.get(
        (dims["BLOCK_D"], dims.get("BLOCK_DV"), elem, fp8_kv), ())
    return [c for c in configs if (block_m, c["BLOCK_N"], c["num_warps"], c["num_stages"])
            not in spills] or configs


def launch_configs(block_m: int, block_d: int, elem: int, fp8_kv: bool, smem_limit: int,
                   widths=None):
    """The configs the launch times for BLOCK_M block_m: configs_for's, 8 warps only for
    tiles of 64 rows (as config_for's rule: 4 warps would hold twice the accumulators a
    thread), and config_for's own for this BLOCK_M; of those, the ones whose staged tiles
    (smem_estimate, at q's element size: an FP8 cache needs less) fit smem_limit bytes of
    shared memory a block, or the least hungry one if none does. CONFIGS fits sm_80's and
    sm_90's; sm_86 and sm_89 allow 99 KiB a block. widths: (k's, v's) staged tile widths
    (staged_widths), block_d for both when None."""
    _, *rule = config_for(block_m, block_d, elem, interpret=False)
    configs = [c for c in configs_for(block_d, elem, fp8_kv)
               if block_m < 64 or c["num_warps"] >= 8]
    configs += [c for c in slot_configs([rule]) if c not in configs]

    k_width, v_width = widths or (block_d, None)

    def smem(config):
        return smem_estimate(block_m, config["BLOCK_N"], k_width, config["num_stages"], elem,
                             v_width)

    return [c for c in configs if smem(c) <= smem_limit] or [min(configs, key=smem)]


def combine_warps(block_d: int) -> int:
    """Warps of a combine program: each thread then reads 4 floats of a row at once."""
    return max(1, block_d // 128)


def smem_estimate(block_m: int, block_n: int, block_d: int, stages: int, elem: int,
                  block_dv=None) -> int:
    """Bytes a config stages: the query tile and the pipelined key tiles, block_d wide, and
    value tiles, block_dv wide (block_d when None)."""
    return elem * (block_d * (block_m + stages * block_n)
                   + (block_dv or block_d) * stages * block_n)


def wide_head_dims_meta(head_dim: int, head_dim_v: int) -> dict:
    """head_dims_meta's, with a head dim D past 256 that is no power of 2 in two tiles:
    BLOCK_D, the largest power of 2 below it, and BLOCK_DT, a tail that holds the rest
    (576 = 512 + 64 columns, not one tile of 1024); v's HEAD_DV and BLOCK_DV then always,
    as BLOCK_D no longer holds v's head dim."""
    meta = head_dims_meta(head_dim, head_dim_v)
    if head_dim > 256 and block_width(head_dim) != head_dim:
        main, tail = head_dim_tiles(head_dim)
        meta.update(BLOCK_D=main, BLOCK_DT=tail, HEAD_DV=head_dim_v,
                    BLOCK_DV=block_width(head_dim_v))
    return meta


def staged_widths(meta) -> tuple:
    """(k's, v's) tile widths that a config stages for the kernels' meta (wide_head_dims_meta's):
    k's BLOCK_D and its tail, v's BLOCK_DV (BLOCK_D without one)."""
    return (meta["BLOCK_D"] + meta.get("BLOCK_DT", 0), meta.get("BLOCK_DV") or meta["BLOCK_D"])


def _splits(capacity, programs, block_n, device, n_splits=None):
    """Splits of each sequence's keys: with n_splits None (or 0), enough that programs x
    splits fill the GPU twice over (slot_splits' rule, three under the interpreter), capped
    at MAX_SPLITS, in whole tiles of block_n: the largest BLOCK_N of the configs that may run.
    A count given (FlashAttention's num_splits) is clamped to the capacity's tiles of block_n
    and MAX_SPLITS: a split holds one tile at least. The count is fixed before the launch, as
    the partial buffers are sized by it, and so is the same for every config the autotuner
    tries: each config then splits the keys in whole tiles of its own BLOCK_N (the kernel's
    split_len), which divides block_n."""
    if n_splits:
        return min(n_splits, triton.cdiv(max(capacity, 1), block_n), MAX_SPLITS)
    _, n_splits = slot_splits(capacity, programs, block_n, device)
    return min(n_splits, MAX_SPLITS)


def _fp8_meta(descales) -> dict:
    """The kernels' FP8_KV arguments for descales (B, Hkv, 2) float32 (k's, v's), or none."""
    if descales is None:
        return {}
    return dict(descale_ptr=descales.to(torch.float32).contiguous(), FP8_KV=True)


def _packed_meta(cu_seqlens_q, total_q) -> dict:
    """The kernels' PACKED_Q arguments for packed queries, or none."""
    if cu_seqlens_q is None:
        return {}
    return dict(cu_seqlens_q_ptr=cu_seqlens_q, total_q=total_q, PACKED_Q=True)


def _packed_k_meta(cu_seqlens_k_new) -> dict:
    """The kernels' PACKED_K arguments for new tokens packed by cu_seqlens_k_new, or none."""
    if cu_seqlens_k_new is None:
        return {}
    return dict(cu_seqlens_k_new_ptr=cu_seqlens_k_new, PACKED_K=True)


def _rotary_meta(rotation, per_query=None) -> dict:
    """The kernels' ROTARY_DIM arguments for rotation = (cos, sin, interleaved), or none;
    with per_query (the attention's), its ROTARY_PER_QUERY."""
    if rotation is None:
        return {}
    cos, sin, interleaved = rotation
    meta = dict(cos_ptr=cos.contiguous(), sin_ptr=sin.contiguous(),
                ROTARY_DIM=2 * cos.shape[1], INTERLEAVED=interleaved)
    if per_query is not None:
        meta["ROTARY_PER_QUERY"] = per_query
    return meta


def _leftpad_meta(cache_leftpad) -> dict:
    """The attention's LEFTPAD arguments for cache_leftpad int32 (B,), or none."""
    return {} if cache_leftpad is None else dict(leftpad_ptr=cache_leftpad, LEFTPAD=True)


def _batch_view(x, packed):
    """x (B, Sq, ...) as it is, or packed x (total, ...) as the kernels' batch of one, batch
    stride 0 (with PACKED_Q or PACKED_K each program moves its bases to its own sequence's
    rows)."""
    return x.as_strided((1, *x.shape), (0, *x.stride())) if packed else x


def append(k, v, k_cache, v_cache, cache_seqlens, block_table, descales=None,
           rotation=None, cu_seqlens_k_new=None):
    """Writes k (B, Sq, Hkv, D) and v (B, Sq, Hkv, Ev) into the caches in place at
    cache_seqlens[b] + i; into float8_e4m3fn caches quantized with descales (B, Hkv, 2)
    float32 (k's, v's). rotation (cos, sin, interleaved): k rotated at its slot first (cos,
    sin (seqlen_ro, R / 2), seqlen_ro at least the capacity). With cu_seqlens_k_new (B + 1,)
    int32 (packed queries' cu_seqlens_q, or new tokens packed on their own): k, v packed
    (total, Hkv, D or Ev), sequence b's new tokens in rows cu_seqlens_k_new[b] to
    cu_seqlens_k_new[b + 1], one program per row (PACKED_K), no longest count needed."""
    if k.numel() == 0:
        return
    packed_k = cu_seqlens_k_new is not None
    k, v = (_batch_view(lastdim_contiguous(x), packed_k) for x in (k, v))
    batch, n_new, kv_heads, head_dim = k.shape
    if packed_k:
        # A program per row, each of which finds its own sequence among n_new = B.
        batch, n_new = 1, cu_seqlens_k_new.shape[0] - 1
        if n_new == 0:
            return
    paged = block_table is not None
    table = block_table if paged else cache_seqlens
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    meta = head_dims_meta(head_dim, v.shape[-1])
    _kvcache_append[(k.shape[1] if packed_k else batch * n_new,)](
        k, v, k_cache, v_cache, cache_seqlens, table, *k.stride()[:3], *v.stride()[:3],
        *k_cache.stride()[:3], *v_cache.stride()[:3], table.stride(0),
        table.stride(-1), n_new, kv_heads, capacity, k_cache.shape[1] if paged else 1,
        k_cache.shape[0], **meta, PAGED=paged,
        BLOCK_H=triton.next_power_of_2(kv_heads), **_fp8_meta(descales),
        **_rotary_meta(rotation), **_packed_k_meta(cu_seqlens_k_new))


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, n_new, scale,
                           window_left, window_right, config=None, n_splits=None, softcap=0.0,
                           sinks=None, alibi_slopes=None, descales=None, cu_seqlens_q=None,
                           max_seqlen_q=None, rotation=None, rotary_per_query=False,
                           cache_leftpad=None, cu_seqlens_k_new=None):
    """-> out (B, Sq, H, Ev) in q's dtype (Ev v_cache's head dim, which may differ from q's
    and k_cache's D), lse (B, H, Sq) float32, natural log. The new keys (n_new of them) are
    in the caches already; cache_seqlens counts the tokens before them. config (BLOCK_M,
    BLOCK_N, num_warps, num_stages) overrides the launch's choice and skips tuning (tests);
    n_splits (None or 0: the launch's choice) the split count, clamped as _splits says (1:
    the attention writes out and lse itself, no combine runs). softcap, sinks (H,) and
    alibi_slopes (H,) or (B, H) as attnmem.attention takes them; lse includes the sinks.
    descales (B, Hkv, 2) float32 (k's, v's): float8_e4m3fn caches, q float16 or bfloat16.
    Packed queries: q (total_q, H, D), sequence b's in rows cu_seqlens_q[b] to
    cu_seqlens_q[b + 1] ((B + 1,) int32), at most max_seqlen_q of them; n_new 0, or nonzero
    when each sequence's queries are its new tokens (in the caches already). -> out (total_q,
    H, Ev), lse (H, total_q).
    rotation (cos, sin, interleaved), with n_new nonzero: q rotated at cache_seqlens[b] + i
    if rotary_per_query, else all at cache_seqlens[b]. cache_leftpad int32 (B,), values in
    [0, capacity]: sequence b's keys start at that slot. cu_seqlens_k_new (B + 1,) int32:
    sequence b's new tokens are its own count there, n_new unused (PACKED_K; the module's
    docstring), q padded or packed; rotary_per_query then rotates query i at its position
    cache_seqlens[b] + n_new[b] - Sq + i (unrotated where that is negative)."""
    q = lastdim_contiguous(q)
    packed = cu_seqlens_q is not None
    head_dim_v = v_cache.shape[-1]
    out = torch.empty((*q.shape[:-1], head_dim_v), dtype=q.dtype, device=q.device)
    heads, head_dim = q.shape[-2:]
    if packed:
        # The combine takes the packed rows as one sequence of total_q queries.
        batch, n_q, n_new = cu_seqlens_q.shape[0] - 1, max_seqlen_q, min(n_new, 1)
        lse = torch.empty((heads, q.shape[0]), dtype=torch.float32, device=q.device)
        rows = (1, q.shape[0])
    else:
        batch, n_q = q.shape[:2]
        lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
        rows = (batch, n_q)
    q, out_view = _batch_view(q, packed), _batch_view(out, packed)
    kv_heads = k_cache.shape[2]
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if out.numel() == 0 or batch * n_q == 0:
        return out, lse.fill_(float("-inf"))
    group = heads // kv_heads
    dims = wide_head_dims_meta(head_dim, head_dim_v)
    # Configs, their shared memory and the BLOCK_M rule follow the larger head dim's tile,
    # as the attention kernels' do: its configs hold the smaller one's tiles too.
    block_d = max(tile_head_dim(dims), *staged_widths(dims))
    elem, fp8_kv = q.element_size(), descales is not None
    # Splits hold whole tiles of the largest BLOCK_N that may run (every candidate's, a power
    # of 2, divides it): an explicit config's, the interpreter's, or the candidates'.
    block_m, quantum = config[:2] if config else (config_for(n_q * group, block_d, elem)[0],
                                                  INTERPRET_CONFIG["BLOCK_N"])
    configs = []
    if not (config or interpreting()):
        configs = launch_configs(block_m, block_d, elem, fp8_kv, _smem_limit(q.device),
                                 staged_widths(dims))
        if q.is_cuda and _arch(q.device) == 90:
            configs = without_value_spills(configs, block_m, dims, elem, fp8_kv)
        quantum = max(c["BLOCK_N"] for c in configs)
    m_tiles = triton.cdiv(n_q * group, block_m)
    n_splits = _splits(capacity, batch * kv_heads * m_tiles, quantum, q.device, n_splits)
    unbounded = capacity + rows[1]
    table = block_table if paged else cache_seqlens
    if n_splits > 1:
        part_out = torch.empty((n_splits, *out.shape), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((n_splits, *lse.shape), dtype=torch.float32, device=q.device)
    else:
        part_out, part_lse = out_view, lse
    qk_scale, mods = _score_mods(scale, softcap, alibi_slopes, sinks, q)
    grid = (batch * kv_heads * m_tiles, n_splits)
    args = (q, k_cache, v_cache, cache_seqlens, table, part_out, part_lse,
            *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], table.stride(0),
            table.stride(-1), part_out.stride(0) if n_splits > 1 else 0, *out_view.stride()[:3],
            lse.numel() if n_splits > 1 else 0, heads, n_q, n_new, capacity,
            k_cache.shape[1] if paged else 1, k_cache.shape[0], group, qk_scale,
            unbounded if window_left < 0 else window_left,
            unbounded if window_right < 0 else window_right)
    meta = dict(**dims, PAGED=paged,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=block_m,
                **mods, **_fp8_meta(descales), **_packed_meta(cu_seqlens_q, rows[1]),
                **_rotary_meta(rotation, rotary_per_query), **_leftpad_meta(cache_leftpad),
                **_packed_k_meta(cu_seqlens_k_new))
    if config:
        _kvcache_attend[grid](*args, **meta, BLOCK_N=config[1], num_warps=config[2],
                              num_stages=config[3])
    else:
        # The output is written, never accumulated: benchmarked launches need no reset.
        launch(_kvcache_attend, lambda _: grid, args,
               dict(meta, capacity_bucket=length_bucket(capacity, 4)), configs, TUNING_KEY,
               INTERPRET_CONFIG)
    if n_splits > 1:
        _kvcache_combine[(rows[0] * rows[1] * heads,)](
            part_out, part_lse, out_view, lse, *out_view.stride()[:3], n_splits, heads, rows[1],
            HEAD_DIM=head_dim_v, BLOCK_D=block_width(head_dim_v),
            BLOCK_S=triton.next_power_of_2(n_splits),
            num_warps=combine_warps(block_width(head_dim_v)))
    return out, lse
