"""attnmem.attention_with_kvcache on float8_e4m3fn caches with (B, Hkv) descales, against
float64 attention of the dequantized cache: contiguous and paged, GQA, split-KV, odd head
dims and lengths, with and without appended tokens, score modifications; the append's
quantization against torch's cast, byte for byte; bad inputs; the sm_90 builds (slow).

Every cache slot past a sequence's length holds e4m3 NaN, so padding that leaks fails.
Under the interpreter, torch's float32 -> e4m3 cast stands in for triton's, which mis-rounds
(tests/test_attention_fp8.py's fixture, imported here): the kernels' own arithmetic (the
division by the descale, the saturation) runs unchanged.
"""

import math
import re

import pytest
import torch
from test_attention_fp8 import _interpreter_e4m3_cast  # noqa: F401 (autouse fixture)
from test_attention_kvcache import _inputs, _paged, assert_matches_float64

import attnmem
from attnmem.reference import kvcache as twin
from backends import BACKENDS, DEVICE

FP8 = torch.float8_e4m3fn
# The kernels dot in q's dtype: bfloat16 dots are wrong under the interpreter.
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# name: (case of tests/test_attention_kvcache.py, page size or None for a contiguous cache)
CASES = {
    "decode_gqa8_paged": ("decode_gqa8", 16),  # append, 3 splits under the interpreter
    "chunk_no_append": ("chunk_no_append", None),
    "odd_dim_not_causal_paged": ("not_causal_odd_dim", 7),
    "row_tiles_window_paged": ("row_tiles_window", 6),
    "clamped": ("clamped", None),
    "empty_cache": ("empty_cache", None),
}


def fp8_inputs(name, dtype):
    """q, k, v in dtype; e4m3 caches (NaN from each sequence's length on); descales (B, Hkv)
    spread over 0.02 to 0.5 (head (0, 0) at 1); new tokens with values past e4m3's range
    and halfway between e4m3 values (ties round to even); lengths and keyword arguments."""
    q, k_cache, v_cache, k, v, seqlens, kwargs = _inputs(name, torch.float32)
    batch, _, kv_heads, _ = k_cache.shape
    descales = [0.02 + 0.48 * torch.rand(batch, kv_heads) for _ in range(2)]
    caches = [(c * 4).to(FP8) for c in (k_cache, v_cache)]
    if k is not None:
        for x, descale in zip((k, v), descales):
            descale[0, 0] = 1.0
            ties = torch.tensor([1.0625, 1.1875, 17.0, -19.0, 500.0, -1e4])
            x[0, 0, 0, :len(ties)] = ties[:x.shape[-1]]
        k, v = k * 4, v * 4
    new = [None if x is None else x.to(dtype) for x in (k, v)]
    return q.to(dtype), caches, new, descales, seqlens, kwargs


def dequantized(cache, descale, dtype=torch.float64):
    return (cache.to(torch.float64) * descale.double()[:, None, :, None]).to(dtype)


