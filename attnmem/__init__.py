"""attnmem: Triton kernels for attention and memory-augmented networks."""

import importlib.util as _util
import os as _os
import sys as _sys

# Installed, the kernels live in attnmem/kernels; in a source checkout (PYTHONPATH=. or an
# editable install) they sit beside this package in kernels/. Importing them imports nothing
# from triton until a kernel module is used.
_here = _os.path.dirname(__file__)
if not _os.path.isdir(_os.path.join(_here, "kernels")):
    _src = _os.path.join(_os.path.dirname(_here), "kernels")
    _spec = _util.spec_from_file_location("attnmem.kernels", _os.path.join(_src, "__init__.py"),
                                          submodule_search_locations=[_src])
    kernels = _sys.modules["attnmem.kernels"] = _util.module_from_spec(_spec)
    _spec.loader.exec_module(kernels)

import torch.distributed as _dist  # noqa: E402

if _dist.is_available():
    # torch.distributed.nn.functional takes group=group.WORLD as default arguments, read
    # when it is first imported. torch imports it lazily (through torch._dynamo, on the
    # first call of any torch.library.custom_op), so a process group
    # made before that call would be held there past destroy_process_group: gloo's threads
    # then live into interpreter shutdown, where they can abort the process ("terminate
    # called without an active exception"). Imported now, before a group exists, the
    # defaults are None.
    import torch.distributed.nn  # noqa: E402, F401

from attnmem.additive import additive_attention, hard_attention, pointer_attention  # noqa: E402
from attnmem.attention import attention, quantize_fp8  # noqa: E402
from attnmem.backend import use_backend  # noqa: E402
from attnmem.kvcache import attention_with_kvcache, kvcache_append  # noqa: E402
from attnmem.memory import (  # noqa: E402
    location_address,
    memory_address,
    memory_attend,
    memory_read,
    memory_write,
)
from attnmem.product_key import product_key_lookup  # noqa: E402
from attnmem.rotary import apply_rotary  # noqa: E402
from attnmem.varlen import attention_varlen  # noqa: E402

__all__ = ["additive_attention", "attention", "attention_varlen", "attention_with_kvcache",
           "hard_attention", "location_address", "memory_address", "memory_attend",
           "memory_read", "memory_write", "pointer_attention", "product_key_lookup",
           "quantize_fp8", "use_backend", "apply_rotary", "kvcache_append"]
__version__ = "0.1.0"
