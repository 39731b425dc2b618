"""On sm_90 with 16-bit inputs the autotuner prunes, per combination of the flags that add
registers (dropout, softcap, ALiBi), the attention configs that spill with them
(kernels/attention.py `_sm90_flag_prune`), keeping a wgmma config for every combination; below
head dim 64 the atomic dK/dV kernel keeps the tiles on which its dQ product runs on wgmma.
With or without flags, no backward tile of one warp group holds 128 accumulator registers a
thread (triton 3.6 spilled in those with every flag off).

No GPU needed: the pruning is called directly, and the first config it keeps for a handful of
heavy combinations is compiled for sm_90 (tests/aot.py: wgmma, no mma.sync, no spill by
`ptxas -v`). The jobs carry their expectations, so tests/test_triton_versions.py checks them
on the GPU machines' triton too (ALiBi in the atomic dK/dV kernel at head dim 128 spilled
there, not on the newest).

The FP8 (e4m3) forward on sm_90 has its own table and rules (`_sm90_fp8_prune`): masked calls
(dense or packed) with any score modification keep the configs within
FP8_SCORE_MODS_VALUES_SM90 float32 values a thread (scores and accumulators), one warp group's
within SCORE_MODS_ONE_WARPGROUP_SCORES_SM90 scores a thread, and with a
float32 output none of FWD_FP8_FLOAT32_OUT_SPILLS_SM90; every combination of the score
modifications keeps an e4m3 config, and what spilled in the sweep of
reports/hopper-attention.md 11 is dropped.

Float32 inputs on sm_90 drop the configs that spilled with dropout, softcap and ALiBi, with
a head-dim tail, or packed (kernels/attention.py FP32_FLAG_SPILLS_SM90, FP32_TAIL_SPILLS_SM90,
FP32_VARLEN_SPILLS_SM90; reports/hopper-attention.md 14).
"""

import itertools
import types

import pytest

triton = pytest.importorskip("triton")

from test_attention_targets import HEAD_DIMS, expecting, job  # noqa: E402

from aot import compile_all  # noqa: E402
from attnmem.kernels import attention as kernel  # noqa: E402

FLAGS = ("DROPOUT", "SOFTCAP", "HAS_ALIBI")
COMBOS = [combo for n in range(len(FLAGS) + 1) for combo in itertools.combinations(FLAGS, n)]
ATOMIC = {"fwd": [None], "dkdv": [True, False], "dq": [None]}


def _tuples(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
             *(f for f in ("USE_TMA", "WARP_SPECIALIZE") if c.kwargs.get(f))) for c in configs]


def candidates(name, block_d):
    """The sm_90 16-bit configs of the table as the autotuner holds them."""
    return kernel.triton_configs(
        kernel.configs_for(name, block_d, 2, kernel.SMEM_LIMIT[90], 90, tma=True))


def pruned(name, block_d, flags, atomic_dq=None, masked=True):
    """The configs the autotuner would time for this launch on sm_90, 16-bit inputs."""
    meta = dict(dict.fromkeys(flags, True), BLOCK_D=block_d, MASK_KEYS=masked)
    if atomic_dq is not None:
        meta["ATOMIC_DQ"] = atomic_dq
    return _tuples(kernel._sm90_flag_prune(name, candidates(name, block_d), **meta))


@pytest.mark.parametrize("name", list(ATOMIC))
def test_every_flag_combination_keeps_a_wgmma_config(name):
    """wgmma's M side (the key tile in dK/dV, the query tile elsewhere; and the query tile
    for the dQ product of atomic dK/dV below head dim 64) holds 64 rows or more; with no flag
    on, from head dim 64 up (and without atomic dQ at every head dim), nothing is pruned."""
    for block_d, flags in itertools.product(HEAD_DIMS, COMBOS):
        for atomic_dq in ATOMIC[name]:
            kept = pruned(name, block_d, flags, atomic_dq)
            assert kept, (name, block_d, flags, atomic_dq)
            for c in kept:
                assert (c[1] if name == "dkdv" else c[0]) >= 64, (name, block_d, flags, c)
                if atomic_dq and block_d < 64:
                    assert c[0] >= 64, (block_d, flags, c)
            if not flags and (block_d >= 64 or not atomic_dq):
                assert kept == _tuples(candidates(name, block_d)), (name, block_d, atomic_dq)


