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
"""

import itertools

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
    return [triton.Config(kernel._config_meta(c), num_warps=c[2], num_stages=c[3])
            for c in kernel.configs_for(name, block_d, 2, kernel.SMEM_LIMIT[90], 90, tma=True)]


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
    """Off sm_90, or with 32-bit inputs, the backward's pruning keeps every config (the
    forward keeps its own earlier rules)."""
    import torch

    configs = [triton.Config(kernel._config_meta(c), num_warps=c[2], num_stages=c[3])
               for c in kernel.configs_for("dq", 128, 2, kernel.SMEM_LIMIT[90], 90)]
    for q in (torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float32)):
        assert kernel._backward_prune(configs, {"q_ptr": q}, BLOCK_D=128, DROPOUT=True,
                                      SOFTCAP=True, HAS_ALIBI=True) == configs


def test_backward_launchers_prune(monkeypatch):
    """The dK/dV and dQ autotuners call the pruning (the forward's calls it from its own).
    Built here without a GPU."""
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


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_pruned_flag_configs_use_wgmma_and_spill_no_register():
    results = dict(zip(JOBS, compile_all(list(JOBS.values()))))
    failures = {name: result["error"] or {key: result[key] for key in JOBS[name]["expect"]}
                for name, result in results.items() if result["error"] or any(
                    result[key] != value for key, value in JOBS[name]["expect"].items())}
    assert not failures, failures
