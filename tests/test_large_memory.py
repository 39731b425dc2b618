"""Memories past 2^31 elements: the kernels address slots in int64.

An untouched 4 GiB buffer costs no RAM (pages are committed when written), so a memory
viewed with a slot stride of 2^30 elements puts its third slot past element 2^31 while
only a few pages are real. A kernel that addresses in int32 reads or writes elsewhere, or
crashes: the check runs in a subprocess so that a crash fails this test, not the run.
"""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

CHECK = """
import torch, attnmem
from attnmem.reference import memory as twin
device = "{device}"
storage = torch.empty(2**31 + 64, dtype=torch.float16, device=device)
memory = storage.as_strided((1, 3, 16), (0, 2**30, 1))  # slot 2 starts at element 2^31
memory[0] = torch.randn(3, 16, dtype=torch.float16, device=device)
dense = memory.clone().requires_grad_()
keys = torch.randn(1, 2, 16, dtype=torch.float16, device=device, requires_grad=True)
weights = torch.softmax(torch.randn(1, 2, 3, device=device), -1).half()
erase, add = (torch.rand(1, 2, 16, device=device).half() for _ in range(2))

def close(a, b):
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)

with attnmem.use_backend("triton"):
    read = attnmem.memory_attend(memory, keys)
    (dkeys,) = torch.autograd.grad(read.float().sum(), keys)
    close(attnmem.memory_read(memory, weights), twin.memory_read(dense.detach(), weights))
    close(attnmem.memory_write(memory, weights, erase, add),
          twin.memory_write(dense.detach(), weights, erase, add))
    with torch.no_grad():
        attnmem.memory_write(memory, weights, erase, add, inplace=True)
expect = twin.memory_attend(dense, keys, None, None, "cosine", None)[0]
close(read, expect)
close(dkeys, torch.autograd.grad(expect.float().sum(), keys)[0])
close(memory, twin.memory_write(dense.detach(), weights, erase, add))
print("ok")
"""


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs triton")
def test_kernels_address_memory_past_2_31_elements():
    device = "cpu" if INTERPRET else "cuda"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", CHECK.format(device=device)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, (
        f"exit {result.returncode}: {result.stderr[-3000:]}")
