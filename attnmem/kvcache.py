"""attnmem.attention_with_kvcache: decoding from a KV cache, contiguous or paged, with the
new tokens appended in place (FlashAttention's flash_attn_with_kvcache); and
attnmem.kvcache_append, its append alone (vLLM's reshape_and_cache).

Two torch.library custom ops: the append (mutating the caches) and the attention over them,
each on the triton kernels (split-KV flash-decoding, GQA packing, paged loads) or on the
pure-torch twin (attnmem.reference.kvcache), as attnmem.backend chooses. Both take the
queries padded (B, Sq, H, D) or packed (total_q, H, D) with cu_seqlens_q, and the new
tokens packed as the queries or on their own with cu_seqlens_k_new (FlashAttention-3's); the
append takes none from kvcache_append, whose packed k comes as cu_seqlens_k_new and whose
checks are attention_with_kvcache's with k in q's place.
The value cache (and the new values, and the output) may have a head dim Ev of its own,
FlashAttention-3's headdim_v (multi-head latent attention's D = 192, Ev = 128). The triton
kernels take D up to 768 and Ev up to 512 (attention proper stops at 256): absorbed
multi-head latent attention's decoding (DeepSeek-V2/V3, FlashMLA's workload) runs there, one
latent kv head of D = 576 whose first 512 columns are the values, v_cache = k_cache[...,
:512] (a view). Appending to it, attention_with_kvcache(..., k=latents, v=None) or
kvcache_append(k_cache, v_cache, latents, None, ...) writes k's first 512 columns as the
values: the same bytes to the same addresses (no rotary, one descale for both); every other
append refuses overlapping caches.
"""

import numbers
import operator
from typing import Optional

import torch

from attnmem import _checks, _library
from attnmem import backend as _backend
from attnmem.attention import (
    FLOAT_DTYPES,
    FP8_DTYPE,
    TRITON_DTYPES,
    _fp8_descales,
    _is_fp8,
    _scale,
    _validate_score_mods,
    _window,
    fp8_arch_reasons,
)
from attnmem.reference import attention as _attention_twin
from attnmem.reference import kvcache as _reference
from attnmem.varlen import _check_lengths, _cu_seqlens, _max_seqlen

# The kernels' widest head dims, past attention's MAX_TRITON_HEAD_DIM (256): q's and k's D
# as a tile of 512 columns and a tail of up to 256 (kernels/attention_kvcache.py's
# wide_head_dims_meta; absorbed multi-head latent attention's D = 576 = 512 + 64), v's Ev in
# one tile, whose float32 accumulator (32 rows, 512 columns) stays in registers.
MAX_KERNEL_HEAD_DIM = 768
MAX_KERNEL_VALUE_HEAD_DIM = 512


