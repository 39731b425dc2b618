"""CUDA caps a launch grid's 2nd and 3rd axes at 65535 programs: each op whose kernels put a
count there refuses the triton backend past it (naming the count; auto, on CUDA, runs the
torch backend instead), and attention_with_kvcache's kernels keep every such count on the
1st axis. Shapes are built with little memory: expanded tensors or few elements per row.
attention, attention_varlen and the memory ops' batch are tested beside those ops."""

import re

import pytest
import torch

import attnmem
from attnmem import backend
from backends import INTERPRET

LIMIT = backend.GRID_YZ_LIMIT


def _calls():
    """(message, call) past the limit, each small enough for the torch twin."""
    wide = LIMIT + 1
    rows = (256, 257)  # 65792 (batch entries x heads)
    location = [torch.rand(*rows, 3), torch.rand(*rows, 3), torch.rand(*rows),
                torch.rand(*rows, 1), torch.ones(rows)]
    n_values = 16 * LIMIT + 1
    return {
        "additive_batch": (f"{wide} batch entries > {LIMIT}", lambda: attnmem.additive_attention(
            torch.randn(wide, 1, 2), torch.randn(wide, 1, 2), torch.randn(wide, 1, 1),
            torch.randn(2))),
        "location_rows": (f"{rows[0] * rows[1]} rows (batch entries x heads) > {LIMIT}",
                          lambda: attnmem.location_address(*location)),
        "product_key_heads": (f"{wide} heads > {LIMIT}", lambda: attnmem.product_key_lookup(
            torch.randn(1, wide, 2), torch.randn(wide, 2, 1, 1), torch.randn(1, 3), topk=1)),
        "product_key_columns": (f"{LIMIT + 1} 16-column chunks", lambda: (
            attnmem.product_key_lookup(torch.randn(1, 1, 2), torch.randn(1, 2, 1, 1),
                                       torch.randn(1, n_values), topk=1))),
        "sparse_read_topk": (f"{LIMIT + 1} column or top-k chunks", lambda: attnmem.memory_read(
            torch.randn(3, 2), (torch.zeros(1, 1, 2 * LIMIT + 1, dtype=torch.long),
                                torch.rand(1, 1, 2 * LIMIT + 1)))),
    }


CALLS = _calls()


@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter for CPU tensors")
@pytest.mark.parametrize("name", list(CALLS))
def test_triton_refuses_counts_past_the_grid_limit(name):
    message, call = CALLS[name]
    with attnmem.use_backend("triton"), pytest.raises(RuntimeError, match=re.escape(message)):
        call()
    with attnmem.use_backend("auto"):
        assert torch.isfinite(call()).all()


def test_grid_reasons_name_each_count_past_the_limit():
    reasons = backend.grid_reasons([("heads", LIMIT), ("batch entries", LIMIT + 1)])
    assert reasons == [f"{LIMIT + 1} batch entries > {LIMIT}, the CUDA launch grid's limit"]


class _Grids:
    """Stands for a kernel: records each launch grid and runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter for CPU tensors")
def test_kvcache_launches_keep_counts_on_the_first_grid_axis(monkeypatch):
    """65536 sequences appending 2 tokens, and 2^20 + 32 packed query rows of one sequence:
    the append's and the attention's grids hold them on the 1st axis (which CUDA allows
    2^31 - 1), so the triton backend takes these shapes."""
    from attnmem import kvcache
    from attnmem.kernels import attention_kvcache as kernel

    recorded = {name: _Grids() for name in ("_kvcache_append", "_kvcache_attend")}
    for name, fake in recorded.items():
        monkeypatch.setattr(kernel, name, fake)
    new = torch.zeros(1, 2, 1, 1).expand(LIMIT + 1, -1, -1, -1)
    caches = [torch.zeros(LIMIT + 1, 4, 1, 1) for _ in range(2)]
    seqlens = torch.zeros(LIMIT + 1, dtype=torch.int32)
    kernel.append(new, new, *caches, seqlens, None)
    rows = 16 * LIMIT + 32
    q = torch.zeros(1, rows, 1, 1)
    kernel.attention_with_kvcache(q, *caches[:1] * 2, seqlens[:1], None, 0, 1.0, -1, -1)
    assert recorded["_kvcache_append"].grids == [((LIMIT + 1) * 2,)]
    assert recorded["_kvcache_attend"].grids == [(LIMIT + 2, 1)]
    assert kvcache._triton_reasons(q, *caches) == []


@pytest.mark.skipif(not INTERPRET, reason="needs the interpreter for CPU tensors")
def test_sparse_read_keeps_the_batch_on_the_first_grid_axis(monkeypatch):
    """A sparse memory_read of 65536 batch entries (tokens reading a shared memory): its
    kernel's grid holds them on the 1st axis, so the triton backend takes them."""
    from attnmem.kernels import memory_read as kernel

    recorded = _Grids()
    monkeypatch.setattr(kernel, "_memory_read_sparse_fwd", recorded)
    indices = torch.zeros(1, 1, 2, dtype=torch.long).expand(LIMIT + 1, -1, -1)
    with attnmem.use_backend("triton"):
        attnmem.memory_read(torch.randn(3, 2), (indices, torch.rand(LIMIT + 1, 1, 2)))
    assert recorded.grids == [(LIMIT + 1, 1)]


def test_slot_splits_of_an_empty_batch(monkeypatch):
    """Compiled, the splits along the slots fill the GPU's multiprocessors twice over with
    the rows at hand; no rows (B = 0, as the H100 run's contract tests drew) count as one
    rather than dividing by zero."""
    pytest.importorskip("triton")
    from attnmem.kernels import _launch

    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    device = type("Properties", (), {"multi_processor_count": 132})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: device)
    assert _launch.slot_splits(1000, 0, 64, "cuda") == (64, 16)
    assert _launch.slot_splits(1000, 264, 64, "cuda") == (1024, 1)