def test_no_backward_tile_of_one_warp_group_holds_128_accumulator_registers():
    """dK/dV's dk and dv (2 x BLOCK_N x head dim), dQ's dq (BLOCK_M x head dim) in float32
    over 4 warps' 128 threads stay under 128 registers a thread in every sm_90 16-bit config:
    dK/dV 16x64x4x2 at head dim 128 and dQ 64x16x4x{2,1} at 256 spilled 12 to 632 B on triton
    3.6 with no flag on."""
    for name, rows in (("dkdv", lambda c: 2 * c[1]), ("dq", lambda c: c[0])):
        for block_d in HEAD_DIMS:
            for config in kernel.configs_for(name, block_d, 2, kernel.SMEM_LIMIT[90], 90):
                if config[2] == 4:
                    assert rows(config) * block_d // (32 * 4) < 128, (name, block_d, config)
    assert (16, 64, 4, 2) in kernel.configs_for("dkdv", 64, 2, kernel.SMEM_LIMIT[90], 90)


def test_other_gpus_and_dtypes_prune_nothing_new():
    """Off sm_90, with 16- or 32-bit inputs, the backward's pruning keeps every config (the
    forward keeps its own earlier rules)."""
    import torch

    configs = kernel.triton_configs(kernel.configs_for("dq", 128, 2, kernel.SMEM_LIMIT[90], 90))
    for q in (torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float32)):
        assert kernel._backward_prune(configs, {"q_ptr": q}, BLOCK_D=128, DROPOUT=True,
                                      SOFTCAP=True, HAS_ALIBI=True) == configs


def test_backward_launchers_prune(monkeypatch):
    """The dK/dV and dQ autotuners call the pruning (the forward's calls it from its own).
    Built here without a GPU, with full tuning (ATTNMEM_TUNING=one wraps the pruning)."""
    monkeypatch.delenv("ATTNMEM_TUNING", raising=False)
    monkeypatch.setattr(kernel, "_autotuned", {})
    monkeypatch.setattr(kernel, "_smem_limit", lambda device: kernel.SMEM_LIMIT[90])
    for name, fn in (("dkdv", kernel._attn_bwd_dkdv), ("dq", kernel._attn_bwd_dq)):
        tuned = kernel._launcher(name, fn, "cuda", 128, 2, 90)
        assert tuned.early_config_prune is kernel._backward_prune, name


def _flag_job(name, block_d, flags, atomic_dq=True, **expect):
    """The first config the pruning keeps for these flags (masked kernels), as a compile job
    expected to use wgmma and spill nothing."""
    config = pruned(name, block_d, flags, atomic_dq if name == "dkdv" else None)[0]
    spec = job(name, 90, "float16", block_d, config, atomic_dq=atomic_dq)
    spec["constexprs"].update(dict.fromkeys(flags, True))
    if "DROPOUT" in flags:
        spec["pointers"]["seed_ptr"] = "i64"
    if "HAS_ALIBI" in flags:
        spec["pointers"]["alibi_ptr"] = "fp32"
    return expecting(spec, wgmma=True, spill_stores=0, spill_loads=0, **expect)


SCORE_MODS = ("SOFTCAP", "HAS_SINKS", "HAS_ALIBI")
MOD_COMBOS = [c for n in range(len(SCORE_MODS) + 1) for c in itertools.combinations(SCORE_MODS, n)]
TMA, WS = "USE_TMA", "WARP_SPECIALIZE"
# What spilled in the sweep (triton 3.9 or 3.6; masked kernels, dense or packed): (head dim,
# config) -> (score modifications, output bytes) of a job that spilled.
FP8_SPILLED = {
    (32, (128, 64, 4, 3, TMA)): [(SCORE_MODS, 2), (SCORE_MODS, 4)],
    (32, (128, 64, 4, 3)): [(SCORE_MODS, 2), (SCORE_MODS, 4)],
    (64, (128, 64, 4, 3, TMA)): [(("SOFTCAP",), 2), (("SOFTCAP",), 4),
                                 (("SOFTCAP", "HAS_SINKS", "HAS_ALIBI"), 2)],
    (64, (128, 64, 4, 3)): [(("SOFTCAP",), 2), (("SOFTCAP", "HAS_ALIBI"), 4),
                            (("HAS_ALIBI",), 4), (("HAS_SINKS", "HAS_ALIBI"), 4)],
    (128, (128, 128, 8, 3, TMA)): [(("HAS_SINKS",), 4), (("HAS_SINKS",), 2),
                                   (("HAS_ALIBI",), 2), (("SOFTCAP", "HAS_ALIBI"), 4),
                                   (("SOFTCAP", "HAS_SINKS", "HAS_ALIBI"), 2)],
    (128, (128, 128, 8, 2)): [((), 4), (("SOFTCAP",), 2), (("SOFTCAP", "HAS_SINKS"), 4),
                              (("SOFTCAP", "HAS_SINKS", "HAS_ALIBI"), 2)],
    (256, (128, 32, 8, 3)): [(("SOFTCAP",), 2), (("SOFTCAP", "HAS_SINKS", "HAS_ALIBI"), 4)],
}