def _triton_reasons(q, k_cache, v_cache, cu_seqlens_q=None, max_seqlen_q=0,
                    k=None, cu_seqlens_k_new=None) -> list[str]:
    """What the triton kernels lack for the append and the attention of q, or with q None
    (kvcache_append) for the append of k alone; cu_seqlens_k_new: k packed (on its own, or as
    the queries: their cu_seqlens_q)."""
    x, reasons = (k if q is None else q), []
    if cu_seqlens_k_new is not None and k is not None and k.shape[0] > _backend.GRID_X_LIMIT:
        # The packed append runs a program per row of k.
        reasons.append(f"k's {k.shape[0]} packed rows need as many programs > "
                       f"{_backend.GRID_X_LIMIT}, the CUDA launch grid's limit")
    if cu_seqlens_q is not None and q is not None:
        # Packed queries: the attention's grid is sized by max_seqlen_q, not by the packed
        # rows, in row tiles of at least 16 rows.
        batch, kv_heads = cu_seqlens_q.shape[0] - 1, k_cache.shape[2]
        group = q.shape[1] // max(kv_heads, 1)
        programs = batch * kv_heads * -(-max_seqlen_q * group // 16)
        if programs > _backend.GRID_X_LIMIT:
            reasons.append(f"{batch} sequences of up to max_seqlen_q = {max_seqlen_q} queries "
                           f"need {programs} programs > {_backend.GRID_X_LIMIT}, the CUDA "
                           "launch grid's limit")
    if x.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {x.dtype} (supported: float16, bfloat16, float32)")
    if x.shape[-1] > MAX_KERNEL_HEAD_DIM:
        reasons.append(f"head dim {x.shape[-1]} > {MAX_KERNEL_HEAD_DIM}")
    if v_cache.shape[-1] > MAX_KERNEL_VALUE_HEAD_DIM:
        reasons.append(f"v_cache's head dim {v_cache.shape[-1]} > {MAX_KERNEL_VALUE_HEAD_DIM}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(-1) != 1 and cache.shape[-1] > 1:
            reasons.append(f"{name}'s last dimension is strided (the kernels write it in "
                           "place and read it in rows)")
    if k_cache.dtype == FP8_DTYPE:
        reasons += fp8_arch_reasons(x.device)
    return reasons


def _pick(q, k_cache, v_cache, backend: str, cu_seqlens_q=None, max_seqlen_q=0,
          k=None, cu_seqlens_k_new=None) -> str:
    reasons = _triton_reasons(q, k_cache, v_cache, cu_seqlens_q, max_seqlen_q, k,
                              cu_seqlens_k_new)
    op = "attention_with_kvcache" if q is not None else "kvcache_append"
    return _backend.resolve(backend, (k if q is None else q, k_cache, v_cache), reasons, op)


@_library.custom_op("kvcache_append", mutates_args=("k_cache", "v_cache"))
def _append(q: Optional[torch.Tensor], k_cache: torch.Tensor, v_cache: torch.Tensor,
            k: torch.Tensor, v: torch.Tensor, cache_seqlens: torch.Tensor,
            block_table: Optional[torch.Tensor], backend: str,
            descales: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
            max_seqlen_q: int = 0, rotary_cos: Optional[torch.Tensor] = None,
            rotary_sin: Optional[torch.Tensor] = None, rotary_interleaved: bool = False,
            cu_seqlens_k_new: Optional[torch.Tensor] = None) -> None:
    """q: attention_with_kvcache's queries, read only to pick the backend that its attention
    picks; None from kvcache_append. descales (B, Hkv, 2) float32 (k's, v's): float8_e4m3fn
    caches, the new tokens quantized on the way in. cu_seqlens_q, max_seqlen_q: k and v (and
    q) packed (total_q, ...). rotary_cos, rotary_sin: k rotated at its slot before it is
    written. cu_seqlens_k_new (B + 1,): k and v packed (total_k_new, ...) on their own,
    whatever q's layout (FlashAttention-3's)."""
    rotation = _rotation(rotary_cos, rotary_sin, rotary_interleaved)
    # k's cumulative lengths: its own, or packed as the queries.
    packed = cu_seqlens_q if cu_seqlens_k_new is None else cu_seqlens_k_new
    if _pick(q, k_cache, v_cache, backend, cu_seqlens_q, max_seqlen_q, k,
             packed) == "triton":
        from attnmem.kernels import attention_kvcache as kernel
        kernel.append(k, v, k_cache, v_cache, cache_seqlens, block_table, descales, rotation,
                      packed)
    elif packed is not None:
        seqlens = _clamped(cache_seqlens, k_cache, packed.diff(), block_table)
        _reference.append_packed(k_cache, v_cache, k, v, seqlens, block_table, packed,
                                 descales, rotation)
    else:
        _reference.append(k_cache, v_cache, k, v, _clamped(cache_seqlens, k_cache, k.shape[1],
                                                           block_table), block_table, descales,
                          rotation)


@_append.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, block_table, backend, descales=None,
      cu_seqlens_q=None, max_seqlen_q=0, rotary_cos=None, rotary_sin=None,
      rotary_interleaved=False, cu_seqlens_k_new=None):
    return None


@_library.custom_op("attention_with_kvcache", mutates_args=())
def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor], n_new: int,
            scale: float, window_left: int, window_right: int, backend: str,
            softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
            alibi_slopes: Optional[torch.Tensor] = None,
            descales: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
            max_seqlen_q: int = 0, rotary_cos: Optional[torch.Tensor] = None,
            rotary_sin: Optional[torch.Tensor] = None, rotary_interleaved: bool = False,
            rotary_per_query: bool = False, cache_leftpad: Optional[torch.Tensor] = None,
            num_splits: int = 0, cu_seqlens_k_new: Optional[torch.Tensor] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, Sq, H, Ev) (Ev v_cache's head dim), lse (B, H, Sq). cu_seqlens_q,
    max_seqlen_q: q packed (total_q, H, D), out (total_q, H, Ev) and lse (H, total_q);
    n_new is then total_q when each sequence's queries are its new tokens, else 0.
    rotary_cos, rotary_sin (with new tokens): q rotated at cache_seqlens[b] + i when
    rotary_per_query, else at cache_seqlens[b]. cache_leftpad int32 (B,) in [0, capacity]:
    sequence b's keys start at that slot. num_splits: the triton kernels' split count (0:
    theirs); the twin has no splits. cu_seqlens_k_new (B + 1,): sequence b's new tokens are
    its own count there, n_new unused (FlashAttention-3's; q padded or packed)."""
    mods = dict(softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, descales=descales,
                rotation=_rotation(rotary_cos, rotary_sin, rotary_interleaved),
                rotary_per_query=rotary_per_query, cache_leftpad=cache_leftpad,
                cu_seqlens_k_new=cu_seqlens_k_new)
    if _pick(q, k_cache, v_cache, backend, cu_seqlens_q, max_seqlen_q) == "triton":
        from attnmem.kernels import attention_kvcache as kernel
        return kernel.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table,
                                             n_new, scale, window_left, window_right, **mods,
                                             cu_seqlens_q=cu_seqlens_q,
                                             max_seqlen_q=max_seqlen_q, n_splits=num_splits)
    knew = None if cu_seqlens_k_new is None else cu_seqlens_k_new.diff()
    if cu_seqlens_q is not None:
        new = cu_seqlens_q.diff() * (n_new > 0) if knew is None else knew
        return _reference.attention_with_kvcache_packed(
            q, k_cache, v_cache, _clamped(cache_seqlens, k_cache, new, block_table), block_table,
            cu_seqlens_q, n_new > 0, scale, window_left, window_right, **mods)
    new = n_new if knew is None else knew
    return _reference.attention_with_kvcache_forward(
        q, k_cache, v_cache, _clamped(cache_seqlens, k_cache, new, block_table), block_table,
        n_new, scale, window_left, window_right, **mods)


@_attend.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, n_new, scale, window_left, window_right,
      backend, softcap=0.0, sinks=None, alibi_slopes=None, descales=None, cu_seqlens_q=None,
      max_seqlen_q=0, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
      rotary_per_query=False, cache_leftpad=None, num_splits=0, cu_seqlens_k_new=None):
    lse_dtype = _attention_twin.compute_dtype(q.dtype)
    out = q.new_empty((*q.shape[:-1], v_cache.shape[-1]))
    if cu_seqlens_q is not None:
        return out, q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)
    batch, n_q, heads, _ = q.shape
    return out, q.new_empty((batch, heads, n_q), dtype=lse_dtype)


def _rotation(rotary_cos, rotary_sin, interleaved):
    """(cos, sin, interleaved) as the kernels and the twin take a rotation, or None."""
    return None if rotary_cos is None else (rotary_cos, rotary_sin, interleaved)


def _capacity(k_cache, block_table) -> int:
    return k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])


def _clamped(cache_seqlens, k_cache, n_new, block_table):
    """cache_seqlens as the kernels read it: clamped to [0, capacity - n_new]; n_new an int,
    or with packed queries a tensor (B,) of each sequence's new tokens."""
    room = _capacity(k_cache, block_table) - n_new
    if isinstance(room, torch.Tensor):
        return torch.minimum(cache_seqlens.clamp(min=0), room.to(cache_seqlens.dtype))
    return cache_seqlens.clamp(0, room)


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


# The names that attention_with_kvcache's messages (x = q) and kvcache_append's (x = k) give
# their arguments and shapes.
_NAMES = {
    "q": dict(cu="cu_seqlens_q", max="max_seqlen_q", rows="queries", x="(B, Sq, H, D)",
              x_packed="(total_q, H, D)", new="(B, Sq, Hkv, {})",
              new_packed="(total_q, Hkv, {}), packed as q",
              new_knew="(total_k_new, Hkv, {}), packed by cu_seqlens_k_new",
              cu_new="cu_seqlens_k_new", fp8="the kernels widen the cache to q's dtype"),
    "k": dict(cu="cu_seqlens", max="max_seqlen", rows="tokens", x="(B, S, Hkv, D)",
              x_packed="(total, Hkv, D)", new="(B, S, Hkv, {})",
              new_packed="(total, Hkv, {}), packed as k", cu_new="cu_seqlens",
              fp8="the append quantizes it into the cache"),
}


def _block_table(block_table, batch, device, ref="q"):
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor or None, got "
                        f"{type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32 (as FlashAttention's), got "
                        f"{block_table.dtype}")
    if block_table.ndim != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be (B, max_blocks) with B = {batch}, got shape "
                         f"{tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but {ref} is on {device}")


