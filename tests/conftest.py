import os
import random
import sys
import zlib

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    # Fresh inputs every run; xdist workers inherit the seed through the environment.
    os.environ.setdefault("ATTNMEM_SEED", str(random.randrange(1 << 31)))


def pytest_report_header(config):
    return f"attnmem: random inputs seeded with ATTNMEM_SEED={os.environ['ATTNMEM_SEED']}"


def pytest_collection_modifyitems(config, items):
    """ATTNMEM_RERUN=FILE: only the tests whose node ids FILE lists, one a line (an earlier
    GPU run's failures, see scripts/gpu_report.sh); listed ids that match no test are
    ignored, so a list stays usable after tests change."""
    path = os.environ.get("ATTNMEM_RERUN")
    if not path:
        return
    with open(path) as f:
        wanted = {line.strip().split("@")[0] for line in f}
    keep = [item for item in items if item.nodeid in wanted]
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in wanted])
    items[:] = keep


def pytest_runtest_logfinish(nodeid, location):
    """A kernel fault (an illegal instruction or address) breaks the process's CUDA context
    for good: every later test of the process would fail at its first CUDA call (909 errors
    after two faults, on the first H100 run). After such a test, its report sent, an xdist
    worker exits and xdist starts a fresh one in its place; a run without xdist stops."""
    if not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as error:
        message = f"the CUDA context is broken after {nodeid}: {error}"
        if "PYTEST_XDIST_WORKER" not in os.environ:
            pytest.exit(message, returncode=1)
        print(message, file=sys.stderr, flush=True)
        os._exit(1)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(int(os.environ["ATTNMEM_SEED"]) + zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poison_empty():
    """torch.empty fills with NaN, so an output element a kernel forgets to write fails."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)
