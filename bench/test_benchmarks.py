"""pytest-benchmark suites: `pytest bench --benchmark-only` (add --benchmark-json=FILE to keep
the numbers), parametrised by op, provider, mode and size from bench.cases,
at the GPU sizes when CUDA is there and CPU sizes otherwise; ATTNMEM_BENCH_PROFILE
(smoke, quick, cpu, gpu) overrides. On a GPU every timed call synchronises the device."""

import os

import pytest
import torch

from bench import cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROFILE = os.environ.get("ATTNMEM_BENCH_PROFILE", cases.default_profile())
if PROFILE not in cases.PROFILES:
    raise ValueError(f"ATTNMEM_BENCH_PROFILE must be one of {cases.PROFILES}, got {PROFILE!r}")


def _id(point):
    extra = [f"d{point['d']}"] if "d" in point else []
    extra += [f"dv{point['dv']}"] if "dv" in point else []
    extra += ["causal"] if point.get("causal") else []
    extra += [point["dtype"]] if "dtype" in point else []
    return "-".join([point["provider"], point["mode"], *extra, str(point["x"])])


def _run(benchmark, point):
    try:
        fn, work = cases.build(point, DEVICE)
        fn()  # warm-up, and the check that this provider runs here
    except RuntimeError as e:
        pytest.skip(f"{point['provider']} does not run here: {str(e).splitlines()[0]}")
    if DEVICE == "cuda":
        timed = fn

        def fn():
            timed()
            torch.cuda.synchronize()
    benchmark.group = f"{point['op']} {point['mode']}" + (
        f" d={point['d']}" if "d" in point else "") + (
        f" dv={point['dv']}" if "dv" in point else "") + (
        " causal" if point.get("causal") else "") + (
        f" {point['dtype']}" if "dtype" in point else "")
    benchmark.extra_info.update(point, work=work, device=DEVICE, dtype=str(
        getattr(torch, point["dtype"]) if "dtype" in point else cases.dtype_for(point["op"],
                                                                                DEVICE)))
    benchmark(fn)


@pytest.mark.parametrize("point", [p for op in cases.OPS for p in cases.points(op, PROFILE)],
                         ids=lambda point: f"{point['op']}-{_id(point)}")
def test_benchmark(benchmark, point):
    """Select an op with -k: attention, memory_attend, memory_write, additive, mha."""
    _run(benchmark, point)
