"""The autotuned tiles of attention_with_kvcache's attention kernel
(kernels/attention_kvcache.py CONFIGS; reports/kvcache-tuning.md): every tile of the table
against float64 through the interpreter; the tuning key, the split count and the configs
timed, on a stand-in GPU (nothing that changes from one decoding step to the next retunes or
resizes the partial buffers); the table's heaviest cases compiled for sm_90 without
register spills.
"""

import importlib.util
import math

import pytest
import torch
from test_attention_kvcache import _attend_job, _paged, assert_matches_float64
from test_attention_kvcache_rotary import _rotary_job
from test_grid_limits import _Grids

from aot import compile_all
from attnmem.reference import kvcache as twin
from backends import BACKENDS, DEVICE

HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNEL = "triton" in BACKENDS
FP8 = torch.float8_e4m3fn
# A head dim per head-dim bucket, none a power of two (masked head dims).
HEAD_DIM = {64: 40, 128: 80, 256: 160, 768: 320}


def kernel_module():
    from attnmem.kernels import attention_kvcache

    return attention_kvcache


def _largest_block_m(bucket, elem):
    """The largest BLOCK_M config_for's rule gives at this head-dim tile and element size."""
    return kernel_module().config_for(1 << 16, bucket, elem, interpret=False)[0]


def _tiles():
    """(bucket, element size, fp8, BLOCK_N) of the table and of the rule's configs there, each
    once (warps and stages change nothing under the interpreter), every other one with a
    paged cache."""
    if not HAS_TRITON:
        return []
    kernel = kernel_module()
    tiles = sorted({(*key, block_n) for key, configs in kernel.CONFIGS.items()
                    for block_n in [c[0] for c in configs] + [kernel.config_for(
                        rows, key[0], key[1], interpret=False)[1] for rows in (16, 64)]})
    return [pytest.param(*tile, i % 2 == 1, id=f"d{tile[0]}-{'fp8' if tile[2] else tile[1]}"
                         f"-n{tile[3]}{'-paged' if i % 2 else ''}")
            for i, tile in enumerate(tiles)]