def fp8_tuned(block_d, flags, out_bytes=2, masked=True, varlen=False):
    """The configs an FP8 forward call tunes on an H100 (sm_90): e4m3 q, an output of
    out_bytes-byte elements."""
    configs = kernel.triton_configs(
        kernel.configs_for("fwd", block_d, 1, kernel.SMEM_LIMIT[90], 90, tma=True))
    q = types.SimpleNamespace(is_cuda=True, device="cuda", element_size=lambda: 1)
    out = types.SimpleNamespace(element_size=lambda: out_bytes)
    meta = dict(dict.fromkeys(flags, True), FP8=True, BLOCK_D=block_d, MASK_KEYS=masked,
                VARLEN=varlen)
    return _tuples(kernel._forward_prune(configs, {"q_ptr": q, "o_ptr": out}, **meta))


@pytest.fixture
def sm90(monkeypatch):
    monkeypatch.setattr(kernel, "_arch", lambda device: 90)


def _fp32_pruned(name, block_d, nargs, **meta):
    """(configs, kept): float32 configs_for at block_d (tile_head_dim's) and what the launch's
    pruning keeps of them."""
    widths = kernel.config_widths(dict(BLOCK_D=block_d, **meta))
    configs = kernel.triton_configs(
        kernel.configs_for(name, widths[0], 4, kernel.SMEM_LIMIT[90], 90, False, *widths[1:]))
    prune = kernel._forward_prune if name == "fwd" else kernel._backward_prune
    return _tuples(configs), _tuples(prune(configs, nargs, BLOCK_D=block_d, **meta))


def test_fp32_pruning_drops_what_spilled(sm90):
    """Float32 inputs on sm_90: with dropout, softcap or ALiBi on, exactly the configs of
    FP32_FLAG_SPILLS_SM90 go, with a tail those of FP32_TAIL_SPILLS_SM90, packed those of
    FP32_VARLEN_SPILLS_SM90; every launch keeps some, and a dense one of one padded tile
    without the flags loses none."""
    nargs = {"q_ptr": types.SimpleNamespace(is_cuda=True, device="cuda", element_size=lambda: 4)}
    for name, atomic in ATOMIC.items():
        for atomic_dq in atomic:
            extra = dict(MASK_KEYS=True) if atomic_dq is None else dict(ATOMIC_DQ=atomic_dq)
            for block_d, flags in itertools.product(HEAD_DIMS, COMBOS):
                listed = set(kernel.FP32_FLAG_SPILLS_SM90[name].get(block_d, ()))
                configs, kept = _fp32_pruned(name, block_d, nargs, **extra,
                                             **dict.fromkeys(flags, True))
                assert kept, (name, block_d, flags)
                assert set(configs) - set(kept) == (listed if flags else set()), (
                    name, block_d, flags)
            for head_dim in (40, 160):
                meta = kernel.tail_head_dims_meta(head_dim, head_dim)
                main, tail = meta.pop("BLOCK_D"), meta["BLOCK_DT"]
                del meta["HEAD_DIM"]
                configs, kept = _fp32_pruned(name, main, nargs, **meta, **extra)
                listed = kernel.FP32_TAIL_SPILLS_SM90[name].get((main, tail), ())
                assert kept and set(configs) - set(kept) == set(listed), (name, head_dim)
            for block_d in HEAD_DIMS:
                configs, kept = _fp32_pruned(name, block_d, nargs, VARLEN=True, **extra)
                listed = kernel.FP32_VARLEN_SPILLS_SM90[name].get(block_d, ())
                assert kept and set(configs) - set(kept) == set(listed), (name, block_d)