def _seqlens(cache_seqlens, batch, device, limit, clamp=None, ref="q"):
    """cache_seqlens as an int32 (B,) tensor on ref's device; an int must lie in [0, limit], a
    tensor is clamped to [0, clamp] (default limit; the kernels clamp it further)."""
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        value = operator.index(cache_seqlens)
        if not 0 <= value <= limit:
            raise ValueError(f"cache_seqlens {value} leaves no room in the cache: it must "
                             f"lie in [0, {limit}] (the capacity less the new tokens)")
        return torch.full((batch,), value, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int or an integer tensor (B,), got "
                        f"{type(cache_seqlens).__name__}")
    _checks.per_batch("cache_seqlens", cache_seqlens, batch, device, ref)
    if cache_seqlens.dtype == torch.int32 and cache_seqlens.is_contiguous():
        return cache_seqlens  # the kernels clamp it
    # Clamped before the cast, so that 2**32 + 3 is the capacity, not 3.
    return cache_seqlens.clamp(0, limit if clamp is None else clamp).to(torch.int32).contiguous()


def _check_pages(block_table, cache_seqlens, n_new, page_size, n_pages):
    """On CPU tensors (where reading them costs no device sync): every page a sequence uses
    lies in the pool. n_new: an int, or each sequence's new tokens (B,)."""
    room = torch.as_tensor(block_table.shape[1] * page_size - n_new)
    lengths = torch.minimum(cache_seqlens.clamp(min=0), room.to(cache_seqlens.dtype)) + n_new
    used = torch.arange(block_table.shape[1]) * page_size < lengths[:, None]
    bad = used & ((block_table < 0) | (block_table >= n_pages))
    if bad.any():
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a page of "
                         f"the pool: pages are 0 to {n_pages - 1}")


def _fp8_cache(x, x_name, k_cache, v_cache) -> bool:
    """The caches have x's dtype (False), or are float8_e4m3fn for a 16-bit x (True); x is
    q (x_name "q") or, appending alone, k."""
    if k_cache.dtype != FP8_DTYPE:
        if _is_fp8(k_cache):
            raise TypeError(f"k_cache must have {x_name}'s dtype {x.dtype} or be "
                            f"float8_e4m3fn, got {k_cache.dtype}")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            _checks.like(name, cache, x, x_name)
        return False
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{x_name} must be float16 or bfloat16 with a float8_e4m3fn cache "
                        f"({_NAMES[x_name]['fp8']}), got {x.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.like(name, cache, k_cache, "k_cache")
        if cache.device != x.device:
            raise ValueError(f"{name} is on {cache.device} but {x_name} is on {x.device}")
    return True


def _descales(x, x_name, batch, k_cache, k_descale, v_descale, fp8):
    """k's and v's descales stacked (B, Hkv, 2) float32 for a float8 cache (None: 1), else
    None: they apply to float8 caches only."""
    if not fp8:
        for name, x in (("k_descale", k_descale), ("v_descale", v_descale)):
            if x is not None:
                raise ValueError(f"{name} applies to float8_e4m3fn caches only (k_cache is "
                                 f"{k_cache.dtype})")
        return None
    # attention()'s check of (B, Hkv) descales; k_cache holds the kv heads on dim 2.
    shape = (batch, k_cache.shape[2])
    return _fp8_descales(x, shape, (None, k_descale, v_descale), x_name)[..., 1:]


def _batch_table(cache_batch_idx, block_table, batch, k_cache, device, ref="q"):
    """cache_batch_idx (B,) as the block table (B, 1) int32 of a pool whose pages are
    k_cache's rows, each of S_max tokens: sequence b's tokens sit in row cache_batch_idx[b].
    Its values are checked on CPU tensors only (on CUDA a row outside the cache is read and
    written nothing, as a page outside the pool)."""
    if block_table is not None:
        raise ValueError("cache_batch_idx picks rows of a contiguous cache (B_cache, S_max, "
                         "Hkv, D); a paged cache's block_table already says where each "
                         "sequence's tokens are: pass one of the two")
    _checks.per_batch("cache_batch_idx", cache_batch_idx, batch, device, ref)
    if device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (cache_batch_idx < 0) | (cache_batch_idx >= k_cache.shape[0])
        if bad.any():
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache_batch_idx[{b}] = {int(cache_batch_idx[b])} is not a row "
                             f"of the cache: rows are 0 to {k_cache.shape[0] - 1}")
    return cache_batch_idx.to(torch.int32).reshape(batch, 1).contiguous()


