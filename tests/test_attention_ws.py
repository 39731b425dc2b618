"""The forward's warp-specialized configs on masked calls (a causal mask, a window, kv_lengths,
Nk not a multiple of KEY_TILE_MULTIPLE, packed sequences). Triton's Hopper warp
specialization refuses the three loops (masked, full, masked key tiles) the other configs
run there, so these run one loop over every visited key tile, each through the mask
(_visible_span).

Through the interpreter (which ignores warp specialization and runs that one loop as written;
small tiles) or on a GPU (its tiles, float16), with the other test files' float64 checks:
every kind of mask, GQA, odd lengths, rows that see no key, padding that holds NaN, packed
sequences, the score modifications, and the public ops' gradients with their forward forced
onto the config (the backward is the usual one). Compiled for sm_90 without a GPU: warp
specialization (setmaxnreg), TMA, wgmma, no spill and one loop, on the installed triton and
(tests/test_triton_versions.py, through the jobs' expectations) on the GPU machines' one.
"""

import os

import pytest
import test_attention_scoremods as scoremods_tests
import test_attention_variants as variants_tests
import test_attention_varlen as varlen_tests
import torch
from test_attention import CASES, check_against_float64, make_inputs

triton = pytest.importorskip("triton")
kernel = pytest.importorskip("attnmem.kernels.attention")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
runs_kernels = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="needs the interpreter or a GPU")
# float32 under the interpreter (exact enough to see any key misplaced), float16 on a GPU.
DTYPE, ATOL = (torch.float32, 1e-5) if INTERPRET else (torch.float16, 2e-3)
# Through TMA, as the sm_90 tables pair them: triton's warp specialization rejects the kernel
# with pointer loads (PassManager::run failed in NVGPUWarpSpecialization, triton 3.6 and 3.9;
# the H100 run's six pointer cases).
WS = ("USE_TMA", "WARP_SPECIALIZE")
CONFIG = (32, 16, 1, 1, *WS) if INTERPRET else (128, 64, 4, 3, *WS)
# Under the interpreter 16-row tiles for packed sequences, so that 19 rows span two.
VARLEN_CONFIG = (16, 16, 1, 1, *WS) if INTERPRET else CONFIG

# test_attention_variants' layout: (B, H, Hkv, Nq, Nk, D, window_left, window_right,
# kv_lengths); -1: unbounded.
SHAPES = {
    "causal_odd_gqa": (1, 4, 2, 45, 45, 24, -1, 0, None),
    "causal_top_rows_see_nothing": (1, 2, 1, 61, 23, 16, -1, 0, None),
    "window_lengths_gqa": (2, 6, 3, 50, 50, 32, 12, 0, [33, 50]),
    "window_both_sides": (1, 2, 2, 20, 50, 16, 3, 5, None),
    "partial_key_tile": (1, 2, 2, 33, 100, 16, -1, -1, None),
    "no_key_seen": (2, 2, 1, 9, 14, 16, -1, -1, [0, 0]),
}


def force_forward(monkeypatch, config):
    """Every forward launch runs `config`, whatever the caller asks (the backward's as
    asked)."""
    run = kernel._run

    def forced(which, fn, grid, args, meta, device, asked, tma=False):
        return run(which, fn, grid, args, meta, device, config if which == "fwd" else asked,
                   tma)

    monkeypatch.setattr(kernel, "_run", forced)


@runs_kernels
@pytest.mark.parametrize("name", list(SHAPES))
def test_masked_forward_matches_float64(name):
    variants_tests.check(*variants_tests.inputs(SHAPES[name], DTYPE), CONFIG, ATOL)


@runs_kernels
def test_unseen_keys_never_leak(monkeypatch):
    """test_attention_variants' check that NaN and inf in keys no query sees change no bit,
    on the warp-specialized TMA config."""
    monkeypatch.setitem(variants_tests.CONFIGS, "ws", CONFIG)
    variants_tests.test_tma_and_pointers_leave_unseen_keys_out("ws")


@runs_kernels
def test_gradients_of_the_specialized_forward(monkeypatch):
    """attnmem.attention's out, lse and gradients against float64 (test_attention's rule):
    the backward reads this forward's out and lse. A causal mask with a window, lengths and
    GQA."""
    force_forward(monkeypatch, CONFIG)
    check_against_float64(*make_inputs(CASES["lengths_window_gqa"], DTYPE, variants_tests.DEVICE),
                          "triton")


