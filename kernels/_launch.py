"""Helpers shared by the kernel files: launch decisions, small jit functions, and the
combine of a softmax computed in slot splits (memory_attend's and location_address's)."""

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Triton runs kernels through its interpreter (CPU tensors, tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def lastdim_contiguous(x):
    """x, copied only if its last dimension is strided (kernels take the other strides)."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def slot_splits(n_slots: int, rows: int, block_n: int, device):
    """(split_len, n_splits): splits of whole tiles along the slots, enough that `rows`
    independent rows times the splits fill the GPU twice over (three under the interpreter,
    so that the combining code runs on test sizes); no rows (an empty batch) count as one."""
    if interpreting():
        target = 3
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = max(1, triton.cdiv(2 * sms, max(rows, 1)))
    tiles = triton.cdiv(max(n_slots, 1), block_n)
    split_len = block_n * triton.cdiv(tiles, min(target, tiles))
    return split_len, triton.cdiv(max(n_slots, 1), split_len)


@triton.jit
def _combine_splits(max_ptr, sum_ptr, part_ptr, stats_ptr, out_ptr, stride_mb, stride_ms,
                    stride_mr, stride_pb, stride_ps, stride_pr, stride_ob, stride_or, n_splits,
                    width, EXP2: tl.constexpr, HAS_PART: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Row (b, r) of a softmax computed in splits along the slots: each split s holds its
    max score m_s (-inf where it saw no usable slot), its sum of exp(score - m_s) t_s and, with
    HAS_PART, its sum of exp(score - m_s) v (width columns). Writes the row statistics
    (top = max_s m_s, total = sum_s t_s exp(m_s - top); 0 and 1 where no split saw a slot)
    and the normalised sum_s exp(m_s - top) part_s / total. Exponentials in base 2 with EXP2
    (scores in log2 units), else base e. The splits' parts stream through one at a time."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    n_rows = tl.num_programs(0) * tl.num_programs(1)
    splits = tl.arange(0, BLOCK_S)
    ok = splits < n_splits
    rows = b * stride_mb + r * stride_mr
    part_max = tl.load(max_ptr + rows + splits * stride_ms, mask=ok, other=float("-inf"))
    part_sum = tl.load(sum_ptr + rows + splits * stride_ms, mask=ok, other=0.0)
    top = tl.max(part_max, 0)
    finite = tl.abs(top) < float("inf")
    shift = tl.where(finite, top, 0.0)
    if EXP2:
        scale = tl.exp2(part_max - shift)
    else:
        scale = tl.exp(part_max - shift)
    total = tl.sum(part_sum * scale, 0)
    seen = total > 0
    total = tl.where(seen, total, 1.0)
    row = b * tl.num_programs(0) + r
    tl.store(stats_ptr + row, tl.where(seen, top, 0.0))
    tl.store(stats_ptr + n_rows + row, total)
    if HAS_PART:
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = within(offs_d, width, EVEN_D)
        part = part_ptr + b * stride_pb + r * stride_pr + offs_d
        acc = tl.zeros([BLOCK_D], tl.float32)
        for split in range(n_splits):
            m = tl.load(max_ptr + rows + split * stride_ms)
            if EXP2:
                weight = tl.exp2(m - shift)
            else:
                weight = tl.exp(m - shift)
            acc += weight * tl.load(part + split * stride_ps, mask=d_ok, other=0.0)
        tl.store(out_ptr + b * stride_ob + r * stride_or + offs_d,
                 (acc / total).to(out_ptr.dtype.element_ty), mask=d_ok)


def combine_splits(part_max, part_sum, part=None, out_dtype=None, exp2=False):
    """-> stats float32 (2, B, R) and out (B, R, D) in out_dtype (None without part): the
    splits of a softmax along the slots merged in one launch (_combine_splits). part_max and
    part_sum are float32 (B, S, R) for S splits (any strides), part float32 (B, S, R, D) with
    its last dimension contiguous."""
    batch, n_splits, heads = part_max.shape
    stats = torch.empty((2, batch, heads), dtype=torch.float32, device=part_max.device)
    width = 0 if part is None else part.shape[-1]
    out = None if part is None else part.new_empty((batch, heads, width), dtype=out_dtype)
    if batch * heads == 0:
        return stats, out
    # Without a part, stats stands in for the part and out pointers, which go unread.
    held, written = (stats, stats) if part is None else (part, out)
    _combine_splits[(heads, batch)](
        part_max, part_sum, held, stats, written, *part_max.stride(), *held.stride()[:3],
        written.stride(0), written.stride(1), n_splits, width, EXP2=exp2,
        HAS_PART=part is not None, BLOCK_S=triton.next_power_of_2(n_splits),
        BLOCK_D=block_width(width), EVEN_D=width == block_width(width),
        num_warps=max(1, block_width(width) // 128))
    return stats, out


@triton.jit
def kv_length(kv_lengths_ptr, b, n_k, HAS_KV_LENGTHS: tl.constexpr):
    """Batch b's number of valid keys: kv_lengths[b] clamped to [0, n_k], else n_k."""
    kv_len = n_k
    if HAS_KV_LENGTHS:
        kv_len = tl.minimum(tl.maximum(tl.load(kv_lengths_ptr + b).to(tl.int32), 0), n_k)
    return kv_len


@triton.jit
def within(offs, size, WHOLE: tl.constexpr):
    """offs < size, or all True when size is a whole number of blocks: a tile mask that is
    constant along its contiguous dimension lets the tile load and store 16 bytes at once."""
    ok = offs < size
    if WHOLE:
        ok = tl.full(offs.shape, 1, tl.int1)
    return ok


def block_width(n: int) -> int:
    """The tile width that holds n columns: the next power of 2, at least 16 (tl.dot's
    smallest K and N)."""
    return max(16, triton.next_power_of_2(n))


def length_bucket(n: int, base: int = 2) -> int:
    """n rounded up to a power of base (2 or 4), at least 1 and at most 2^16: a sequence
    length as an autotuning key sees it, so that one model tunes a handful of times."""
    bits = (max(n, 1) - 1).bit_length()
    bits += -bits % (base.bit_length() - 1)
    return min(1 << bits, 1 << 16)


def slot_configs(rows):
    """(BLOCK_N, num_warps, num_stages) rows of a measured table -> configs for `launch`."""
    return [dict(BLOCK_N=n, num_warps=w, num_stages=s) for n, w, s in rows]


_TUNERS = {}


def one_config_per_key() -> bool:
    """ATTNMEM_TUNING=one (the GPU check's tests): each tuning key runs one of its configs,
    picked by a hash of the key, instead of benchmarking them all. A test suite on a GPU
    meets some 550 tuning keys; tuning each over its 1 to 8 configs compiles about 2400
    kernels, one config per key about 930, and across the keys every config still runs."""
    return os.environ.get("ATTNMEM_TUNING", "full") == "one"


def tuning_options(key, prune=None) -> dict:
    """Options for triton.autotune(configs, key, ...): tuning results kept on disk in
    triton's cache where the installed triton can (its cache_results option, keyed by the
    kernel source, the target, the configs and the key, so that a new process skips the
    benchmarking; older tritons tune once per process), and `prune` (an
    early_config_prune) followed, under one_config_per_key(), by the choice of one config
    from the key's values as triton's autotuner forms them (the arguments named in key,
    then every argument's dtype)."""
    import inspect
    import zlib

    options = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True

    def prune_to_one(configs, nargs, **meta):
        kept = prune(configs, nargs, **meta) if prune else configs
        args = {**nargs, **meta}
        values = [args[k] for k in key if k in args]
        values += [str(a.dtype) for a in args.values() if hasattr(a, "dtype")]
        return [kept[zlib.crc32(repr(values).encode()) % len(kept)]]

    chosen = prune_to_one if one_config_per_key() else prune
    if chosen:
        options["prune_configs_by"] = {"early_config_prune": chosen}
    return options


def autotuned(fn, configs, key, **options):
    """fn under triton.autotune over `configs` (dicts of constexprs with num_warps and
    num_stages), one autotuner per (fn, configs, key, options), with tuning_options(key)."""
    frozen = (fn, tuple(tuple(sorted(c.items())) for c in configs), tuple(key),
              tuple(sorted((k, tuple(v)) for k, v in options.items())))
    if frozen not in _TUNERS:
        _TUNERS[frozen] = triton.autotune(
            [triton.Config({k: v for k, v in c.items() if not k.startswith("num_")},
                           num_warps=c["num_warps"], num_stages=c["num_stages"])
             for c in configs], key=list(key), **options, **tuning_options(key))(fn)
    return _TUNERS[frozen]


# The config each autotuned kernel ran at its latest launch, by kernel name, and the median
# milliseconds of every config where that launch tuned: the benchmark records them beside
# each point it times (bench/report.py).
LAST_CONFIGS = {}
LAST_TUNING = {}


def run_tuned(tuner, grid, args, meta):
    """tuner[grid](*args, **meta) (a triton.autotune'd kernel), recording the config it ran
    in LAST_CONFIGS and, where it tuned a new key, each config's time in LAST_TUNING."""
    keys = len(tuner.cache)
    tuner[grid](*args, **meta)
    name = kernel_name(tuner)
    LAST_CONFIGS[name] = tuner.best_config
    timings = getattr(tuner, "configs_timings", None)
    if len(tuner.cache) > keys and timings:
        # triton's timings: do_bench's (median, 20th, 80th percentile) list, or one float.
        LAST_TUNING[name] = {config_text(c): t[0] if isinstance(t, (list, tuple)) else t
                             for c, t in timings.items()}


def kernel_name(fn) -> str:
    """The name of the jit function under triton's autotune and heuristics wrappers."""
    while not hasattr(fn, "__name__"):
        fn = fn.fn
    return fn.__name__


def config_text(config) -> str:
    """A triton.Config as the reports show it: "BLOCK_M=128 BLOCK_N=64 warps=4 stages=3"
    (and maxnreg where one is set)."""
    words = [f"{k}={v}" for k, v in config.kwargs.items()]
    words += [f"warps={config.num_warps}", f"stages={config.num_stages}"]
    if config.maxnreg:
        words.append(f"maxnreg={config.maxnreg}")
    return " ".join(words)


def launch(fn, grid, args, meta, configs, key, interpret_config, **options):
    """Launch fn(*args, **meta): at interpret_config under the interpreter (small tiles, so
    test sizes span several), else autotuned over configs (see autotuned; options such as
    reset_to_zero and restore_value go to triton.autotune). grid: the config's constexprs ->
    the launch grid."""
    if interpreting():
        config = dict(interpret_config)
        fn[grid(config)](*args, **meta, **config)
        return
    run_tuned(autotuned(fn, configs, key, **options), grid, args, meta)
