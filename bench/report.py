"""The report command: sweep the points of bench.cases, time each, and write
DIR/<device-slug>/ results.json (every point with its median and 20th/80th percentiles),
report.md (tables) and PNG plots."""

import argparse
import importlib.util
import json
import math
import os
import sys

import torch
from tqdm import tqdm

from bench import cases, timing

UNITS = {"cuda": ("TFLOP/s", 1e12), "cpu": ("GFLOP/s", 1e9)}
CPU_NOTE = ("**This is a CPU report.** On a CPU, attnmem runs its torch backend: torch's "
            "fused flash-attention kernel for attention (the one SDPA uses) and its pure-torch "
            "twins for the other ops. Its Triton kernels need a GPU, and Triton interpreter "
            "timings are never reported, so these numbers compare torch implementations on "
            "this CPU and say nothing about attnmem's kernels. Peak memory is measured on CUDA "
            "only.")


def _availability(op, device):
    """provider -> None if it runs here, else the reason it does not."""
    reasons = {}
    profile_point = cases.points(op, "smoke")
    for provider in cases.PROVIDERS[op]:
        point = next(p for p in profile_point if p["provider"] == provider)
        try:
            fn, _ = cases.build(point, device)
            fn()
            reasons[provider] = None
        except Exception as e:  # noqa: BLE001 - any failure means "not on this machine"
            reasons[provider] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return reasons


def run_point(point, device, budget_s):
    fn, work = cases.build(point, device)
    # What the point's autotuned kernels ran (kernels/_launch.py), where any is loaded.
    launch = sys.modules.get("attnmem.kernels._launch")
    if launch is not None:
        launch.LAST_CONFIGS.clear()
        launch.LAST_TUNING.clear()
    median, p20, p80 = timing.measure(fn, device, budget_s)
    row = dict(point, median_ms=median, p20_ms=p20, p80_ms=p80,
               peak_mib=timing.peak_memory_mib(fn, device))
    if launch is not None and launch.LAST_CONFIGS:
        row["configs"] = {name: launch.config_text(c)
                          for name, c in sorted(launch.LAST_CONFIGS.items())}
    if launch is not None and launch.LAST_TUNING:
        row["tuning_ms"] = dict(sorted(launch.LAST_TUNING.items()))
    if work is not None:
        per_s = work / (median * 1e-3)
        flops = point["op"] in ("attention", "varlen")
        row["tflops" if flops else "gbs"] = per_s / (1e12 if flops else 1e9)
    return row


def sweep(ops, profile, device, budget_s):
    unavailable, todo = {}, []
    for op in ops:
        reasons = _availability(op, device)
        unavailable.update({f"{op}/{p}": r for p, r in reasons.items() if r})
        todo += [p for p in cases.points(op, profile) if not reasons[p["provider"]]]
    rows = []
    # disable=None: a live bar on a terminal, nothing on a pipe or a log file
    progress = tqdm(todo, unit="point", disable=None, dynamic_ncols=True)
    for point in progress:
        progress.set_postfix_str(" ".join(f"{k}={v}" for k, v in point.items() if k in (
            "op", "provider", "mode", "x", "d", "dv", "causal")), refresh=False)
        try:
            rows.append(run_point(point, device, budget_s))
        except torch.OutOfMemoryError:
            rows.append(dict(point, error="out of memory"))
        except RuntimeError as e:
            rows.append(dict(point, error=str(e).splitlines()[0][:200]))
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows, unavailable


MEASURED = ("provider", "median_ms", "p20_ms", "p80_ms", "peak_mib", "tflops", "gbs", "error",
            "configs", "tuning_ms")
FASTEST = "fastest baseline"


def ratios(rows):
    """attnmem's median time over each baseline's at the same point, and over the fastest
    baseline's there: dicts of the point's fields, provider (attnmem's), baseline and ratio.
    Above 1, attnmem is slower."""
    points = {}
    for row in rows:
        if "median_ms" in row:
            key = tuple((k, v) for k, v in row.items() if k not in MEASURED)
            points.setdefault(key, {})[row["provider"]] = row["median_ms"]
    out = []
    for key, times in points.items():
        baselines = {p: t for p, t in times.items() if not p.startswith("attnmem")}
        if len(baselines) > 1:
            baselines[FASTEST] = min(baselines.values())
        for provider in sorted(p for p in times if p.startswith("attnmem")):
            out += [dict(key, provider=provider, baseline=b, ratio=times[provider] / t)
                    for b, t in baselines.items()]
    return out


