"""The attention forward's compile-time variants against float64, through the interpreter
(small tiles) or on a GPU (its tiles): the unmasked kernel (no mask, Nk a multiple of
KEY_TILE_MULTIPLE; Nq whole tiles or not), the masked one, partial key tiles, and TMA
descriptors (device-made; the interpreter runs them too) with every kind of mask. What a GPU
target's code shows (wgmma, TMA instructions, warp specialization, spills) is compiled
without one in tests/test_attention_targets.py.
"""

import os

import pytest
import torch

from attnmem.reference import attention as twin

pytest.importorskip("triton")
kernel = pytest.importorskip("attnmem.kernels.attention")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
runs_kernels = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="needs the interpreter or a GPU")

# name: (B, H, Hkv, Nq, Nk, D, window_left, window_right, kv_lengths); -1: unbounded.
SHAPES = {
    "unmasked": (1, 2, 1, 64, 128, 16, -1, -1, None),
    "unmasked_partial_rows": (1, 2, 2, 45, 128, 24, -1, -1, None),
    "partial_key_tile": (1, 2, 2, 32, 100, 16, -1, -1, None),
    "causal": (1, 2, 1, 48, 128, 16, -1, 0, None),
    "causal_top_rows_see_nothing": (1, 1, 1, 50, 30, 16, -1, 0, None),
    "window_lengths": (2, 2, 1, 48, 80, 16, 20, 5, [80, 37]),
    "decode_gqa": (2, 4, 2, 1, 70, 24, -1, 0, [70, 3]),
    "no_key_seen": (2, 2, 1, 9, 14, 16, -1, -1, [0, 0]),
}
# Several tiles per test sequence under the interpreter; real tiles on a GPU.
CONFIGS = ({"pointers": (16, 16, 1, 1), "tma": (16, 16, 1, 1, "USE_TMA"),
            "tma_tall": (32, 16, 1, 1, "USE_TMA")} if INTERPRET else
           {"pointers": (64, 64, 4, 3), "tma": (64, 64, 4, 3, "USE_TMA"),
            "tma_tall": (128, 64, 8, 3, "USE_TMA")})
SPECIALIZED = ((32, 16, 1, 1, "USE_TMA", "WARP_SPECIALIZE") if INTERPRET else
               (128, 64, 4, 3, "USE_TMA", "WARP_SPECIALIZE"))


def inputs(shape, dtype=torch.float32):
    b, h, hkv, nq, nk, d, left, right, lengths = shape
    q = torch.randn(b, h, nq, d).to(DEVICE, dtype)
    k, v = (torch.randn(b, hkv, nk, d).to(DEVICE, dtype) for _ in range(2))
    lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    return q, k, v, lengths, left, right


def forward(q, k, v, lengths, left, right, config):
    return kernel.attention_forward(q, k, v, lengths, 0.3, left, right, config=config)


def check(q, k, v, lengths, left, right, config, atol=1e-5):
    out, lse = forward(q, k, v, lengths, left, right, config)
    ref_out, ref_lse = twin.attention_forward(q.double(), k.double(), v.double(), lengths, 0.3,
                                              left, right)
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=atol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-5)
    return out, lse


@runs_kernels
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_variants_match_float64(name, config):
    check(*inputs(SHAPES[name]), CONFIGS[config])


@runs_kernels
@pytest.mark.parametrize("config", ["pointers", "tma"])
def test_float16_forward_variants(config):
    for name in ("unmasked", "window_lengths"):
        check(*inputs(SHAPES[name], torch.float16), CONFIGS[config], atol=2e-3)


@runs_kernels
@pytest.mark.parametrize("name", ["unmasked", "causal"])
def test_warp_specialized_config(name):
    """Specialized on sm_90 (one loop: unmasked, or every tile through the mask), its plain
    twin elsewhere (and everywhere under the interpreter, which ignores warp
    specialization)."""
    check(*inputs(SHAPES[name], torch.float16), SPECIALIZED, atol=2e-3)