def _check_rotary(rotary_cos, rotary_sin, interleaved, x, x_name, capacity, appending):
    """rotary_cos and rotary_sin (seqlen_ro, R / 2) with 0 < R <= D, covering the cache's
    slots (FlashAttention's seqlen_ro >= seqlen_k, a shape check: no device sync), and new
    tokens to rotate; rotary_interleaved a bool that applies with them."""
    if not isinstance(interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {type(interleaved).__name__}")
    if rotary_cos is None and rotary_sin is None:
        if interleaved:
            raise ValueError("rotary_interleaved applies with rotary_cos and rotary_sin only")
        return
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together, or both be None")
    _checks.rotary_table("rotary_cos", rotary_cos, "rotary_sin", rotary_sin, x_name, x)
    seqlen_ro = rotary_cos.shape[0]
    if seqlen_ro < capacity:
        raise ValueError(f"rotary_cos has {seqlen_ro} positions but the cache has {capacity} "
                         f"slots: it must cover them all, as FlashAttention's seqlen_ro >= "
                         "seqlen_k")
    if not appending:
        raise ValueError("rotary_cos and rotary_sin rotate the new keys and the queries: pass "
                         "k and v with them (as FlashAttention requires)")


def _check_cache(x, x_name, k_cache, v_cache, k, v, block_table, k_descale, v_descale,
                 cu_seqlens, max_seqlen, cache_batch_idx, cu_seqlens_k_new=None):
    """The checks that attention_with_kvcache (x = q, x_name "q") and kvcache_append (x = k)
    share: x and its packing, the caches, their table, the descales and the new tokens k
    and v (None without them, for q only). -> (batch, n_q, n_new, block_table (a
    cache_batch_idx's, or the one given), descales (B, Hkv, 2) or None, capacity): n_q
    x's tokens per sequence (the longest when packed), n_new the new ones (0 or n_q), or
    with cu_seqlens_k_new (q's only: k packed on its own) k's rows; kvcache_append's packed
    k without max_seqlen: n_q None, n_new k's rows."""
    names = _NAMES[x_name]
    packed = cu_seqlens is not None
    _checks.tensor(x_name, x, 3 if packed else 4, names["x_packed" if packed else "x"])
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{x_name} must be float16, bfloat16, float32 or float64, got "
                        f"{x.dtype}")
    *_, heads, head_dim = x.shape
    if packed:
        _cu_seqlens(names["cu"], cu_seqlens, x.device, x_name)
        batch = cu_seqlens.shape[0] - 1
        # The longest sequence's tokens stand for Sq in the checks on sizes below; None where
        # kvcache_append is not told it (its lengths are then checked as cu_seqlens_k_new's).
        n_q = (None if x_name == "k" and max_seqlen is None
               else _max_seqlen(names["max"], max_seqlen, x.shape[0], batch))
    else:
        if max_seqlen is not None:
            raise ValueError(f"{names['max']} applies to packed {names['rows']} only: pass "
                             f"{names['cu']} with it, or None")
        batch, n_q = x.shape[:2]
    if head_dim < 1:
        raise ValueError(f"{x_name} must have a head dim of at least 1")
    paged = block_table is not None
    what = ("(num_pages, page_size, Hkv, {})" if paged else "(B_cache, S_max, Hkv, {})"
            if cache_batch_idx is not None else "(B, S_max, Hkv, {})")
    for name, cache, dim in (("k_cache", k_cache, "D"), ("v_cache", v_cache, "Ev")):
        _checks.tensor(name, cache, 4, what.format(dim))
    fp8 = _fp8_cache(x, x_name, k_cache, v_cache)
    # v_cache's head dim Ev may differ from k_cache's (FlashAttention's headdim_v).
    if v_cache.shape[:3] != k_cache.shape[:3] or v_cache.shape[3] < 1:
        dims = ", ".join(map(str, k_cache.shape[:3]))
        raise ValueError(f"v_cache must have k_cache's shape but for its head dim, ({dims}, "
                         f"Ev) with Ev >= 1, got {tuple(v_cache.shape)}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache has head dim {k_cache.shape[3]} but {x_name} has "
                         f"{head_dim}")
    kv_heads = k_cache.shape[2]
    # k's heads are the cache's: its shape's check below says so.
    if x_name == "q" and (kv_heads < 1 or heads % kv_heads != 0):
        raise ValueError(f"k_cache has {kv_heads} heads, which must divide q's {heads} heads "
                         "(grouped-query attention)")
    if cache_batch_idx is not None:
        block_table = _batch_table(cache_batch_idx, block_table, batch, k_cache, x.device,
                                   x_name)
    elif paged:
        _block_table(block_table, batch, x.device, x_name)
    elif k_cache.shape[0] != batch:
        which = (f"{names['cu']} has {batch} sequences" if packed
                 else f"{x_name} has batch {batch}")
        raise ValueError(f"k_cache has batch {k_cache.shape[0]} but {which} "
                         "(pass block_table for a paged cache)")
    if block_table is not None and k_cache.shape[1] < 1:
        raise ValueError(f"k_cache must have a {'page_size' if paged else 'S_max'} of at "
                         "least 1 (its dim 1)")
    descales = _descales(x, x_name, batch, k_cache, k_descale, v_descale, fp8)
    if (k is None) != (v is None):
        both = ", or both be None" if x_name == "q" else ""
        raise ValueError(f"k and v must be given together (the new tokens){both}; v may be "
                         "None alone only when v_cache is a view of k_cache's first Ev "
                         "columns (absorbed multi-head latent attention's v_cache = "
                         "k_cache[..., :Ev]), which this v_cache is not")
    knew = cu_seqlens_k_new is not None
    if knew:
        if k is None:
            raise ValueError("cu_seqlens_k_new packs the new tokens: pass k and v with it")
        _cu_seqlens("cu_seqlens_k_new", cu_seqlens_k_new, x.device, x_name)
        if cu_seqlens_k_new.shape[0] != batch + 1:
            raise ValueError(f"cu_seqlens_k_new must be (B + 1,) = ({batch + 1},), one more "
                             f"than the sequences, got shape {tuple(cu_seqlens_k_new.shape)}")
    n_new = 0
    if k is not None:
        if knew:
            # k's rows are its own, any count: cu_seqlens_k_new's lengths are checked with
            # the slots.
            _checks.tensor("k", k, 3, names["new_knew"].format("D"))
        rows = (k.shape[0],) if knew else (x.shape[0],) if packed else (batch, n_q)
        # k's head dim is k_cache's (q's), v's v_cache's.
        for name, t, dim, cache in (("k", k, "D", k_cache), ("v", v, "Ev", v_cache)):
            what = names["new_knew" if knew else "new_packed" if packed else "new"].format(dim)
            shape = (*rows, kv_heads, cache.shape[3])
            _checks.tensor(name, t, len(shape), what)
            _checks.like(name, t, x, x_name)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must be {what} = {shape}, got {tuple(t.shape)}")
        n_new = rows[0] if knew or n_q is None else n_q
    capacity = _capacity(k_cache, block_table)
    if n_new > capacity and not knew and n_q is not None:
        longest = f" ({names['max']})" if packed else ""
        raise ValueError(f"k holds {n_new} new tokens{longest} but the cache holds at most "
                         f"{capacity}")
    return batch, n_q, n_new, block_table, descales, capacity


def _check_slots(x, x_name, k_cache, cache_seqlens, block_table, paged, batch, n_q, n_new,
                 capacity, cu_seqlens, cu_seqlens_k_new=None):
    """cache_seqlens as the kernels take it (_seqlens), after the checks that read the
    cumulative lengths and the block table's pages (on CPU tensors, outside a torch.compile
    trace, which cannot read tensor data). With cu_seqlens_k_new, n_new is k's rows
    (kvcache_append passes its cu_seqlens there when it is not told max_seqlen)."""
    packed, knew = cu_seqlens is not None, cu_seqlens_k_new is not None
    tracing = torch.compiler.is_compiling()
    new, room = n_new, capacity - n_new
    if knew:
        # An int must leave room for the longest sequence's new tokens, which only readable
        # lengths tell; elsewhere the kernels clamp each sequence's as a tensor's.
        room = capacity
        if x.device.type == "cpu" and not tracing:
            _check_lengths(_NAMES[x_name]["cu_new"], cu_seqlens_k_new, n_new, capacity,
                           "the cache's capacity")
            new = cu_seqlens_k_new.diff()
            room = capacity - int(new.max()) if batch else capacity
    # Packed: the kernels clamp each sequence's to the room its own new tokens leave.
    seqlens = _seqlens(cache_seqlens, batch, x.device, room,
                       capacity if packed or knew else None, x_name)
    if packed and x.device.type == "cpu" and not tracing:
        names = _NAMES[x_name]
        _check_lengths(names["cu"], cu_seqlens, x.shape[0], n_q, names["max"])
        if not knew:
            new = cu_seqlens.diff() * (n_new > 0)
    if paged and x.device.type == "cpu" and not tracing:
        _check_pages(block_table, seqlens, new, k_cache.shape[1], k_cache.shape[0])
    return seqlens


