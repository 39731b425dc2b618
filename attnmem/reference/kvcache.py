"""Pure-torch decoding from a KV cache: the reference the tests compare against, and the
torch backend of attnmem.attention_with_kvcache.

Each sequence's cache is gathered into a contiguous (1, Hkv, L, D) slice of its own length
L = cache_seqlens[b] + n_new (through its pages when the cache is paged), the value cache's
into (1, Hkv, L, Ev) (its head dim may differ from the keys', FlashAttention's headdim_v),
and run through the attention twin, whose bottom-right alignment of the Sq queries to the L keys is
FlashAttention's alignment to the end of each cache. Slots past L are never read.
One sequence at a time: the lengths come to the host, so this is no fast path.

float8_e4m3fn caches come with descales (B, Hkv, 2) (k's, v's): the append quantizes the
new tokens (quantize) and the attention dequantizes each sequence's cache in the compute
dtype (float32, float64 for a float64 q) before it attends.

Packed queries (q (total_q, H, D), sequence b's in rows cu_seqlens_q[b] to cu_seqlens_q[b + 1],
its new tokens, if any, packed alike): append_packed and attention_with_kvcache_packed run
the functions above on each sequence's rows as a batch of one. New tokens packed on their own
(FlashAttention-3's cu_seqlens_k_new: k (total_k_new, Hkv, D), sequence b's in rows
cu_seqlens_k_new[b] to cu_seqlens_k_new[b + 1], whatever the queries' layout): append_packed
with cu_seqlens_k_new for its cumulative lengths, and the attention functions take
cu_seqlens_k_new for each sequence's count of new tokens.

Rotary embeddings (FlashAttention's rotary_cos and rotary_sin, (seqlen_ro, R / 2), applied
by rotary): the append rotates the new keys at their slots cache_seqlens[b] + i (before
quantizing them), the attention its queries at cache_seqlens[b] + i, or all at
cache_seqlens[b]. cache_leftpad (B,): sequence b's keys start at slot cache_leftpad[b]; the
attention twin aligns the queries to its slice of keys from there, which shifts queries and
keys alike, so masks and ALiBi distances stay those of the slots.
"""

import torch

from attnmem.reference import attention as _attention
from attnmem.reference.rotary import rotary


