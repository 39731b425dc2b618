"""attnmem.kvcache_append: the caches it writes are, byte for byte, those that
attention_with_kvcache(..., k=, v=) writes on the same inputs (contiguous, paged, packed with
max_seqlen or without, cache_batch_idx, rotary, FP8 caches), on both backends; packed, its
launch is a program per row of k whatever max_seqlen; a serving loop that prefills through
attention_varlen and kvcache_append decodes as one that prefills through
attention_with_kvcache (examples/decode.py, tiny), and as attention over the whole sequence;
bad inputs raise errors naming the argument; the custom op's schema and fake.
"""

import math
import re

import pytest
import torch
from test_grid_limits import _Grids

import attnmem
from backends import BACKENDS, DEVICE

FP8 = torch.float8_e4m3fn
# name: (B, new tokens per sequence (an int, or a list: packed), Hkv, D, capacity,
# cache_seqlens, options): page_size (a paged pool, shuffled), pool (cache_batch_idx's rows
# of a pool of that many), rotary (R, interleaved), fp8 (float8_e4m3fn caches, descales),
# max_seqlen (packed; default the longest; None: not passed to kvcache_append, whose packed
# append, a program per row, needs none; attention_with_kvcache gets the longest as
# max_seqlen_q and appends k packed as q, by the same kernel). The caches are float16 unless
# fp8 or float32.
CASES = {
    "contiguous_odd_dim_clamped": (3, 2, 2, 33, 40, [0, 45, 17], dict(float32=True)),
    "paged_rotary_gptj": (2, 3, 2, 16, 28, [5, 20], dict(page_size=7, rotary=(10, True))),
    "packed_paged_rotary": (3, [3, 0, 1], 1, 16, 25, [30, 2, 23],
                            dict(page_size=5, rotary=(16, False), max_seqlen=4)),
    "cache_batch_idx": (2, 2, 2, 24, 12, 5, dict(pool=4)),
    "fp8_paged": (2, 2, 2, 16, 16, [3, 14], dict(page_size=4, fp8=True)),
    "fp8_packed_rotary": (2, [1, 4], 2, 8, 12, [11, 0], dict(fp8=True, rotary=(8, False))),
    # An odd batch with empty sequences; 8 is clamped to 6, -1 to 0.
    "packed_no_max_seqlen_empty": (5, [0, 3, 0, 1, 2], 2, 40, 9, [3, 8, 9, 0, -1],
                                   dict(max_seqlen=None)),
    "packed_paged_rotary_no_max_seqlen": (3, [3, 0, 1], 1, 16, 25, [30, 2, 23],
                                          dict(page_size=5, rotary=(16, False),
                                               max_seqlen=None)),
    "fp8_packed_paged_no_max_seqlen": (3, [2, 0, 5], 2, 8, 12, [11, 4, 0],
                                       dict(fp8=True, page_size=4, max_seqlen=None)),
}