@pytest.mark.skipif(not KERNEL, reason="needs the triton backend")
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("bucket, elem, fp8, block_n, paged", _tiles())
def test_table_tiles_match_float64(bucket, elem, fp8, block_n, paged):
    """Each tile of the table at the rule's largest BLOCK_M: 5 queries of GQA 4:1 (20 rows)
    whose keys are in caches of 200 slots already, in 3 splits, lengths 200 (2 to 13 key
    tiles over the splits) and 5 (the new tokens only), causal; float16 (or float32) q and caches,
    or e4m3 caches with descales. Against the twin in float64, within twice the error of
    torch in q's dtype."""
    kernel = kernel_module()
    torch.manual_seed(bucket + block_n + elem)
    dtype = torch.float32 if elem == 4 else torch.float16
    batch, n_q, heads, kv_heads, capacity, head_dim = 2, 5, 4, 1, 200, HEAD_DIM[bucket]
    seqlens = torch.tensor([capacity - n_q, 0], dtype=torch.int32)
    q = torch.randn(batch, n_q, heads, head_dim, dtype=dtype)
    past = (torch.arange(capacity)[None, :] >= (seqlens + n_q)[:, None])[..., None, None]
    caches = [torch.randn(batch, capacity, kv_heads, head_dim).masked_fill(past, math.nan)
              for _ in range(2)]
    descales = 0.02 + 0.48 * torch.rand(batch, kv_heads, 2) if fp8 else None
    caches = [(c * 4).to(FP8) if fp8 else c.to(dtype) for c in caches]
    table = None
    if paged:
        order = torch.randperm(batch * capacity // 10 + 2)
        (k_pool, table), (v_pool, _) = (_paged(c, 10, order) for c in caches)
    scale = head_dim ** -0.5
    out, lse = kernel.attention_with_kvcache(
        q.to(DEVICE), *(c.to(DEVICE) for c in ((k_pool, v_pool) if paged else caches)),
        seqlens.to(DEVICE), None if table is None else table.to(DEVICE), n_q, scale, -1, 0,
        config=(_largest_block_m(bucket, elem), block_n, 4, 3), n_splits=3,
        descales=None if descales is None else descales.to(DEVICE))
    expect, base = (twin.attention_with_kvcache_forward(
        q.to(ref), *caches, seqlens, None, n_q, scale, -1, 0,
        descales=None if descales is None else descales.to(ref)) for ref in (torch.float64,
                                                                            dtype))
    assert_matches_float64(out.cpu(), lse.cpu(), expect, base, dtype)


class _Recorder:
    """Stands in for kernels/_launch.py's launch: keeps what each call would tune with."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, grid, args, meta, configs, key, interpret_config, **options):
        named = {**dict(zip(fn.arg_names, args)), **meta}
        # As triton's autotuner forms its key: the named arguments, then every dtype.
        tuning_key = [named[k] for k in key if k in named]
        tuning_key += [str(a.dtype) for a in named.values() if hasattr(a, "dtype")]
        self.calls.append(dict(grids={grid(c) for c in configs}, key=tuple(tuning_key),
                               configs=configs, meta=meta))


@pytest.fixture
def on_a_stand_in_h100(monkeypatch):
    """The launcher as on an sm_90 GPU of 132 SMs and 227 KiB of shared memory a block, on
    CPU tensors: the autotuned launch is recorded, the combine skipped."""
    from attnmem.kernels import _launch

    kernel = kernel_module()
    recorder = _Recorder()

    class Properties:
        multi_processor_count = 132

    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(kernel, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties)
    monkeypatch.setattr(kernel, "_smem_limit", lambda device: kernel.SMEM_LIMIT[90])
    monkeypatch.setattr(kernel, "launch", recorder)
    monkeypatch.setattr(kernel, "_kvcache_combine", _Grids())
    return recorder


def _step(seqlens, capacity=4096, head_dim=128, dtype=torch.float16, n_q=1, paged=False):
    """The attention of a decoding step of 32 heads over 8 kv heads."""
    batch, heads, kv_heads, page = len(seqlens), 32, 8, 16
    q = torch.zeros(batch, n_q, heads, head_dim, dtype=dtype)
    slots = (batch * capacity // page, page) if paged else (batch, capacity)
    cache = torch.zeros(1, dtype=dtype).expand(*slots, kv_heads, head_dim)
    table = torch.arange(slots[0], dtype=torch.int32).view(batch, -1) if paged else None
    kernel_module().attention_with_kvcache(q, cache, cache, torch.tensor(seqlens).int(), table,
                                           n_q, head_dim ** -0.5, -1, 0)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_key_and_splits_stay_across_decoding_steps(on_a_stand_in_h100):
    """Steps that differ in their lengths, and in the batch (4 or 6 sequences), tune once:
    one key, and per step one grid whichever config runs (the partial buffers are sized
    before tuning). The capacity's bucket, the head dim, the rows per kv head, a paged cache
    and the dtype each tune apart. Among the configs timed: the fixed rule's."""
    kernel = kernel_module()
    _step([100, 7, 4000, 0])
    _step([101, 8, 4001, 1])
    _step([102, 9, 4002, 2, 50, 60])
    calls = on_a_stand_in_h100.calls
    assert calls[0]["key"] == calls[1]["key"] == calls[2]["key"]
    assert calls[0]["grids"] == calls[1]["grids"] and len(calls[2]["grids"]) == 1
    # 4 sequences x 8 kv heads fill 132 SMs twice over in 9 splits or more, of whole tiles
    # of the largest BLOCK_N timed (every config's divides it): 8 splits of 512 keys.
    quantum = max(c["BLOCK_N"] for c in calls[0]["configs"])
    assert all(quantum % c["BLOCK_N"] == 0 for c in calls[0]["configs"])
    assert calls[0]["grids"] == {(4 * 8, 8)} and 512 % quantum == 0
    block_m, *rule = kernel.config_for(4, 128, 2, interpret=False)
    assert calls[0]["meta"]["BLOCK_M"] == block_m
    assert dict(zip(("BLOCK_N", "num_warps", "num_stages"), rule)) in calls[0]["configs"]
    for variant in (dict(capacity=1024), dict(head_dim=64), dict(n_q=16), dict(paged=True),
                    dict(dtype=torch.float32)):
        _step([100, 7, 1000, 0], **variant)
    keys = [call["key"] for call in calls[2:]]
    assert len(set(keys)) == len(keys), keys


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_forced_split_counts(on_a_stand_in_h100):
    """A split count given (num_splits) replaces the launch's choice, within the capacity's
    tiles of the largest BLOCK_N timed (4096 slots: 64 tiles of 64) and MAX_SPLITS."""
    kernel = kernel_module()
    q = torch.zeros(4, 1, 32, 128, dtype=torch.float16)
    for capacity, n_splits in ((4096, 1), (4096, 5), (4096, 1000), (512 * 64, 1000)):
        cache = torch.zeros(1, dtype=torch.float16).expand(4, capacity, 8, 128)
        kernel.attention_with_kvcache(q, cache, cache, torch.tensor([9, 0, 7, 5]).int(), None,
                                      1, 0.1, -1, 0, n_splits=n_splits)
    calls = on_a_stand_in_h100.calls
    quantum = max(c["BLOCK_N"] for c in calls[0]["configs"])
    assert quantum == 64
    assert [call["grids"] for call in calls] == [{(32, n)} for n in (1, 5, 64,
                                                                      kernel.MAX_SPLITS)]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_launch_configs():
    """Every table config's cache tiles hold 16 bytes a thread or more. At each BLOCK_M the
    rule gives: the table's configs (8 warps only for 64 rows; each table has such configs)
    and the rule's own, all within sm_80's shared memory; with 99 KiB
    (sm_86, sm_89) those that do not fit drop out, and with none fitting the least hungry
    stays."""
    kernel = kernel_module()
    for (bucket, elem, fp8), table in kernel.CONFIGS.items():
        configs = kernel.configs_for(bucket, elem, fp8)
        assert len(configs) == len(table) == len(set(table))
        # Cache tiles of 16 bytes a thread or more, which load 16 bytes at a time.
        assert all(block_n * bucket * (1 if fp8 else elem) >= 16 * 32 * warps
                   for block_n, warps, _ in table), (bucket, elem, fp8)
        if bucket > 256:
            continue  # fits sm_90 only: tests/test_attention_kvcache_wide.py
        for block_m in (m for m in (16, 32, 64) if m <= _largest_block_m(bucket, elem)):
            _, *rule = kernel.config_for(block_m, bucket, elem, interpret=False)
            rule = dict(zip(("BLOCK_N", "num_warps", "num_stages"), rule))
            expect = [c for c in configs if block_m < 64 or c["num_warps"] == 8]
            assert expect, (bucket, elem, fp8, block_m)
            expect += [rule] if rule not in expect else []
            assert kernel.launch_configs(block_m, bucket, elem, fp8,
                                         kernel.SMEM_LIMIT[80]) == expect
            small = kernel.launch_configs(block_m, bucket, elem, fp8, 101376)
            assert len(small) == 1 or all(
                kernel.smem_estimate(block_m, c["BLOCK_N"], bucket, c["num_stages"], elem)
                <= 101376 for c in small)
            assert len(kernel.launch_configs(block_m, bucket, elem, fp8, 0)) == 1


def _heavy_job(dtype, head_dim, block_m, config, fp8_kv=False):
    """The attention kernel's sm_90 job at this tile with every flag on: paged cache, split,
    packed queries, rotary (interleaved, per query), left padding, softcap, sinks, ALiBi."""
    job = _rotary_job(_attend_job(90, dtype, head_dim, block_m, True, True, fp8_kv=fp8_kv,
                                  packed=True), True, leftpad=True)
    block_n, warps, stages = config
    job["constexprs"].update(BLOCK_M=block_m, BLOCK_N=block_n, SOFTCAP=True, HAS_SINKS=True,
                             HAS_ALIBI=True)
    job["pointers"].update(sinks_ptr="fp32", alibi_ptr="fp32")
    return dict(job, num_warps=warps, num_stages=stages)


# Table configs with the most registers a thread in the sweep (reports/kvcache-tuning.md),
# one per element size and cache type, at the rule's largest BLOCK_M for them.
HEAVY = {"bfloat16-d128-64x64-8w4s": ("bfloat16", 128, 64, (64, 8, 4)),
         "float16-d256-32x16-4w4s": ("float16", 256, 32, (16, 4, 4)),
         "float32-d256-16x16-8w2s": ("float32", 256, 16, (16, 8, 2)),
         "fp8-float16-d64-32x128-4w2s": ("float16", 64, 32, (128, 4, 2), True)}


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_heaviest_table_configs_compile_without_spills():
    """No register spills on sm_90, 16-byte loads, and 16-bit dots on tensor cores; every
    HEAVY config is in the table."""
    kernel = kernel_module()
    for case in HEAVY.values():
        dtype, head_dim, _, config, *fp8 = case
        elem = 4 if dtype == "float32" else 2
        table = kernel.CONFIGS[(head_dim, elem, bool(fp8))]
        assert config in table, case
    jobs = {name: _heavy_job(*case) for name, case in HEAVY.items()}
    for name, result in zip(jobs, compile_all(list(jobs.values()))):
        assert result["error"] is None, (name, result["error"])
        assert result["spill_stores"] == result["spill_loads"] == 0, (name, result)
        assert result["vector_loads"], name
        assert "float32" in name or result["wgmma"] or result["mma_sync"], name
