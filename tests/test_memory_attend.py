"""memory_attend on both backends against float64, every gradient, and sm_80/sm_90 builds.

Tolerance: twice the error of the torch fallback on the same rounded inputs, plus rounding
units of the dtype scaled by the largest value compared and by the largest logit |s|: the
kernels recompute softmax weights from the saved logsumexp, whose relative accuracy is
eps * |s| (dot similarity with strength 3 reaches |s| ~ 200), and, as FlashAttention does,
round p to the input dtype before the read.
"""


import pytest
import torch

import attnmem
from aot import TRITON_TYPES, compile_all, sm90_spills
from attnmem.reference import memory as twin
from backends import BACKENDS, DEVICE, DTYPE_IDS, DTYPES, INTERPRET
from tolerance import assert_close_to_float64

# name: (B, N, D, R, Dv or None, with strength, with mask)
CASES = {
    "one_slot": (2, 1, 8, 1, None, False, False),
    "odd": (2, 75, 20, 3, None, True, True),
    "key_value": (3, 130, 24, 5, 12, True, False),
    "narrow": (1, 200, 3, 2, 5, False, True),
    "wide": (2, 40, 72, 4, None, True, True),
    "whole_blocks": (2, 50, 32, 4, 16, True, True),  # unmasked widths: EVEN_D and EVEN_DV
    # More heads than the backward's block of 16, an odd count: partials summed in place.
    "many_heads": (2, 45, 20, 37, 9, True, True),
    # A masked width past 128: the backward's padded rows (PADDED).
    "wide_odd": (2, 21, 150, 3, None, True, True),
}


def _run(fn, tensors, grads_out):
    tensors = [None if x is None else x.detach().requires_grad_() for x in tensors]
    read, weights = fn(*tensors)
    loss = (read.float() * grads_out[0].float()).sum() + (weights.float() * grads_out[1].float()
                                                          ).sum()
    present = [x for x in tensors if x is not None]
    return [read.detach(), weights.detach(), *torch.autograd.grad(loss, present)]


def draw(b, n, d, r, dv, with_strength, with_mask, dtype):
    """memory_attend's inputs [memory, keys, strength, values] in dtype (None where absent)
    and a mask (B, N) or None, whose last batch entry has no usable slot."""
    memory = torch.randn(b, n, d, device=DEVICE)
    if n > 4 and dtype == torch.float32:
        # A zero slot: cosine's gradient there is ~1/eps = 1e8, beyond half precision.
        memory[:, 4] = 0
    keys = torch.randn(b, r, d, device=DEVICE)
    values = None if dv is None else torch.randn(b, n, dv, device=DEVICE)
    strength = torch.rand(b, r, device=DEVICE) * 3 if with_strength else None
    mask = None
    if with_mask:
        mask = torch.rand(b, n, device=DEVICE) > 0.3
        mask[-1] = False  # the last batch entry has no usable slot
    return [None if x is None else x.to(dtype) for x in (memory, keys, strength, values)], mask