def _values_in_keys(k_cache, v_cache) -> bool:
    """v_cache is a view of k_cache's first Ev <= D columns (absorbed multi-head latent
    attention's v_cache = k_cache[..., :Ev]): the same storage, data pointer, dtype and
    strides, and k_cache's shape but for a last dim of at most D. Inside a torch.compile
    trace, which cannot read data pointers, the layout alone."""
    laid_out = (isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor)
                and k_cache.ndim == v_cache.ndim > 0 and k_cache.dtype == v_cache.dtype
                and k_cache.device == v_cache.device
                and v_cache.shape[:-1] == k_cache.shape[:-1]
                and 1 <= v_cache.shape[-1] <= k_cache.shape[-1]
                and v_cache.stride() == k_cache.stride())
    if not laid_out or torch.compiler.is_compiling():
        return laid_out
    return (v_cache.data_ptr() == k_cache.data_ptr()
            and v_cache.untyped_storage().data_ptr() == k_cache.untyped_storage().data_ptr())


def _latent_values(k_cache, v_cache, k, v, rotary_cos, rotary_sin, k_descale, v_descale):
    """-> (v, v_descale, values_in_keys) as the append takes them. With new keys k, v None
    and v_cache a view of k_cache's first Ev columns (_values_in_keys): the values are k's
    first Ev columns, v = k[..., :Ev] (a view) and v_descale = k_descale, so that the
    append writes each token's k row and then its v row, the same bytes to the same
    addresses, in one program; refused where the two would differ (a rotation of k, a
    descale of v's own). Otherwise v and v_descale as given, and False."""
    if k is None or v is not None or not _values_in_keys(k_cache, v_cache):
        return v, v_descale, False
    if rotary_cos is not None or rotary_sin is not None:
        raise ValueError("rotary_cos and rotary_sin rotate k's first R dims before the "
                         "append writes them, but with v=None and v_cache a view of "
                         "k_cache's first columns those columns are the values, which stay "
                         "unrotated: rotate the rope part of k yourself (as FlashMLA takes "
                         "no rotary), or pass v and a v_cache of its own")
    if v_descale is not None:
        raise ValueError("v_descale must be None when v is None and v_cache is a view of "
                         "k_cache's first columns: the values are k's own bytes, which "
                         "k_descale descales")
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be a torch.Tensor or None, got {type(k).__name__}")
    # A 0-d k stays as it is, for k's own shape check to refuse.
    return (k[..., :v_cache.shape[-1]] if k.ndim else k), k_descale, True


def _check_inference(op, tensors, n_new, k_cache, v_cache, detached, values_in_keys=False):
    """No input of an inference op requires grad while grad mode is on (detached says what
    the op's counterpart does instead), and the caches that the append writes overlap neither
    themselves nor the other tensors, (name, tensor or None) pairs; nor each other, unless
    values_in_keys (_latent_values: v_cache a view of k_cache that the append writes with k's
    own bytes)."""
    if torch.is_grad_enabled():
        for name, x in tensors:
            if x is not None and x.requires_grad:
                raise RuntimeError(
                    f"{op} has no gradient, and {name} requires grad: run it under "
                    "torch.no_grad() or torch.inference_mode(), or pass detached tensors "
                    f"({detached}; attnmem refuses rather than drop a gradient)")
    # Storage cannot be inspected inside a torch.compile trace.
    if n_new and not torch.compiler.is_compiling():
        # As torch's in-place ops: one written element must not stand for several.
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if torch._debug_has_internal_overlap(cache) == 1:
                raise ValueError(f"{name} has overlapping elements (expanded?): the append "
                                 "writes it in place")
            for other, x in tensors:
                if (other not in ("k_cache", "v_cache") and x is not None
                        and torch._C._overlaps(cache, x)):
                    raise ValueError(f"{other} shares storage with {name}, which the append "
                                     "overwrites; pass a copy")
        if not values_in_keys and torch._C._overlaps(k_cache, v_cache):
            raise ValueError("k_cache and v_cache share storage: the append would write one "
                             "over the other")


def _validate(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, window, scale,
              return_lse, softcap=None, sinks=None, alibi_slopes=None, k_descale=None,
              v_descale=None, cu_seqlens_q=None, max_seqlen_q=None, cache_batch_idx=None,
              rotary_cos=None, rotary_sin=None, rotary_interleaved=False, cache_leftpad=None,
              cu_seqlens_k_new=None, values_in_keys=False):
    packed, paged = cu_seqlens_q is not None, block_table is not None
    batch, n_q, n_new, block_table, descales, capacity = _check_cache(
        q, "q", k_cache, v_cache, k, v, block_table, k_descale, v_descale, cu_seqlens_q,
        max_seqlen_q, cache_batch_idx, cu_seqlens_k_new)
    heads = q.shape[-2]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    scale = _scale(scale, q)
    softcap, sinks, alibi_slopes = _validate_score_mods(q, scale, softcap, sinks, alibi_slopes,
                                                        batch, heads)
    left, right = _window(window, n_q, capacity)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    _check_rotary(rotary_cos, rotary_sin, rotary_interleaved, q, "q", capacity, k is not None)
    # FlashAttention's rule: queries rotate at their own positions when causal or local, a
    # window side below the cache's capacity (its seqlen_k) making it local.
    rotary_per_query = causal or max(_window(window, capacity + 1, capacity + 1)) >= 0
    cache_leftpad = _checks.lengths("cache_leftpad", cache_leftpad, batch, capacity, q.device)
    seqlens = _check_slots(q, "q", k_cache, cache_seqlens, block_table, paged, batch, n_q,
                           n_new, capacity, cu_seqlens_q, cu_seqlens_k_new)
    _check_inference("attention_with_kvcache",
                     [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
                      ("sinks", sinks), ("k_descale", k_descale), ("v_descale", v_descale),
                      ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)],
                     n_new, k_cache, v_cache, "FlashAttention's flash_attn_with_kvcache "
                     "returns an output detached from autograd", values_in_keys)
    if packed and cu_seqlens_k_new is None:
        n_new = q.shape[0] if n_new else 0
    rotary = dict(rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                  rotary_interleaved=rotary_interleaved)
    return (n_new, n_q, seqlens, block_table, scale, left, right,
            (softcap, sinks, alibi_slopes, descales), rotary,
            dict(rotary, rotary_per_query=rotary_per_query, cache_leftpad=cache_leftpad))


