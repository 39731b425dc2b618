"""attnmem: Triton kernels for attention and memory-augmented networks."""

import importlib.util as _util
import os as _os
import sys as _sys

# Installed, the kernels live in attnmem/kernels; in a source checkout run with
# PYTHONPATH=. they sit beside this package in kernels/.
if _util.find_spec("attnmem.kernels") is None:
    _src = _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "kernels")
    _spec = _util.spec_from_file_location("attnmem.kernels", _os.path.join(_src, "__init__.py"),
                                          submodule_search_locations=[_src])
    _sys.modules["attnmem.kernels"] = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_sys.modules["attnmem.kernels"])

from attnmem.attention import attention  # noqa: E402
from attnmem.backend import use_backend  # noqa: E402

__all__ = ["attention", "use_backend"]
__version__ = "0.1.0"
