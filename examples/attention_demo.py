"""Check attnmem.attention against torch's scaled_dot_product_attention and time both.

Runs on the GPU when there is one (the Triton kernels, fp16) and on the CPU otherwise, where
attnmem runs its pure-torch fallback: CPU timings say nothing about the kernels.

    python examples/attention_demo.py [--seq 1024] [--heads 8] [--head-dim 64]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import attnmem


def median_ms(fn, device, reps):
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4 if cuda else 2)
    parser.add_argument("--heads", type=int, default=16 if cuda else 8)
    parser.add_argument("--seq", type=int, default=4096 if cuda else 1024)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=20 if cuda else 5)
    args = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    backend = "triton kernels" if cuda else "pure-torch fallback (CPU)"
    print(f"attnmem {attnmem.__version__} on {torch.cuda.get_device_name() if cuda else 'CPU'}"
          f" | {backend} | torch {torch.__version__}")
    print(f"B={args.batch} H={args.heads} N={args.seq} D={args.head_dim} {dtype}\n")

    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(shape, device=device, dtype=dtype)
    for causal in (False, True):
        ours = attnmem.attention(q, k, v, causal=causal)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        grads = torch.autograd.grad(ours, (q, k, v), dout)
        expect = torch.autograd.grad(theirs, (q, k, v), dout)
        err = max((a.float() - b.float()).abs().max().item()
                  for a, b in zip((ours, *grads), (theirs, *expect)))
        print(f"causal={causal}: max |attnmem - sdpa| over out, dq, dk, dv: {err:.2e}")
        for label, backward in (("forward", False), ("forward + backward", True)):
            times = {}
            for name, fn in (("attnmem", lambda c: attnmem.attention(q, k, v, causal=c)),
                             ("sdpa", lambda c: F.scaled_dot_product_attention(
                                 q, k, v, is_causal=c))):
                def step(fn=fn, causal=causal, backward=backward):
                    out = fn(causal)
                    if backward:
                        torch.autograd.grad(out, (q, k, v), dout)
                times[name] = median_ms(step, device, args.reps)
            print(f"  {label:<20} attnmem {times['attnmem']:9.2f} ms   "
                  f"sdpa {times['sdpa']:9.2f} ms")

if __name__ == "__main__":
    main()
