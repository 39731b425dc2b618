"""tests/aot.py's registers and spills: the report of the ptxas run that builds the cubin,
the same when triton's cache holds the kernel (no ptxas runs then), and the spills
tests/ptxas_spills.json lists for the installed triton moved to "known_spills"."""

import pytest

triton = pytest.importorskip("triton")

from test_location_address import compile_jobs  # noqa: E402

from aot import KNOWN_SPILLS, compile_all, job_digest, minor  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("aot")]


def test_usage_is_the_same_from_triton_cache(tmp_path, monkeypatch):
    # The 16-bit location backward over 1024 slots, 8 warps: a small kernel that triton 3.9's
    # ptxas options make spill 4/4 B at 64 registers (none under 3.6's).
    job = compile_jobs()["_location_bwd-sm90-float16-1024x8x2-None"]
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    built, = compile_all([job])
    cached, = compile_all([job])  # the kept report
    kept = list(tmp_path.rglob("ptxas_usage.json"))
    assert kept
    for path in kept:
        path.unlink()
    rebuilt, = compile_all([job])  # cached without the report: compiled again
    assert built["error"] is None, built["error"]
    assert built == cached == rebuilt
    listed = [e["spills"] for e in KNOWN_SPILLS["entries"] if e["job"] == job_digest(job)]
    if minor(triton.__version__) == KNOWN_SPILLS["triton"]:
        assert listed and built["known_spills"] == listed[0]
        assert (built["spill_stores"], built["spill_loads"]) == (0, 0)
    else:
        assert "known_spills" not in built
