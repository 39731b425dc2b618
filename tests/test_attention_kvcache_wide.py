"""attnmem.attention_with_kvcache at head dims past 256: absorbed multi-head latent attention's
decoding (DeepSeek-V2/V3, the workload FlashMLA serves): one latent kv head shared by 16
query heads, D = 576 (kv_lora_rank 512 + 64 rope dims), Ev = 512, the values the first 512
columns of the keys' cache (v_cache = k_cache[..., :512], a view). The triton kernels take
q's and k's D as a tile of 512 columns and a tail of 64 (BLOCK_DT), v's Ev in one tile.

Against float64 attention over each sequence's keys and values, built apart from the op
(tests/test_attention_kvcache_mla.py's checks), on both backends: the view, contiguous and
paged, in one split and several, a sequence that sees no key; D = 320, Ev = 300 with an
append (every option of the op at widths past 256: paged, packed, cache_batch_idx, rotary
across the tail, left padding, windows, softcap, sinks, ALiBi, e4m3 caches); wider head dims
run the twin; the launch's tiles on a stand-in H100; the sm_90 builds (slow).
"""

import math

import pytest
import torch
from test_attention_fp8 import _interpreter_e4m3_cast  # noqa: F401 (autouse fixture)
from test_attention_kvcache import (
    HAS_TRITON,
    NO_SPILLS,
    _append_job,
    _attend_job,
    _paged,
    assert_matches_float64,
)
from test_attention_kvcache_mla import _reference, _to, check_matches_float64
from test_kvcache_tuning import on_a_stand_in_h100  # noqa: F401 (fixture)

import attnmem
from aot import compile_all
from backends import BACKENDS, DEVICE

F16, F32 = torch.float16, torch.float32
D, EV = 576, 512


def _absorbed(dtype, seqlens, capacity=48, heads=16):
    """q (B, 1, H, D) and a cache (B, capacity, 1, D) whose slots past each sequence's length
    hold NaN; the values are its first Ev columns."""
    batch = len(seqlens)
    unused = torch.arange(capacity)[None, :] >= torch.tensor(seqlens)[:, None]
    cache = torch.randn(batch, capacity, 1, D).masked_fill(unused[..., None, None], math.nan)
    return torch.randn(batch, 1, heads, D, dtype=dtype), cache.to(dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout, num_splits, dtype", [
    ("contiguous", 1, F32), ("paged", 3, F32), ("paged", 1, F16),
    # DeepSeek's own dtype, where dots in bfloat16 are right: on a GPU.
    *([("paged", 3, torch.bfloat16)] if DEVICE == "cuda" else [])])
def test_absorbed_mla_decoding_matches_float64(layout, num_splits, dtype, backend):
    """D = 576, Ev = 512, 16 query heads on one kv head, v_cache a view of k_cache's first
    512 columns, no append: out and lse within twice the error of the attention twin in q's
    dtype; the empty sequence outputs zeros with lse -inf (bfloat16 on CUDA only)."""
    torch.manual_seed(num_splits + dtype.itemsize)
    seqlens = [37, 0, 21]
    q, cache = _absorbed(dtype, seqlens)
    k_cache, table = cache, None
    if layout == "paged":
        k_cache, table = _paged(cache, 8, torch.randperm(len(seqlens) * 6 + 2))
    k_cache = _to(k_cache)
    with attnmem.use_backend(backend), torch.no_grad():
        out, lse = attnmem.attention_with_kvcache(
            _to(q), k_cache, k_cache[..., :EV], cache_seqlens=_to(torch.tensor(
                seqlens, dtype=torch.int32)), block_table=_to(table), return_lse=True,
            num_splits=num_splits)
    case = dict(n_q=1, d=D, causal=True, window=None, rotary=None, leftpad=None, fp8=False,
                capacity=48)
    old = [[cache[b, :s].double() for b, s in enumerate(seqlens)],
           [cache[b, :s, :, :EV].double() for b, s in enumerate(seqlens)]]
    new = [[x[:0] for x in old[0]], [x[:0] for x in old[1]]]
    ref, base = (_reference(case, q, old, new, seqlens, {}, t) for t in (torch.float64, dtype))
    assert out.shape == (3, 1, 16, EV)
    assert_matches_float64(out.cpu(), lse.cpu(), ref, base, dtype)
    assert (out[1] == 0).all() and (lse[1] == -math.inf).all()