def attention_with_kvcache(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens,
                           block_table=None, causal=True, window=None, scale=None,
                           return_lse=False, softcap=None, sinks=None, alibi_slopes=None,
                           k_descale=None, v_descale=None, cu_seqlens_q=None,
                           max_seqlen_q=None, cache_batch_idx=None, rotary_cos=None,
                           rotary_sin=None, rotary_interleaved=False, cache_leftpad=None,
                           num_splits=0, cu_seqlens_k_new=None):
    """Attention of new queries over a KV cache, appending the new keys and values to the
    cache in place first: FlashAttention's flash_attn_with_kvcache, whose API semantics it
    follows (layout, alignment, window).

    q: (B, Sq, H, D). k_cache: (B, S_max, Hkv, D), or with block_table a paged pool
    (num_pages, page_size, Hkv, D), any page size; v_cache: the same with its own head dim
    Ev >= 1, (B, S_max, Hkv, Ev) or (num_pages, page_size, Hkv, Ev) (FlashAttention-3's
    headdim_v; multi-head latent attention's D = 192, Ev = 128; Ev = D otherwise), which
    every option below takes, on both backends (the triton kernels: D up to 768, Ev up to
    512; wider heads run the twin). Absorbed multi-head latent attention (DeepSeek-V2/V3's
    decoding, FlashMLA's: one latent kv head, D = 576, Ev = 512) passes v_cache =
    k_cache[..., :512], a view of the keys' first columns; its new latents come as k with
    v=None (below);
    block_table (B, max_blocks) int32: token t of sequence b sits in page
    block_table[b, t // page_size] at offset t % page_size. H % Hkv == 0 (query head h
    reads kv head h // (H // Hkv)). cache_seqlens: an int or an integer tensor (B,), the
    tokens already in each cache (values clamped to [0, capacity - Sq] when appending, to
    [0, capacity] otherwise; capacity = S_max or max_blocks * page_size). k (B, Sq, Hkv, D)
    and v (B, Sq, Hkv, Ev): new tokens, or None: they are written in place into the caches
    at positions cache_seqlens[b] + i (cache_seqlens itself is not advanced), and then
    attended to with the rest of the cache. With k and v, caches that overlap themselves,
    each other or the other inputs are refused (not inside a torch.compile trace, which
    cannot inspect storage). With k and v=None, v_cache must be a view of k_cache's first Ev
    columns (the same storage, data pointer and strides, k_cache's shape but for a last dim
    Ev <= D: absorbed multi-head latent attention's latent cache, v_cache = k_cache[...,
    :Ev]): the values are then k's first Ev columns, which the append writes with k, the
    same bytes to the same addresses (the only overlap of k_cache and v_cache taken; inside
    a torch.compile trace, which cannot read data pointers, the layout alone is checked).
    Where the two would differ it is refused: rotary_cos and rotary_sin (they rotate k's
    first R dims, which would leave the values unrotated; FlashMLA takes no rotary either:
    rotate the rope part of k first), and for float8_e4m3fn caches a v_descale (None there:
    k_descale descales the keys and the values, in the append and the attention alike).

    Each sequence's queries align to the end of its own cache, as FlashAttention's do: with
    L = cache_seqlens[b] + (Sq if k is given else 0) keys (with cu_seqlens_k_new, its own
    count of new tokens in place of Sq: below), query i sits at a = L - Sq + i
    and sees key j < L when all of these hold:
      causal (the default, True):  j <= a
      window=(l, r):               a - l <= j <= a + r   (None or -1 leaves a side unbounded)
    Cache slots at or past L count for nothing whatever they hold (NaN included); a query
    that sees no key (L = 0, or a window past every key) outputs zeros and has lse -inf.
    scale defaults to 1/sqrt(D). Returns out (B, Sq, H, Ev) in q's dtype and, with
    return_lse=True, the natural-log logsumexp (B, H, Sq) of the scaled, masked scores in
    float32 (float64 for float64 inputs).

    An inference op: it has no gradient, and raises if an input requires grad while grad
    mode is on (FlashAttention's returns a detached output instead). Not checked, as that
    would need a device sync on CUDA: that the block_table entries a sequence uses are pages
    of the pool (checked on CPU tensors; on CUDA the kernels read and write no memory
    outside the pool for them, but the result is undefined), and that no two sequences
    append into the same page slot. The triton backend splits each sequence's keys across
    programs by the device's SM count (flash-decoding) and combines the splits by
    logsumexp; the torch backend runs attnmem.reference.kvcache, one sequence at a time.

    softcap, sinks and alibi_slopes act as in attnmem.attention (its docstring): the cap
    c * tanh(s / c) on the scaled scores, the ALiBi bias -slope * |a - j| from each query's
    position a above (FlashAttention's i + seqlen_k - seqlen_q with each sequence's own
    length), and one sink logit per query head joining every softmax (lse includes it; a
    query that sees no key outputs zeros and has lse = sinks[h]). No gradient here either:
    sinks that require grad are refused while grad mode is on.
    FP8 caches (vLLM's kv_cache_dtype="fp8", FlashAttention-3's e4m3 caches): k_cache and
    v_cache in torch.float8_e4m3fn, contiguous or paged, with k_descale and v_descale
    ((B, Hkv), any float dtype, used in float32; None for 1) such that the cached keys and
    values of sequence b, kv head h, are k_cache * k_descale[b, h] and v_cache *
    v_descale[b, h]. q stays float16 or bfloat16 (float8 queries are not taken), and so do
    the new k and v, which the append quantizes with the same descales: x / descale in
    float32, saturated to e4m3's +-448 (NaN stays NaN), rounded to nearest even, as
    torch's cast of the saturated value (attnmem.reference.kvcache.quantize). The triton
    kernels read the e4m3 cache (half the bytes of a 16-bit one) and widen it exactly to
    q's dtype in registers: k's descale folds into the softmax scale and v's scales the
    output; the dots run in q's dtype with float32 accumulation, as with a 16-bit cache
    (an e4m3 value is exact in float16 and bfloat16). They need sm_89 or later (where
    triton compiles e4m3); older GPUs and the torch backend dequantize in float32 and run
    the twin.

    Packed queries (FlashAttention-3's cu_seqlens_q and max_seqlen_q: a batch mixing
    decoding with chunks of prefill, none padded to the longest): q (total_q, H, D) with
    sequence b's queries in rows cu_seqlens_q[b] to cu_seqlens_q[b + 1] (int32 (B + 1,) on
    q's device, from 0 to total_q, nondecreasing: lengths may be 0), max_seqlen_q an int at
    least the longest sequence's length. k, v, if given, are (total_q, Hkv, D) and (total_q,
    Hkv, Ev), packed alike: sequence b's new tokens are its queries' tokens (unless
    cu_seqlens_k_new packs them on their own, below), written at cache_seqlens[b] + i.
    Everything above holds per sequence with Sq its own length (its clamp of cache_seqlens
    to [0, capacity - Sq] when appending included; an int cache_seqlens must leave room for
    max_seqlen_q new tokens). Returns out (total_q, H, Ev) and lse (H,
    total_q), as attnmem.attention_varlen does. The triton kernels size their grid by
    max_seqlen_q and read cu_seqlens_q on the device, so the launch needs no host sync (row
    tiles past a sequence's length exit at once); the torch backend runs each sequence's
    rows as a batch of one. As in attention_varlen, the cumulative lengths are checked on
    CPU tensors only: on CUDA wrong ones read and write nothing outside the tensors and
    caches, but rows that no sequence covers are left unwritten.

    New tokens packed on their own (FlashAttention-3's cu_seqlens_k_new: a serving step that
    appends a chunk of a sequence's tokens but queries only some of them, or queries a
    sequence that appends nothing; drafted tokens appended in one layout and verified in
    another): cu_seqlens_k_new int32 (B + 1,) on q's device, from 0 to total_k_new,
    nondecreasing, with k (total_k_new, Hkv, D) and v (total_k_new, Hkv, Ev): sequence b's
    n_new[b] = cu_seqlens_k_new[b + 1] - cu_seqlens_k_new[b] new tokens (0 included) are rows
    cu_seqlens_k_new[b] to cu_seqlens_k_new[b + 1], written at cache_seqlens[b] + i,
    whatever q's layout: padded (B, Sq, H, D) or packed with cu_seqlens_q (Sq each
    sequence's own length; as in FlashAttention-3, no max_seqlen_k_new is taken). Sequence b
    then holds L = cache_seqlens[b] + n_new[b] keys, cache_seqlens[b] clamped to [0, capacity
    - n_new[b]], and its query i sits at a = L - Sq + i as above (with more queries than
    keys, causal queries at a < 0 see no key: zeros, lse -inf). With rotary_cos and
    rotary_sin a query that is rotated per query (causal or windowed) is rotated at a,
    where the mask places it (a query at a < 0 passes through unrotated, as positions past
    the tables do in apply_rotary); FlashAttention-3 rotates it at cache_seqlens[b] + i,
    the same position whenever a sequence's queries are its new tokens. The lengths are checked on
    CPU tensors only (each at most the capacity; an int cache_seqlens must leave room for
    the longest); on CUDA each sequence's n_new[b] is clamped to [0, capacity] and its
    cache_seqlens[b] as above, so that wrong lengths write nothing outside the caches and
    read no row outside k and v. The triton append runs a program per row of k, each of
    which finds its sequence by bisection in cu_seqlens_k_new, and the attention reads each
    sequence's count there: the grids follow k's rows and q's shape, with no host sync.

    cache_batch_idx (FlashAttention's; an integer tensor (B,) on q's device, or None for
    0 to B - 1): sequence b's cache is row cache_batch_idx[b] of contiguous caches
    (B_cache, S_max, Hkv, D or Ev) with any B_cache, as a serving loop's cache pool holds more
    sequences than a step runs. The rows are read (and appended to) where they are; the
    kernels take them as a paged pool of one page per row. Not with block_table. Indices
    are checked against B_cache on CPU tensors only; two sequences appending into the same
    row leave it undefined, as in FlashAttention.

    Rotary embeddings (FlashAttention's rotary_cos, rotary_sin and rotary_interleaved):
    rotary_cos and rotary_sin (seqlen_ro, R / 2), any float dtype, on q's device, with R
    even and 0 < R <= D (FlashAttention asks for a multiple of 16; any even R is taken here)
    and seqlen_ro at least the capacity; only with k and v. The new keys are rotated at
    their slots cache_seqlens[b] + i before they are written (and, into an FP8 cache,
    quantized); the queries at cache_seqlens[b] + i when causal or windowed (a window side
    below the capacity, FlashAttention's rule; with cu_seqlens_k_new at their positions a,
    below), else all at cache_seqlens[b] (cache_seqlens as clamped above; packed, each
    sequence's own). The first R dims of a head pair up as
    (d, d + R / 2) (GPT-NeoX, rotary_interleaved=False) or (2i, 2i + 1) (GPT-J, True): the
    first of a pair becomes x * cos - x_pair * sin, the second x * cos + x_pair * sin, with
    cos and sin at the position's row, in float32 (float64 for float64 inputs) rounded to
    q's dtype; dims past R are untouched. The cache then holds the rotated keys. The
    triton kernels rotate the keys on their way into the cache and the q tile after
    loading it: no separate pass over q or k.

    cache_leftpad (FlashAttention's; an integer tensor (B,) on q's device, or None for 0):
    sequence b's keys start at slot cache_leftpad[b] (values clamped to [0, capacity]):
    slots below it count for nothing, whatever they hold. Everything else counts slots
    from 0 as above: cache_seqlens[b] is where the new tokens go, the queries' positions
    a, the windows, the ALiBi distances and the rotary positions are unchanged (as in
    FlashAttention, whose positions counted from cache_leftpad[b] shift queries and keys
    alike); a sequence with cache_leftpad[b] >= L sees no key. It works with block_table
    and cache_batch_idx too (FlashAttention's refuses a paged cache): it bounds the keys
    each sequence reads from below.

    num_splits (FlashAttention's; an int >= 0): the splits of each sequence's keys that the
    triton backend runs (flash-decoding). 0 (the default) lets the launch pick them (from the
    SM count, the capacity and the largest key tile it may run, as before); 1 runs one split,
    which writes out and lse itself, with no combine; n > 1 asks for n, clamped to the
    capacity's key tiles (capacity over that largest tile, rounded up; 128 at most), so that
    a split holds a tile at least. The result is the same for any count up to rounding. The
    torch backend has no splits: it checks num_splits and runs the twin as ever.
    """
    v, v_descale, in_keys = _latent_values(k_cache, v_cache, k, v, rotary_cos, rotary_sin,
                                           k_descale, v_descale)
    n_new, n_q, seqlens, block_table, scale, left, right, mods, rotary, attend = _validate(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, window, scale,
        return_lse, softcap, sinks, alibi_slopes, k_descale, v_descale, cu_seqlens_q,
        max_seqlen_q, cache_batch_idx, rotary_cos, rotary_sin, rotary_interleaved,
        cache_leftpad, cu_seqlens_k_new, in_keys)
    num_splits = _num_splits(num_splits)
    backend = _backend.requested_backend()
    packing = (cu_seqlens_q, n_q) if cu_seqlens_q is not None else (None, 0)
    if n_new:
        _append(q, k_cache, v_cache, k, v, seqlens, block_table, backend, mods[-1], *packing,
                **rotary, cu_seqlens_k_new=cu_seqlens_k_new)
    out, lse = _attend(q, k_cache, v_cache, seqlens, block_table, n_new, scale, left, right,
                       backend, *mods, *packing, **attend, num_splits=num_splits,
                       cu_seqlens_k_new=cu_seqlens_k_new)
    return (out, lse) if return_lse else out