def token_slots(cache_seqlens, n_tokens, block_table, page_size):
    """(index into the cache's first dim, index into its second) of tokens
    cache_seqlens[b] + i, i < n_tokens, each (B, n_tokens)."""
    pos = cache_seqlens.long()[:, None] + torch.arange(n_tokens, device=cache_seqlens.device)
    if block_table is None:
        return torch.arange(len(pos), device=pos.device)[:, None].expand_as(pos), pos
    return block_table.long().gather(1, pos // page_size), pos % page_size


def quantize(x, descale):
    """x (B, Sq, Hkv, D) and descale (B, Hkv) -> x / descale in float32, saturated to
    e4m3's +-448 (NaN stays NaN) and cast to float8_e4m3fn (round to nearest even)."""
    limit = torch.finfo(torch.float8_e4m3fn).max
    scaled = x.to(torch.float32) / descale.to(torch.float32)[:, None, :, None]
    return scaled.clamp(-limit, limit).to(torch.float8_e4m3fn)


def append(k_cache, v_cache, k, v, cache_seqlens, block_table, descales=None, rotation=None):
    """Writes k (B, Sq, Hkv, D), v (B, Sq, Hkv, Ev) into the caches in place, token i of
    sequence b at position cache_seqlens[b] + i; k rotated at that position first with
    rotation = (cos, sin, interleaved) if given, then both quantized with descales (B, Hkv,
    2) if given."""
    first, second = token_slots(cache_seqlens, k.shape[1], block_table, k_cache.shape[1])
    if rotation is not None:
        positions = cache_seqlens.long()[:, None] + torch.arange(k.shape[1], device=k.device)
        k = rotary(k, *rotation[:2], positions[..., None], rotation[2])
    if descales is not None:
        k, v = quantize(k, descales[..., 0]), quantize(v, descales[..., 1])
    k_cache[first, second] = k
    v_cache[first, second] = v


def gather(cache, b, length, block_table):
    """Sequence b's first `length` tokens of a cache, (length, Hkv, its head dim)."""
    if block_table is None:
        return cache[b, :length]
    page_size = cache.shape[1]
    pages = block_table[b, :-(-length // page_size)].long()
    return cache[pages].flatten(0, 1)[:length]


def attention_with_kvcache_forward(q, k_cache, v_cache, cache_seqlens, block_table, n_new,
                                   scale, window_left, window_right, softcap=0.0, sinks=None,
                                   alibi_slopes=None, descales=None, rotation=None,
                                   rotary_per_query=False, cache_leftpad=None,
                                   cu_seqlens_k_new=None):
    """q (B, Sq, H, D); the caches hold the n_new new tokens after cache_seqlens[b] old ones
    (values in range), v_cache's of head dim Ev. -> out (B, Sq, H, Ev) in q's dtype, lse
    (B, H, Sq) in the twin's compute dtype (-inf where a query sees no key and no sink; its
    output is zero).
    softcap, sinks (H,) and alibi_slopes (H,) or (B, H) as the attention twin takes them.
    descales (B, Hkv, 2): float8 caches, whose keys are k_cache * descales[b, :, 0] and
    values v_cache * descales[b, :, 1]. rotation (cos, sin, interleaved): q rotated at
    positions cache_seqlens[b] + i if rotary_per_query, else all at cache_seqlens[b].
    cache_leftpad (B,) (values in [0, capacity]): sequence b's keys are slots
    cache_leftpad[b] to cache_seqlens[b] + n_new. cu_seqlens_k_new (B + 1,): sequence b's
    new tokens are its own count n_new[b] there (FlashAttention-3's), n_new unused; a query
    rotated per query sits at its position cache_seqlens[b] + n_new[b] - Sq + i (unrotated
    where that is negative)."""
    ct = _attention.compute_dtype(q.dtype)
    counts = torch.full_like(cache_seqlens, n_new).long()
    if cu_seqlens_k_new is not None:
        counts = cu_seqlens_k_new.diff().long()
    if rotation is not None:
        # Query i at its position L - Sq + i: cache_seqlens[b] + i when the new tokens are
        # the queries' own.
        step = (torch.arange(q.shape[1], device=q.device) + counts[:, None] - q.shape[1])
        positions = cache_seqlens.long()[:, None] + step * rotary_per_query
        # A query before the first key (a < 0, with cu_seqlens_k_new) passes through.
        rotated = rotary(q, *rotation[:2], positions.clamp(min=0)[..., None], rotation[2])
        q = torch.where((positions >= 0)[..., None, None], rotated, q)
    starts = [0] * len(cache_seqlens) if cache_leftpad is None else cache_leftpad.tolist()
    outs, lses = [], []
    for b, (seqlen, start, new) in enumerate(zip(cache_seqlens.tolist(), starts,
                                                 counts.tolist())):
        length = seqlen + new
        k, v = (gather(c, b, length, block_table)[start:] for c in (k_cache, v_cache))
        if descales is not None:
            k, v = (x.to(ct) * descales[b, :, i, None].to(ct) for i, x in enumerate((k, v)))
        k, v = (x.transpose(0, 1)[None] for x in (k, v))
        slopes = alibi_slopes
        if slopes is not None and slopes.ndim == 2:
            slopes = slopes[b:b + 1]
        # Aligned to the end of the keys from slot `start` on, the queries and keys sit at
        # their slots less start: masks and ALiBi distances, differences, do not see it.
        out, lse = _attention.attention_forward(q[b:b + 1].transpose(1, 2), k, v, None,
                                                scale, window_left, window_right, softcap,
                                                sinks, slopes)
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    if not outs:
        return (q.new_empty((*q.shape[:-1], v_cache.shape[-1])),
                q.new_empty((0, q.shape[2], q.shape[1]), dtype=_attention.compute_dtype(q.dtype)))
    return torch.cat(outs), torch.cat(lses)


def _sequences(cu_seqlens_q, k_cache, v_cache, cache_seqlens, block_table):
    """(b, rows, k_cache, v_cache, cache_seqlens, block_table) of each sequence b of a packed
    batch as a batch of one: rows its slice of the packed rows, its own cache (or the whole
    pool with its row of the table)."""
    ends = cu_seqlens_q.tolist()
    for b in range(len(ends) - 1):
        own = slice(b, b + 1)
        caches = (k_cache, v_cache) if block_table is not None else (k_cache[own], v_cache[own])
        yield (b, slice(*ends[b:b + 2]), *caches, cache_seqlens[own],
               None if block_table is None else block_table[own])


def _own(x, b):
    """Sequence b's row of a per-sequence tensor (B, ...) as a batch of one; None stays."""
    return None if x is None else x[b:b + 1]


def append_packed(k_cache, v_cache, k, v, cache_seqlens, block_table, cu_seqlens_q,
                  descales=None, rotation=None):
    """append() of each sequence's new tokens, k (total_q, Hkv, D) and v (total_q, Hkv, Ev)
    packed as cu_seqlens_q: sequence b's at cache_seqlens[b] + i."""
    for b, rows, *sequence, table in _sequences(cu_seqlens_q, k_cache, v_cache, cache_seqlens,
                                                 block_table):
        k_caches, v_caches, seqlens = sequence
        append(k_caches, v_caches, k[None, rows], v[None, rows], seqlens, table,
               _own(descales, b), rotation)


def attention_with_kvcache_packed(q, k_cache, v_cache, cache_seqlens, block_table,
                                  cu_seqlens_q, appended, scale, window_left, window_right,
                                  softcap=0.0, sinks=None, alibi_slopes=None, descales=None,
                                  rotation=None, rotary_per_query=False, cache_leftpad=None,
                                  cu_seqlens_k_new=None):
    """attention_with_kvcache_forward of each sequence's queries, q (total_q, H, D) packed as
    cu_seqlens_q; appended: its queries' tokens are its new tokens (in the caches after
    cache_seqlens[b] old ones), or with cu_seqlens_k_new (B + 1,) its own count there.
    -> out (total_q, H, Ev) in q's dtype, lse (H, total_q) in the twin's compute dtype."""
    out = q.new_zeros((*q.shape[:-1], v_cache.shape[-1]))
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"),
                     dtype=_attention.compute_dtype(q.dtype))
    for b, rows, *sequence in _sequences(cu_seqlens_q, k_cache, v_cache, cache_seqlens,
                                         block_table):
        slopes = alibi_slopes
        if slopes is not None and slopes.ndim == 2:
            slopes = slopes[b:b + 1]
        n_q = rows.stop - rows.start
        out_b, lse_b = attention_with_kvcache_forward(
            q[None, rows], *sequence, n_q if appended else 0, scale, window_left, window_right,
            softcap, sinks, slopes, _own(descales, b), rotation, rotary_per_query,
            _own(cache_leftpad, b),
            None if cu_seqlens_k_new is None else cu_seqlens_k_new[b:b + 2])
        out[rows], lse[:, rows] = out_b[0], lse_b[0]
    return out, lse