@runs_kernels
@pytest.mark.parametrize("config", list(CONFIGS))
def test_tma_and_pointers_leave_unseen_keys_out(config):
    """NaN and inf in keys below the window or past kv_lengths change no bit: TMA reads them
    as zeros through descriptors that start at the first key a query tile sees."""
    q, k, v, lengths, left, right = inputs(SHAPES["window_lengths"])
    n_q, n_k = q.shape[2], k.shape[2]
    j = torch.arange(n_k, device=DEVICE)
    unseen = ((j < n_k - n_q - left) | (j >= lengths[:, None]))[:, None, :, None]
    poison = torch.full_like(k, float("nan"))
    poison[..., ::2, :] = float("inf")
    clean = check(q, k, v, lengths, left, right, CONFIGS[config])
    dirty = forward(q, torch.where(unseen, poison, k), torch.where(unseen, poison, v), lengths,
                    left, right, CONFIGS[config])
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)


@runs_kernels
def test_tma_takes_strided_layouts():
    """(B, N, H, D) memory viewed as (B, H, N, D): descriptors take the strides as they are."""
    b, h, n, d = 1, 2, 40, 16
    q, k, v = (torch.randn(b, n, h, d, device=DEVICE).transpose(1, 2) for _ in range(3))
    assert kernel._tma_aligned(q, k, v)
    check(q, k, v, None, -1, 0, CONFIGS["tma"])


def test_tma_configs_need_aligned_tensors():
    q = torch.randn(1, 1, 8, 3)
    with pytest.raises(ValueError, match="TMA"):
        kernel.attention_forward(q, q, q, None, 1.0, -1, -1, config=CONFIGS["tma"])


def test_mask_keys_only_when_some_key_tile_needs_the_mask(monkeypatch):
    """MASK_KEYS selects the three-loop kernel: for a mask, lengths, or Nk that is not a
    multiple of KEY_TILE_MULTIPLE; otherwise one unmasked loop runs."""
    seen = []
    monkeypatch.setattr(kernel, "_run", lambda *args, **kwargs: seen.append(args[4]))
    n = kernel.KEY_TILE_MULTIPLE
    cases = [((n, -1, -1, None), False), ((2 * n, -1, -1, None), False),
             ((n + 16, -1, -1, None), True), ((n, -1, 0, None), True), ((n, 4, -1, None), True),
             ((n, -1, -1, torch.tensor([n])), True)]
    for (n_k, left, right, lengths), masked in cases:
        q, k, v = torch.randn(1, 1, 3, 16), torch.randn(1, 1, n_k, 16), torch.randn(1, 1, n_k, 16)
        kernel.attention_forward(q, k, v, lengths, 1.0, left, right)
        assert seen[-1]["MASK_KEYS"] is masked, (n_k, left, right, lengths)


def test_tma_alignment_rules():
    """16-byte aligned data and strides; a dimension of size 1 is never stepped over."""
    assert kernel._tma_aligned(torch.randn(2, 3, 5, 8, dtype=torch.float16))
    assert not kernel._tma_aligned(torch.randn(2, 3, 5, 3))  # rows of 12 bytes
    assert not kernel._tma_aligned(torch.randn(2, 3, 5, 12)[..., 1:9])  # data 4 bytes in
    assert kernel._tma_aligned(torch.randn(2, 1, 5, 8).as_strided((2, 1, 5, 8), (40, 3, 8, 1)))


def test_descriptor_scratch_uses_the_callers_allocator_or_torch(monkeypatch):
    """Device-made descriptors need triton's allocator: torch's for the launch, the caller's
    when one is set; nothing changes afterwards."""
    import triton
    from triton.runtime import _allocation

    def current():
        allocator = _allocation._allocator
        return allocator.get() if hasattr(allocator, "get") else allocator

    monkeypatch.setattr(kernel, "interpreting", lambda: False)
    before = current()
    assert isinstance(before, _allocation.NullAllocator)
    with kernel._descriptor_scratch(True):
        assert not isinstance(current(), _allocation.NullAllocator)
    assert current() is before
    with kernel._descriptor_scratch(False):
        assert current() is before

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    triton.set_allocator(mine)
    try:
        with kernel._descriptor_scratch(True):
            assert current() is mine
    finally:
        triton.set_allocator(before)
