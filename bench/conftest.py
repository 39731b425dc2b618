import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.exit("TRITON_INTERPRET=1 runs Triton kernels through its interpreter, whose timings "
                "are not performance: unset it to benchmark", returncode=2)
