"""attnmem.attention and attention_varlen at head dims that run in a main tile and a tail
(kernels/attention.py's tail_head_dims_meta: D = 192 as 128 + 64 columns with MLA's Ev = 128,
96 as 64 + 32, 80 as 64 + 16, 40 as 32 + 16): out, lse and every gradient against the float64
twin in both triton backward modes, with masks, lengths, GQA, a packed batch, score
modifications and dropout, the forward on its TMA and warp-specialized paths too; that the
launchers pass the tail to every kernel (under the interpreter's 16-column tiles as on a GPU);
and, slow, that each tail width's first kept sm_90 config of every kernel compiles to wgmma
without spills (TMA and warp specialization where flagged), on the installed triton and,
through the jobs' expectations (tests/test_triton_versions.py), on the GPU machines' 3.6.

Tolerance as tests/test_attention_mla.py's (tests/tolerance.py).
"""

import pytest
import test_attention_mla as mla_tests
import test_attention_varlen as varlen_tests
import torch
from test_attention_fp8 import _interpreter_e4m3_cast  # noqa: F401
from test_attention_mla import TARGETS, check, make_inputs

from attnmem.kernels._launch import block_width
from backends import BACKENDS, DEVICE

kernel = pytest.importorskip("attnmem.kernels.attention")

pytestmark = pytest.mark.usefixtures("poison_empty")
mode = mla_tests.mode  # the triton backward's mode, as TARGETS name it

# test_attention_mla's layout: (B, H, Hkv, Nq, Nk, D, Ev, causal, window, kv_lengths).
CASES = {
    # MLA's training shape (Ev apart, so HEAD_DV is passed), GQA, no mask.
    "mla_192_128_gqa": (1, 2, 1, 19, 29, 192, 128, False, None, None),
    # Causal with more queries than keys: the first see no key.
    "d96_causal": (1, 2, 2, 23, 21, 96, 96, True, None, None),
    # A causal window with lengths; batch 1 sees no key.
    "d80_window_lengths_mqa": (2, 2, 1, 21, 30, 80, 80, True, (6, None), [30, 0]),
    # A window on both sides; the tail tile holds 8 columns of 16.
    "d40_window_gqa": (1, 4, 2, 17, 33, 40, 40, False, (5, 3), None),
}
# The tails the launchers pass: (BLOCK_D, BLOCK_DT) per head dim (None: one padded tile).
SPLITS = {192: (128, 64), 96: (64, 32), 160: (128, 32), 80: (64, 16), 48: (32, 16),
          40: (32, 16), 33: (32, 16), 112: None, 224: None, 24: None, 200: None, 128: None,
          64: None, 256: None}


def test_tail_head_dims_meta():
    """A tail wherever main + tail stage fewer columns than one padded tile; v's head dim
    then always goes to the kernels; the configs follow the staged width (or v's tile)."""
    for d, split in SPLITS.items():
        meta = kernel.tail_head_dims_meta(d, d)
        got = (meta["BLOCK_D"], meta["BLOCK_DT"]) if "BLOCK_DT" in meta else None
        assert got == split, d
        if split:
            assert (meta["HEAD_DV"], meta["BLOCK_DV"]) == (d, block_width(d))
        else:
            assert meta == kernel.head_dims_meta(d, d)
    mla = kernel.tail_head_dims_meta(192, 128)
    assert kernel.tile_head_dim(mla) == 192
    assert kernel.tile_head_dim(kernel.tail_head_dims_meta(96, 96)) == 128  # v's tile
    # The sm_90 16-bit forward at 192 staged columns: its own table, whose shared memory
    # counts v's 128 columns apart; elsewhere the padded bucket's (v's 256 at D = Ev = 160).
    assert kernel.config_widths(mla) == (192, 64, 128)
    assert kernel.configs_for("fwd", 192, 2, kernel.SMEM_LIMIT[90], 90, True, 64, 128) == \
        kernel.FWD_CONFIGS_SM90[192]
    assert kernel.tile_head_dim(kernel.tail_head_dims_meta(160, 160)) == 256