def test_fp8_every_score_mod_combination_keeps_a_config(sm90):
    """Every head dim, combination of softcap, sinks and ALiBi, output width, masked or not,
    dense or packed keeps a config of the e4m3 table; unmasked calls and calls without a
    score modification lose none but the warp-specialized (masked), the packed
    (FWD_FP8_VARLEN_SPILLS_SM90) and the float32 output's (FWD_FP8_FLOAT32_OUT_SPILLS_SM90)."""
    for block_d, flags, out in itertools.product((32, 64, 128, 256), MOD_COMBOS, (2, 4)):
        table = kernel.FWD_FP8_CONFIGS_SM90[block_d]
        for masked, varlen in ((False, False), (True, False), (True, True)):
            kept = fp8_tuned(block_d, flags, out, masked, varlen)
            assert kept and set(kept) <= set(table), (block_d, flags, out, masked, varlen)
            if not masked:
                assert kept == table, (block_d, flags, out)
            if masked and not flags:
                dropped = [*kernel.FWD_FP8_VARLEN_SPILLS_SM90.get(block_d, [])] * varlen + [
                    *kernel.FWD_FP8_FLOAT32_OUT_SPILLS_SM90.get(block_d, [])] * (out == 4)
                assert kept == [c for c in table if WS not in c and c not in dropped], (
                    block_d, out, varlen)


def test_fp8_pruning_drops_what_spilled(sm90):
    for (block_d, config), cases in FP8_SPILLED.items():
        for flags, out in cases:
            for varlen in (False, True):
                assert config not in fp8_tuned(block_d, flags, out, True, varlen), (
                    block_d, config, flags, out, varlen)


def _fp8_flag_job(block_d, flags, out="bf16", varlen=False):
    """The first config a masked FP8 call with these score modifications and output tunes,
    as a compile job expected to use e4m3 wgmma and spill nothing."""
    from test_attention_fp8 import fp8_job
    from test_attention_varlen_fp8 import varlen_fp8_job

    config = fp8_tuned(block_d, flags, 4 if out == "fp32" else 2, True, varlen)[0]
    spec = varlen_fp8_job(block_d, config) if varlen else fp8_job(block_d, config, True)
    spec["constexprs"].update(dict.fromkeys(flags, True))
    spec["pointers"].update(o_ptr=out, **{p: "fp32" for flag, p in (
        ("HAS_SINKS", "sinks_ptr"), ("HAS_ALIBI", "alibi_ptr")) if flag in flags})
    return spec


ALL = FLAGS
JOBS = {
    "fwd-d256-dropout-softcap-alibi": _flag_job("fwd", 256, ALL),
    "fwd-d64-softcap-alibi": _flag_job("fwd", 64, ("SOFTCAP", "HAS_ALIBI")),
    "dkdv-d128-dropout-softcap-alibi": _flag_job("dkdv", 128, ALL),
    "dkdv-d128-dropout-softcap-alibi-det": _flag_job("dkdv", 128, ALL, atomic_dq=False),
    "dkdv-d128-alibi": _flag_job("dkdv", 128, ("HAS_ALIBI",)),
    "dkdv-d32": _flag_job("dkdv", 32, (), mma_sync=False),
    "dkdv-d32-dropout-softcap-alibi": _flag_job("dkdv", 32, ALL, mma_sync=False),
    "dq-d128-dropout-softcap-alibi": _flag_job("dq", 128, ALL),
    "dq-d256-dropout-softcap-alibi": _flag_job("dq", 256, ALL),
}


@pytest.fixture
def fp8_jobs(sm90):
    """The FP8 jobs where the pruning's choice changed (worst former spill): 128x64x4x3 TMA
    at head dim 64 (200/224 B, softcap, packed); 128x128x8x2 at 128 (500/524 B, softcap and
    sinks, packed, float32 output; 8 B with no modification, dense); 128x32x8x3 at 256
    (16 B, triton 3.6, all three)."""
    return {"fp8-d64-softcap-varlen": _fp8_flag_job(64, ("SOFTCAP",), "fp32", varlen=True),
            "fp8-d128-fp32-out": _fp8_flag_job(128, (), "fp32"),
            "fp8-d128-softcap-sinks-fp32-out": _fp8_flag_job(128, ("SOFTCAP", "HAS_SINKS"),
                                                             "fp32"),
            "fp8-d256-softcap-sinks-alibi": _fp8_flag_job(256, SCORE_MODS)}


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_pruned_flag_configs_use_wgmma_and_spill_no_register(fp8_jobs):
    jobs = {**JOBS, **fp8_jobs}
    results = dict(zip(jobs, compile_all(list(jobs.values()))))
    failures = {name: result["error"] or {key: result[key] for key in jobs[name]["expect"]}
                for name, result in results.items() if result["error"] or any(
                    result[key] != value for key, value in jobs[name]["expect"].items())}
    assert not failures, failures