def _num_splits(num_splits) -> int:
    """FlashAttention's num_splits: an int >= 0."""
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be 0 (the launch picks), 1 (no split) or more, got "
                         f"{num_splits}")
    return operator.index(num_splits)


def _validate_append(k_cache, v_cache, k, v, cache_seqlens, block_table, cu_seqlens,
                     max_seqlen, cache_batch_idx, rotary_cos, rotary_sin, rotary_interleaved,
                     k_descale, v_descale, values_in_keys=False):
    """attention_with_kvcache's checks of its append, with k in q's place (batch, device,
    dtype: the caches' or, for float8_e4m3fn caches, a 16-bit one)."""
    paged = block_table is not None
    batch, longest, n_new, block_table, descales, capacity = _check_cache(
        k, "k", k_cache, v_cache, k, v, block_table, k_descale, v_descale, cu_seqlens,
        max_seqlen, cache_batch_idx)
    _check_rotary(rotary_cos, rotary_sin, rotary_interleaved, k, "k", capacity, True)
    # Packed without max_seqlen: the lengths are checked as attention_with_kvcache's
    # cu_seqlens_k_new (each within the capacity; an int cache_seqlens leaves room for the
    # longest, which CUDA tensors do not tell without a sync: the kernels clamp there).
    packing = (None, cu_seqlens) if cu_seqlens is not None and longest is None else (
        cu_seqlens, None)
    seqlens = _check_slots(k, "k", k_cache, cache_seqlens, block_table, paged, batch, n_new,
                           n_new, capacity, *packing)
    _check_inference("kvcache_append",
                     [("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
                      ("k_descale", k_descale), ("v_descale", v_descale),
                      ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)],
                     n_new, k_cache, v_cache, "vLLM's reshape_and_cache writes the caches "
                     "outside autograd", values_in_keys)
    return n_new, seqlens, block_table, descales