def _spy(monkeypatch):
    """Records (kernel, meta) of every launch of the attention kernels."""
    launches, run = [], kernel._run

    def spied(which, fn, grid, args, meta, *rest, **kwargs):
        launches.append((which, meta))
        return run(which, fn, grid, args, meta, *rest, **kwargs)

    monkeypatch.setattr(kernel, "_run", spied)
    return launches


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_launchers_pass_the_tail(monkeypatch, packed, deterministic):
    """Forward, dK/dV and dQ get BLOCK_D and BLOCK_DT of the split (and v's HEAD_DV,
    BLOCK_DV); under the interpreter the kernels then run 16 + 16 columns for D = 40."""
    import attnmem

    launches = _spy(monkeypatch)
    torch.use_deterministic_algorithms(deterministic)
    q, k, v = (torch.randn(n, 2, 40, device=DEVICE, requires_grad=True) for n in (9, 11, 11))
    with attnmem.use_backend("triton"):
        if packed:
            lengths = varlen_tests.cu_seqlens([4, 5]), varlen_tests.cu_seqlens([6, 5])
            out = attnmem.attention_varlen(q, k, v, *lengths, 5, 6, causal=True)
        else:
            out = attnmem.attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), causal=True)
        out.sum().backward()
    kernels = {name for name, _ in launches}
    assert kernels == ({"fwd", "dkdv", "dq"} if deterministic else {"fwd", "dkdv"})
    for name, meta in launches:
        assert (meta["HEAD_DIM"], meta["BLOCK_D"], meta["BLOCK_DT"], meta["HEAD_DV"],
                meta["BLOCK_DV"]) == (40, 32, 16, 40, 64), name
        assert meta.get("VARLEN", False) == packed


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
@pytest.mark.parametrize("head_dim, padded", [(40, True), (96, True), (192, False)])
def test_backward_with_dropout_keeps_a_tail_past_64_columns(monkeypatch, head_dim, padded):
    """With dropout the backward runs one padded tile where the main tile is 64 columns or
    fewer (its tail kernels spilled on sm_90: kernels/attention.py's _backward_tails); the
    forward keeps its tail; the gradients stay the float64 twin's."""
    launches = _spy(monkeypatch)
    q, k, v, kwargs = make_inputs((1, 2, 1, 9, 11, head_dim, 32, True, None, None))
    check(q, k, v, kwargs, "triton", dropout_p=0.25, seed=3)
    tails = {name: "BLOCK_DT" in meta for name, meta in launches}
    assert tails.pop("fwd") and set(tails.values()) == {not padded}, tails  # dK/dV (and dQ)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
def test_fp8_forward_keeps_one_padded_tile(monkeypatch):
    """e4m3 dots take K in 32 columns: the FP8 forward runs D = 96 as one tile of 128."""
    import attnmem

    launches = _spy(monkeypatch)
    q, k, v = (torch.randn(1, 2, n, 96, device=DEVICE) for n in (5, 7, 7))
    quantized = [attnmem.quantize_fp8(x, kv_heads=2) for x in (q, k, v)]
    descales = dict(zip(("q_descale", "k_descale", "v_descale"), (s for _, s in quantized)))
    with attnmem.use_backend("triton"), torch.no_grad():
        attnmem.attention(*(x for x, _ in quantized), **descales, out_dtype=torch.float32)
    [(_, meta)] = launches
    assert meta["BLOCK_D"] == 128 and "BLOCK_DT" not in meta


# On a GPU also the 16-bit kernels, whose products run on wgmma (the interpreter's bfloat16
# dots are wrong, and its float16 ones run the same tiles as float32).
GPU_DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else []


@pytest.mark.parametrize("backend, mode", TARGETS, indirect=["mode"])
@pytest.mark.parametrize("dtype", [torch.float32, *GPU_DTYPES], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, dtype, backend, mode):
    _, unseen = check(*make_inputs(CASES[name], dtype), backend)
    assert unseen.any() == name.startswith(("d96", "d80"))


@pytest.mark.parametrize("backend, mode", TARGETS, indirect=["mode"])
def test_score_modifications_and_dropout(backend, mode):
    """softcap, ALiBi, sinks (and their gradient) and dropout together, at D = 80."""
    mla_tests.check_modifications_and_dropout(CASES["d80_window_lengths_mqa"], backend)


@pytest.mark.parametrize("backend, mode", TARGETS, indirect=["mode"])
def test_varlen_matches_float64(backend, mode):
    """test_attention_varlen's packed batch (empty sequences, GQA, causal with more and
    fewer queries than keys) at D = 96."""
    case = (*varlen_tests.CASES["causal_gqa"][:2], 96, *varlen_tests.CASES["causal_gqa"][3:])
    varlen_tests.check_against_float64(*varlen_tests.make_inputs(case, torch.float32), backend)


