"""NTM training steps per second on the copy task (issue 15): attnmem's NTM against the
same model in eager torch and under torch.compile, and from CUDA graphs on a GPU.

    python -m bench.ntm [--quick | --smoke] [--out reports] [--providers P ...]

writes DIR/<device-slug>/ntm.json (every point: median and 20th/80th percentile ms per
step) and ntm.md, after each point. The points are bench.cases.ntm_points; a provider that
cannot run here (CUDA graphs on a CPU) is listed with the reason.
"""

import argparse
import json
import os

import torch

from bench import cases, timing


def write(out_dir, meta, rows, unavailable):
    """out_dir/ntm.json and ntm.md."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "ntm.json"), "w") as f:
        json.dump(dict(meta=meta, unavailable=unavailable, results=rows), f, indent=1)
    sizes = cases.NTM_SIZES[meta["profile"]]
    md = [f"# NTM training steps: {meta['device']}", "",
          f"Copy task: a {sizes['slots']} x {sizes['width']} memory, batch {sizes['batch']}, "
          f"{sizes['heads']} read and {sizes['heads']} write heads, an LSTM controller of 100; "
          "one step is the forward over 2L + 1 time steps, the loss, the backward and Adam. "
          "Training steps per second (median; ms in ntm.json).", ""]
    if meta["device_type"] == "cpu":
        md += ["On a CPU, attnmem's NTM runs the pure-torch twins: `attnmem` and `eager` "
               "run the same torch code.", ""]
    providers = [p for p in cases.NTM_PROVIDERS if any(r["provider"] == p for r in rows)]
    md += ["| L | " + " | ".join(providers) + " |", "|" + " --- |" * (len(providers) + 1)]
    for x in sizes["x"]:
        cells = {r["provider"]: r["steps_per_s"] for r in rows if r["x"] == x}
        md.append(f"| {x} | " + " | ".join(f"{cells[p]:.1f}" if p in cells else "-"
                                           for p in providers) + " |")
    md += [""] + [f"- {p}: not measured: {why}" for p, why in unavailable.items()]
    md += ["", "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in meta.items()]
    with open(os.path.join(out_dir, "ntm.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.ntm", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="copy length 5 only")
    parser.add_argument("--smoke", action="store_true", help="a tiny NTM: checks the harness")
    parser.add_argument("--out", default="reports")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", nargs="+", choices=cases.NTM_PROVIDERS,
                        default=cases.NTM_PROVIDERS, help="the providers to time (all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1: interpreter timings are not performance")
    device = torch.device(args.device)
    profile = "smoke" if args.smoke else "quick" if args.quick else device.type
    budget_s = 0.02 if args.smoke else 0.5
    meta = dict(timing.environment(device), profile=profile)
    out_dir = os.path.join(args.out, timing.device_slug(device))
    rows, unavailable = [], {}
    for point in cases.ntm_points(profile):
        if point["provider"] in unavailable or point["provider"] not in args.providers:
            continue
        try:
            fn, _ = cases.build_ntm(point, device)
            median, p20, p80 = timing.measure(fn, device, budget_s)
        except (ValueError, RuntimeError) as e:
            unavailable[point["provider"]] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            continue
        rows.append(dict(point, median_ms=median, p20_ms=p20, p80_ms=p80,
                         steps_per_s=1e3 / median))
        print(f"{point['provider']:16s} L={point['x']:3d}: {1e3 / median:8.1f} steps/s",
              flush=True)
        write(out_dir, meta, rows, unavailable)  # what was measured stays, should it be killed
    write(out_dir, meta, rows, unavailable)
    print(f"wrote {out_dir}/ntm.md and ntm.json")


if __name__ == "__main__":
    main()
