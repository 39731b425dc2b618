"""Compile Triton kernels for GPU targets on a machine without a GPU.

The tests run kernels through the interpreter, which decides at definition time and patches
triton.language, so compilation happens in a clean subprocess: `compile_all(jobs)` sends
jobs to `python tests/aot.py` and returns, per job, the shared memory the kernel allocates,
which matrix instructions its PTX uses and how many, whether it loads and stores 16 bytes at
a time, uses TMA and warp specialization, and the registers and spill bytes that the ptxas run
building its cubin reports (triton's bundled ptxas, with the options triton gives it).

Spill bytes leave out those of tests/ptxas_spills.json, jobs that spill only under the
options of the triton it names (3.9 runs ptxas with --regAllocOptLevel=2, a workaround for
a ptxas 13 bug; 3.6, the GPU machines', does not, and they spill nothing there): a job
listed there spilling exactly its bytes on that triton reports them as "known_spills" and
0 in "spill_stores" and "spill_loads"; any other spill is reported, and fails the tests.

A job: {"module", "kernel", "arch", "constexprs", "pointers", "num_warps", "num_stages"} and
optionally "options", more compiler options (e.g. maxnreg) as the launcher passes them,
and "count", PTX instructions (e.g. "tanh.approx.f32") whose occurrences it returns;
`pointers` maps each pointer argument to its element type ("fp16", "fp32", "i32"); other
arguments are float32 if named *scale, else int32. Pointers and strides are declared
16-divisible, as aligned torch tensors make them. The kernel may sit under triton.heuristics
or triton.autotune: the jit function beneath is compiled. Other keys of a job (an "expect"
that tests check) are left alone.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def minor(version: str) -> str:
    """"3.9" of "3.9.0"."""
    return ".".join(version.split(".")[:2])


def _usage(report):
    """{"registers", "spill_stores", "spill_loads"} (bytes) from a `ptxas -v` report; spills
    count every function of the module."""
    spills = [tuple(map(int, m)) for m in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)]
    return {"registers": max(map(int, re.findall(r"Used (\d+) registers", report)), default=0),
            "spill_stores": sum(st for st, _ in spills),
            "spill_loads": sum(ld for _, ld in spills)}


def ptxas_usage(ptx, arch):
    """_usage of running triton's bundled ptxas on `ptx` with only -v: for tritons that do not
    show the report of their own ptxas run (3.4 and 3.5)."""
    from triton.backends.nvidia import compiler

    try:
        ptxas = compiler.get_ptxas(arch).path
    except TypeError:  # triton 3.4 and 3.5 take no arch
        ptxas = compiler.get_ptxas().path
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as src:
        src.write(ptx)
        src.flush()
        return _usage(subprocess.run([ptxas, "-v", f"--gpu-name={target}", src.name,
                                      "-o", os.devnull], capture_output=True, text=True,
                                     check=True).stderr)


def compile_with_usage(compile):
    """compile() (a triton.compile call) and the _usage of the cubin it builds, from the
    report of the ptxas run that built it, with the options triton gave it (3.9 adds
    --regAllocOptLevel=2): the registers and spills the GPU would run. Kept in triton's cache
    beside the kernel, keyed by triton's version (tritons give ptxas other options) and the
    PTX, since a cached kernel runs no ptxas; a kernel cached without it is compiled again.
    (compiled, None) where triton cannot show the report."""
    import triton
    from triton import knobs
    from triton.runtime.cache import get_cache_manager

    if not hasattr(knobs.nvidia, "dump_ptxas_log"):
        return compile(), None
    knobs.nvidia.dump_ptxas_log = True
    before = knobs.compilation.always_compile
    try:
        for always in (before, True):
            knobs.compilation.always_compile = always
            with contextlib.redirect_stdout(io.StringIO()) as log:
                compiled = compile()
            cache = get_cache_manager(hashlib.sha256(
                (triton.__version__ + compiled.asm["ptx"]).encode()).hexdigest())
            if "Used" in log.getvalue():
                usage = _usage(log.getvalue())
                cache.put(json.dumps(usage), "ptxas_usage.json")
                return compiled, usage
            stored = cache.get_file("ptxas_usage.json")
            if stored:
                with open(stored) as f:
                    return compiled, json.load(f)
    finally:
        knobs.compilation.always_compile = before
    raise RuntimeError("triton's ptxas showed no report")


with open(os.path.join(ROOT, "tests", "ptxas_spills.json")) as f:
    KNOWN_SPILLS = json.load(f)


def job_digest(job):
    """What tests/ptxas_spills.json names a job by: its JSON's sha256 (16 hex digits)
    without "expect"."""
    return hashlib.sha256(json.dumps({k: v for k, v in job.items() if k != "expect"},
                                     sort_keys=True).encode()).hexdigest()[:16]


def _known(job, usage):
    """usage with the spills tests/ptxas_spills.json lists for this job on this triton moved
    to "known_spills"."""
    import triton

    spills = [usage["spill_stores"], usage["spill_loads"]]
    if minor(triton.__version__) == KNOWN_SPILLS["triton"] and any(
            e["job"] == job_digest(job) and e["spills"] == spills
            for e in KNOWN_SPILLS["entries"]):
        return {**usage, "spill_stores": 0, "spill_loads": 0, "known_spills": spills}
    return usage


def compile_job(job):
    import importlib
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    pointers = job["pointers"]
    # Constexprs the job leaves out take their defaults, and so do pointers defaulting to
    # None, as a launch that does not pass them compiles them.
    constexprs = {**{p.name: p.default for p in fn.params
                     if (p.is_constexpr and p.default is not inspect.Parameter.empty)
                     or (p.default is None and p.name not in pointers)}, **job["constexprs"]}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    # MLIR writes why a pass failed to file descriptor 2: keep it for the error message.
    with tempfile.TemporaryFile() as log:
        stderr = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            compiled, usage = compile_with_usage(lambda: triton.compile(
                ASTSource(fn, signature, constexprs, attrs),
                target=GPUTarget("cuda", job["arch"], 32),
                options={"num_warps": job["num_warps"], "num_stages": job["num_stages"],
                         **job.get("options", {})}))
        except Exception as e:  # reported per job, so one bad config names itself
            log.seek(0)
            why = [line for line in log.read().decode(errors="replace").splitlines()
                   if "error:" in line or "note:" in line or "Assertion" in line]
            return {"error": "\n".join([f"{type(e).__name__}: {e}"[:2000], *why[-4:]])}
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
    ptx = compiled.asm["ptx"]
    return {"error": None, "shared": compiled.metadata.shared,
            "wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync.aligned" in ptx,
            # Every wgmma multiplies e4m3 by e4m3 (the FP8 attention forward's products).
            "wgmma_e4m3": {".e4m3.e4m3" in line for line in ptx.splitlines()
                           if "wgmma.mma_async" in line} == {True},
            "mma_instructions": ptx.count("wgmma.mma_async") + ptx.count("mma.sync.aligned"),
            # 16 bytes a load: a vector load, or an async copy .cg (which moves 16 bytes only).
            "vector_loads": "ld.global.v4" in ptx or "cp.async.cg.shared.global" in ptx,
            "vector_stores": "st.global.v4" in ptx,
            "async_copies": "cp.async.cg.shared.global" in ptx,  # pipelined loads
            "tma": "cp.async.bulk.tensor" in ptx, "warp_specialized": "setmaxnreg" in ptx,
            # How often each instruction the job lists under "count" occurs in the PTX.
            "ptx_counts": {op: ptx.count(op) for op in job.get("count", ())},
            **_known(job, usage or ptxas_usage(ptx, job["arch"]))}


def compiled(jobs):
    """{name: result} of compiling the named jobs; fails naming every job that did not
    compile."""
    results = dict(zip(jobs, compile_all(list(jobs.values()))))
    failures = {k: r["error"] for k, r in results.items() if r["error"]}
    assert not failures, failures
    return results


def sm90_spills(results):
    """{job: (registers, spill store bytes, spill load bytes)} of the sm_90 jobs that spill."""
    return {k: (r["registers"], r["spill_stores"], r["spill_loads"]) for k, r in results.items()
            if "sm90" in k and (r["spill_stores"] or r["spill_loads"])}


def table_jobs(make_job, configs_for, widths):
    """Compile jobs for every config of a width-chunked kernel's tables ("fwd" and "bwd"):
    at each width chunk widths(elem) gives, every dtype, on sm_90; at the widest chunk on
    sm_80; and a masked (odd, "odd" in its name) width at the first config.
    make_job(kernel, arch, dtype, block_d, config, even=True) builds one job."""
    jobs = {}
    for kernel in ("fwd", "bwd"):
        for dtype in ("float16", "bfloat16", "float32"):
            elem = 4 if dtype == "float32" else 2
            chunks = widths(elem)
            for block_d in chunks:
                for config in configs_for(kernel, block_d, elem):
                    name = "-".join(f"{k}{v}" for k, v in config.items())
                    jobs[f"{kernel}-sm90-{dtype}-d{block_d}-{name}"] = make_job(
                        kernel, 90, dtype, block_d, config)
                    if block_d == chunks[-1] and dtype != "bfloat16":
                        jobs[f"{kernel}-sm80-{dtype}-d{block_d}-{name}"] = make_job(
                            kernel, 80, dtype, block_d, config)
            config = configs_for(kernel, chunks[-1], elem)[0]
            jobs[f"{kernel}-sm90-{dtype}-odd-width"] = make_job(kernel, 90, dtype, chunks[-1],
                                                                config, even=False)
    return jobs


def compile_all(jobs, python=sys.executable):
    """Compiles jobs with `python` (another environment's, another triton: see
    tests/test_triton_versions.py). With ATTNMEM_AOT_RECORD=FILE set, appends the jobs to FILE
    as a line of JSON and raises instead: that collects the jobs of the compile tests."""
    record = os.environ.get("ATTNMEM_AOT_RECORD")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps(jobs) + "\n")
        raise RuntimeError(f"jobs recorded in {record}, not compiled")
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([python, os.path.abspath(__file__)], input=json.dumps(jobs),
                            capture_output=True, text=True, env=env, timeout=3000)
    if result.returncode != 0:
        raise RuntimeError(f"aot compiler failed:\n{result.stderr[-5000:]}")
    return json.loads(result.stdout)


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    todo = json.load(sys.stdin)
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        print(json.dumps(list(pool.map(compile_job, todo))))
