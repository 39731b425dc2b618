"""flash-attention's tolerance rule for comparing an op with float64."""

import torch

# A few rounding units of each dtype at magnitude 1.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_float64(got, expect, base, dtype, condition=1.0):
    """Each of `got` (outputs and gradients in `dtype`) is finite and within twice the error
    of `base` (torch on the same rounded inputs) of `expect` (float64), plus rounding units
    scaled by the largest value compared and by `condition` (the op's sensitivity, e.g. the
    largest logit for softmax weights recomputed from a logsumexp), a number or one per
    output."""
    conditions = condition if isinstance(condition, (list, tuple)) else [condition] * len(got)
    for i, (o, e, t, condition) in enumerate(zip(got, expect, base, conditions, strict=True)):
        assert o.dtype == dtype and torch.isfinite(o).all(), f"output {i}"
        err, base_err = ((x.double() - e).abs().max().item() for x in (o, t))
        atol = ATOL[dtype] * max(1.0, e.abs().max().item()) * condition
        assert err <= 2 * base_err + atol, f"output {i}: error {err:.3g}, torch's {base_err:.3g}"