def kvcache_append(k_cache, v_cache, k, v, *, cache_seqlens, block_table=None,
                   cu_seqlens=None, max_seqlen=None, cache_batch_idx=None, rotary_cos=None,
                   rotary_sin=None, rotary_interleaved=False, k_descale=None,
                   v_descale=None) -> None:
    """Writes new keys and values into a KV cache in place, as attention_with_kvcache(q,
    k_cache, v_cache, k=k, v=v, ...) appends them before it attends (its docstring), without
    the attention: for a serving loop that prefills through attention_varlen or runs its own
    attention (vLLM's reshape_and_cache).

    k_cache, v_cache: (B, S_max, Hkv, D), or with block_table (B, max_blocks) int32 a paged pool
    (num_pages, page_size, Hkv, D), or with cache_batch_idx (B,) rows of a contiguous pool
    (B_cache, S_max, Hkv, D); v_cache's head dim Ev may differ from k_cache's D (as in
    attention_with_kvcache). v None with v_cache a view of k_cache's first Ev columns (its
    latent cache): k's first Ev columns are the values, as attention_with_kvcache appends them
    with v=None (no rotary, no v_descale: k_descale serves both). k (B, S, Hkv, D), v (B, S,
    Hkv, Ev) in the caches' dtype, or float16 or bfloat16 for float8_e4m3fn caches, or packed
    (total, Hkv, D or Ev) with cu_seqlens (B + 1,) int32 (attention_with_kvcache's
    cu_seqlens_k_new, FlashAttention-3's name for the new tokens' cumulative lengths): sequence
    b's tokens in rows cu_seqlens[b] to cu_seqlens[b + 1], 0 included. Token i of sequence b
    goes to slot cache_seqlens[b] + i, cache_seqlens an int or an integer tensor (B,) clamped to
    [0, capacity - S] (packed: each sequence's own length), and is not advanced. rotary_cos,
    rotary_sin ((seqlen_ro >= capacity, R / 2)) and rotary_interleaved rotate each key at its
    slot first; k_descale, v_descale ((B, Hkv), None for 1) quantize both into float8_e4m3fn
    caches, as attention_with_kvcache does. The same checks, with k where q stands there: batch,
    device and dtype come from k; caches that overlap themselves, each other (but for v=None
    above) or the other inputs are refused (not inside a torch.compile trace), and cu_seqlens,
    block_table's pages and cache_batch_idx's rows are checked on CPU tensors only. The caches
    end byte for byte as that call leaves them.

    max_seqlen (optional, packed only; attention_with_kvcache's max_seqlen_q): a bound on
    the longest sequence's tokens that the launch does not need, as the packed append runs a
    program per row of k either way. Without it, packed lengths are checked as
    attention_with_kvcache's cu_seqlens_k_new: on CPU tensors each at most the capacity and
    an int cache_seqlens leaving room for the longest; on CUDA ones, where reading them
    would be a host sync (and break CUDA-graph capture), not at all: the kernels clamp each
    sequence's count to the capacity and its cache_seqlens[b] to the room its count leaves,
    so that wrong lengths write nothing outside the caches. With it, it is checked as
    max_seqlen_q: at least total / B, at most the capacity, at least the longest on CPU
    tensors, and an int cache_seqlens must leave room for it (a check on sizes, which CUDA
    tensors pass without a sync too).

    Returns None, as vLLM's reshape_and_cache does: the call is for its effect on the
    caches. torch's in-place methods return self for chaining, but this writes two tensors,
    not one self, and returning them would read as new caches. An inference op: inputs that
    require grad are refused while grad mode is on. The triton backend runs
    attention_with_kvcache's append kernel (one program per new token, no host sync; packed,
    each finds its sequence by bisection in cu_seqlens); the torch backend
    attnmem.reference.kvcache's append.
    """
    v, v_descale, in_keys = _latent_values(k_cache, v_cache, k, v, rotary_cos, rotary_sin,
                                           k_descale, v_descale)
    n_new, seqlens, block_table, descales = _validate_append(
        k_cache, v_cache, k, v, cache_seqlens, block_table, cu_seqlens, max_seqlen,
        cache_batch_idx, rotary_cos, rotary_sin, rotary_interleaved, k_descale, v_descale,
        in_keys)
    if n_new:
        # Packed, with max_seqlen or without, the append runs a program per row of k
        # (attention_with_kvcache's cu_seqlens_k_new), never B * max_seqlen of them.
        _append(None, k_cache, v_cache, k, v, seqlens, block_table,
                _backend.requested_backend(), descales, rotary_cos=rotary_cos,
                rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
                cu_seqlens_k_new=cu_seqlens)
