"""attnmem imports and each kernel compiles on the oldest Triton that pyproject.toml accepts
here (for sm_90) and on the GPU machines' Triton (sm_80 and sm_90), not only on the installed
one (which the rest of the suite covers, every config and dtype); on the GPU machines' Triton the
compile jobs that state what they must compile to (wgmma, no spill, TMA, warp
specialization) are checked as well.

Each version gets a virtual environment under ~/.cache/attnmem/ that sees this Python's
packages (torch and attnmem itself are reused) and holds only that triton, installed from the
package index. The jobs are those the compile tests (`-m slow`) build, collected by running
them with ATTNMEM_AOT_RECORD (tests/aot.py); one job per kernel and arch is compiled with
the GPU machines' version, one per kernel for sm_90 with the oldest: whether a kernel
compiles at all is what differs between Triton versions, and all of them would double the
suite's time on a cold cache. Skipped when the index is
unreachable or has no wheel of that version for this Python and platform.
"""

import fcntl
import importlib
import inspect
import json
import os
import pkgutil
import platform
import re
import subprocess
import sys
from importlib.metadata import requires

import pytest
from packaging.requirements import Requirement

triton = pytest.importorskip("triton")

from aot import ROOT, compile_all, minor  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("triton_versions")]

GPU_MACHINES_TRITON = "3.6"
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                     "attnmem")
OFFLINE = ("NewConnectionError", "Failed to establish a new connection", "Max retries exceeded",
           "Temporary failure in name resolution", "Network is unreachable", "ConnectTimeout",
           "ReadTimeoutError", "ProxyError", "Could not fetch URL")
IMPORT_ALL = """
import importlib, pkgutil
import attnmem, attnmem.nn, attnmem.kernels as kernels, triton
for module in pkgutil.iter_modules(kernels.__path__):
    importlib.import_module(f"attnmem.kernels.{module.name}")
print(triton.__version__)
"""


def _clean_env():
    """Neither this run's interpreter switch nor its pytest(-xdist) state."""
    return {k: v for k, v in os.environ.items()
            if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}


def triton_floor() -> str:
    """The lowest triton attnmem's installed metadata accepts on this platform: '3.4'."""
    for line in requires("attnmem") or ():
        requirement = Requirement(line)
        if requirement.name == "triton" and (requirement.marker is None
                                             or requirement.marker.evaluate({"extra": ""})):
            return next(s.version for s in requirement.specifier if s.operator == ">=")
    pytest.skip("attnmem does not require triton on this platform")


def venv_with_triton(version: str) -> str:
    """The python of a virtual environment holding triton==version.*; built once, then reused.
    A lock keeps concurrent runs (xdist workers, other checkouts) from building it twice."""
    where = os.path.join(CACHE, f"triton-{version}-py{minor(platform.python_version())}")
    python = os.path.join(where, "bin", "python")
    os.makedirs(CACHE, exist_ok=True)
    with open(where + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        have = subprocess.run([python, "-c", "import triton; print(triton.__version__)"],
                              capture_output=True, text=True) if os.path.exists(python) else None
        if have is None or have.returncode or minor(have.stdout.strip()) != version:
            subprocess.run([sys.executable, "-m", "venv", "--clear", "--system-site-packages",
                            where], check=True, timeout=300)
            pip = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check",
                                  "--timeout", "20", "--retries", "1", f"triton=={version}.*"],
                                 capture_output=True, text=True, timeout=1200)
            if pip.returncode:
                log = pip.stdout + pip.stderr
                if any(marker in log for marker in OFFLINE):
                    pytest.skip(f"package index unreachable, cannot install triton {version}")
                if "No matching distribution" in log:
                    pytest.skip(f"no triton {version} wheel for Python "
                                f"{platform.python_version()} on {platform.machine()}")
                raise AssertionError(f"pip install triton=={version}.* failed:\n{log[-3000:]}")
    return python


@pytest.fixture(scope="module")
def recorded_jobs(tmp_path_factory):
    """Every job the compile tests build."""
    record = tmp_path_factory.mktemp("aot") / "jobs.jsonl"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow",
                    "tests", "-k", "not triton_versions"], cwd=ROOT,
                   env={**_clean_env(), "ATTNMEM_AOT_RECORD": str(record)},
                   capture_output=True, text=True, timeout=600)
    assert record.exists(), "the compile tests recorded no jobs"
    return [job for line in record.read_text().splitlines() for job in json.loads(line)]