# Atomic dK/dV paths the interpreter's 16-row tiles and float32 inputs leave out: on a GPU,
# tiles of 64 query rows add a tail under 64 columns into dQ with the rows as the product's M
# side (_atomic_dq), and 16-bit inputs with v's tile of 256 read K in column chunks beside a
# tail (K_CHUNKS, one loop). (CASES name or case, dtype, dK/dV config or None.)
ATOMIC_PATHS = {
    "rows_m_side": ("d96_causal", torch.float32, (64, 16, 1, 1)),
    "k_chunks": ((1, 2, 1, 19, 29, 160, 160, True, None, None), torch.float16, None),
}


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
@pytest.mark.parametrize("path", list(ATOMIC_PATHS))
def test_atomic_dq_paths(monkeypatch, path):
    """Atomic dQ's tail on the rows' M side, and K in chunks beside a tail, against float64."""
    case, dtype, config = ATOMIC_PATHS[path]
    if config is not None:
        run = kernel._run

        def forced(which, fn, grid, args, meta, device, asked, tma=False):
            return run(which, fn, grid, args, meta, device, config if which == "dkdv" else asked,
                       tma)

        monkeypatch.setattr(kernel, "_run", forced)
    torch.use_deterministic_algorithms(False)
    check(*make_inputs(CASES.get(case, case), dtype), "triton")


def _force_tma(monkeypatch, flags, rows=32):
    """Every forward launch through TMA descriptors (the tail's of its own block shape) with
    `flags`: the interpreter's small tiles, or a GPU's. -> the dtype to test in."""
    from test_attention_ws import force_forward

    interpreted = kernel.interpreting()
    force_forward(monkeypatch, (rows, 16, 1, 1, *flags) if interpreted else (128, 64, 4, 3, *flags))
    return torch.float32 if interpreted else torch.float16


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
@pytest.mark.parametrize("flags", [("USE_TMA", "WARP_SPECIALIZE"), ("USE_TMA",)],
                         ids=["tma-ws", "tma"])
@pytest.mark.parametrize("name", ["mla_192_128_gqa", "d40_window_gqa"])
def test_tma_forward(monkeypatch, name, flags):
    """The forward through TMA, warp specialized or not; the gradients as usual."""
    dtype = _force_tma(monkeypatch, flags)
    torch.use_deterministic_algorithms(True)
    check(*make_inputs(CASES[name], dtype), "triton")


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
def test_tma_packed_forward(monkeypatch):
    """A packed batch at D = 96 through the warp-specialized TMA forward (16-row tiles under
    the interpreter, so that sequences end inside tiles and tiles lie past their ends)."""
    dtype = _force_tma(monkeypatch, ("USE_TMA", "WARP_SPECIALIZE"), rows=16)
    case = (*varlen_tests.CASES["causal_gqa"][:2], 96, *varlen_tests.CASES["causal_gqa"][3:])
    varlen_tests.check_against_float64(*varlen_tests.make_inputs(case, dtype), "triton")


# (D, Ev): every tail width the splits give, at the first config the sm_90 pruning keeps.
COMPILE_WIDTHS = [(192, 128), (160, 160), (96, 96), (80, 80), (40, 40)]


def _compile_jobs(monkeypatch):
    from test_attention_mla import _sm90_pruned
    from test_attention_targets import config_id, expecting, job

    jobs = {}
    for d, ev in COMPILE_WIDTHS:
        dims = kernel.tail_head_dims_meta(d, ev)
        tiles = {k: v for k, v in dims.items() if k != "HEAD_DIM"}
        variants = [("fwd", "ws", True), ("fwd", "ws", False), ("fwd", "tma", True),
                    ("dkdv", "atomic", True), ("dkdv", "det", True), ("dq", "", True)]
        for name, variant, masked in variants:
            meta = {"fwd": dict(MASK_KEYS=masked), "dq": {},
                    "dkdv": dict(ATOMIC_DQ=variant == "atomic")}[name]
            configs = _sm90_pruned(name, monkeypatch, **tiles, **meta)
            if name == "fwd":
                configs = [c for c in configs if ("WARP_SPECIALIZE" in c) == (variant == "ws")
                           and "USE_TMA" in c]
            spec = job(name, 90, "float16", dims["BLOCK_D"], configs[0], masked=masked,
                       atomic_dq=variant == "atomic")
            spec["constexprs"].update(HEAD_DIM=d, **tiles)
            key = (f"{name}-{d}x{ev}-{variant}-{'masked' if masked else 'unmasked'}-"
                   f"{config_id(configs[0])}")
            jobs[key] = expecting(spec, wgmma=True, mma_sync=False, spill_stores=0,
                                  spill_loads=0, tma="USE_TMA" in configs[0],
                                  warp_specialized="WARP_SPECIALIZE" in configs[0])
    return jobs


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_kernels_compile_for_sm90_without_spills(monkeypatch):
    """At every tail width, 16-bit inputs, the forward (warp-specialized masked and unmasked,
    TMA masked), dK/dV (atomic and deterministic) and dQ use wgmma only, TMA and warp
    specialization as their configs say, and spill nothing."""
    pytest.importorskip("triton")
    from aot import compiled

    jobs = _compile_jobs(monkeypatch)
    for name, result in compiled(jobs).items():
        got = {key: result[key] for key in jobs[name]["expect"]}
        assert got == jobs[name]["expect"], (name, result["registers"])
