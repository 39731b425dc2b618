"""Where a call's time goes, on the host and on the device: the `profile` part of
scripts/gpu_report.sh, for the points of the gpu-check sweep whose speed left a question
open (FOCUS). For each provider at each point, after warm-up calls (compilation,
autotuning):

- host_ms: the host's time to issue one call (a run of calls, no synchronisation between
  them), and wall_ms: the same run's time per call up to the device's last result;
- device_ms and kernels: the device's kernel time and kernel count per call, and its
  kernels taking the most time, from torch.profiler;
- python: the host functions taking the most time of their own (cProfile), for attnmem's
  providers: whether its wrapper, the autotuner or triton's launcher holds a call up.

Where wall_ms is close to host_ms and well above device_ms, the host bounds the call.

    python -m bench.trace OUT_DIR --profile P --deadline EPOCH [--calls N]

writes OUT_DIR/profile.json and OUT_DIR/profile.md.
"""

import argparse
import cProfile
import json
import os
import pstats
import shutil
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import cases, timing

# The points to profile: op, mode, providers, the swept size ("smallest" or "largest") and
# the other fields a point must have (dv=None: no separate value head dim). Why each:
FOCUS = (
    # Decoding one token at batch 1 from 4096 cached tokens took 0.57 ms (15 GB/s) on an
    # H100: is it the host?
    dict(op="decode", mode="fwd", providers=("attnmem", "sdpa"), x="smallest", batch=1,
         dv=None),
    # memory_attend streams memory at 21% of the copy roof at 4e6 slots,
    dict(op="memory_attend", mode="fwd", providers=("attnmem", "eager"), x="largest"),
    # and takes 1.05 ms at 1e4 slots (20 MB) against 3.2 ms at 1e6 (2 GB): a fixed
    # millisecond, on the host or the device?
    dict(op="memory_attend", mode="fwd", providers=("attnmem", "eager"), x="smallest"),
    # memory_write at 1e4 slots: 2.6x slower than eager (launch-bound?).
    dict(op="memory_write", mode="fwd", providers=("attnmem", "eager"), x="smallest"),
    # The backward reaches 50% of the matmul roof, cuDNN 1.44x faster.
    dict(op="attention", mode="bwd", providers=("attnmem", "sdpa"), x="largest", d=128,
         dv=None, causal=False),
    # The largest gap to cuDNN: short causal forwards (174 vs 339 TFLOP/s at N 1024).
    dict(op="attention", mode="fwd", providers=("attnmem", "sdpa"), x="smallest", d=64,
         dv=None, causal=True),
)
TOP = 8  # kernels and host functions listed per call


def focus_points(profile_name):
    """The points of FOCUS in the profile's sweep; a field that no point has at the asked
    value (the smoke profile's head dims) is not matched."""
    out = []
    for focus in FOCUS:
        found = [p for p in cases.points(focus["op"], profile_name)
                 if p["mode"] == focus["mode"] and p["provider"] in focus["providers"]]
        for field, value in focus.items():
            if field not in ("op", "mode", "providers", "x"):
                found = [p for p in found if p.get(field) == value] or found
        if found:
            pick = (min if focus["x"] == "smallest" else max)(p["x"] for p in found)
            out += [p for p in found if p["x"] == pick]
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_time(event):
    """An averaged profiler event's own device time in microseconds."""
    return event.self_device_time_total


def profile_point(point, device, calls):
    """The point's host, wall and device times per call, its top kernels and (attnmem's
    providers) its top host functions."""
    fn, _ = cases.build(point, device)
    for _ in range(3):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    _sync(device)
    wall = time.perf_counter() - start
    row = dict(point, calls=calls, host_ms=host * 1e3 / calls, wall_ms=wall * 1e3 / calls)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    kernels = [e for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA and _device_time(e) > 0]
    row["device_ms"] = sum(_device_time(e) for e in kernels) / 1e3 / calls
    row["kernels"] = sum(e.count for e in kernels) / calls
    row["top_kernels"] = [dict(name=e.key[:120], us=_device_time(e) / calls,
                               count=e.count / calls)
                          for e in sorted(kernels, key=_device_time, reverse=True)[:TOP]]
    if point["provider"].startswith("attnmem"):
        row["python"] = _host_functions(fn, calls)
        _sync(device)
    return row


