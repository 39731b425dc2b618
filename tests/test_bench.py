"""The benchmark harness runs end to end at tiny sizes (its numbers mean nothing here), so
the report command and the pytest-benchmark suites cannot rot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)  # benchmarks never time the interpreter
    return {**env, **extra}


def test_report_command_writes_json_markdown_and_plots(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = tmp_path.iterdir()  # one directory, named after the device
    data = json.loads((out / "results.json").read_text())
    for key in ("device", "torch", "triton", "commit", "date", "copy_bandwidth_gbs"):
        assert data["meta"][key], key
    rows = [r for r in data["results"] if "error" not in r]
    assert {r["op"] for r in rows} == {"attention", "memory_attend", "memory_write", "additive",
                                       "mha", "decode", "varlen", "product_key", "rotary"}
    for row in rows:
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
    assert {r["provider"] for r in rows if r["op"] == "attention"} >= {"attnmem", "sdpa",
                                                                        "eager"}
    assert all(r["tflops"] > 0 for r in rows if r["op"] in ("attention", "varlen"))
    assert {r["mode"] for r in rows if r["op"] == "attention" and r.get("dv") == 8} == {
        "fwd", "bwd", "fwd_bwd"}  # the smoke profile's (D, Ev) = (16, 8) points
    assert all(r["gbs"] > 0 for r in rows if r["op"].startswith("memory") or r["op"] == "decode"
               or (r["op"], r["mode"]) == ("product_key", "fwd") or r["op"] == "rotary")
    assert {(r["provider"], r["mode"]) for r in rows if r["op"] == "product_key"} == {
        (p, m) for p in ("attnmem", "attnmem-sparse", "eager", "dense")
        for m in ("fwd", "fwd_bwd")}
    report = (out / "report.md").read_text()
    assert "This is a CPU report" in report or data["meta"]["device_type"] == "cuda"
    assert "## attnmem against the baselines" in report
    assert "**bwd, head dims 16/8, causal**" in report
    for dtype in ("float32", "bfloat16"):  # the smoke profile's memories in both
        assert f"**memory_attend, width 16, {dtype}** (GB/s)" in report, dtype
    for baseline in ("sdpa", "eager", "compile", "fastest baseline"):
        assert f"| attnmem ÷ {baseline} |" in report, baseline
    assert {(r["op"], r["baseline"]) for r in data["ratios"]} >= {
        ("attention", "sdpa"), ("attention", "eager"), ("memory_attend", "compile"),
        ("memory_write", "eager"), ("additive", "eager"), ("mha", "torch-mha"),
        ("decode", "sdpa"), ("varlen", "padded"), ("product_key", "eager"),
        ("product_key", "dense"), ("rotary", "eager"), ("rotary", "compile")}
    assert "\r" not in result.stderr  # no progress bar drawn into a pipe
    for plot in ("attention.png", "memory.png", "additive.png", "mha.png", "decode.png",
                 "varlen.png", "product_key.png", "product_key_time.png", "rotary.png"):
        assert (out / plot).stat().st_size > 1000, plot
        assert f"]({plot})" in report


def test_ratios_divide_attnmem_time_by_each_baseline_at_the_same_point():
    from bench.report import FASTEST, ratios

    point = dict(op="attention", mode="fwd", d=64, causal=False)
    rows = [dict(point, x=128, provider="attnmem", median_ms=3.0),
            dict(point, x=128, provider="sdpa", median_ms=2.0),
            dict(point, x=128, provider="eager", median_ms=6.0),
            dict(point, x=256, provider="attnmem", median_ms=1.0),
            dict(point, x=256, provider="sdpa", error="out of memory"),
            dict(point, x=256, provider="eager", median_ms=4.0),
            dict(point, x=128, causal=True, provider="sdpa", median_ms=1.0)]
    got = {(r["x"], r["baseline"]): r["ratio"] for r in ratios(rows) if not r["causal"]}
    assert got == {(128, "sdpa"): 1.5, (128, "eager"): 0.5, (128, FASTEST): 1.5,
                   (256, "eager"): 0.25}
    assert not [r for r in ratios(rows) if r["causal"]]  # no attnmem time there


def test_report_draws_a_panel_without_points(tmp_path):
    """A sweep stopped by its deadline, or whose points all failed, leaves panels without a
    point (here attention's bwd, mha's fwd_bwd, and no fwd_bwd for the memory plot): the
    report is still written."""
    from bench.report import write_report

    meta = dict(device="GPU", device_type="cuda", copy_bandwidth_gbs=3000.0,
                bf16_matmul_tflops=800.0)
    timed = dict(median_ms=1.0, p20_ms=0.9, p80_ms=1.1, peak_mib=10.0)
    point = dict(op="attention", mode="fwd", x=1024, d=64, causal=False, tokens=16384,
                 width=2048)
    rows = [dict(point, provider="attnmem", tflops=100.0, **timed),
            dict(point, provider="sdpa", tflops=90.0, **timed),
            dict(point, mode="bwd", provider="attnmem", error="out of memory"),
            dict(op="mha", provider="attnmem-mha", mode="fwd", x=1024, batch=4, embed=1024,
                 heads=16, **timed)]
    write_report(str(tmp_path), meta, rows, {"mha (time)": "2 of 4 points not reached "
                                                           "within the time budget"})
    report = (tmp_path / "report.md").read_text()
    assert "- attention/attnmem bwd x=1024: out of memory" in report
    assert "](mha.png)" in report and "attention_memory.png" not in report
    for plot in ("attention.png", "mha.png"):
        assert (tmp_path / plot).stat().st_size > 1000, plot


def test_report_command_refuses_interpreter_timings(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
                            cwd=ROOT, env=_env(TRITON_INTERPRET="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and "interpreter" in result.stderr
    assert not any(tmp_path.iterdir())


def test_pytest_benchmark_suites_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-p",
                             "no:cacheprovider", "--benchmark-disable"],
                            cwd=ROOT, env=_env(ATTNMEM_BENCH_PROFILE="smoke"),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout


def test_points_record_the_configs_their_autotuned_kernels_ran(monkeypatch):
    """Beside each timed point, the config of each autotuned kernel it launched and, where
    it tuned, each config's time (and none that an earlier point launched); the report lists
    them."""
    triton = pytest.importorskip("triton")
    from attnmem.kernels import _launch
    from bench import cases, report

    tuning = {"BLOCK_M=128 warps=8 stages=2": 1.0, "BLOCK_M=64 warps=4 stages=3": 1.5,
              "BLOCK_M=256 warps=8 stages=2": float("inf")}  # out of shared memory

    def launches():
        _launch.LAST_CONFIGS["_attn_fwd"] = triton.Config({"BLOCK_M": 128}, num_warps=8,
                                                          num_stages=2)
        _launch.LAST_TUNING["_attn_fwd"] = tuning

    monkeypatch.setattr(_launch, "LAST_CONFIGS", {"_memory_write_fwd": None})
    monkeypatch.setattr(_launch, "LAST_TUNING", {"_memory_write_fwd": {}})
    monkeypatch.setattr(cases, "build", lambda point, device: (launches, None))
    point = dict(op="attention", provider="attnmem", mode="fwd", x=64, d=16, causal=False)
    row = report.run_point(point, "cpu", 0.01)
    assert row["configs"] == {"_attn_fwd": "BLOCK_M=128 warps=8 stages=2"}
    assert row["tuning_ms"] == {"_attn_fwd": tuning}
    baseline = dict(point, provider="sdpa", median_ms=row["median_ms"])
    assert [r["ratio"] for r in report.ratios([row, baseline])] == [1.0]
    assert ("| attention | attnmem | fwd | x=64 d=16 causal=False | _attn_fwd | BLOCK_M=128 "
            "warps=8 stages=2 | 2: 1.50× |") in report._configs_section([row, baseline])


def test_ntm_command_writes_steps_per_second(tmp_path):
    """python -m bench.ntm (scripts/gpu_report.sh's ntm part) on a tiny NTM: each provider
    asked for timed, or (CUDA graphs on a CPU) listed with its reason. torch.compile's
    provider is left out here: compiling the unrolled sequence takes the most time, and
    tests/test_memory_modules.py compiles the NTM's training step."""
    subprocess.run([sys.executable, "-m", "bench.ntm", "--smoke", "--out", str(tmp_path),
                    "--providers", "attnmem", "attnmem-graphed", "eager"],
                   cwd=ROOT, env=_env(), check=True, capture_output=True)
    (out,) = tmp_path.iterdir()
    result = json.loads((out / "ntm.json").read_text())
    assert {r["provider"] for r in result["results"] if r["steps_per_s"] > 0} == {
        "attnmem", "eager"}
    assert list(result["unavailable"]) == ["attnmem-graphed"]
    report = (out / "ntm.md").read_text()
    assert "| L | attnmem | eager |" in report and "| 2 | " in report


def test_the_callers_commit_wins_over_git(monkeypatch):
    """A copy of the work tree (the GPU machine's) may carry a stale .git: every report
    records ATTNMEM_COMMIT where it is set."""
    from bench import timing

    monkeypatch.setenv("ATTNMEM_COMMIT", "abc123")
    assert timing.environment("cpu")["commit"] == "abc123"
    monkeypatch.delenv("ATTNMEM_COMMIT")
    assert timing.git_commit() != "abc123"
