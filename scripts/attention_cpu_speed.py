"""attnmem.attention on CPU tensors against F.scaled_dot_product_attention, side by side.

At the CPU report's attention points (bench/cases.py, profile "cpu"; float32), each
repetition times one call of each provider in alternating order; the ratio is the median
attnmem time over the median SDPA time, and the spread is the 20th to 80th percentile of
the per-repetition ratios (the machine is shared, so it says how noisy the run was).

    python -m scripts.attention_cpu_speed [--reps 15] [--threads 2]   # from the repo root
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import attnmem
from bench import cases


def _call(provider, mode, q, k, v, causal, grad):
    def forward():
        if provider == "attnmem":
            return attnmem.attention(q, k, v, causal=causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                forward()
        return run
    return lambda: torch.autograd.grad(forward(), (q, k, v), grad)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    points = [p for p in cases.points("attention", "cpu")
              if p["provider"] == "attnmem" and p["mode"] in ("fwd", "fwd_bwd")]
    print("| mode | D | causal | N | attnmem ms | sdpa ms | ratio | p20-p80 of ratios |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    worst = {}
    for point in points:
        n, d, mode = point["x"], point["d"], point["mode"]
        batch, heads = max(1, point["tokens"] // n), max(1, point["width"] // d)
        q, k, v = (torch.randn(batch, heads, n, d, requires_grad=mode != "fwd")
                   for _ in range(3))
        grad = torch.randn(batch, heads, n, d)
        calls = {p: _call(p, mode, q, k, v, point["causal"], grad) for p in ("attnmem", "sdpa")}
        times = {p: [] for p in calls}
        for provider in calls:  # warm-up
            calls[provider]()
        for rep in range(args.reps):
            order = ("attnmem", "sdpa") if rep % 2 == 0 else ("sdpa", "attnmem")
            for provider in order:
                start = time.perf_counter()
                calls[provider]()
                times[provider].append(time.perf_counter() - start)
        ours, theirs = (statistics.median(times[p]) for p in ("attnmem", "sdpa"))
        ratios = sorted(a / b for a, b in zip(times["attnmem"], times["sdpa"]))
        low, high = (ratios[int(f * (len(ratios) - 1))] for f in (0.2, 0.8))
        worst[mode] = max(worst.get(mode, 0.0), ours / theirs)
        print(f"| {mode} | {d} | {point['causal']} | {n} | {ours * 1e3:.2f} | "
              f"{theirs * 1e3:.2f} | {ours / theirs:.3f} | {low:.2f}-{high:.2f} |", flush=True)
    print("worst ratio per mode:", {m: round(r, 3) for m, r in worst.items()})


if __name__ == "__main__":
    main()