def _host_functions(fn, calls):
    """The TOP host functions by their own time over `calls` calls (cProfile)."""
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [fn() for _ in range(calls)])
    stats = pstats.Stats(profiler).stats
    rows = [dict(function=f"{os.path.basename(file)}:{line} {name}", us=own * 1e6 / calls,
                 count=n / calls)
            for (file, line, name), (_, n, own, _, _) in stats.items()]
    return sorted(rows, key=lambda r: r["us"], reverse=True)[:TOP]


def write(out_dir, meta, rows):
    with open(os.path.join(out_dir, "profile.json"), "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    md = [f"# Where the time goes: {meta['device']}", "",
          f"commit {meta['commit']}, torch {meta['torch']}, triton {meta['triton']}; ncu: "
          f"{meta['ncu'] or 'not found'}, nsys: {meta['nsys'] or 'not found'}. Per call, "
          "after warm-up: host_ms, the host's time to issue it; wall_ms, until the device is "
          "done; device_ms, the device's kernel time (torch.profiler); kernels launched. "
          "wall close to host and well above device: the host bounds the call.", "",
          "| op | provider | mode | point | host_ms | wall_ms | device_ms | kernels |",
          "|" + " --- |" * 8]
    skip = ("op", "provider", "mode", "calls", "host_ms", "wall_ms", "device_ms", "kernels",
            "top_kernels", "python", "error")
    for r in rows:
        point = " ".join(f"{k}={v}" for k, v in r.items() if k not in skip)
        if "error" in r:
            md.append(f"| {r['op']} | {r['provider']} | {r['mode']} | {point} | "
                      f"{r['error']} | | | |")
            continue
        md.append(f"| {r['op']} | {r['provider']} | {r['mode']} | {point} | "
                  f"{r['host_ms']:.3f} | {r['wall_ms']:.3f} | {r['device_ms']:.3f} | "
                  f"{r['kernels']:g} |")
    for r in rows:
        if "error" in r:
            continue
        md += ["", f"## {r['op']} {r['mode']} x={r['x']}: {r['provider']}", ""]
        md += [f"- {k['us']:.1f} µs × {k['count']:g}: `{k['name']}`" for k in r["top_kernels"]]
        if r.get("python"):
            md += ["", "Host functions by own time (µs a call):", ""]
            md += [f"- {h['us']:.1f} µs × {h['count']:g}: `{h['function']}`"
                   for h in r["python"]]
    with open(os.path.join(out_dir, "profile.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.trace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--profile", choices=cases.PROFILES, default="gpu-check")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds since the epoch: no point starts after it")
    parser.add_argument("--calls", type=int, default=20, help="calls timed and traced")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = timing.environment(device)
    # Whether Nsight Compute and Systems are there, for a next look at a kernel's limits.
    meta.update(ncu=shutil.which("ncu"), nsys=shutil.which("nsys"))
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for point in focus_points(args.profile):
        if time.time() > args.deadline:
            rows.append(dict(point, error="not reached within the time budget"))
            continue
        try:
            rows.append(profile_point(point, device, args.calls))
        except Exception as e:  # noqa: BLE001 - one point's failure is its own row
            rows.append(dict(point, error=f"{type(e).__name__}: {str(e)[:200]}"))
        print(f"{point['op']} {point['provider']} x={point['x']}: done", flush=True)
        write(args.out, meta, rows)  # what was profiled stays, should the step be killed
    write(args.out, meta, rows)


if __name__ == "__main__":
    main()