# Cases of tests/test_attention_kvcache_mla.py's checks (its BASE's keys) at widths past 256,
# with the append: D = 320 (a tile of 256 and a masked tail of 64), Ev = 300 (a masked tile
# of 512); D = 576 with a rotary dim of 544 (pairs (d, d + 272): the tail's partners lie in
# the first tile) and left padding; e4m3 caches, packed queries from cache_batch_idx's rows.
WIDE = dict(heads=4, kv_heads=2, append=True, causal=True, window=None, dtype=F32, mods=False,
            rotary=None, leftpad=None, fp8=False)
CASES = {
    "d320_ev300_paged_window_mods": dict(WIDE, n_q=2, d=320, ev=300, capacity=40,
                                         seqlens=[5, 99, 0], layout=8, window=(6, 0),
                                         mods=True),
    "d576_rotary_tail_leftpad": dict(WIDE, n_q=2, d=576, ev=512, capacity=32, seqlens=[20, 9],
                                     kv_heads=1, layout="contiguous", rotary=(544, False),
                                     leftpad=[3, 0]),
    "d576_fp8_packed_rows": dict(WIDE, n_q=[1, 3], d=576, ev=512, capacity=32,
                                 seqlens=[17, 0], layout="rows", dtype=F16, fp8=True),
}


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_options_past_256_match_float64(name, backend):
    """out, lse within twice the twin's error in q's dtype, and the caches after the append
    byte for byte (rotated keys within a unit in the last place): the MLA tests'
    check_matches_float64, here with num_splits 2."""
    torch.manual_seed(len(name))
    check_matches_float64(CASES[name], backend, num_splits=2)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
@pytest.mark.parametrize("d, ev, words", [(776, 512, "head dim 776 > 768"),
                                          (576, 520, "v_cache's head dim 520 > 512")])
def test_head_dims_past_the_kernels_run_the_twin(d, ev, words):
    """D past 768 (512 + a tail of 256) or Ev past 512: backend="triton" refuses naming the
    head dim; "auto" runs the twin."""
    q, k_cache = torch.randn(1, 1, 2, d), torch.randn(1, 8, 1, d)
    v_cache = torch.randn(1, 8, 1, ev)
    with attnmem.use_backend("triton"), pytest.raises(RuntimeError, match=words):
        attnmem.attention_with_kvcache(*map(_to, (q, k_cache, v_cache)), cache_seqlens=5)
    with attnmem.use_backend("auto"):
        out = attnmem.attention_with_kvcache(*map(_to, (q, k_cache, v_cache)), cache_seqlens=5)
    assert out.shape == (1, 1, 2, ev)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_wide_tiles_and_configs(on_a_stand_in_h100):  # noqa: F811
    """D = 576 launches a tile of 512 and a tail of 64 (BLOCK_DT, in the tuning key), v's tile
    of 512; 16 query heads a kv head take 16-row tiles, 128 take 32 (64 would spill); the
    candidates are the wide table's and the rule's that fit sm_90's shared memory by the
    estimate of both tiles (k's 576 columns, v's 512), and the splits' tiles divide them.
    Head dims up to 256 launch as before (no BLOCK_DT)."""
    from attnmem.kernels import attention_kvcache as kernel

    for heads, d in ((16, D), (128, D), (16, 256)):
        cache = torch.zeros(1, 512, 1, d, dtype=F16)
        kernel.attention_with_kvcache(torch.zeros(1, 1, heads, d, dtype=F16), cache,
                                      cache[..., :min(d, EV)], torch.tensor([300]).int(), None,
                                      0, 0.125, -1, 0)
    few, many, narrow = on_a_stand_in_h100.calls
    widths = (576, 512)
    for call, block_m in ((few, 16), (many, 32)):
        meta = call["meta"]
        assert (meta["BLOCK_D"], meta["BLOCK_DT"], meta["BLOCK_DV"]) == (512, 64, 512)
        assert meta["BLOCK_M"] == block_m and 64 in call["key"]
        assert call["configs"] == kernel.launch_configs(block_m, 576, 2, False,
                                                        kernel.SMEM_LIMIT[90], widths)
        assert all(kernel.smem_estimate(block_m, c["BLOCK_N"], *widths[:1], c["num_stages"], 2,
                                        widths[1]) <= kernel.SMEM_LIMIT[90]
                   for c in call["configs"])
        assert all(c["num_warps"] == 8 for c in call["configs"])
    # At 32 rows, 3 stages of 32 keys exceed the estimate: fewer candidates than at 16.
    assert len(many["configs"]) < len(few["configs"])
    assert "BLOCK_DT" not in narrow["meta"] and len(narrow["key"]) == len(few["key"]) - 2
    assert kernel.smem_estimate(16, 32, 256, 3, 2) == kernel.smem_estimate(16, 32, 256, 3, 2,
                                                                           256)


