"""The Python half of scripts/gpu_check.sh and scripts/gpu_report.sh: the device's facts
and roofs, a benchmark sweep that stops at a deadline and keeps what it measured, the
check's summary (summary.json, report.md), and the merge of a report's parts.

    python -m bench.gpu_check facts FILE [--smoke]
    python -m bench.gpu_check bench DIR --profile P --deadline EPOCH --facts FILE [--ops ..]
                                    [--modes ..] [--budget-s S]
    python -m bench.gpu_check summarize OUT_DIR WORK_DIR
    python -m bench.gpu_check merge DIR PART.json [PART.json ...]
"""

import argparse
import collections
import json
import os
import platform
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET

import torch

from bench import cases, report, timing

# The share of the sweep's time each op may use; time an op leaves over passes to the next,
# and the op with the largest share runs last, so that it gets what the others leave.
SHARES = {"attention": 4, "memory_attend": 2, "memory_write": 2, "additive": 1, "mha": 1,
          "decode": 1, "varlen": 1, "product_key": 1, "rotary": 1}


def _nvidia_smi():
    """Driver and memory of GPU 0 as nvidia-smi reports them, or {} without it."""
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
            check=True).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    _, driver, memory = (s.strip() for s in line.split(","))
    return dict(driver=driver, gpu_memory=memory)