def _run(q, caches, new, descales, seqlens, kwargs, backend, page_size=None):
    """out, lse, and the caches after the call (contiguous again if paged), on the CPU."""
    caches = [c.clone() for c in caches]
    table = order = None
    if page_size is not None:
        order = torch.randperm(caches[0].shape[0] * caches[0].shape[1] // page_size + 2)
        (caches[0], table), (caches[1], _) = (_paged(c, page_size, order) for c in caches)
    to = lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x  # noqa: E731
    caches = [to(c) for c in caches]
    with attnmem.use_backend(backend), torch.no_grad():
        out, lse = attnmem.attention_with_kvcache(
            to(q), *caches, k=to(new[0]), v=to(new[1]), cache_seqlens=to(seqlens),
            block_table=to(table), return_lse=True, k_descale=to(descales[0]),
            v_descale=to(descales[1]), **kwargs)
    caches = [c.cpu() for c in caches]
    if table is not None:
        caches = [c[table.long()].flatten(1, 2) for c in caches]
    return out.cpu(), lse.cpu(), caches


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
@pytest.mark.parametrize("name", list(CASES))
def test_fp8_cache_matches_float64(name, dtype, backend):
    """The append writes torch's quantization of the new tokens, byte for byte, and nothing
    else; the attention matches float64 attention over the dequantized cache within twice
    the error of the 16-bit torch backend over the cache dequantized to q's dtype."""
    case, page_size = CASES[name]
    q, caches, new, descales, seqlens, kwargs = fp8_inputs(case, dtype)
    out, lse, after = _run(q, caches, new, descales, seqlens, kwargs, backend, page_size)
    n_new = 0 if new[0] is None else q.shape[1]
    lengths = seqlens.clamp(0, caches[0].shape[1] - n_new)
    expect_caches = [c.clone() for c in caches]
    if n_new:
        twin.append(*expect_caches, *new, lengths, None, torch.stack(descales, -1))
    for got, expect in zip(after, expect_caches):
        assert torch.equal(got.view(torch.uint8), expect.view(torch.uint8))
    # The same attention with the new tokens in the cache already: lengths + n_new keys.
    reference = {}
    for ref_dtype in (torch.float64, dtype):
        with attnmem.use_backend("torch"):
            reference[ref_dtype] = attnmem.attention_with_kvcache(
                q.to(ref_dtype), *(dequantized(c, d, ref_dtype) for c, d in zip(after, descales)),
                cache_seqlens=lengths + n_new, return_lse=True, **kwargs)
    assert_matches_float64(out, lse, reference[torch.float64], reference[dtype], dtype)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize("n_splits", [1, 4])
def test_fp8_splits_and_score_modifications(n_splits):
    """softcap (k's descale folds into the scale inside the tanh), sinks and ALiBi over an
    fp8 cache, in one split (the output written in q's dtype directly) or several: the
    kernels against the twin in float64."""
    from attnmem.kernels import attention_kvcache as kernel

    q, caches, _, descales, seqlens, _ = fp8_inputs("window_gqa", torch.float16)
    heads, scale = q.shape[2], q.shape[-1] ** -0.5
    mods = dict(softcap=2.0, sinks=torch.randn(heads), alibi_slopes=torch.rand(2, heads))
    stacked = torch.stack(descales, -1)
    lengths = seqlens.clamp(0, caches[0].shape[1])
    out, lse = kernel.attention_with_kvcache(
        q.to(DEVICE), *(c.to(DEVICE) for c in caches), lengths.to(DEVICE), None, 0, scale, 7,
        0, n_splits=n_splits, descales=stacked.to(DEVICE),
        **{name: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for name, x in mods.items()})
    expect = twin.attention_with_kvcache_forward(q.double(), *caches, lengths, None, 0, scale,
                                                 7, 0, descales=stacked.double(), **mods)
    assert out.dtype == torch.float16
    # float16 output: its rounding (half an ulp, 2^-11 relative) on top of the kernel's error.
    torch.testing.assert_close(out.cpu().double(), expect[0], rtol=2 ** -11, atol=2e-3)
    torch.testing.assert_close(lse.cpu().double(), expect[1], rtol=1e-5, atol=1e-5)


def test_quantize_saturates_and_rounds_to_even():
    x = torch.tensor([1.0625, 1.1875, 17.0, -19.0, 500.0, -1e4, math.nan, 0.3]).view(1, 1, 1, -1)
    got = twin.quantize(x, torch.full((1, 1), 0.5)).float().flatten()
    expect = torch.tensor([2.0, 2.5, 32.0, -40.0, 448.0, -448.0, math.nan, 0.625])
    torch.testing.assert_close(got, expect, equal_nan=True, rtol=0, atol=0)


def _good():
    return dict(q=torch.randn(2, 1, 4, 16, dtype=torch.float16),
                k_cache=torch.randn(2, 32, 2, 16).to(FP8),
                v_cache=torch.randn(2, 32, 2, 16).to(FP8),
                k=torch.randn(2, 1, 2, 16, dtype=torch.float16),
                v=torch.randn(2, 1, 2, 16, dtype=torch.float16),
                cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
                k_descale=torch.rand(2, 2), v_descale=torch.rand(2, 2))


ERRORS = {
    "descale_shape": (dict(k_descale=torch.ones(2, 4)), ValueError,
                      "k_descale must be (B, Hkv) = (2, 2)"),
    "descale_dtype": (dict(v_descale=torch.ones(2, 2, dtype=torch.int32)), TypeError,
                      "v_descale must be a floating-point tensor"),
    "descale_not_tensor": (dict(k_descale=0.5), TypeError, "k_descale must be a torch.Tensor"),
    "float32_q": (dict(q=torch.randn(2, 1, 4, 16)), TypeError,
                  "q must be float16 or bfloat16 with a float8_e4m3fn cache"),
    "fp8_q": (dict(q=torch.randn(2, 1, 4, 16).to(FP8)), TypeError, "q must be float16"),
    "descale_16bit_cache": (dict(k_cache=torch.randn(2, 32, 2, 16, dtype=torch.float16),
                                 v_cache=torch.randn(2, 32, 2, 16, dtype=torch.float16)),
                            ValueError, "k_descale applies to float8_e4m3fn caches only"),
    "v_cache_16bit": (dict(v_cache=torch.randn(2, 32, 2, 16, dtype=torch.float16)), TypeError,
                      "v_cache must have k_cache's dtype"),
    "e5m2_cache": (dict(k_cache=torch.randn(2, 32, 2, 16).to(torch.float8_e5m2)), TypeError,
                   "k_cache must have q's dtype torch.float16 or be float8_e4m3fn"),
    "fp8_new_tokens": (dict(k=torch.randn(2, 1, 2, 16).to(FP8)), TypeError,
                       "k must have q's dtype"),
    "descale_grad": (dict(v_descale=torch.rand(2, 2, requires_grad=True)), RuntimeError,
                     "has no gradient, and v_descale requires grad"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_fp8_errors_name_the_argument(name):
    change, error, match = ERRORS[name]
    args = dict(_good(), **change)
    with pytest.raises(error, match=re.escape(match)):
        attnmem.attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                                       **args)


def test_fp8_ops_trace():
    """The custom ops' fakes and real outputs agree with descales (torch.library.opcheck,
    torch backend; its schema test would run float8 kernels torch's CPU lacks)."""
    from attnmem import kvcache

    args = _good()
    descales = torch.stack([args["k_descale"], args["v_descale"]], -1)
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    seqlens = args["cache_seqlens"]
    torch.library.opcheck(kvcache._append.default, (args["q"], args["k_cache"], args["v_cache"],
                                                    args["k"], args["v"], seqlens, None, "torch",
                                                    descales), test_utils=checks)
    torch.library.opcheck(kvcache._attend.default, (
        args["q"], args["k_cache"], args["v_cache"], seqlens, None, 1, 0.25, -1, 0, "torch", 0.0,
        None, None, descales), test_utils=checks)
