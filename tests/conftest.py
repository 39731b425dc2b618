import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs each run, reproducible from the printed seed on failure.
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("ATTNMEM_FRESH") else 0
    torch.manual_seed(seed + hash(request.node.nodeid) % (1 << 30))
