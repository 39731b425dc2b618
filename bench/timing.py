"""Timing and the facts every result carries: device, versions, commit, copy bandwidth."""

import datetime
import os
import platform
import re
import subprocess

import torch
from torch.utils import benchmark

QUANTILES = (0.5, 0.2, 0.8)


def measure(fn, device, budget_s=0.5):
    """(median, p20, p80) of fn's time in milliseconds. CUDA: triton.testing.do_bench
    (synchronises the device, flushes L2 between calls). CPU: torch.utils.benchmark's
    blocked_autorange over about budget_s, on torch's current thread count, after one warm-up
    call; the quantiles are over its blocks, each the mean of enough calls to hide the timer's
    overhead."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return tuple(do_bench(fn, warmup=25, rep=max(25, int(budget_s * 1000)),
                              quantiles=list(QUANTILES)))
    fn()  # warm-up: allocations, compilation
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = torch.tensor(timer.blocked_autorange(min_run_time=budget_s).times, dtype=torch.float64)
    return tuple((times.quantile(torch.tensor(QUANTILES, dtype=torch.float64)) * 1e3).tolist())


def peak_memory_mib(fn, device):
    """Peak memory one call allocates beyond what was allocated before it (CUDA only: it
    reads the caching allocator's statistics; None on a CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def copy_bandwidth_gbs(device, mib=None):
    """Measured device copy bandwidth in GB/s (bytes read plus bytes written per second):
    the roof of a memory-bound op."""
    cuda = torch.device(device).type == "cuda"
    n = (mib or (1024 if cuda else 256)) * 2 ** 20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    median, _, _ = measure(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (median * 1e-3) / 1e9


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.+)", f.read())
        name = match.group(1).strip() if match else platform.processor()
    except OSError:
        name = platform.processor() or platform.machine()
    return f"{name} ({torch.get_num_threads()} threads)"


def device_slug(device) -> str:
    """A directory name for the device: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc-7b13'."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu " + device_name(device).split(" (")[0]
    name = re.sub(r"\(r\)|\(tm\)|@.*|processor|\d+-core", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def git_commit() -> str:
    """HEAD (and whether the work tree differs), or ATTNMEM_COMMIT where the caller names it:
    a copy of the work tree may carry no .git, or a stale one (the device tool's copy named
    the session's first commit)."""
    if os.environ.get("ATTNMEM_COMMIT"):
        return os.environ["ATTNMEM_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+uncommitted changes" if dirty else "")


def environment(device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(device=device_name(device), device_type=torch.device(device).type,
                torch=torch.__version__, triton=triton_version,
                python=platform.python_version(), commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