def _ratio_table(point_ratios, **match):
    """A markdown table of attnmem's time over each baseline's: a row per swept size."""
    found = [r for r in point_ratios if all(r.get(k) == v for k, v in match.items())]
    if not found:
        return ""
    columns = sorted({(r["provider"], r["baseline"]) for r in found},
                     key=lambda c: (c[0], c[1] == FASTEST, c[1]))
    cells = {(r["provider"], r["baseline"], r["x"]): r["ratio"] for r in found}
    lines = ["| N | " + " | ".join(f"{p} ÷ {b}" for p, b in columns) + " |",
             "|" + " --- |" * (len(columns) + 1)]
    for x in sorted({r["x"] for r in found}):
        lines.append(f"| {x} | " + " | ".join(
            f"{cells[(p, b, x)]:.2f}×" if (p, b, x) in cells else "-" for p, b in columns) + " |")
    return "\n".join(lines) + "\n"


def _ratio_summary(point_ratios):
    """A markdown table: per op, mode, attnmem provider and baseline, the range and geometric
    mean of attnmem's time over the baseline's across the swept points."""
    groups = {}
    for r in point_ratios:
        groups.setdefault((r["op"], r["mode"], r["provider"], r["baseline"]), []).append(
            r["ratio"])
    lines = ["| op | mode | attnmem | baseline | points | min | geometric mean | max |",
             "|" + " --- |" * 8]
    for (op, mode, provider, baseline), values in sorted(groups.items(), key=lambda g: (
            cases.OPS.index(g[0][0]), cases.MODES[g[0][0]].index(g[0][1]), g[0][2],
            g[0][3] == FASTEST, g[0][3])):
        mean = math.exp(sum(map(math.log, values)) / len(values))
        lines.append(f"| {op} | {mode} | {provider} | {baseline} | {len(values)} | "
                     f"{min(values):.2f}× | {mean:.2f}× | {max(values):.2f}× |")
    return "\n".join(lines) + "\n"


def _attention_title(mode, d, dv, causal):
    dims = f"head dim {d}" if dv is None else f"head dims {d}/{dv}"
    return f"{mode}, {dims}, {'causal' if causal else 'not causal'}"


def _series(rows, key, **match):
    """{provider: [(x, value)]} of the rows matching, errors left out."""
    out = {}
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and row.get(key) is not None:
            out.setdefault(row["provider"], []).append((row["x"], row[key]))
    return out


NO_PLOTS = "matplotlib is not installed, so no plots were drawn"


def _can_plot():
    return importlib.util.find_spec("matplotlib") is not None


def _plot(path, panels, xlabel, ylabel, roof=None, logy=False):
    """panels: [(title, {provider: [(x, y)]})] side by side; roof: a horizontal line.
    Without matplotlib nothing is drawn (write_report says so)."""
    if not _can_plot():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for provider, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", ms=3, label=provider,
                    lw=2.5 if provider.startswith("attnmem") else 1.2)
        if roof:
            ax.axhline(roof[1], color="k", ls="--", lw=1, label=roof[0])
        if series:
            ax.set_xscale("log", base=2 if max(x for s in series.values() for x, _ in s) < 1e5
                          else 10)
        else:  # each point cut by the sweep's deadline or failed (the report's "Not measured")
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows, key, fmt, label, **match):
    """A markdown table of key: a row per swept size, a column per provider."""
    series = _series(rows, key, **match)
    if not series:
        return ""
    providers = sorted(series)
    xs = sorted({x for s in series.values() for x, _ in s})
    lines = [f"| {label} | " + " | ".join(providers) + " |",
             "|" + " --- |" * (len(providers) + 1)]
    for x in xs:
        cells = [fmt.format(dict(series[p]).get(x)) if x in dict(series[p]) else "-"
                 for p in providers]
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _configs_section(rows):
    """Markdown lines: the config each autotuned kernel ran at each point attnmem was timed
    at (a row's "configs"), folded away under a <details> block."""
    tuned = [r for r in rows if r.get("configs")]
    if not tuned:
        return []
    md = ["## Configs the autotuner picked", "", "<details><summary>The config each of "
          "attnmem's autotuned kernels ran at each timed point (its latest launch there), "
          "and where the point tuned it, how many configs it timed and the slowest's time "
          "over the fastest's (each config's time: tuning_ms in results.json); "
          f"{len(tuned)} points</summary>", "", "| op | provider | mode | point | kernel | "
          "config | tuned over |", "|" + " --- |" * 7]
    for r in tuned:
        point = " ".join(f"{k}={v}" for k, v in r.items()
                         if k not in (*MEASURED, "op", "mode"))
        for kernel, config in r["configs"].items():
            times = [t for t in r.get("tuning_ms", {}).get(kernel, {}).values()
                     if math.isfinite(t)]
            spread = f"{len(times)}: {max(times) / min(times):.2f}×" if times else ""
            md.append(f"| {r['op']} | {r['provider']} | {r['mode']} | {point} | {kernel} | "
                      f"{config} | {spread} |")
    return md + ["", "</details>", ""]