# ---------------------------------------------------------------------------------------
# Compiled for sm_90 (no GPU needed; see tests/aot.py)
# ---------------------------------------------------------------------------------------


def _wide_jobs():
    """The attention kernel at D = 576, Ev = 512, paged and split, every candidate the sm_90
    launch gives for 128 or 16 query heads a kv head, each at the larger BLOCK_M that runs it
    (32, else 16: the sweep in reports/kvcache-tuning.md found no spill at 16 where 32 had
    none): float16, and e4m3 caches with bfloat16 queries; the append (one kv head, e4m3).
    Each carries no spill, for tests/test_triton_versions.py to check on the GPU machines'
    triton."""
    from attnmem.kernels import attention_kvcache as kernel

    meta = kernel.wide_head_dims_meta(D, EV)
    widths = kernel.staged_widths(meta)
    jobs = {}
    for dtype, fp8 in (("float16", False), ("bfloat16", True)):
        done = []
        for rows in (128, 16):
            block_m = kernel.config_for(rows, 576, 2, interpret=False)[0]
            for c in kernel.launch_configs(block_m, 576, 2, fp8, kernel.SMEM_LIMIT[90], widths):
                if c in done:
                    continue
                done.append(c)
                job = _attend_job(90, dtype, 64, rows, True, True, fp8_kv=fp8)
                job["constexprs"].update(meta, BLOCK_M=block_m, BLOCK_N=c["BLOCK_N"])
                jobs[f"attend-{dtype}{'-e4m3' if fp8 else ''}-m{block_m}-n{c['BLOCK_N']}-"
                     f"{c['num_warps']}w{c['num_stages']}s"] = dict(
                    job, num_warps=c["num_warps"], num_stages=c["num_stages"], expect=NO_SPILLS)
    append = _append_job(90, "bfloat16", D, 1, True, fp8_kv=True)
    append["constexprs"].update(kernel.head_dims_meta(D, EV))
    jobs["append-bfloat16-e4m3"] = dict(append, expect=NO_SPILLS)
    return jobs


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_wide_kernels_compile_for_sm90_without_spills():
    """No register spills, shared memory within sm_90's and the config's estimate, 16-bit
    dots on tensor cores (mma.sync: tiles of 16 and 32 rows are below wgmma's 64), 16-byte
    loads."""
    from attnmem.kernels import attention_kvcache as kernel

    jobs = _wide_jobs()
    widths = kernel.staged_widths(kernel.wide_head_dims_meta(D, EV))
    for (name, job), result in zip(jobs.items(), compile_all(list(jobs.values()))):
        assert result["error"] is None, (name, result["error"])
        assert {key: result[key] for key in job["expect"]} == job["expect"], (name, result)
        assert result["vector_loads"], name
        if job["kernel"] == "_kvcache_attend":
            meta = job["constexprs"]
            assert result["mma_sync"], name
            assert result["shared"] <= kernel.smem_estimate(
                meta["BLOCK_M"], meta["BLOCK_N"], widths[0], job["num_stages"], 2,
                widths[1]) <= kernel.SMEM_LIMIT[90], (name, result["shared"])
