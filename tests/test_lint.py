import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is in the dev extra")
def test_ruff_is_clean():
    result = subprocess.run(["ruff", "check", ROOT], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
