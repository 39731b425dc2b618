"""Elementwise math the kernel files share: tanh, exact or the GPU's own, and when to use
which."""

import torch
import triton
import triton.language as tl

from attnmem.kernels._launch import interpreting

# Hardware tanh from sm_75 (Turing) on: PTX's tanh.approx.f32, one MUFU.TANH instruction.
HARDWARE_TANH_ARCH = (7, 5)


def fast_tanh(x: torch.Tensor) -> bool:
    """Kernels on x may take tanh.approx.f32 for tanh: x is float16 or bfloat16 on an NVIDIA
    GPU of sm_75 or later and the kernel is compiled, not interpreted (triton's interpreter
    runs no inline assembly; ROCm has no such instruction). Its error (2^-11 relative at
    most, see tanh) is at most a 16-bit output's rounding (2^-11 for float16, 2^-8 for
    bfloat16); float32 keeps an exact form."""
    return (x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda and torch.version.hip is None
            and not interpreting()
            and torch.cuda.get_device_capability(x.device) >= HARDWARE_TANH_ARCH)


@triton.jit
def tanh(x, FAST: tl.constexpr = False, SYMMETRIC: tl.constexpr = True):
    """tanh of float32 x. FAST: the hardware's tanh.approx.f32 (one MUFU instruction; PTX ISA
    9.7.3.22: "The maximum relative error over the entire floating point range is 2^-11",
    -+inf give -+1, NaN gives NaN), for the launches fast_tanh allows. Else one of two exact
    forms from one exp2 and one division (libdevice's tanh has no interpreter twin), both
    with exact limits at -+inf and within float32 rounding of float64 in absolute terms,
    which is what the scores of a softmax need:
    SYMMETRIC, from exp2(-2|x|) with x's sign put back: within 1.2e-7 absolute over
    float32's range, 1.8e-5 relative where |tanh x| >= 1e-3, 2e-8 absolute for |x| < 1e-3;
    else 1 - 2 / (e^2x + 1), with no sign to put back: 1.9e-7, 1.1e-4 and 1.2e-7. The
    additive kernels' tanh-bound loops keep the second: in their sm_90 forward's inner loop
    (float16 inputs, 64x32x8 tiles, 8 warps) the first took 1493 instructions a pass where the
    second takes 1103 (reports/additive-tuning.md)."""
    if FAST:
        y = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x],
                                      dtype=tl.float32, is_pure=True, pack=1)
    elif SYMMETRIC:
        t = tl.math.exp2(tl.abs(x) * -2.8853900817779268)
        y = (1.0 - t) / (1.0 + t)
        y = tl.where(x < 0, -y, y)
    else:
        y = 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)
    return y