def write_report(out_dir, meta, rows, unavailable):
    os.makedirs(out_dir, exist_ok=True)
    if not _can_plot():
        unavailable = {**unavailable, "plots": NO_PLOTS}
    point_ratios = ratios(rows)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(meta=meta, unavailable=unavailable, results=rows, ratios=point_ratios),
                  f, indent=1)
    kind = meta["device_type"]
    unit, scale = UNITS[kind]
    md = [f"# attnmem benchmarks: {meta['device']}", ""]
    if kind == "cpu":
        md += [CPU_NOTE, ""]
    md += ["| | |", "| --- | --- |"] + [f"| {k} | {v:.1f} |" if isinstance(v, float) else
                                         f"| {k} | {v} |" for k, v in meta.items()] + [""]
    md += ["Each value is the median of repeated calls; results.json also holds the 20th and "
           "80th percentiles. attnmem's lines are drawn thick.", ""]
    if point_ratios:
        md += ["## attnmem against the baselines", "", "attnmem's median time divided by "
               "each baseline's at the same point (below 1: attnmem is faster; 1.10× is 10% "
               f"slower), and by the {FASTEST}'s at each point; the range and geometric mean "
               "over the swept points. Each op's section has them point by point.", "",
               _ratio_summary(point_ratios)]
    ops = [op for op in cases.OPS if any(r["op"] == op for r in rows)]

    if "attention" in ops:
        configs = sorted({(r["mode"], r["d"], r.get("dv"), r["causal"]) for r in rows
                          if r["op"] == "attention"}, key=lambda c: (
            cases.MODES["attention"].index(c[0]), c[2] is not None, c[1], c[2] or 0, c[3]))
        panels = []
        for mode, d, dv, causal in configs:
            series = {p: [(x, y * 1e12 / scale) for x, y in s] for p, s in _series(
                rows, "tflops", op="attention", mode=mode, d=d, dv=dv, causal=causal).items()}
            panels.append((_attention_title(mode, d, dv, causal), series))
        roof = meta.get("bf16_matmul_tflops")  # measured by the GPU check
        _plot(os.path.join(out_dir, "attention.png"), panels, "sequence length", unit,
              roof=None if roof is None else ("bf16 matmul", roof * 1e12 / scale))
        md += ["## Attention", "", f"{unit} (FlashAttention's count: forward 4·B·H·N²·D, "
               "halved when causal; backward 2.5× forward; with a value head dim Ev apart "
               "from D, forward 2·B·H·N²·(D + Ev) and backward 2·B·H·N²·(3·D + 2·Ev)) "
               "against sequence length, at a fixed number of tokens per batch.", "",
               "![attention](attention.png)", ""]
        for mode, d, dv, causal in configs:
            match = dict(op="attention", mode=mode, d=d, dv=dv, causal=causal)
            md += [f"**{_attention_title(mode, d, dv, causal)}** ({unit})", "", _table(
                       [dict(r, tflops=r["tflops"] * 1e12 / scale) for r in rows
                        if "tflops" in r], "tflops", "{:.3g}", label="N", **match),
                   "attnmem's time ÷ each baseline's:", "",
                   _ratio_table(point_ratios, **match)]
        memory_panels = [(_attention_title(mode, d, dv, c), _series(
            rows, "peak_mib", op="attention", mode=mode, d=d, dv=dv, causal=c))
            for mode, d, dv, c in configs if mode == "fwd_bwd"]
        if kind == "cuda" and memory_panels:  # none where the sweep stopped before fwd_bwd
            _plot(os.path.join(out_dir, "attention_memory.png"), memory_panels,
                  "sequence length", "peak MiB", logy=True)
            md += ["Peak memory of forward and backward:", "",
                   "![attention memory](attention_memory.png)", ""]

    memory_ops = [op for op in ops if op.startswith("memory")]
    if memory_ops:
        # (width, dtype) of the points: a point without a dtype has dtype_for's.
        widths = sorted({(r["d"], r.get("dtype")) for r in rows if r["op"] in memory_ops},
                        key=lambda w: (w[0], w[1] or ""))
        names = {w: f"width {w[0]}" + (f", {w[1]}" if w[1] else "") for w in widths}
        panels = [(f"{op}, {names[d, t]}", _series(rows, "gbs", op=op, d=d, dtype=t))
                  for op in memory_ops for d, t in widths]
        _plot(os.path.join(out_dir, "memory.png"), panels, "memory slots N", "GB/s",
              roof=("copy bandwidth", meta["copy_bandwidth_gbs"]))
        md += ["## Memory ops", "", "GB/s (each input read once, each output written once) "
               "against memory size; the dashed line is this device's measured copy "
               f"bandwidth, {meta['copy_bandwidth_gbs']:.1f} GB/s. memory_attend: "
               f"{cases.READ_HEADS} read heads, cosine similarity; memory_write: "
               f"{cases.WRITE_HEADS} write head.", "", "![memory](memory.png)", ""]
        for op in memory_ops:
            for d, t in widths:
                md += [f"**{op}, {names[d, t]}** (GB/s)", "",
                       _table(rows, "gbs", "{:.3g}", op=op, d=d, dtype=t, label="N"),
                       "attnmem's time ÷ each baseline's:", "",
                       _ratio_table(point_ratios, op=op, d=d, dtype=t)]

    for op, title, what in (("additive", "Additive attention",
                             "Bahdanau attention, forward and forward+backward"),
                            ("mha", "Multi-head attention layers",
                             "self-attention layers, need_weights=False")):
        if op not in ops:
            continue
        modes = cases.MODES[op]
        panels = [(f"{op} {mode}, time", _series(rows, "median_ms", op=op, mode=mode))
                  for mode in modes]
        if kind == "cuda":
            panels += [(f"{op} {mode}, peak memory", _series(rows, "peak_mib", op=op,
                                                             mode=mode)) for mode in modes]
        _plot(os.path.join(out_dir, f"{op}.png"), panels, "sequence length",
              "ms (time) / MiB (memory)", logy=True)
        md += [f"## {title}", "", f"Time in ms, {what}.", "", f"![{op}]({op}.png)", ""]
        for mode in modes:
            md += [f"**{mode}** (ms)", "", _table(rows, "median_ms", "{:.3g}", op=op,
                                                  mode=mode, label="N"),
                   "attnmem's time ÷ each baseline's:", "",
                   _ratio_table(point_ratios, op=op, mode=mode)]
            if kind == "cuda":
                md += [f"**{mode}** (peak MiB)", "", _table(rows, "peak_mib", "{:.0f}", op=op,
                                                            mode=mode, label="N")]
    if "decode" in ops:
        batches = sorted({r["batch"] for r in rows if r["op"] == "decode"})
        point = next(r for r in rows if r["op"] == "decode")
        # The mla points (a value head dim dv) get tables of their own below.
        mla = sorted({(r["heads"], r["d"], r["dv"]) for r in rows
                      if r["op"] == "decode" and r.get("dv")})
        _plot(os.path.join(out_dir, "decode.png"),
              [(f"decode, batch {b}", _series(rows, "gbs", op="decode", batch=b, dv=None))
               for b in batches], "cached tokens", "GB/s",
              roof=("copy bandwidth", meta["copy_bandwidth_gbs"]))
        md += ["## Decoding from a KV cache", "", "GB/s (the cache read once, the query read "
               "and the output written once) against the cached tokens per sequence: one new "
               f"query token, {point['heads']} query heads over {point['kv_heads']} kv heads, "
               f"head dim {point['d']}; attnmem-paged reads the same cache through a shuffled "
               f"table of {point['page_size']}-token pages; attnmem-fp8 reads an e4m3 copy "
               "of the cache (one scale per batch entry and kv head), and its GB/s count "
               "those bytes, half the others'. The dashed line is this device's "
               "measured copy bandwidth.", "", "![decode](decode.png)", ""]
        for b in batches:
            md += [f"**batch {b}** (GB/s)", "",
                   _table(rows, "gbs", "{:.3g}", op="decode", batch=b, dv=None, label="N"),
                   "attnmem's time ÷ each baseline's:", "",
                   _ratio_table(point_ratios, op="decode", batch=b, dv=None)]
        if mla:
            md += ["Absorbed multi-head latent attention (DeepSeek-V2/V3's decoding): one "
                   "latent kv head whose first Ev columns are the values (attnmem reads them "
                   "as a view of the key cache, once), GB/s counting that cache once; twin: "
                   "attention_with_kvcache on the torch backend.", ""]
        for heads, d, dv in mla:
            for b in batches:
                match = dict(op="decode", batch=b, heads=heads, d=d, dv=dv)
                md += [f"**{heads} query heads, head dims {d}/{dv}, batch {b}** (GB/s)", "",
                       _table(rows, "gbs", "{:.3g}", label="N", **match),
                       "attnmem's time ÷ each baseline's:", "",
                       _ratio_table(point_ratios, **match)]
    if "varlen" in ops:
        configs = sorted({(r["mode"], r["causal"]) for r in rows if r["op"] == "varlen"},
                         key=lambda c: (cases.MODES["varlen"].index(c[0]), c[1]))
        point = next(r for r in rows if r["op"] == "varlen")
        panels = [(f"varlen {mode}, {'causal' if causal else 'not causal'}",
                   {p: [(x, y * 1e12 / scale) for x, y in s] for p, s in _series(
                       rows, "tflops", op="varlen", mode=mode, causal=causal).items()})
                  for mode, causal in configs]
        _plot(os.path.join(out_dir, "varlen.png"), panels, "longest sequence", unit)
        md += ["## Packed variable-length batches", "", f"Useful {unit} (each sequence's own "
               "attention, FlashAttention's count) against the longest sequence x of a batch "
               f"of {point['batch']} sequences, the others uniform in [1, x]; "
               f"{point['heads']} heads, head dim {point['d']}. attnmem: attention_varlen on "
               "the packed batch (attnmem-fp8: on its e4m3 copy, one scale per sequence and "
               "head, forward only); padded: the batch padded to x through attnmem.attention "
               "with kv_lengths.", "", "![varlen](varlen.png)", ""]
        for mode, causal in configs:
            what = f"{mode}, {'causal' if causal else 'not causal'}"
            md += [f"**{what}** ({unit})", "", _table(
                       [dict(r, tflops=r["tflops"] * 1e12 / scale) for r in rows
                        if "tflops" in r], "tflops", "{:.3g}", op="varlen", mode=mode,
                       causal=causal, label="longest"),
                   "attnmem's time ÷ padded's:", "",
                   _ratio_table(point_ratios, op="varlen", mode=mode, causal=causal)]
    if "product_key" in ops:
        point = next(r for r in rows if r["op"] == "product_key")
        modes = cases.MODES["product_key"]
        _plot(os.path.join(out_dir, "product_key.png"), [
            ("product_key fwd", _series(rows, "gbs", op="product_key", mode="fwd"))],
            "value rows n_keys²", "GB/s", roof=("copy bandwidth", meta["copy_bandwidth_gbs"]),
            logy=True)
        panels = [(f"product_key {mode}, time", _series(rows, "median_ms", op="product_key",
                                                        mode=mode)) for mode in modes]
        if kind == "cuda":
            panels += [(f"product_key {mode}, peak memory", _series(
                rows, "peak_mib", op="product_key", mode=mode)) for mode in modes]
        _plot(os.path.join(out_dir, "product_key_time.png"), panels, "value rows n_keys²",
              "ms (time) / MiB (memory)", logy=True)
        md += ["## Product-key memory", "", f"A lookup of {point['batch']} query tokens, "
               f"{point['heads']} heads, query width {point['dk']}, top {point['topk']}, into "
               f"a table of n_keys² value rows of width {point['dv']}, forward (fwd) and "
               "forward+backward with gradients for the queries, the keys and the values "
               "(fwd_bwd). attnmem: `product_key_lookup`; attnmem-sparse: the same with "
               "sparse=True (the values' gradient a sparse tensor of the touched rows, for "
               "sparse optimisers; the same forward); eager: two torch.topk, the "
               "Cartesian sum, a topk, softmax and F.embedding_bag, as users write it; dense: "
               "`memory_attend` with the same queries over every row's product key (softmax "
               "over all rows, no top-k). GB/s of the forward count the bytes a lookup "
               "needs, the same for every provider: each selected row read once per "
               "selection (B·H·k·Dv), the sub-keys and queries read once, the output written "
               "once. The dashed line is this device's measured copy bandwidth.", "",
               "![product_key](product_key.png)", "",
               "![product_key time](product_key_time.png)", "",
               "**fwd** (GB/s)", "",
               _table(rows, "gbs", "{:.3g}", op="product_key", mode="fwd", label="rows")]
        for mode in modes:
            md += [f"**{mode}** (ms)", "",
                   _table(rows, "median_ms", "{:.3g}", op="product_key", mode=mode,
                          label="rows"),
                   "attnmem's time ÷ each baseline's:", "",
                   _ratio_table(point_ratios, op="product_key", mode=mode)]
            if kind == "cuda":
                md += [f"**{mode}** (peak MiB)", "", _table(
                    rows, "peak_mib", "{:.0f}", op="product_key", mode=mode, label="rows")]
    if "rotary" in ops:
        point = next(r for r in rows if r["op"] == "rotary")
        modes = cases.MODES["rotary"]
        _plot(os.path.join(out_dir, "rotary.png"), [
            (f"rotary {mode}", _series(rows, "gbs", op="rotary", mode=mode)) for mode in modes],
            "sequence length", "GB/s", roof=("copy bandwidth", meta["copy_bandwidth_gbs"]))
        md += ["## Rotary embedding", "", f"GB/s of the rotation of a (B, N, H, D) = "
               f"({point['batch']}, N, {point['heads']}, {point['d']}) tensor over all its "
               "dims, GPT-NeoX pairs, at positions 0 to N - 1: x read once, the output "
               "written once, cos and sin read once (fwd_bwd: the same again for the "
               "gradient). attnmem: `apply_rotary`; eager: rotate_half with cos and sin "
               "repeated to D, as users write it; compile: that under torch.compile. The "
               "dashed line is this device's measured copy bandwidth.", "",
               "![rotary](rotary.png)", ""]
        for mode in modes:
            md += [f"**{mode}** (GB/s)", "",
                   _table(rows, "gbs", "{:.3g}", op="rotary", mode=mode, label="N"),
                   "attnmem's time ÷ each baseline's:", "",
                   _ratio_table(point_ratios, op="rotary", mode=mode)]
    md += _configs_section(rows)
    errors = [r for r in rows if "error" in r]
    if unavailable or errors:
        md += ["## Not measured", ""]
        md += [f"- {key}: {reason}" for key, reason in sorted(unavailable.items())]
        md += [f"- {r['op']}/{r['provider']} {r['mode']} x={r['x']}: {r['error']}"
               for r in errors]
        md += [""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=(
        "Time attnmem against the alternatives and write a report to DIR/<device-slug>/."))
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes and repetitions: a couple of minutes on a CPU")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repetition: checks the harness, numbers mean "
                             "nothing (CI)")
    parser.add_argument("--out", default="reports", help="output directory (default reports)")
    parser.add_argument("--ops", nargs="+", choices=cases.OPS, default=list(cases.OPS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 runs Triton kernels through its interpreter, whose "
                     "timings are not performance: unset it to benchmark")
    device = torch.device(args.device)
    if device.type == "cuda":
        profile = "smoke" if args.smoke else "gpu"
    else:
        profile = "smoke" if args.smoke else "quick" if args.quick else "cpu"
    budget_s = 0.02 if args.smoke else 0.2 if args.quick else 0.5
    meta = dict(timing.environment(device), profile=profile,
                copy_bandwidth_gbs=timing.copy_bandwidth_gbs(device, 16 if args.smoke else None))
    out_dir = os.path.join(args.out, timing.device_slug(device))
    print(f"attnmem benchmarks on {meta['device']} ({profile} profile) -> {out_dir}")
    if device.type == "cpu":
        print("CPU: attnmem runs its pure-torch fallback here; these are not kernel timings.")
    rows, unavailable = sweep(args.ops, profile, device, budget_s)
    write_report(out_dir, meta, rows, unavailable)
    print(f"wrote {out_dir}/report.md, results.json and plots ({len(rows)} points)")