def _rotary_tables(positions, rotary_dim):
    """cos, sin (positions, rotary_dim / 2) in float32, Llama's frequencies."""
    inv_freq = 10000.0 ** -(torch.arange(0, rotary_dim, 2) / rotary_dim)
    angles = torch.arange(positions)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def _to(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def _inputs(name):
    """q (for attention_with_kvcache), the caches (random everywhere), k, v, the keyword
    arguments the two calls share, kvcache_append's packing and attention_with_kvcache's,
    and the number of new tokens; tensors on DEVICE."""
    batch, new, kv_heads, d, capacity, seqlens, options = CASES[name]
    dtype = torch.float32 if options.get("float32") else torch.float16
    packed = isinstance(new, list)
    shared = dict(cache_seqlens=seqlens if isinstance(seqlens, int)
                  else torch.tensor(seqlens, dtype=torch.int32))
    shape = (batch, capacity, kv_heads, d)
    if "page_size" in options:
        page_size = options["page_size"]
        blocks = capacity // page_size
        shape = (batch * blocks + 2, page_size, kv_heads, d)
        order = torch.randperm(shape[0])[:batch * blocks]
        shared["block_table"] = order.view(batch, blocks).to(torch.int32)
    if "pool" in options:
        shape = (options["pool"], capacity, kv_heads, d)
        shared["cache_batch_idx"] = torch.randperm(options["pool"])[:batch]
    caches = [torch.randn(shape) * 4 for _ in range(2)]
    if "rotary" in options:
        rotary_dim, interleaved = options["rotary"]
        cos, sin = _rotary_tables(capacity, rotary_dim)
        shared.update(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)
    tokens = (sum(new),) if packed else (batch, new)
    k, v = (torch.randn(*tokens, kv_heads, d) * 4 for _ in range(2))
    q = torch.randn(*tokens, 2 * kv_heads, d, dtype=dtype)
    if options.get("fp8"):
        caches = [c.to(FP8) for c in caches]
        k.view(-1)[:3] = torch.tensor([500.0, -1e4, 1.0625])  # saturated, a tie to even
        shared.update(k_descale=0.02 + 0.48 * torch.rand(batch, kv_heads),
                      v_descale=0.02 + 0.48 * torch.rand(batch, kv_heads))
    else:
        caches = [c.to(dtype) for c in caches]
    append_packing = attend_packing = {}
    if packed:
        cu_seqlens = torch.tensor([0, *new]).cumsum(0).to(torch.int32)
        longest = options.get("max_seqlen", max(new))
        append_packing = dict(cu_seqlens=cu_seqlens, max_seqlen=longest)
        attend_packing = dict(cu_seqlens_q=cu_seqlens, max_seqlen_q=longest or max(new))
    shared = {key: _to(x) for key, x in shared.items()}
    return (_to(q), [_to(c) for c in caches], _to(k.to(dtype)), _to(v.to(dtype)), shared,
            {key: _to(x) for key, x in append_packing.items()},
            {key: _to(x) for key, x in attend_packing.items()}, tokens[0] * (1 if packed
                                                                             else tokens[1]))


def _bytes(cache):
    return cache.cpu().view(torch.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_caches_match_attention_with_kvcache(name, backend):
    """Byte for byte the caches attention_with_kvcache leaves, one slot written per new
    token (every other slot as it was)."""
    q, caches, k, v, shared, append_packing, attend_packing, n_new = _inputs(name)
    appended, attended = [c.clone() for c in caches], [c.clone() for c in caches]
    with attnmem.use_backend(backend), torch.no_grad():
        assert attnmem.kvcache_append(*appended, k, v, **shared, **append_packing) is None
        attnmem.attention_with_kvcache(q, *attended, k=k, v=v, **shared, **attend_packing)
    for got, expect, before in zip(appended, attended, caches):
        assert torch.equal(_bytes(got), _bytes(expect))
        written = (_bytes(got) != _bytes(before)).flatten(2).any(-1)
        assert int(written.sum()) == n_new


def _attention_over(q, k, v):
    """float64 softmax attention of q (H, D) over keys and values (L, Hkv, D), GQA."""
    group = q.shape[0] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, 1) for x in (k, v))
    scores = torch.einsum("hd,lhd->hl", q.double(), k) / math.sqrt(q.shape[-1])
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_prefill_then_decode(backend):
    """examples/decode.py's loop, tiny: packed prompts through apply_rotary, attention_varlen
    and kvcache_append fill a paged cache byte for byte as attention_with_kvcache's packed
    prefill does, with the same outputs; decoding from it then matches float64 attention
    over each whole sequence (prompt and decoded tokens, rotated at their positions)."""
    lengths, steps, heads, kv_heads, d, page_size = [5, 1, 3], 2, 4, 2, 16, 4
    batch, longest = len(lengths), max(lengths)
    blocks = -(-(longest + steps) // page_size)
    table = _to(torch.randperm(batch * blocks).view(batch, blocks).to(torch.int32))
    cos, sin = (_to(x) for x in _rotary_tables(blocks * page_size, d))
    rotary = dict(rotary_cos=cos, rotary_sin=sin)
    cu_seqlens = _to(torch.tensor([0, *lengths]).cumsum(0).to(torch.int32))
    packing = dict(cu_seqlens=cu_seqlens, max_seqlen=longest)
    q, k, v = (_to(torch.randn(sum(lengths), h, d)) for h in (heads, kv_heads, kv_heads))
    pools = [[_to(torch.zeros(batch * blocks, page_size, kv_heads, d)) for _ in range(2)]
             for _ in range(2)]
    zeros = _to(torch.zeros(batch, dtype=torch.int32))
    with attnmem.use_backend(backend), torch.no_grad():
        rotated_q, rotated_k = (attnmem.apply_rotary(x, cos, sin, **packing) for x in (q, k))
        out = attnmem.attention_varlen(rotated_q, rotated_k, v, cu_seqlens, cu_seqlens,
                                       longest, longest, causal=True)
        attnmem.kvcache_append(*pools[0], k, v, cache_seqlens=zeros, block_table=table,
                               **packing, **rotary)
        expect = attnmem.attention_with_kvcache(
            q, *pools[1], k=k, v=v, cache_seqlens=zeros, block_table=table,
            cu_seqlens_q=cu_seqlens, max_seqlen_q=longest, **rotary)
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
        for got, want in zip(*pools):
            assert torch.equal(got, want)
        seqlens, keys, values = torch.tensor(lengths), [k], [v]
        for _ in range(steps):
            new = [_to(torch.randn(batch, 1, h, d)) for h in (heads, kv_heads, kv_heads)]
            outs = [attnmem.attention_with_kvcache(new[0], *pool, k=new[1], v=new[2],
                                                   cache_seqlens=_to(seqlens),
                                                   block_table=table, **rotary)
                    for pool in pools]
            assert torch.equal(*outs)
            keys, values = keys + [new[1]], values + [new[2]]
            seqlens += 1
    # The whole sequences: prompt rows, then each step's token; rotated at 0 to L - 1.
    cos, sin = cos.cpu().double(), sin.cpu().double()
    for b, length in enumerate(seqlens.tolist()):
        start = sum(lengths[:b])
        seq_k, seq_v = (torch.cat([x[0].cpu()[start:start + lengths[b]]]
                                  + [x_t.cpu()[b, 0][None] for x_t in x[1:]])
                        for x in (keys, values))
        seq_k = attnmem.apply_rotary(seq_k[None].double(), cos, sin)[0]
        q_last = attnmem.apply_rotary(new[0].cpu()[b:b + 1].double(), cos, sin,
                                      seqlen_offsets=length - 1)[0, 0]
        reference = _attention_over(q_last, seq_k, seq_v)
        torch.testing.assert_close(outs[0].cpu()[b, 0].double(), reference, atol=1e-5,
                                   rtol=1e-5)


def _good():
    """Arguments of a valid append on the CPU: a paged float16 pool, 2 sequences of 3 new
    tokens, 2 kv heads of head dim 8."""
    return dict(k_cache=torch.zeros(6, 4, 2, 8, dtype=torch.float16),
                v_cache=torch.zeros(6, 4, 2, 8, dtype=torch.float16),
                k=torch.randn(2, 3, 2, 8, dtype=torch.float16),
                v=torch.randn(2, 3, 2, 8, dtype=torch.float16),
                cache_seqlens=torch.tensor([0, 5], dtype=torch.int32),
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))