@pytest.fixture(scope="module")
def kernel_jobs(recorded_jobs):
    """{"module.kernel-smXX": job}: the first job the compile tests build for each kernel
    and arch."""
    jobs = {}
    for job in recorded_jobs:
        jobs.setdefault(f"{job['module']}.{job['kernel']}-sm{job['arch']}", job)
    return jobs


def launched_kernels():
    """Every @triton.jit function in kernels/ that no other calls: the kernels the launchers
    start ("module.name")."""
    import attnmem.kernels

    modules = [importlib.import_module(f"attnmem.kernels.{m.name}")
               for m in pkgutil.iter_modules(attnmem.kernels.__path__)]
    source = "\n".join(inspect.getsource(module) for module in modules)
    found = set()
    for module in modules:
        for name, obj in vars(module).items():
            fn = _jit_function(obj)
            if (fn is not None and fn.__module__ == module.__name__
                    and len(re.findall(rf"\b{name}\(", source)) == 1):  # its def line only
                found.add(f"{module.__name__}.{name}")
    return found


def _jit_function(obj):
    """The Python function under @triton.jit (compiled or interpreted) and any autotune or
    heuristics wrapper, else None."""
    wrapped = False
    while hasattr(obj, "fn") and not inspect.isfunction(obj):
        obj, wrapped = obj.fn, True
    return obj if wrapped and inspect.isfunction(obj) else None


def test_every_kernel_has_a_compile_job(kernel_jobs):
    compiled = {name.rsplit("-", 1)[0] for name in kernel_jobs}
    assert launched_kernels() - compiled == set(), "kernels that no compile test (-m slow) builds"


@pytest.mark.parametrize("which", ["oldest supported", "GPU machines'"])
def test_imports_and_kernels_compile_on_other_triton_versions(kernel_jobs, which):
    version = triton_floor() if which == "oldest supported" else GPU_MACHINES_TRITON
    if minor(triton.__version__) == version:
        pytest.skip(f"triton {version} is the installed one, which the rest of the suite checks")
    python = venv_with_triton(version)
    imported = subprocess.run([python, "-c", IMPORT_ALL], cwd=ROOT, env=_clean_env(),
                              capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert minor(imported.stdout.strip()) == version, imported.stdout
    # The oldest triton compiles each kernel for sm_90, where the versions differ (TMA,
    # warp specialization, wgmma); sm_80's paths it shares with the others.
    jobs = {name: job for name, job in kernel_jobs.items()
            if which == "GPU machines'" or job["arch"] == 90}
    results = dict(zip(jobs, compile_all(list(jobs.values()), python=python)))
    failures = {name: result["error"] for name, result in results.items() if result["error"]}
    assert not failures, f"on triton {version}: {failures}"


def test_gpu_machines_triton_compiles_as_expected(recorded_jobs):
    """The jobs that carry an "expect" (tests/test_attention_targets.py: wgmma, no spill, TMA,
    warp specialization on sm_90) compile to what they expect on the GPU machines' triton
    too, not only on the installed one."""
    if minor(triton.__version__) == GPU_MACHINES_TRITON:
        pytest.skip(f"triton {GPU_MACHINES_TRITON} is the installed one, which the rest of the "
                    "suite checks")
    jobs = list({json.dumps(job, sort_keys=True): job for job in recorded_jobs
                 if "expect" in job}.values())
    assert jobs, "no compile job carries an expectation"
    python = venv_with_triton(GPU_MACHINES_TRITON)
    failures = {}
    for job, result in zip(jobs, compile_all(jobs, python=python)):
        got = {key: result.get(key) for key in job["expect"]}
        if result["error"] or got != job["expect"]:
            name = f"{job['kernel']}-sm{job['arch']}-{job['constexprs']}-{job['num_warps']}w"
            failures[name] = result["error"] or got
    assert not failures, f"on triton {GPU_MACHINES_TRITON}: {failures}"
