"""Compile a Triton kernel for a GPU target on a machine without a GPU."""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def compile_for(fn, arch, constexprs, pointer_types, num_warps, num_stages):
    """fn compiled for sm_<arch>. pointer_types maps each pointer argument to its element
    type ("fp16", "fp32", "i32"); other arguments are float32 if named *scale, else int32.
    Pointers and strides are declared 16-divisible, as aligned torch tensors make them."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(pointer_types) - set(fn.arg_names)
    if missing:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(missing)}")
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