def _packed(args):
    return dict(args, k=args["k"].flatten(0, 1), v=args["v"].flatten(0, 1),
                cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32), max_seqlen=4)


def _packed_alone(args, counts):
    """Packed new tokens of counts without max_seqlen (their lengths then checked as
    attention_with_kvcache's cu_seqlens_k_new)."""
    k, v = (torch.randn(sum(counts), *args[n].shape[2:], dtype=args[n].dtype) for n in "kv")
    return dict(args, k=k, v=v, cu_seqlens=torch.tensor([0, *counts], dtype=torch.int32)
                .cumsum(0, dtype=torch.int32))


def _fp8(args):
    return dict(args, k_cache=args["k_cache"].to(FP8), v_cache=args["v_cache"].to(FP8))


BAD = {
    "k_dtype": (lambda a: dict(a, k=a["k"].float()), TypeError,
                "k_cache must have k's dtype torch.float32"),
    "k_fp8": (lambda a: dict(_fp8(a), k=a["k"].to(FP8)), TypeError,
              "k must be float16, bfloat16, float32 or float64"),
    "k_float32_fp8_cache": (lambda a: dict(_fp8(a), k=a["k"].float(), v=a["v"].float()),
                            TypeError, re.escape("k must be float16 or bfloat16 with a "
                                                 "float8_e4m3fn cache (the append quantizes "
                                                 "it into the cache), got torch.float32")),
    "k_ndim": (lambda a: dict(a, k=a["k"][0]), ValueError,
               r"k must be \(B, S, Hkv, D\), got shape"),
    "k_heads": (lambda a: dict(a, k=a["k"].repeat(1, 1, 2, 1)), ValueError,
                r"k must be \(B, S, Hkv, D\) = \(2, 3, 2, 8\), got \(2, 3, 4, 8\)"),
    "v_missing": (lambda a: dict(a, v=None), ValueError, "k and v must be given together"),
    "v_shape": (lambda a: dict(a, v=a["v"][:, :2]), ValueError,
                r"v must be \(B, S, Hkv, Ev\) = \(2, 3, 2, 8\)"),
    "too_many": (lambda a: dict(a, k=a["k"].repeat(1, 3, 1, 1), v=a["v"].repeat(1, 3, 1, 1)),
                 ValueError, "k holds 9 new tokens but the cache holds at most 8"),
    "seqlens_int": (lambda a: dict(a, cache_seqlens=6), ValueError,
                    r"cache_seqlens 6 leaves no room in the cache: it must lie in \[0, 5\]"),
    "seqlens_device": (lambda a: dict(a, cache_seqlens=a["cache_seqlens"].to("meta")),
                       ValueError, "cache_seqlens is on meta but k is on cpu"),
    "table_device": (lambda a: dict(a, block_table=a["block_table"].to("meta")), ValueError,
                     "block_table is on meta but k is on cpu"),
    "page_outside": (lambda a: dict(a, block_table=torch.tensor([[0, 1], [2, 9]],
                                                                dtype=torch.int32)),
                     ValueError, r"block_table\[1, 1\] = 9 is not a page of the pool"),
    "batch_idx_and_table": (lambda a: dict(a, cache_batch_idx=torch.tensor([0, 1])),
                            ValueError, "pass one of the two"),
    "batch_idx_row": (lambda a: dict(a, block_table=None, cache_batch_idx=torch.tensor([0, 6])),
                      ValueError, r"cache_batch_idx\[1\] = 6 is not a row of the cache"),
    "max_seqlen_alone": (lambda a: dict(a, max_seqlen=3), ValueError,
                         "max_seqlen applies to packed tokens only: pass cu_seqlens"),
    "cu_seqlens_end": (lambda a: dict(_packed(a), cu_seqlens=torch.tensor(
        [0, 4, 5], dtype=torch.int32)), ValueError, "cu_seqlens must end at the 6 packed rows"),
    "cu_seqlens_device": (lambda a: dict(_packed(a), cu_seqlens=torch.tensor(
        [0, 4, 6], dtype=torch.int32, device="meta")), ValueError,
        "cu_seqlens is on meta but k is on cpu"),
    "max_seqlen_short": (lambda a: dict(_packed(a), max_seqlen=3), ValueError,
                         "max_seqlen = 3 is less than the longest sequence in cu_seqlens"),
    "cu_seqlens_past_capacity": (lambda a: _packed_alone(a, [9, 0]), ValueError,
                                 "the cache's capacity = 8 is less than the longest sequence "
                                 "in cu_seqlens, 9"),
    "cu_seqlens_end_no_max_seqlen": (lambda a: dict(_packed_alone(a, [4, 2]), cu_seqlens=(
        torch.tensor([0, 4, 5], dtype=torch.int32))), ValueError,
        "cu_seqlens must end at the 6 packed rows"),
    "seqlens_int_longest": (lambda a: dict(_packed_alone(a, [1, 4]), cache_seqlens=5),
                            ValueError, r"cache_seqlens 5 leaves no room in the cache: it must "
                            r"lie in \[0, 4\]"),
    "packed_shape": (lambda a: dict(_packed(a), v=a["v"]), ValueError,
                     r"v must be \(total, Hkv, Ev\), packed as k"),
    "rotary_short": (lambda a: dict(a, rotary_cos=torch.ones(7, 4), rotary_sin=torch.ones(7, 4)),
                     ValueError, "rotary_cos has 7 positions but the cache has 8 slots"),
    "rotary_device": (lambda a: dict(a, rotary_cos=torch.ones(8, 4, device="meta"),
                                     rotary_sin=torch.ones(8, 4, device="meta")),
                      ValueError, "rotary_cos is on meta but k is on cpu"),
    "descale_not_fp8": (lambda a: dict(a, k_descale=torch.ones(2, 2)), ValueError,
                        "k_descale applies to float8_e4m3fn caches only"),
    "descale_device": (lambda a: dict(_fp8(a), v_descale=torch.ones(2, 2, device="meta")),
                       ValueError, "v_descale is on meta but k is on cpu"),
    "k_shares_cache": (lambda a: dict(a, k=a["k_cache"][:2, :3]), ValueError,
                       "k shares storage with k_cache"),
    "requires_grad": (lambda a: dict(a, v=a["v"].requires_grad_()), RuntimeError,
                      "kvcache_append has no gradient, and v requires grad: run it under "
                      r"torch.no_grad\(\)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_name_the_argument(name):
    make, error, message = BAD[name]
    args = make(_good())
    k_cache, v_cache, k, v = (args.pop(key) for key in ("k_cache", "v_cache", "k", "v"))
    with pytest.raises(error, match=message):
        attnmem.kvcache_append(k_cache, v_cache, k, v, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """The append's custom op as kvcache_append calls it (no q): schema (it mutates the
    caches), fake and dispatch, padded and packed (k packed on its own, cu_seqlens_k_new)."""
    from attnmem import kvcache

    args = {key: _to(x) for key, x in _good().items()}
    caches, new = (args["k_cache"], args["v_cache"]), (args["k"], args["v"])
    seqlens, table = args["cache_seqlens"], args["block_table"]
    torch.library.opcheck(kvcache._append.default, (None, *caches, *new, seqlens, table, backend))
    packed = {key: _to(x) for key, x in _packed(_good()).items()}
    torch.library.opcheck(kvcache._append.default, (
        None, *caches, packed["k"], packed["v"], seqlens, None, backend),
        dict(cu_seqlens_k_new=packed["cu_seqlens"]))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
def test_packed_append_runs_a_program_per_row(monkeypatch):
    """Packed, with max_seqlen or without, the append kernel runs one program per row of k
    (not B x max_seqlen: 6 rows in 3 sequences of up to 5 tokens, told 8), and the triton
    backend refuses only k's rows past the grid's limit, whatever B x max_seqlen, while
    attention_with_kvcache's packed queries still count their row tiles."""
    from attnmem import kvcache
    from attnmem.kernels import attention_kvcache as kernel

    recorded = _Grids()
    monkeypatch.setattr(kernel, "_kvcache_append", recorded)
    args = {key: _to(x) for key, x in _packed_alone(_good(), [0, 5, 1]).items()}
    args.update(cache_seqlens=_to(torch.zeros(3, dtype=torch.int32)),
                block_table=_to(torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)))
    with attnmem.use_backend("triton"), torch.no_grad():
        for max_seqlen in (None, 8):
            attnmem.kvcache_append(**args, max_seqlen=max_seqlen)
    assert recorded.grids == [(6,), (6,)]
    caches = [torch.zeros(1, 1, 1, 16).expand(2 ** 16, 4, 32, -1)] * 2
    k = torch.zeros(1, 1, 16).expand(5, 32, -1)
    cu_seqlens = torch.zeros(2 ** 16 + 1, dtype=torch.int32)
    assert kvcache._triton_reasons(None, *caches, k=k, cu_seqlens_k_new=cu_seqlens) == []
    [reason] = kvcache._triton_reasons(k, *caches, cu_seqlens, 2 ** 14)
    assert "max_seqlen_q = 16384 queries need 2147483648 programs" in reason
    rows = torch.zeros(1, 1, 16).expand(2 ** 31, 32, -1)
    [reason] = kvcache._triton_reasons(None, *caches, k=rows, cu_seqlens_k_new=cu_seqlens)
    assert "k's 2147483648 packed rows need as many programs > 2147483647" in reason


@pytest.mark.parametrize("max_seqlen", [4, None])
def test_compiles_under_torch_compile(max_seqlen):
    """fullgraph: the checks that read tensor data or storage stay out of the trace; packed
    without max_seqlen, nothing reads a length on the host."""
    args = {key: _to(x) for key, x in _packed(_good()).items()}
    args["max_seqlen"] = max_seqlen
    caches = [args.pop(key) for key in ("k_cache", "v_cache")]
    expect = [c.clone() for c in caches]
    attnmem.kvcache_append(*expect, **args)
    fn = torch.compile(lambda *a, **kw: attnmem.kvcache_append(*a, **kw), fullgraph=True)
    fn(*caches, **args)
    for got, want in zip(caches, expect):
        assert torch.equal(got, want)
