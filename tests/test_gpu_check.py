"""The GPU check's CPU smoke run (scripts/gpu_check.sh --smoke: two kernel tests through the
interpreter, the smoke benchmark profile on attnmem's torch backend), so the command a GPU
machine runs cannot rot; the merge of a GPU report's parts; and the report's profile part
(scripts/gpu_report.sh --smoke OUT profile)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", str(out)], cwd=ROOT,
                            env=dict(env, PYTHON=sys.executable), capture_output=True,
                            text=True, timeout=300)
    return result, out


@pytest.mark.skipif(shutil.which("bash") is None, reason="the check is a bash script")
def test_smoke_check_writes_its_files(check):
    result, out = check
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["bench.log", "bench.tar.gz", "report.md", "summary.json", "tests.log"]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("device", "torch", "triton", "python", "commit", "copy_bandwidth_gbs",
                "bf16_matmul_tflops"):
        assert summary["facts"][key], key
    assert [s["step"] for s in summary["steps"]] == ["facts", "tests", "bench"]
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    assert summary["tests"]["tests"] == 2 and summary["tests"]["failures"] == 0
    assert summary["bench"]["measured"] > 0
    assert "2 passed" in (out / "tests.log").read_text()
    report = (out / "report.md").read_text()
    for heading in ("# attnmem GPU check", "## Steps", "## Tests", "### Attention",
                    "### Memory ops"):
        assert heading in report, heading
    with tarfile.open(out / "bench.tar.gz") as tar:
        names = tar.getnames()
        (results,) = [n for n in names if n.endswith("/results.json")]
        data = json.load(tar.extractfile(results))
    assert data["meta"]["commit"] == summary["facts"]["commit"]
    assert any(n.endswith("/attention.png") for n in names)


@pytest.mark.skipif(shutil.which("bash") is None, reason="the check is a bash script")
def test_parts_merge_into_one_report(check, tmp_path):
    _, out = check
    with tarfile.open(out / "bench.tar.gz") as tar:
        tar.extractall(tmp_path / "bench", filter="data")
    (results,) = (tmp_path / "bench").glob("*/results.json")
    data = json.loads(results.read_text())
    parts = []
    for op in ("attention", "memory_attend"):
        part = dict(data, results=[r for r in data["results"] if r["op"] == op])
        parts.append(tmp_path / f"part-{op}.json")
        parts[-1].write_text(json.dumps(part))
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "merge",
                             str(tmp_path / "reports"), *map(str, parts)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = json.loads((tmp_path / "reports" / data["meta"]["slug"] / "results.json")
                        .read_text())
    assert {r["op"] for r in merged["results"]} == {"attention", "memory_attend"}
    assert len(merged["results"]) == sum(r["op"] in ("attention", "memory_attend")
                                         for r in data["results"])


def test_summary_of_a_test_step_cut_off_by_its_timeout(tmp_path):
    """No JUnit XML: the summary counts what pytest -v logged, and names the failures."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    facts = dict(device="GPU", driver="1", torch="2", triton="3", python="3.12", commit="abc",
                 copy_bandwidth_gbs=3000.0, bf16_matmul_tflops=800.0)
    (work / "facts.json").write_text(json.dumps(facts))
    (work / "steps.tsv").write_text("facts 9 120 0\ntests 300 300 124\n")
    (work / "missing.txt").write_text("\n")
    (out / "tests.log").write_text(
        "attnmem: random inputs seeded with ATTNMEM_SEED=123\n"
        "[gw0] [  1%] PASSED tests/test_a.py::test_x[plain-fp32]\n"
        "[gw1] [  2%] FAILED tests/test_c.py::test_y[first size + 1-triton]\n"
        "[gw1] [  3%] SKIPPED tests/test_c.py::test_z\n"
        "FAILED tests/test_c.py::test_y[first size + 1-triton] - RuntimeError: no\n")
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "summarize", str(out),
                             str(work)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tests = json.loads((out / "summary.json").read_text())["tests"]
    assert tests["seed"] == "123"
    assert tests["failed"] == ["tests/test_c.py::test_y[first size + 1-triton]"]
    assert "timed out" in tests["outcome"] and "3 tests" in tests["outcome"]
    assert "1 failed, 1 passed, 1 skipped" in tests["outcome"]
    report = (out / "report.md").read_text()
    assert "timed out" in report and "test_y[first size + 1-triton]" in report


@pytest.mark.skipif(shutil.which("bash") is None, reason="the report is a bash script")
def test_profile_part_writes_where_each_calls_time_goes(tmp_path):
    """bench/trace.py through scripts/gpu_report.sh at the smoke profile's sizes: each focus
    point's host, wall and device time, and attnmem's host functions."""
    from bench import trace

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(["bash", "scripts/gpu_report.sh", "--smoke", str(tmp_path),
                             "profile"], cwd=ROOT, env=dict(env, PYTHON=sys.executable),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("facts", "ok"),
                                                                    ("profile", "ok")]
    rows = json.loads((tmp_path / "profile.json").read_text())["results"]
    assert [(r["op"], r["provider"]) for r in rows] == [
        (p["op"], p["provider"]) for p in trace.focus_points("smoke")]
    assert {r["op"] for r in rows} == {f["op"] for f in trace.FOCUS}
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["host_ms"] <= r["wall_ms"], r
        assert r["python"] if r["provider"] == "attnmem" else "python" not in r
    report = (tmp_path / "profile.md").read_text()
    assert "| decode | attnmem | fwd | x=32 batch=1 " in report
    assert "Host functions by own time" in report
    assert "| decode | attnmem | fwd | x=32 batch=1 " in result.stdout  # the console's table
    assert "## Where the time goes" in (tmp_path / "report.md").read_text()