def matmul_tflops(device, n):
    """The measured bf16 matrix product rate (n x n by n x n, random data): the roof of a
    compute-bound op."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    median, _, _ = timing.measure(lambda: a @ b, device, 0.2)
    return 2 * n ** 3 / (median * 1e-3) / 1e12


def facts(smoke):
    """Device, driver, versions, commit and the two roofs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = dict(timing.environment(device), slug=timing.device_slug(device), driver=None,
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               platform=platform.platform())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(_nvidia_smi(), multiprocessors=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
    out["copy_bandwidth_gbs"] = timing.copy_bandwidth_gbs(device, 16 if smoke else None)
    out["bf16_matmul_tflops"] = matmul_tflops(device, 256 if smoke else 8192)
    return out


class Deadline(BaseException):
    """SIGTERM from the step's timeout: stop, and write what was measured (a BaseException,
    so that no point's error handling swallows it)."""


def _stop(signum, frame):
    raise Deadline


def sweep(args):
    """Time the profile's points in order until the deadline, each op within its share of
    the time left (SHARES) but at least its first point; write DIR/<device-slug>/
    (report.write_report) whatever happens. The report's facts (device, versions, commit,
    roofs) are those of the facts step."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("TRITON_INTERPRET=1: interpreter timings are not performance")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops = sorted(args.ops or cases.OPS, key=SHARES.get)
    with open(args.facts) as f:
        meta = dict(json.load(f), profile=args.profile)
    out_dir = os.path.join(args.out, meta["slug"])
    rows, unavailable = [], {}
    signal.signal(signal.SIGTERM, _stop)
    start = time.time()
    try:
        for i, op in enumerate(ops):
            todo = [p for p in cases.points(op, args.profile)
                    if not args.modes or p["mode"] in args.modes]
            left = sum(SHARES[o] for o in ops[i:])
            op_deadline = time.time() + (args.deadline - time.time()) * SHARES[op] / left
            done = 0
            if time.time() < args.deadline:
                reasons = report._availability(op, device)
                unavailable.update({f"{op}/{p}": r for p, r in reasons.items() if r})
                todo = [p for p in todo if not reasons[p["provider"]]]
            for point in todo:
                # Each op gets its first point while the sweep has time left at all.
                if time.time() > (op_deadline if done else args.deadline):
                    break
                try:
                    rows.append(report.run_point(point, device, args.budget_s))
                except torch.OutOfMemoryError:
                    rows.append(dict(point, error="out of memory"))
                except Exception as e:  # noqa: BLE001 - one point's failure is its own row
                    first_line = (str(e).splitlines() or [""])[0][:200]
                    rows.append(dict(point, error=f"{type(e).__name__}: {first_line}"))
                done += 1
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if done < len(todo):
                unavailable[f"{op} (time)"] = (f"{len(todo) - done} of {len(todo)} points not "
                                               "reached within the time budget")
            print(f"{op}: {done}/{len(todo)} points, {time.time() - start:.0f}s", flush=True)
            # Should the step be killed, what was measured stays (merge makes its report).
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "results.json"), "w") as f:
                json.dump(dict(meta=meta, unavailable=unavailable, results=rows), f, indent=1)
    except Deadline:
        unavailable["sweep"] = "stopped by its step's timeout"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        meta["sweep_s"] = round(time.time() - start, 1)
        report.write_report(out_dir, meta, rows, unavailable)
        print(f"wrote {out_dir}: {sum('error' not in r for r in rows)} points measured")


OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def _tests(work, steps, log):
    """The test step's outcome from pytest's JUnit XML (counts and the first failure), or,
    where the step was cut off before pytest wrote it, what its log shows ran; and the seed
    of the random inputs."""
    seed, outcomes = None, {}
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            for line in f:
                found = re.search(r"ATTNMEM_SEED=(\d+)", line)
                seed = seed or (found and found.group(1))
                # pytest -v: "tests/x.py::t PASSED [ 5%]", with xdist "[gw3] [ 5%] PASSED tests/.."
                found = OUTCOME.search(line)
                if found and line.startswith(("tests/", "[gw")):
                    test = line[:found.start()] if line.startswith("tests/") else \
                        line[found.end():]
                    outcomes[test.strip()] = found.group()
    status = next((s["status"] for s in steps if s["step"] == "tests"), None)
    if status is None:
        return dict(outcome="not run", failed=[], seed=None)
    path = os.path.join(work, "tests.xml")
    if not os.path.exists(path):
        ran = ", ".join(f"{n} {o.lower()}" for o, n in sorted(
            collections.Counter(outcomes.values()).items()))
        return dict(outcome=f"no result: the test step {status}; its log shows "
                            f"{len(outcomes)} tests before that ({ran or 'none'})",
                    failed=sorted(t for t, o in outcomes.items() if o in ("FAILED", "ERROR")),
                    seed=seed)
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out = dict(counts, seconds=float(suite.get("time", 0)), seed=seed)
    for case in suite.iter("testcase"):
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        if bad is not None:
            # The short traceback's end, where the assertion and its values are.
            text = bad.text or bad.get("message") or ""
            out["first_failure"] = dict(test=f"{case.get('classname')}::{case.get('name')}",
                                        message=text[-3000:])
            break
    return out


def _steps(work):
    """[{step, seconds, limit_s, status}] from the shell's steps.tsv."""
    out = []
    with open(os.path.join(work, "steps.tsv")) as f:
        for line in f:
            step, seconds, limit, code = line.split()
            code = int(code)
            status = "ok" if code == 0 else "timed out" if code in (124, 137) else f"exit {code}"
            out.append(dict(step=step, seconds=int(seconds), limit_s=int(limit), status=status))
    return out


def summarize(out_dir, work):
    """OUT_DIR/summary.json and report.md from the step outputs in WORK."""
    with open(os.path.join(work, "facts.json")) as f:
        summary = dict(facts=json.load(f))
    summary["steps"] = _steps(work)
    summary["tests"] = _tests(work, summary["steps"], os.path.join(out_dir, "tests.log"))
    with open(os.path.join(work, "missing.txt")) as f:
        summary["missing_packages"] = f.read().split()
    bench_md, results = None, None
    for root, _, files in os.walk(os.path.join(work, "bench")):
        if "results.json" in files:
            with open(os.path.join(root, "results.json")) as f:
                results = json.load(f)
            with open(os.path.join(root, "report.md")) as f:
                bench_md = f.read()
    if results is not None:
        measured = [r for r in results["results"] if "error" not in r]
        summary["bench"] = dict(points=len(results["results"]), measured=len(measured),
                                not_measured=results["unavailable"],
                                sweep_s=results["meta"].get("sweep_s"))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    facts_ = summary["facts"]
    md = [f"# attnmem GPU check: {facts_['device']}", "", "| | |", "| --- | --- |"]
    md += [f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |"
           for k, v in facts_.items()]
    if summary["missing_packages"]:
        md += ["", "Missing Python packages (not installed, no wheel in .whl/): "
               + ", ".join(summary["missing_packages"])]
    md += ["", "## Steps", "", "| step | seconds | limit (s) | status |",
           "| --- | --- | --- | --- |"]
    md += [f"| {s['step']} | {s['seconds']} | {s['limit_s']} | {s['status']} |"
           for s in summary["steps"]]
    tests = summary["tests"]
    md += ["", "## Tests", ""]
    if "tests" in tests:
        md += [f"{tests['tests']} tests, {tests['failures']} failed, {tests['errors']} errors, "
               f"{tests['skipped']} skipped in {tests['seconds']:.0f} s, random inputs seeded "
               f"with ATTNMEM_SEED={tests['seed']}; the log is tests.log."]
        if "first_failure" in tests:
            md += ["", f"First failure: `{tests['first_failure']['test']}`", "", "```",
                   tests["first_failure"]["message"], "```"]
    else:
        md += [f"{tests['outcome']}."]
        md += [f"- failed: `{test}`" for test in tests["failed"]]
    reports = [] if bench_md is None else [bench_md]
    for name in ("ntm.md", "profile.md"):  # scripts/gpu_report.sh's ntm and profile parts
        if os.path.exists(os.path.join(out_dir, name)):
            with open(os.path.join(out_dir, name)) as f:
                reports.append(f.read())
    if not reports:
        md += ["", "## Benchmarks", "", "No benchmark results (see bench.log)."]
    if bench_md is not None:
        md += ["", "The benchmark's plots and results.json are in bench.tar.gz."]
    for text in reports:  # each report one heading level down
        md += ["", re.sub(r"^(#+) ", r"#\1 ", text, flags=re.MULTILINE)]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    _print_summary(summary)


def _print_summary(summary):
    """A few lines for the end of the console output, which is what a remote call shows."""
    facts_ = summary["facts"]
    print(f"{facts_['device']}, driver {facts_['driver']}, torch {facts_['torch']}, triton "
          f"{facts_['triton']}, Python {facts_['python']}, commit {facts_['commit']}")
    print(f"copy {facts_['copy_bandwidth_gbs']:.0f} GB/s, bf16 matmul "
          f"{facts_['bf16_matmul_tflops']:.1f} TFLOP/s")
    for s in summary["steps"]:
        print(f"{s['step']:>6}: {s['seconds']:4d} s of {s['limit_s']:4d} s, {s['status']}")
    tests = summary["tests"]
    if "tests" in tests:
        print(f" tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} "
              f"errors, {tests['skipped']} skipped (ATTNMEM_SEED={tests['seed']})")
        if "first_failure" in tests:
            print(f" first failure: {tests['first_failure']['test']}")
    else:
        print(f" tests: {tests['outcome']}")
        for test in tests["failed"][:10]:
            print(f"   failed: {test}")
    if "bench" in summary:
        bench = summary["bench"]
        print(f" bench: {bench['measured']} of {bench['points']} points measured")
        for key, reason in bench["not_measured"].items():
            print(f"   not measured, {key}: {reason[:120]}")


def merge(out, parts):
    """One report from the parts of scripts/gpu_report.sh (each a results.json)."""
    rows, unavailable, metas = [], {}, []
    for path in parts:
        with open(path) as f:
            part = json.load(f)
        metas.append(part["meta"])
        rows += part["results"]
        unavailable.update(part["unavailable"])
    meta = dict(metas[0], profile=",".join(sorted({m["profile"] for m in metas})),
                sweep_s=sum(m.get("sweep_s", 0) for m in metas))
    for key in ("copy_bandwidth_gbs", "bf16_matmul_tflops"):
        values = sorted(m[key] for m in metas if key in m)
        if values:
            meta[key] = values[len(values) // 2]
    commits = {m["commit"] for m in metas}
    if len(commits) > 1:
        meta["commit"] = " and ".join(sorted(commits))
    out_dir = os.path.join(out, meta["slug"])
    report.write_report(out_dir, meta, rows, unavailable)
    print(f"wrote {out_dir}: {len(rows)} points from {len(parts)} parts")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("facts", help="device, versions, commit and roofs as JSON")
    p.add_argument("file")
    p.add_argument("--smoke", action="store_true", help="tiny roofs (CI)")
    p = sub.add_parser("bench", help="a benchmark sweep that stops at a deadline")
    p.add_argument("out")
    p.add_argument("--profile", choices=cases.PROFILES, required=True)
    p.add_argument("--deadline", type=float, required=True, help="seconds since the epoch")
    p.add_argument("--ops", nargs="+", choices=cases.OPS)
    p.add_argument("--modes", nargs="+", choices=("fwd", "bwd", "fwd_bwd"))
    p.add_argument("--budget-s", type=float, default=0.1, help="timing budget of one point")
    p.add_argument("--facts", required=True, help="the facts step's JSON")
    p = sub.add_parser("summarize", help="summary.json and report.md from the steps")
    p.add_argument("out_dir")
    p.add_argument("work")
    p = sub.add_parser("merge", help="one report from the parts of scripts/gpu_report.sh")
    p.add_argument("out")
    p.add_argument("parts", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "facts":
        with open(args.file, "w") as f:
            json.dump(facts(args.smoke), f, indent=1)
    elif args.command == "bench":
        sweep(args)
    elif args.command == "summarize":
        summarize(args.out_dir, args.work)
    else:
        merge(args.out, args.parts)


if __name__ == "__main__":
    main()