def tolerance_conditions(memory, keys, strength, similarity, outputs):
    """The tolerance's condition of each of the outputs (read, weights, dMemory, dKeys,
    dStrength, ...): the largest |logit| (masked slots' NaN read as 0)."""
    sims = twin.similarity(memory.double().nan_to_num(), keys.double(), similarity).abs()
    logits = sims if strength is None else sims * strength.double()[..., None]
    cond = max(1.0, logits.max().item())
    result = [cond] * outputs
    if strength is not None:
        # dStrength sums dS * sim over the slots: terms of size |sim| that mostly cancel, so
        # its rounding follows the summands, not the (small) result.
        result[4] = cond * max(1.0, sims.max().item())
    return result


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("similarity", ["cosine", "dot", "scaled_dot"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, similarity, dtype, backend):
    b, n, d, r, dv, with_strength, with_mask = CASES[name]
    tensors, mask = draw(*CASES[name], dtype)
    grads_out = (torch.randn(b, r, d if dv is None else dv, device=DEVICE),
                 torch.randn(b, r, n, device=DEVICE))

    def ours(m, k, s, v):
        with attnmem.use_backend(backend):
            return attnmem.memory_attend(m, k, values=v, strength=s, similarity=similarity,
                                         mask=mask, return_weights=True)

    def reference(m, k, s, v):
        return twin.memory_attend(m, k, v, s, similarity, mask)

    got = _run(ours, tensors, grads_out)
    expect = _run(reference, [None if x is None else x.double() for x in tensors], grads_out)
    base = _run(reference, tensors, grads_out)
    conditions = tolerance_conditions(*tensors[:3], similarity, len(got))
    assert_close_to_float64(got, expect, base, dtype, conditions)
    if with_mask:
        assert (got[0][-1] == 0).all() and (got[1][-1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("similarity", ["cosine", "dot", "scaled_dot"])
def test_memory_address_matches_float64(similarity, dtype, backend):
    """Content addressing alone: the attend kernels without the read."""
    b, n, d, r = 2, 75, 20, 3
    tensors = [torch.randn(b, n, d, device=DEVICE), torch.randn(b, r, d, device=DEVICE),
               torch.rand(b, r, device=DEVICE) * 2]
    mask = torch.rand(b, n, device=DEVICE) > 0.3
    mask[-1] = False
    dweights = torch.randn(b, r, n, device=DEVICE)

    def run(xs, use_backend):
        xs = [x.detach().requires_grad_() for x in xs]
        with attnmem.use_backend(use_backend):
            w = attnmem.memory_address(xs[0], xs[1], strength=xs[2], similarity=similarity,
                                       mask=mask)
        return [w.detach(), *torch.autograd.grad((w.float() * dweights).sum(), xs)]

    got = run([x.to(dtype) for x in tensors], backend)
    expect = run([x.double() for x in tensors], "torch")
    base = run([x.to(dtype) for x in tensors], "torch")
    cond = 2 * max(1.0, twin.similarity(tensors[0].double(), tensors[1].double(),
                                        similarity).abs().max().item())
    assert_close_to_float64(got, expect, base, dtype, cond)
    assert (got[0][-1] == 0).all()


@pytest.mark.skipif(not INTERPRET, reason="drives the kernel through the interpreter")
def test_read_only_gradients_without_weights():
    memory, keys = torch.randn(2, 50, 16, requires_grad=True), torch.randn(2, 3, 16,
                                                                         requires_grad=True)
    with attnmem.use_backend("triton"):
        read = attnmem.memory_attend(memory, keys)
    got = torch.autograd.grad(read.sum(), (memory, keys))
    expect = torch.autograd.grad(attnmem.memory_attend(memory, keys).sum(), (memory, keys))
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def _job(kernel, arch, dtype, width, heads, read=True, even=True, config=(64, 4, 3), topk=0):
    """A compile job as the launchers pass it, heads: BLOCK_R; topk > 0: the forward's top-k
    selection with topk candidates per head (no read, no scores)."""
    from attnmem.kernels import memory_attend as module

    pointers = {"mem_ptr": dtype, "keys_ptr": dtype, "values_ptr": dtype, "strength_ptr": dtype,
                "mask_ptr": "i1", "part_read_ptr": "fp32", "part_max_ptr": "fp32",
                "part_sum_ptr": "fp32", "scores_ptr": "fp32", "part_top_ptr": "i64"}
    block_n, num_warps, num_stages = config
    constexprs = dict(SIMILARITY=0, HAS_VALUES=read, HAS_STRENGTH=True, HAS_MASK=True, READ=read,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", EVEN_D=even,
                      EVEN_DV=even, BLOCK_R=heads,
                      BLOCK_D=width, BLOCK_DV=width, BLOCK_N=block_n)
    if kernel == "_memory_attend_fwd":
        constexprs.update(STORE_SCORES=not topk, TOPK=topk)
    else:
        pointers = {k: v for k, v in pointers.items() if not k.startswith(("part", "scores"))}
        pointers.update({"row_max_ptr": "fp32", "row_sum_ptr": "fp32", "dread_ptr": "fp32",
                         "delta_ptr": "fp32", "dweights_ptr": "fp32", "dmem_ptr": dtype,
                         "dvalues_ptr": dtype, "part_dkeys_ptr": "fp32",
                         "part_dstrength_ptr": "fp32"})
        chunk = min(module.DOT_CHUNK, width)
        constexprs.update(HAS_DREAD=read, HAS_DWEIGHTS=True, CHUNK_D=chunk, CHUNK_DV=chunk,
                          PADDED=not even and width > 128)
        del constexprs["READ"]
    return dict(module="attnmem.kernels.memory_attend", kernel=kernel, arch=arch,
                constexprs=constexprs, pointers=pointers, num_warps=num_warps,
                num_stages=num_stages)


def _backward_jobs():
    """The backward's first config at the widest width chunk of each dtype (16-bit to 256,
    float32 to 128) on sm_90; float16 on sm_80 (163 KB of shared memory); without values,
    address-only (no read) and masked (odd) widths to 128 and to 256 (padded rows) in
    float16."""
    from attnmem.kernels import memory_attend as kernel

    jobs, heads = {}, kernel.BWD_BLOCK_R
    for dtype, width in (("float16", 256), ("bfloat16", 256), ("float32", 128)):
        elem = 4 if dtype == "float32" else 2
        config = kernel.BWD_CONFIGS[(elem, width)][0]
        jobs[f"bwd-sm90-{dtype}-d{width}"] = _job("_memory_attend_bwd", 90, TRITON_TYPES[dtype],
                                                  width, heads, config=config)
    for name in ("bwd-sm90-float16-d256", "bwd-sm90-float32-d128"):
        # tests/test_triton_versions.py checks these on the GPU machines' triton too.
        jobs[name]["expect"] = dict(spill_stores=0, spill_loads=0, vector_loads=True)
    fp16 = kernel.BWD_CONFIGS[(2, 256)][0]
    jobs["bwd-sm80-float16-d256"] = _job("_memory_attend_bwd", 80, "fp16", 256, heads, config=fp16)
    jobs["bwd-sm90-float16-odd-width"] = _job(
        "_memory_attend_bwd", 90, "fp16", 128, heads, even=False,
        config=kernel.MASKED_BWD_CONFIGS[(2, 128)][0])
    # Spill-free on triton 3.9; 3.6 spills 8 bytes here (kernels/memory_attend.py).
    jobs["bwd-sm90-float16-odd-width-d256"] = _job(
        "_memory_attend_bwd", 90, "fp16", 256, heads, even=False,
        config=kernel.MASKED_BWD_CONFIGS[(2, 256)][0])
    jobs["bwd-sm90-float16-address-only"] = _job("_memory_attend_bwd", 90, "fp16", 256,
                                                 heads, read=False, config=fp16)
    no_values = _job("_memory_attend_bwd", 90, "fp16", 256, heads, config=fp16)
    no_values["constexprs"]["HAS_VALUES"] = False  # the read's gradient goes to dMemory
    jobs["bwd-sm90-float16-no-values"] = no_values
    return jobs


def _forward_jobs():
    """Every forward config at every width it serves (16-bit to 256, float32 to 128) on
    sm_90, the widest on sm_80; address-only at the first config, and every masked (odd)
    width config at the widest chunk."""
    from attnmem.kernels import memory_attend as kernel

    jobs = {}
    for dtype in ("float16", "bfloat16", "float32"):
        elem = 4 if dtype == "float32" else 2
        widths = (16, 32, 64, 128) + ((256,) if elem == 2 else ())
        t = TRITON_TYPES[dtype]
        for width in widths:
            for config in kernel.FWD_CONFIGS[(elem, width)]:
                name = f"d{width}-" + "x".join(map(str, config))
                jobs[f"fwd-sm90-{dtype}-{name}"] = _job("_memory_attend_fwd", 90, t, width,
                                                        kernel.FWD_BLOCK_R, config=config)
                if width == widths[-1] and dtype != "bfloat16":
                    jobs[f"fwd-sm80-{dtype}-{name}"] = _job(
                        "_memory_attend_fwd", 80, t, width, kernel.FWD_BLOCK_R, config=config)
        first = kernel.FWD_CONFIGS[(elem, widths[-1])][0]
        jobs[f"fwd-sm90-{dtype}-address-only"] = _job(
            "_memory_attend_fwd", 90, t, widths[-1], kernel.FWD_BLOCK_R, read=False,
            config=first)
        for config in kernel.MASKED_FWD_CONFIGS[(elem, widths[-1])]:
            jobs[f"fwd-sm90-{dtype}-odd-width-" + "x".join(map(str, config))] = _job(
                "_memory_attend_fwd", 90, t, widths[-1], kernel.FWD_BLOCK_R, even=False,
                config=config)
    return jobs


def _check(jobs, results):
    """Every job compiles within its GPU's shared memory, with tensor-core MMA in 16-bit; none
    spills on sm_90; memory tiles of whole (not "odd") widths load 16 bytes at a time."""
    limits = {80: 166912, 90: 232448}
    failures = {k: r["error"] or f"shared {r['shared']}" for k, r in results.items()
                if r["error"] or r["shared"] > limits[jobs[k]["arch"]]}
    assert not failures, failures
    for key, result in results.items():
        if "float32" not in key:
            assert result["wgmma"] or result["mma_sync"], f"{key}: no tensor-core MMA"
    spills = sm90_spills(results)
    assert not spills, spills
    scalar = [k for k, r in results.items() if "odd" not in k and not r["vector_loads"]]
    assert not scalar, scalar


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_forward_configs_compile_without_spills():
    """Issue 15: no forward config spills a register on sm_90 at any width (heads come in
    blocks of FWD_BLOCK_R), and whole-block widths stream memory 16 bytes a load."""
    jobs = _forward_jobs()
    _check(jobs, dict(zip(jobs, compile_all(list(jobs.values())))))


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_split_combine_compiles_without_spills():
    """The splits' combine (kernels/_launch.py's, which memory_attend and location_address
    share) at the widest read, in each dtype it writes, and statistics alone (location's)."""
    from attnmem.memory import MAX_TRITON_WIDTH

    def job(arch, out, part):
        return dict(module="attnmem.kernels._launch", kernel="_combine_splits", arch=arch,
                    constexprs=dict(EXP2=not part, HAS_PART=part, BLOCK_S=256,
                                    BLOCK_D=MAX_TRITON_WIDTH if part else 16, EVEN_D=part),
                    pointers=dict(max_ptr="fp32", sum_ptr="fp32", part_ptr="fp32",
                                  stats_ptr="fp32", out_ptr=TRITON_TYPES[out]),
                    num_warps=MAX_TRITON_WIDTH // 128 if part else 1, num_stages=1)

    jobs = {f"sm{arch}-{out}-{part}": job(arch, out, part) for arch in (80, 90)
            for out, part in (("float16", True), ("bfloat16", True), ("float32", True),
                              ("float32", False))}
    results = compile_all(list(jobs.values()))
    failures = {k: r["error"] for k, r in zip(jobs, results) if r["error"]}
    assert not failures, failures
    spills = sm90_spills(dict(zip(jobs, results)))
    assert not spills, spills


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_backward_compiles_without_spills():
    """Issue 15: the backward walks the heads in blocks (its registers do not grow with the
    head count) and compiles without register spills on sm_90 at the widest width of each
    dtype, with tensor-core MMA in 16-bit and 16-byte memory-tile loads at whole widths."""
    from attnmem.memory import MAX_TRITON_WIDTH

    jobs = _backward_jobs()
    assert max(j["constexprs"]["BLOCK_D"] for j in jobs.values()) == MAX_TRITON_WIDTH
    _check(jobs, dict(zip(jobs, compile_all(list(jobs.values())))))
