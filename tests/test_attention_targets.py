"""Every attention autotune config compiles for sm_80 and sm_90 and fits shared memory, and
so does the backward's delta kernel.

No GPU needed: triton compiles to PTX and cubin for a GPUTarget on the CPU. Each config is
compiled at the largest head dim (hence the most shared memory) at which the pruning in
kernels/attention.py keeps it, for 16- and 32-bit inputs.
"""

import pytest

pytest.importorskip("triton")

from aot import TRITON_TYPES, compile_all  # noqa: E402
from attnmem.kernels import attention as kernel  # noqa: E402

pytestmark = pytest.mark.xdist_group("aot")

TABLES = {"fwd": ("_attn_fwd", kernel.FWD_CONFIGS),
          "dkdv": ("_attn_bwd_dkdv", kernel.DKDV_CONFIGS),
          "dq": ("_attn_bwd_dq", kernel.DQ_CONFIGS)}
HEAD_DIMS = (256, 128, 64, 32, 16)
ELEM = {"float16": 2, "bfloat16": 2, "float32": 4}
POINTERS = {"_attn_fwd": ["q", "k", "v", "o", "lse", "kv_lengths"],
            "_attn_bwd_dkdv": ["q", "k", "v", "do", "lse", "delta", "dk", "dv", "dq",
                               "kv_lengths"],
            "_attn_bwd_dq": ["q", "k", "v", "do", "lse", "delta", "dq", "kv_lengths"]}


def job(name, arch, dtype, block_d, config, atomic_dq=True):
    fn = TABLES[name][0]
    block_m, block_n, warps, stages = config
    # dK/dV's dq is the float32 buffer its atomic variant adds into.
    fp32 = ("lse", "delta", "dq") if fn == "_attn_bwd_dkdv" else ("lse", "delta")
    pointers = {f"{p}_ptr": ("fp32" if p in fp32 else
                             "i32" if p == "kv_lengths" else TRITON_TYPES[dtype])
                for p in POINTERS[fn]}
    constexprs = dict(HEAD_DIM=block_d, BLOCK_D=block_d, HAS_KV_LENGTHS=True,
                      DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
                      BLOCK_M=block_m, BLOCK_N=block_n)
    if fn == "_attn_bwd_dkdv":
        constexprs["ATOMIC_DQ"] = atomic_dq
    return dict(module="attnmem.kernels.attention", kernel=fn, arch=arch, constexprs=constexprs,
                pointers=pointers, num_warps=warps, num_stages=stages,
                options={} if name == "fwd" else kernel.BACKWARD_OPTIONS)


def _config_cases():
    cases = {}
    for name, (_, table) in TABLES.items():
        for arch in (80, 90):
            for dtype in ("float16", "float32"):
                for tile in table:
                    for block_d in HEAD_DIMS:
                        kept = [c for c in kernel.configs_for(name, block_d, ELEM[dtype],
                                                              kernel.SMEM_LIMIT[arch])
                                if c[:3] == tile[:3]]
                        if kept:
                            key = f"{name}-sm{arch}-{dtype}-d{block_d}-" + "x".join(
                                map(str, kept[0]))
                            cases[key] = job(name, arch, dtype, block_d, kept[0])
                            break
    return cases


def _instruction_cases():
    cases = {}
    for name in TABLES:
        for dtype in ("float16", "bfloat16"):
            for arch in (80, 90):
                config = kernel.configs_for(name, 128, 2, kernel.SMEM_LIMIT[arch])[0]
                cases[f"{name}-sm{arch}-{dtype}"] = job(name, arch, dtype, 128, config)
    return cases


CONFIG_CASES = _config_cases()
INSTRUCTION_CASES = _instruction_cases()
DELTA_CASES = {f"delta-sm{arch}-{dtype}": dict(
    module="attnmem.kernels.attention", kernel="_attn_bwd_delta", arch=arch,
    constexprs=dict(HEAD_DIM=256, BLOCK_D=256, HAS_DLSE=True, BLOCK_M=64),
    pointers={"o_ptr": TRITON_TYPES[dtype], "do_ptr": TRITON_TYPES[dtype], "dlse_ptr": "fp32",
              "delta_ptr": "fp32"}, num_warps=4, num_stages=3)
    for arch in (80, 90) for dtype in ("float16", "bfloat16", "float32")}


@pytest.fixture(scope="module")
def compiled_configs():
    return dict(zip(CONFIG_CASES, compile_all(list(CONFIG_CASES.values()))))


@pytest.fixture(scope="module")
def compiled_instructions():
    """Apart from the config sweep, so that `-k tensor_core` compiles only these."""
    return dict(zip(INSTRUCTION_CASES, compile_all(list(INSTRUCTION_CASES.values()))))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_compiles_and_fits_shared_memory(compiled_configs, case):
    result, spec = compiled_configs[case], CONFIG_CASES[case]
    assert result["error"] is None, result["error"]
    assert result["shared"] <= kernel.SMEM_LIMIT[spec["arch"]]
    if not case.split("-")[2] == "float32":
        assert result["wgmma"] or result["mma_sync"], "16-bit dots must use tensor cores"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(INSTRUCTION_CASES))
def test_tensor_core_instructions(compiled_instructions, case):
    """Hopper's warpgroup MMA on sm_90 for the first config at D=128; mma.sync on sm_80."""
    result = compiled_instructions[case]
    assert result["error"] is None, result["error"]
    assert result["wgmma"] if "sm90" in case else result["mma_sync"]


@pytest.mark.slow
def test_backward_delta_compiles_and_fits_shared_memory():
    """The backward's rowsum(dO * O) kernel, at the largest head dim and its launch's rows."""
    results = dict(zip(DELTA_CASES, compile_all(list(DELTA_CASES.values()))))
    failures = {case: result["error"] or f"shared {result['shared']}"
                for case, result in results.items() if result["error"]
                or result["shared"] > kernel.SMEM_LIMIT[DELTA_CASES[case]["arch"]]}
    assert not failures, failures


@pytest.mark.parametrize("arch", [80, 90])
def test_every_head_dim_and_dtype_has_a_config(arch):
    for name in TABLES:
        for block_d in HEAD_DIMS:
            for elem in (2, 4):
                assert kernel.configs_for(name, block_d, elem, kernel.SMEM_LIMIT[arch]), \
                    f"no {name} config fits sm_{arch} at head dim {block_d}, {elem}-byte inputs"


def test_every_config_is_used_somewhere():
    for name, (_, table) in TABLES.items():
        for tile in table:
            assert any(c[:3] == tile[:3] for d in HEAD_DIMS
                       for c in kernel.configs_for(name, d, 2, kernel.SMEM_LIMIT[80])), \
                f"{name} config {tile} is pruned at every head dim"
