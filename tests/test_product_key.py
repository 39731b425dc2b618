"""product_key_lookup on both backends against float64 (output, rows, weights and every
gradient), ties, the deterministic and sparse value gradients, the module with SparseAdam,
bad input, opcheck, and sm_90 builds of the kernels."""

import pytest
import torch

import attnmem
from aot import TRITON_TYPES, compiled, sm90_spills
from attnmem.nn import ProductKeyMemory
from backends import BACKENDS, DEVICE, INTERPRET
from tolerance import assert_close_to_float64

# name: (B, H, n_keys, Dk, Dv, topk). Under the interpreter the kernels take 16 queries,
# 16 keys and 16 features at a time: "wide" spans two of each, and Dv three chunks.
CASES = {
    "odd": (5, 2, 11, 10, 7, 4),         # n_keys not a power of two, odd Dv and Dk / 2
    "topk_one": (3, 1, 6, 8, 16, 1),     # whole Dv chunks
    "topk_all": (4, 1, 9, 6, 9, 9),      # topk = n_keys, padded to 16: candidates in 3 steps
    "wide": (17, 1, 20, 40, 33, 3),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
if DEVICE == "cuda":
    DTYPES["bf16"] = torch.bfloat16


def make(case, dtype):
    b, h, n, dk, dv, topk = case
    tensors = [torch.randn(b, h, dk, device=DEVICE), torch.randn(h, 2, n, dk // 2, device=DEVICE),
               torch.randn(n * n, dv, device=DEVICE)]
    return [x.to(dtype) for x in tensors], topk


def run(tensors, topk, grads, backend, sparse=False):
    tensors = [x.detach().requires_grad_() for x in tensors]
    with attnmem.use_backend(backend):
        out, rows, weights = attnmem.product_key_lookup(*tensors, topk=topk,
                                                        return_indices=True, sparse=sparse)
    loss = (out.float() * grads[0]).sum() + (weights * grads[1]).sum()
    return [out.detach(), weights.detach(), *torch.autograd.grad(loss, tensors)], rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, dtype, backend):
    if dtype != torch.float32 and name in ("topk_one", "topk_all") and DEVICE == "cpu":
        pytest.skip("the half-precision path is the same kernels: two cases suffice on CPU")
    tensors, topk = make(CASES[name], dtype)
    b, h = CASES[name][:2]
    grads = (torch.randn(b, CASES[name][4], device=DEVICE),
             torch.randn(b, h, topk, device=DEVICE))
    got, rows = run(tensors, topk, grads, backend)
    expect, expect_rows = run([x.double() for x in tensors], topk, grads, "torch")
    base, _ = run(tensors, topk, grads, "torch")
    assert rows.dtype == torch.int64 and torch.equal(rows, expect_rows)
    got[1] = got[1].to(dtype)  # weights are float32 on every path
    base[1] = base[1].to(dtype)
    assert_close_to_float64(got, expect, base, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_index(backend):
    """Integer scores tie exactly on both backends: duplicated sub-keys and a query that
    weighs two features alike. The selection must be the brute-force order: score
    descending, then row ascending."""
    b, h, n, dk, topk = 6, 2, 7, 8, 5
    queries = torch.randint(-2, 3, (b, h, dk), device=DEVICE).float()
    sub_keys = torch.randint(-1, 2, (h, 2, n, dk // 2), device=DEVICE).float()
    sub_keys[:, :, 3] = sub_keys[:, :, 1]
    values = torch.randn(n * n, 3, device=DEVICE)
    with attnmem.use_backend(backend):
        _, rows, _ = attnmem.product_key_lookup(queries, sub_keys, values, topk=topk,
                                                return_indices=True)
    halves = torch.einsum("bhsd,hsnd->bhsn", queries.unflatten(-1, (2, dk // 2)), sub_keys)
    full = (halves[:, :, 0, :, None] + halves[:, :, 1, None, :]).flatten(-2)
    # ascending row order, then a stable sort by descending score
    expect = torch.sort(full, dim=-1, descending=True, stable=True)[1][..., :topk]
    assert (full.gather(-1, rows) == full.gather(-1, expect)).all()
    assert torch.equal(rows, expect)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
def test_deterministic_mode_repeats_bit_for_bit():
    tensors, topk = make((9, 2, 6, 8, 20, 3), torch.float32)
    grads = (torch.randn(9, 20, device=DEVICE), torch.zeros(9, 2, 3, device=DEVICE))
    atomic, _ = run(tensors, topk, grads, "triton")
    torch.use_deterministic_algorithms(True)
    try:
        first, _ = run(tensors, topk, grads, "triton")
        second, _ = run(tensors, topk, grads, "triton")
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y, z in zip(first, second, atomic):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_value_gradient(backend):
    tensors, topk = make(CASES["odd"], torch.float32)
    grads = (torch.randn(5, 7, device=DEVICE), torch.randn(5, 2, 4, device=DEVICE))
    dense, rows = run(tensors, topk, grads, backend)
    sparse, _ = run(tensors, topk, grads, backend, sparse=True)
    dvalues = sparse[4]
    assert dvalues.layout == torch.sparse_coo
    touched = dvalues.coalesce().indices()[0]
    assert set(touched.tolist()) <= set(rows.flatten().tolist())
    torch.testing.assert_close(dvalues.to_dense(), dense[4])
    for x, y in zip(sparse[:4], dense[:4]):
        torch.testing.assert_close(x, y)


def test_leading_dims():
    (queries, sub_keys, values), topk = make(CASES["odd"], torch.float32)
    out, rows, weights = attnmem.product_key_lookup(queries[None, 1:], sub_keys, values,
                                                    topk=topk, return_indices=True)
    flat = attnmem.product_key_lookup(queries[1:], sub_keys, values, topk=topk,
                                      return_indices=True)
    assert out.shape == (1, 4, 7) and rows.shape == weights.shape == (1, 4, 2, topk)
    for x, y in zip((out, rows, weights), flat):
        assert torch.equal(x[0], y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_value_table(backend):
    """A value table without gradient (a buffer): the other gradients are the same."""
    (queries, sub_keys, values), topk = make(CASES["odd"], torch.float32)
    queries.requires_grad_()
    with attnmem.use_backend(backend):
        out = attnmem.product_key_lookup(queries, sub_keys, values, topk=topk)
        expect = attnmem.product_key_lookup(queries, sub_keys, values.requires_grad_(),
                                            topk=topk)
    (dqueries,) = torch.autograd.grad(out.square().sum(), queries)
    torch.testing.assert_close(dqueries, torch.autograd.grad(expect.square().sum(), queries)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_heads(backend):
    queries, sub_keys, values = make((0, 2, 4, 6, 5, 2), torch.float32)[0]
    with attnmem.use_backend(backend):
        out = attnmem.product_key_lookup(queries, sub_keys, values, topk=2)
        assert out.shape == (0, 5)
        out = attnmem.product_key_lookup(torch.zeros(3, 0, 6, device=DEVICE), sub_keys[:0],
                                         values, topk=2)
    assert torch.equal(out, torch.zeros(3, 5, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_empty_value_rows(sparse, backend):
    """Value rows of width 0 read (B, 0), with zero gradients for queries and sub-keys."""
    tensors = [x.requires_grad_() for x in make((3, 2, 4, 6, 0, 2), torch.float32)[0]]
    with attnmem.use_backend(backend):
        out = attnmem.product_key_lookup(*tensors, topk=2, sparse=sparse)
        grads = torch.autograd.grad(out.sum(), tensors[:2])
    assert out.shape == (3, 0)
    assert all((g == 0).all() for g in grads)


def test_module_trains_with_sparse_adam():
    torch.manual_seed(0)
    memory = ProductKeyMemory(12, 8, 3, heads=2, value_dim=5, sparse=True).to(DEVICE)
    x, target = torch.randn(4, 6, 12, device=DEVICE), torch.randn(4, 6, 5, device=DEVICE)
    dense_params = [p for name, p in memory.named_parameters() if name != "values.weight"]
    optimizers = [torch.optim.SparseAdam([memory.values.weight], lr=0.05),
                  torch.optim.Adam(dense_params, lr=0.05)]
    before = memory.values.weight.detach().clone()
    losses = []
    for _ in range(2):
        out, rows, weights = memory(x, return_indices=True)
        assert out.shape == (4, 6, 5) and rows.shape == weights.shape == (4, 6, 2, 3)
        loss = (out - target).square().mean()
        losses.append(loss.item())
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        assert memory.values.weight.grad.layout == torch.sparse_coo
        for opt in optimizers:
            opt.step()
    changed = (memory.values.weight.detach() != before).any(1).nonzero().flatten()
    assert 0 < len(changed) < 64 and losses[1] < losses[0]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # queries in bf16, tables in fp32
        assert memory.eval()(x).shape == (4, 6, 5)


def test_bad_input_names_the_argument():
    (queries, sub_keys, values), _ = make(CASES["odd"], torch.float32)
    lookup = attnmem.product_key_lookup
    for call, error, name in [
        (lambda: lookup(queries[0, 0], sub_keys, values, topk=2), ValueError, "queries"),
        (lambda: lookup(queries, sub_keys[:, :, :, :4], values, topk=2), ValueError,
         "sub_keys"),
        (lambda: lookup(queries, sub_keys.double(), values, topk=2), TypeError, "sub_keys"),
        (lambda: lookup(queries, sub_keys, values[:-1], topk=2), ValueError, "values"),
        (lambda: lookup(queries, sub_keys, values, topk=12), ValueError, "topk"),
        (lambda: lookup(queries, sub_keys, values, topk=0), ValueError, "topk"),
        (lambda: lookup(queries, sub_keys, values, topk=2.0), TypeError, "topk"),
        (lambda: lookup(queries.int(), sub_keys, values, topk=2), TypeError, "queries"),
        (lambda: lookup(queries, sub_keys, values, topk=2, sparse="no"), TypeError,
         "sparse must be a bool"),
        (lambda: lookup(queries, sub_keys, values, topk=2, return_indices=1), TypeError,
         "return_indices must be a bool"),
        (lambda: ProductKeyMemory(8, 4, 5), ValueError, "topk"),
        (lambda: ProductKeyMemory(8, 4, 2, query_dim=7), ValueError, "query_dim"),
        (lambda: ProductKeyMemory(8, 4, 2)(torch.randn(3, 9)), ValueError, "x"),
    ]:
        with pytest.raises(error, match=name):
            call()


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
def test_triton_says_what_it_lacks():
    (queries, sub_keys, values), _ = make((1, 1, 65, 4, 1, 1), torch.float32)
    with attnmem.use_backend("triton"):
        with pytest.raises(RuntimeError, match="topk 65 > 64"):
            attnmem.product_key_lookup(queries, sub_keys, values, topk=65)
        with pytest.raises(RuntimeError, match="float64"):
            attnmem.product_key_lookup(queries.double(), sub_keys.double(), values.double(),
                                       topk=2)


@pytest.mark.skipif(not INTERPRET and DEVICE == "cpu", reason="needs the triton backend")
def test_opcheck():
    from attnmem.product_key import _lookup_backward_op, _lookup_op

    (queries, sub_keys, values), topk = make(CASES["odd"], torch.float32)
    torch.library.opcheck(_lookup_op.default, (queries, sub_keys, values, topk, False),
                          test_utils=("test_schema", "test_faketensor"))
    out, rows, weights = _lookup_op(queries, sub_keys, values, topk, False)
    for sparse, need_values in ((False, True), (True, True), (False, False)):
        torch.library.opcheck(_lookup_backward_op.default, (
            torch.randn_like(out), torch.randn_like(weights), queries, sub_keys, values, rows,
            weights, sparse, True, need_values), test_utils=("test_schema", "test_faketensor"))


def _job(kernel, constexprs, pointers, num_warps, num_stages=1):
    return dict(module="attnmem.kernels.product_key", kernel=kernel, arch=90,
                constexprs=constexprs, pointers=pointers, num_warps=num_warps,
                num_stages=num_stages)


def _jobs():
    """The selection kernel at topk 32 in float16 (4 warps, mma) and at topk 64 in float32
    (8 warps, the most registers), the gathers at their widest value chunks."""
    from attnmem.kernels import product_key as kernel

    jobs = {}
    for dtype, topk in (("float16", 32), ("float32", 64)):
        t = TRITON_TYPES[dtype]
        config = kernel.select_config(topk)
        job = _job("_pkm_select", dict(
            TOPK=topk, K=kernel.pad_topk(topk), A=config["A"], BLOCK_B=kernel.BLOCK_B,
            DOT_PRECISION="ieee" if dtype == "float32" else "tf32",
            BLOCK_N=config["BLOCK_N"], BLOCK_D=config["BLOCK_D"]),
            {"q_ptr": t, "keys_ptr": t, "rows_ptr": "i64", "weights_ptr": "fp32"},
            config["num_warps"], config["num_stages"])
        # tests/test_triton_versions.py checks these on the GPU machines' triton too.
        job["expect"] = dict(spill_stores=0, spill_loads=0, mma_sync=dtype == "float16")
        jobs[f"select-sm90-{dtype}-topk{topk}"] = job
    t = TRITON_TYPES["float16"]
    config = kernel.gather_configs(32)[-1]
    meta = dict(TOPK=32, K=32, EVEN_D=True, BLOCK_D=config["BLOCK_D"])
    jobs["gather-sm90-float16"] = _job(
        "_pkm_gather", meta, {"values_ptr": t, "rows_ptr": "i64", "weights_ptr": "fp32",
                              "out_ptr": t}, config["num_warps"])
    config = kernel.gather_configs(64)[-1]  # the most registers: float32 atomics, K = 64
    jobs["gather_bwd-sm90-float32-topk64"] = _job(
        "_pkm_gather_bwd", dict(TOPK=64, K=64, EVEN_D=True, BLOCK_D=config["BLOCK_D"],
                                ATOMIC=True),
        {"values_ptr": "fp32", "rows_ptr": "i64", "weights_ptr": "fp32", "dout_ptr": "fp32",
         "dweights_ptr": "fp32", "dscores_ptr": "fp32", "dvalues_ptr": "fp32",
         "keys_ptr": "fp32", "dq_ptr": "fp32"}, config["num_warps"])
    jobs["row_sums-sm90-float16"] = _job(
        "_pkm_row_sums", dict(EVEN_D=True, BLOCK_E=kernel.BLOCK_E, BLOCK_D=128),
        {"sorted_rows_ptr": "i64", "ends_ptr": "i64", "dest_ptr": "i64", "order_ptr": "i64",
         "weights_ptr": "fp32", "src_ptr": t, "out_ptr": t}, 4)
    return jobs


@pytest.mark.slow
@pytest.mark.xdist_group("aot")
def test_kernels_compile_for_sm90_without_spills():
    """The kernels compile for sm_90 without register spills, the float16 selection scores
    with mma, and the gathers load value rows 16 bytes at a time."""
    jobs = _jobs()
    results = compiled(jobs)
    spills = sm90_spills(results)
    assert not spills, spills
    unexpected = {k: r for k, r in results.items() if "expect" in jobs[k]
                  and any(r[key] != value for key, value in jobs[k]["expect"].items())}
    assert not unexpected, unexpected
    scalar = [k for k, r in results.items() if "gather" in k and not r["vector_loads"]]
    assert not scalar, scalar