@runs_kernels
def test_score_modifications(monkeypatch):
    """test_attention_scoremods' check (out, lse, the gradients, the sinks' too): softcap,
    sinks and ALiBi with a causal window, lengths and GQA."""
    force_forward(monkeypatch, CONFIG)
    scoremods_tests.check("all_window_lengths_gqa", DTYPE, variants_tests.DEVICE, "triton")


@runs_kernels
def test_packed_sequences(monkeypatch):
    """test_attention_varlen's check: empty sequences, sequences ending inside tiles, tiles
    past a sequence's end (which run no key tile and store nothing: warp specialization takes
    no early exit), more queries than keys and fewer."""
    force_forward(monkeypatch, VARLEN_CONFIG)
    varlen_tests.check_against_float64(*varlen_tests.make_inputs(varlen_tests.CASES["causal_gqa"],
                                                                 DTYPE), "triton")


def test_masked_calls_keep_warp_specialized_configs():
    """The tuner times them for masked calls and packed batches, not with dropout, nor for
    masked FP8 calls (unmasked FP8 calls keep them)."""
    configs = kernel.triton_configs(kernel.FWD_CONFIGS_SM90[128])

    def specialized(**meta):
        return [c for c in kernel._forward_prune(configs, {"q_ptr": torch.zeros(1)}, **meta)
                if c.kwargs.get("WARP_SPECIALIZE")]

    assert specialized(MASK_KEYS=True, VARLEN=False, DROPOUT=False)
    assert specialized(MASK_KEYS=False, VARLEN=False, DROPOUT=False)
    assert specialized(MASK_KEYS=True, VARLEN=True, DROPOUT=False)
    assert not specialized(MASK_KEYS=True, VARLEN=False, DROPOUT=True)
    assert not specialized(MASK_KEYS=True, VARLEN=False, DROPOUT=False, FP8=True)
    assert specialized(MASK_KEYS=False, VARLEN=False, DROPOUT=False, FP8=True)


def _job(block_d, config, masked=True, **constexprs):
    """test_attention_targets' sm_90 float16 forward job; masked: kv_lengths and Nq not a
    multiple of BLOCK_M (else a causal mask or a window alone, whole tiles)."""
    from test_attention_targets import job

    spec = job("fwd", 90, "float16", block_d, config)
    spec["constexprs"].update(dict(MASK_KEYS=True, HAS_KV_LENGTHS=masked, EVEN_M=not masked),
                              **constexprs)
    spec["pointers"].update({f"{f.removeprefix('HAS_').lower()}_ptr": "fp32"
                             for f in ("HAS_SINKS", "HAS_ALIBI") if constexprs.get(f)})
    if constexprs.get("VARLEN"):
        spec["pointers"].update(cu_seqlens_q_ptr="i32", cu_seqlens_k_ptr="i32")
    return spec


def _ws_configs(block_d):
    return [c for c in kernel.FWD_CONFIGS_SM90[block_d] if "WARP_SPECIALIZE" in c]


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_masked_warp_specialized_forward_compiles_for_sm90():
    """The warp-specialized configs of head dims 64 and 128 (128 keys a tile) with a causal
    mask, at head dim 128 (64 keys a tile) with lengths, a partial query tile and the score
    modifications, and packed sequences: setmaxnreg, TMA, wgmma, no spill; and as many MMAs
    as the unmasked kernel, whose loop is the only one (the three-loop kernel has three
    times as many)."""
    from test_attention_targets import expecting

    from aot import compile_all

    (wide, wide_short), (narrow, _) = _ws_configs(128), _ws_configs(64)
    jobs = {"d128-causal": _job(128, wide, masked=False),
            "d64-causal": _job(64, narrow, masked=False),
            "d128-lengths-mods": _job(128, wide_short, SOFTCAP=True, HAS_SINKS=True,
                                      HAS_ALIBI=True),
            "d128-varlen": _job(128, wide, HAS_KV_LENGTHS=False, VARLEN=True)}
    jobs = {name: expecting(spec, wgmma=True, tma=True, warp_specialized=True, spill_stores=0,
                            spill_loads=0) for name, spec in jobs.items()}
    unmasked = _job(128, wide, masked=False, MASK_KEYS=False)
    results = dict(zip([*jobs, "d128-unmasked"], compile_all([*jobs.values(), unmasked])))
    for name, result in results.items():
        assert result["error"] is None, f"{name}: {result['error']}"
    for name, spec in jobs.items():
        got = {key: results[name][key] for key in spec["expect"]}
        assert got == spec["expect"], (name, results[name]["registers"], got)
    assert results["d128-causal"]["mma_instructions"] == \
        results["d128-unmasked"]["mma_instructions"]
