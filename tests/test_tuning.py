"""ATTNMEM_TUNING=one, the GPU check's tests: each tuning key runs one config, chosen from the
key's values after the kernel's own pruning, and across keys every config runs. The
autotuners are built here without a GPU and their pruning called as triton's would. And each
launch records the config it ran, for the benchmark report."""

import pytest
import torch

from backends import DEVICE

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from attnmem.kernels import _launch, memory_write  # noqa: E402
from attnmem.kernels import attention as kernel  # noqa: E402


def _prune(tuner, nargs, **meta):
    return tuner.early_config_prune(tuner.configs, nargs, **meta)


@pytest.fixture
def one_config(monkeypatch):
    monkeypatch.setenv("ATTNMEM_TUNING", "one")
    monkeypatch.setattr(kernel, "_autotuned", {})
    monkeypatch.setattr(_launch, "_TUNERS", {})
    monkeypatch.setattr(kernel, "_smem_limit", lambda device: kernel.SMEM_LIMIT[90])


def test_attention_runs_one_config_per_key_and_every_config_across_keys(one_config):
    tuner = kernel._launcher("fwd", kernel._attn_fwd, "cuda", 64, 2)
    q = torch.empty(1, dtype=torch.float16)
    meta = dict(BLOCK_D=64, DROPOUT=False, MASK_KEYS=True, VARLEN=False)
    chosen = [_prune(tuner, {"q_ptr": q, "seq_bucket": bucket}, **meta)
              for bucket in range(200)]
    assert all(len(c) == 1 for c in chosen)
    assert {str(c[0]) for c in chosen} == {str(c) for c in tuner.configs}
    # The same key, the same config; another dtype is another key.
    again = _prune(tuner, {"q_ptr": q, "seq_bucket": 7}, **meta)
    assert str(again[0]) == str(chosen[7][0])


def test_one_config_comes_after_the_kernels_pruning(one_config):
    """With dropout the forward's pruning drops warp-specialized configs: none is chosen."""
    tuner = kernel._launcher("fwd", kernel._attn_fwd, "cuda", 64, 2)
    q = torch.empty(1, dtype=torch.float16)
    meta = dict(BLOCK_D=64, DROPOUT=True, MASK_KEYS=True, VARLEN=False)
    kept = kernel._forward_prune(tuner.configs, {"q_ptr": q}, **meta)
    assert len(kept) < len(tuner.configs)
    chosen = {str(_prune(tuner, {"q_ptr": q, "seq_bucket": b}, **meta)[0]) for b in range(200)}
    assert chosen == {str(c) for c in kept}


def test_memory_kernels_run_one_config_per_key(one_config):
    configs = memory_write.configs_for("fwd", 64, 2)
    tuner = _launch.autotuned(memory_write._memory_write_fwd, configs, ["n_slots"])
    mem = torch.empty(1, dtype=torch.float16)
    chosen = [_prune(tuner, {"mem_ptr": mem, "n_slots": n}) for n in range(100)]
    assert all(len(c) == 1 for c in chosen)
    assert len({str(c[0]) for c in chosen}) == len(configs) > 1


def test_full_tuning_by_default(monkeypatch):
    monkeypatch.delenv("ATTNMEM_TUNING", raising=False)
    monkeypatch.setattr(_launch, "_TUNERS", {})
    configs = memory_write.configs_for("fwd", 64, 2)
    tuner = _launch.autotuned(memory_write._memory_write_fwd, configs, ["n_slots"])
    assert tuner.early_config_prune is None and len(tuner.configs) == len(configs)


@triton.jit
def _fill(out_ptr, value, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), value)


def test_launches_record_the_config_they_ran(monkeypatch):
    """What the benchmark report shows beside each point (bench/report.py)."""
    monkeypatch.setattr(_launch, "_TUNERS", {})
    monkeypatch.setattr(_launch, "LAST_CONFIGS", {})
    monkeypatch.setattr(_launch, "LAST_TUNING", {})
    tuner = _launch.autotuned(_fill, [dict(BLOCK=4, num_warps=1, num_stages=2)], ["value"])
    out = torch.zeros(4, device=DEVICE)
    _launch.run_tuned(tuner, lambda meta: (1,), (out, 3.0), {})
    assert out.tolist() == [3.0] * 4
    assert _launch.config_text(_launch.LAST_CONFIGS["_fill"]) == "BLOCK=4 warps=1 stages=2"
    assert not _launch.LAST_TUNING  # one config: nothing timed


class _Tuner:
    """What run_tuned reads of triton's Autotuner: its launch, cache, best config and the
    timings of its latest tuning; its launch tunes key "k" where that is not cached."""

    fn = _fill

    def __init__(self, timings):
        self.configs_timings = timings
        self.cache = {}

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.cache.setdefault("k", min(self.configs_timings,
                                           key=lambda c: self.configs_timings[c]))
            self.best_config = self.cache["k"]
        return run


def test_records_name_the_kernel_under_its_wrappers(one_config):
    """The attention forward sits under heuristics, which have no name of their own."""
    tuner = kernel._launcher("fwd", kernel._attn_fwd, "cuda", 64, 2)
    assert _launch.kernel_name(tuner) == "_attn_fwd"
    assert _launch.kernel_name(_launch.autotuned(_fill, [dict(BLOCK=4, num_warps=1,
                                                              num_stages=1)], [])) == "_fill"


def test_a_launch_that_tunes_records_each_configs_time(monkeypatch):
    monkeypatch.setattr(_launch, "LAST_CONFIGS", {})
    monkeypatch.setattr(_launch, "LAST_TUNING", {})
    fast, slow = (triton.Config({"BLOCK": b}, num_warps=4, num_stages=3) for b in (64, 128))
    tuner = _Tuner({fast: [0.5, 0.4, 0.6], slow: [2.0, 1.9, 2.1]})
    _launch.run_tuned(tuner, None, (), {})
    assert _launch.LAST_CONFIGS["_fill"] is fast
    assert _launch.LAST_TUNING == {"_fill": {"BLOCK=64 warps=4 stages=3": 0.5,
                                             "BLOCK=128 warps=4 stages=3": 2.0}}
    _launch.LAST_TUNING.clear()
    _launch.run_tuned(tuner, None, (), {})  # a cached key: no tuning to record
    assert not _launch.LAST_TUNING
