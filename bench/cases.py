"""What the benchmarks time: each op's providers (attnmem and what users would pick
instead), its size sweep per profile, and how one point becomes a call to time.

A point is a dict: "op", "provider", "mode" ("fwd", "bwd" or "fwd_bwd"), "x" (the swept
size: sequence length or memory slots) and the op's other sizes. build(point, device)
returns (fn, work): the call to time and the work it does, in FLOPs (attention,
FlashAttention's convention) or bytes (memory ops: each input read once, each output
written once), or None where time is the measure.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch._functorch import config as functorch_config

import attnmem
from attnmem.nn import MultiheadAttention, MultiheadSelfAttention

OPS = ("attention", "memory_attend", "memory_write", "additive", "mha", "decode", "varlen",
       "product_key", "rotary")
PROFILES = ("smoke", "quick", "cpu", "gpu", "gpu-check")
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
PROVIDERS = {
    "attention": ("attnmem", "attnmem-fp8", "sdpa", *SDPA_BACKENDS, "flex", "eager"),
    "memory_attend": ("attnmem", "eager", "compile"),
    "memory_write": ("attnmem", "eager", "compile"),
    "additive": ("attnmem", "eager"),
    "mha": ("attnmem-mha", "attnmem-self", "torch-mha"),
    "decode": ("attnmem", "attnmem-paged", "attnmem-fp8", "sdpa", "flex", "twin"),
    "varlen": ("attnmem", "attnmem-fp8", "padded"),
    "product_key": ("attnmem", "attnmem-sparse", "eager", "dense"),
    "rotary": ("attnmem", "eager", "compile"),
}
# The GPU check (scripts/gpu_check.sh) leaves out the attention baselines that fill N^2 scores.
PROFILE_PROVIDERS = {("attention", "gpu-check"): ("attnmem", "attnmem-fp8", "sdpa", "sdpa-flash",
                                                 "sdpa-cudnn", "sdpa-efficient", "flex")}
# Providers that run some modes only: attnmem's FP8 forward is for inference (no backward).
PROVIDER_MODES = {"attnmem-fp8": ("fwd",)}
MODES = {"attention": ("fwd", "bwd", "fwd_bwd"), "memory_attend": ("fwd",),
         "memory_write": ("fwd",), "additive": ("fwd", "fwd_bwd"), "mha": ("fwd", "fwd_bwd"),
         "decode": ("fwd",), "varlen": ("fwd", "fwd_bwd"), "product_key": ("fwd", "fwd_bwd"),
         "rotary": ("fwd", "fwd_bwd")}

# Per profile: the swept sizes and the fixed ones. "smoke" only checks that the harness runs;
# "gpu-check" is the few minutes of benchmark that scripts/gpu_check.sh leaves room for.
# Attention's mla: (D, Ev) pairs of a value head dim apart from the query/key one (DeepSeek-V3's
# multi-head latent attention trains at 192/128), swept after the d's.
SIZES = {
    "attention": {
        "gpu": dict(x=[512, 1024, 2048, 4096, 8192, 16384], d=[64, 128], tokens=16384,
                    width=2048, mla=[(192, 128)]),
        # Head dim 128 first: the H100 check's share of time reached only 64's points.
        "gpu-check": dict(x=[1024, 4096, 16384], d=[128, 64], tokens=16384, width=2048),
        "cpu": dict(x=[128, 256, 512, 1024], d=[64, 128], tokens=1024, width=512),
        "quick": dict(x=[128, 256, 512], d=[64, 128], tokens=512, width=256),
        "smoke": dict(x=[16, 32], d=[16], tokens=32, width=32, mla=[(16, 8)]),
    },
    # dtypes: memories in each (else dtype_for's): float32's products run on the FMA units,
    # bfloat16's on tensor cores (reports/nvidia-h100-80gb-hbm3/gpu-check.md's model).
    "memory": {
        "gpu": dict(x=[1000, 10_000, 100_000, 1_000_000, 4_000_000], d=[32, 64, 128], batch=8,
                    dtypes=["float32", "bfloat16"]),
        "gpu-check": dict(x=[10_000, 1_000_000, 4_000_000], d=[64], batch=8),
        "cpu": dict(x=[1000, 10_000, 100_000, 1_000_000], d=[32, 128], batch=2),
        "quick": dict(x=[1000, 10_000, 100_000], d=[64], batch=2),
        "smoke": dict(x=[64, 256], d=[16], batch=2, dtypes=["float32", "bfloat16"]),
    },
    "additive": {
        "gpu": dict(x=[128, 256, 512, 1024, 2048], batch=8, attn=128, dv=128),
        "gpu-check": dict(x=[256, 1024], batch=8, attn=128, dv=128),
        "cpu": dict(x=[32, 64, 128, 256], batch=2, attn=64, dv=64),
        "quick": dict(x=[32, 64, 128], batch=2, attn=64, dv=64),
        "smoke": dict(x=[8, 16], batch=1, attn=16, dv=16),
    },
    "mha": {
        "gpu": dict(x=[512, 1024, 2048, 4096], batch=8, embed=1024, heads=16),
        "gpu-check": dict(x=[1024, 4096], batch=8, embed=1024, heads=16),
        "cpu": dict(x=[128, 256, 512], batch=2, embed=256, heads=4),
        "quick": dict(x=[128, 256], batch=2, embed=256, heads=4),
        "smoke": dict(x=[16], batch=1, embed=32, heads=2),
    },
}
READ_HEADS, WRITE_HEADS = 4, 1


def default_profile() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def dtype_for(op: str, device) -> torch.dtype:
    """bfloat16 on a GPU (float32 for the memory ops, as NTMs train), float32 on a CPU."""
    if torch.device(device).type == "cuda" and not op.startswith("memory"):
        return torch.bfloat16
    return torch.float32


def points(op: str, profile: str):
    """Every point of op's sweep, in order."""
    if op == "decode":
        return decode_points(profile)
    if op == "varlen":
        return varlen_points(profile)
    if op == "product_key":
        return product_key_points(profile)
    if op == "rotary":
        return rotary_points(profile)
    sizes = SIZES["memory" if op.startswith("memory") else op][profile]
    configs = [{}]
    if op == "attention":
        configs = [dict(d=d, causal=c) for d in sizes["d"] for c in (False, True)] + [
            dict(d=d, dv=dv, causal=c) for d, dv in sizes.get("mla", ()) for c in (False, True)]
    elif op.startswith("memory"):
        configs = [dict(d=d, **({"dtype": t} if t else {})) for d in sizes["d"]
                   for t in sizes.get("dtypes", [None])]
    fixed = {k: v for k, v in sizes.items() if k not in ("x", "d", "mla", "dtypes")}
    providers = PROFILE_PROVIDERS.get((op, profile), PROVIDERS[op])
    return [dict(op=op, provider=provider, mode=mode, x=x, **fixed, **config)
            for config in configs for mode in MODES[op] for provider in providers
            for x in sizes["x"] if mode in PROVIDER_MODES.get(provider, (mode,))]


# Baselines, written as a user would write them in torch.

def eager_attention(q, k, v, causal):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        n_q, n_k = scores.shape[-2:]
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(n_k - n_q + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores.float(), -1).to(q.dtype) @ v


def eager_memory_attend(memory, keys, strength):
    """NTM content addressing and read: cosine similarity, sharpened softmax, weighted sum."""
    norms = keys.norm(dim=-1)[:, :, None] * memory.norm(dim=-1)[:, None, :]
    similarity = (keys @ memory.transpose(1, 2)) / norms.clamp_min(1e-8)
    return torch.softmax(strength[:, :, None] * similarity, -1) @ memory


def eager_memory_write(memory, weights, erase, add):
    """NTM erase then add over the write heads."""
    keep = torch.prod(1 - weights[:, :, :, None] * erase[:, :, None, :], dim=1)
    return memory * keep + weights.transpose(1, 2) @ add


def eager_additive(q, k, values, v):
    scores = torch.tanh(q[:, :, None, :] + k[:, None, :, :]) @ v
    return torch.softmax(scores.float(), -1).to(values.dtype) @ values


_COMPILED = {}
# "bwd" times a backward alone, run again and again on one kept graph (retain_graph): re-running
# the forward each time would time it too. A compiled backward runs once only by default: it
# overwrites the tensors saved for it ("donated buffers"). FlexAttention is compiled without them,
# and the timed backward runs with them off too, as torch checks the setting then (each alone
# fails: torch raises, or the second backward reads overwritten tensors).
_NO_DONATED_BUFFERS = functorch_config.patch(donated_buffer=False)


# The sweep's sizes, head dims, masks and modes recompile a compiled baseline past dynamo's
# limit of 8, after which torch runs it eagerly without a word: FlexAttention then timed its
# unfused path (14 TFLOP/s at head dim 128 on the H100). A higher limit, and past it an error
# for the point rather than a silent fallback.
_RECOMPILES = torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True)


def _compiled(fn):
    """torch.compile with dynamic shapes, under _RECOMPILES: few compilations serve the
    whole sweep."""
    if fn not in _COMPILED:
        compiled = torch.compile(fn, dynamic=True)

        def run(*args, **kwargs):
            with _RECOMPILES:
                return compiled(*args, **kwargs)
        _COMPILED[fn] = run
    return _COMPILED[fn]


@functools.lru_cache(maxsize=8)
def _causal_block_mask(n, device):
    """FlexAttention's causal block mask of n queries and keys, built once a size, as a
    model builds it once for all its layers: outside the timed call."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, i, j: i >= j, None, None, n, n, device=device)


def _flex(q, k, v, causal):
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":
        raise RuntimeError("FlexAttention is timed on CUDA only: its CPU path compiles "
                           "through inductor's C++ backend at every shape")
    mask = _causal_block_mask(q.shape[2], q.device) if causal else None
    with _NO_DONATED_BUFFERS:
        return _compiled(flex_attention)(q, k, v, block_mask=mask)


def _sdpa(backend):
    def run(q, k, v, causal):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _attention_fn(provider):
    if provider == "attnmem":
        return lambda q, k, v, causal: attnmem.attention(q, k, v, causal=causal)
    if provider == "sdpa":
        return _sdpa(None)
    if provider in SDPA_BACKENDS:
        return _sdpa(SDPA_BACKENDS[provider])
    if provider == "flex":
        return _flex
    return eager_attention


def _fp8_attention(q, k, v, causal):
    """attnmem's FP8 forward on q, k, v quantized beforehand, one scale per (batch, head) (as
    an inference stack keeps them), its output in q's dtype: the quantization is not timed."""
    (qf, qd), (kf, kd), (vf, vd) = (attnmem.quantize_fp8(x) for x in (q, k, v))
    return lambda: attnmem.attention(qf, kf, vf, causal=causal, q_descale=qd, k_descale=kd,
                                     v_descale=vd, out_dtype=q.dtype)


def _timed(mode, forward, inputs):
    """The call to time for mode: forward alone (no graph), backward of a kept graph, or
    both."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                forward()
        return run
    out = forward()
    grad = torch.randn_like(out)
    if mode == "bwd":
        def backward():
            with _NO_DONATED_BUFFERS:
                torch.autograd.grad(out, inputs, grad, retain_graph=True)
        return backward
    return lambda: torch.autograd.grad(forward(), inputs, grad)


def _randn(*shape, device, dtype, grad=False):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def build(point, device):
    """(fn, work) for one point; raises if the provider cannot run here."""
    op, mode, n = point["op"], point["mode"], point["x"]
    if op == "decode":
        return build_decode(point, device)
    if op == "varlen":
        return build_varlen(point, device)
    if op == "product_key":
        return build_product_key(point, device)
    if op == "rotary":
        return build_rotary(point, device)
    dtype = getattr(torch, point["dtype"]) if "dtype" in point else dtype_for(op, device)
    grad = mode != "fwd"
    if op == "attention":
        d, dv = point["d"], point.get("dv", point["d"])
        batch, heads = max(1, point["tokens"] // n), max(1, point["width"] // d)
        q, k, v = (_randn(batch, heads, n, width, device=device, dtype=dtype, grad=grad)
                   for width in (d, d, dv))
        if point["provider"] == "attnmem-fp8":
            forward = _fp8_attention(q, k, v, point["causal"])
        else:
            fn = _attention_fn(point["provider"])
            forward = lambda: fn(q, k, v, point["causal"])  # noqa: E731
        # Two n x n GEMMs forward (QK^T over d, PV over dv), five backward (QK^T again, dQ
        # and dK over d; dP and dV over dv): 2.5x the forward when dv == d.
        width = {"fwd": d + dv, "bwd": 3 * d + 2 * dv, "fwd_bwd": 4 * d + 3 * dv}[mode]
        flops = 2 * batch * heads * n * n * width / (2 if point["causal"] else 1)
        return _timed(mode, forward, (q, k, v)), flops
    if op.startswith("memory"):
        batch, d = point["batch"], point["d"]
        memory = _randn(batch, n, d, device=device, dtype=dtype)
        size = memory.element_size()
        if op == "memory_attend":
            keys = _randn(batch, READ_HEADS, d, device=device, dtype=dtype)
            strength = torch.rand(batch, READ_HEADS, device=device, dtype=dtype) * 10
            args = (memory, keys, strength)
            fn = {"attnmem": lambda m, k, s: attnmem.memory_attend(m, k, strength=s),
                  "eager": eager_memory_attend,
                  "compile": _compiled(eager_memory_attend)}[point["provider"]]
            work = size * (batch * n * d + batch * READ_HEADS * (2 * d + 1))
        else:
            weights = torch.softmax(_randn(batch, WRITE_HEADS, n, device=device, dtype=dtype), -1)
            erase = torch.rand(batch, WRITE_HEADS, d, device=device, dtype=dtype)
            add = _randn(batch, WRITE_HEADS, d, device=device, dtype=dtype)
            args = (memory, weights, erase, add)
            fn = {"attnmem": attnmem.memory_write, "eager": eager_memory_write,
                  "compile": _compiled(eager_memory_write)}[point["provider"]]
            work = size * (2 * batch * n * d + batch * WRITE_HEADS * (n + 2 * d))
        return _timed(mode, lambda: fn(*args), ()), work
    if op == "additive":
        batch = point["batch"]
        q = _randn(batch, n, point["attn"], device=device, dtype=dtype, grad=grad)
        k = _randn(batch, n, point["attn"], device=device, dtype=dtype, grad=grad)
        values = _randn(batch, n, point["dv"], device=device, dtype=dtype, grad=grad)
        v = _randn(point["attn"], device=device, dtype=dtype, grad=grad) / math.sqrt(
            point["attn"])
        fn = attnmem.additive_attention if point["provider"] == "attnmem" else eager_additive
        return _timed(mode, lambda: fn(q, k, values, v), (q, k, values)), None
    # mha: self-attention, batch first, the output only (need_weights=False)
    batch, embed, heads = point["batch"], point["embed"], point["heads"]
    x = _randn(batch, n, embed, device=device, dtype=dtype, grad=grad)
    if point["provider"] == "attnmem-self":
        layer = MultiheadSelfAttention(embed, heads).to(device, dtype)
        forward = lambda: layer(x)  # noqa: E731
    else:
        cls = MultiheadAttention if point["provider"] == "attnmem-mha" \
            else torch.nn.MultiheadAttention
        layer = cls(embed, heads, batch_first=True).to(device, dtype)
        forward = lambda: layer(x, x, x, need_weights=False)[0]  # noqa: E731
    return _timed(mode, forward, (x,)), None


# ---------------------------------------------------------------------------------------
# Decoding from a KV cache: one new query token per sequence over a cache of x tokens, GQA
# 8:1, against SDPA and FlexAttention on the same cache. Every provider attends over the
# x cached tokens (attnmem with k=None: the append is a separate write for every provider);
# attnmem-fp8 over an e4m3 copy of it (16-bit queries only: the GPU profiles' bfloat16).
# mla: absorbed multi-head latent attention's decoding (DeepSeek-V2/V3, FlashMLA's workload)
# after those points, (query heads, D, Ev) on one latent kv head whose first Ev columns are
# the values (v_cache = k_cache[..., :Ev], a view, for attnmem), over caches of mla_x tokens,
# with "twin": attention_with_kvcache on the torch backend, which ran these head dims before
# the triton kernels took them.
# ---------------------------------------------------------------------------------------

DECODE_SIZES = {
    "gpu": dict(x=[1024, 4096, 16384, 65536, 131072], batch=[1, 8, 64], heads=32, kv_heads=4,
                d=128, page_size=16, mla=[(16, 576, 512), (128, 576, 512)],
                mla_x=[4096, 16384, 32768]),
    "gpu-check": dict(x=[4096, 65536], batch=[1, 64], heads=32, kv_heads=4, d=128,
                      page_size=16),
    "cpu": dict(x=[1024, 4096, 16384], batch=[1, 8], heads=8, kv_heads=1, d=64, page_size=16),
    "quick": dict(x=[1024, 4096], batch=[1, 4], heads=8, kv_heads=1, d=64, page_size=16),
    "smoke": dict(x=[32, 64], batch=[1, 2], heads=8, kv_heads=1, d=16, page_size=16,
                  mla=[(4, 24, 16)], mla_x=[32]),
}


def decode_points(profile):
    sizes = DECODE_SIZES[profile]
    fixed = {k: v for k, v in sizes.items() if k not in ("x", "batch", "mla", "mla_x")}
    return [dict(op="decode", provider=provider, mode="fwd", x=x, batch=batch, **fixed)
            for batch in sizes["batch"] for provider in PROVIDERS["decode"]
            for x in sizes["x"] if provider != "twin"] + [
        dict(op="decode", provider=provider, mode="fwd", x=x, batch=batch,
             **dict(fixed, heads=heads, kv_heads=1, d=d, dv=dv))
        for heads, d, dv in sizes.get("mla", ()) for batch in sizes["batch"]
        for provider in PROVIDERS["decode"] for x in sizes["mla_x"]]


def _fp8_cache(cache):
    """cache (B, N, Hkv, D) in float8_e4m3fn, one scale per (batch, kv head) as an FP8
    serving stack keeps it (quantized outside the timed call), and its descales (B, Hkv)."""
    fp8, descale = attnmem.quantize_fp8(cache.transpose(1, 2))
    return fp8.transpose(1, 2).contiguous(), descale


def _decode_fn(provider, q, k, v, page_size):
    """The call for one provider: q (B, 1, H, D) and the cache k, v (B, N, Hkv, D or Ev),
    each laid out as the provider takes them. A v that is a view of k's first columns (the
    mla points) stays one for attnmem: its pool, its e4m3 copy and descales are k's."""
    if provider.startswith("attnmem") or provider == "twin":
        batch, n = k.shape[:2]
        shared = v.data_ptr() == k.data_ptr() and v.shape[-1] < k.shape[-1]
        table = None
        if provider == "attnmem-paged":  # the cache's pages shuffled through the pool
            blocks = -(-n // page_size)
            order = torch.randperm(batch * blocks, device=k.device)
            table = order.view(batch, blocks).to(torch.int32)
            pools = []
            for cache in (k,) if shared else (k, v):
                pool = cache.new_zeros(batch * blocks, page_size, *cache.shape[2:])
                pool.view(batch, blocks * page_size, *cache.shape[2:])[:, :n] = cache
                pools.append(pool[torch.argsort(order)])
            k, v = (pools[0], pools[0][..., :v.shape[-1]]) if shared else pools
        descales = {}
        if provider == "attnmem-fp8":
            if q.dtype not in (torch.float16, torch.bfloat16):
                raise RuntimeError(f"an e4m3 cache takes 16-bit queries, this profile's are "
                                   f"{q.dtype}")
            if shared:
                k, descales["k_descale"] = _fp8_cache(k)
                v, descales["v_descale"] = k[..., :v.shape[-1]], descales["k_descale"]
            else:
                (k, descales["k_descale"]), (v, descales["v_descale"]) = map(_fp8_cache,
                                                                             (k, v))
        seqlens = torch.full((batch,), n, dtype=torch.int32, device=k.device)

        def call():
            return attnmem.attention_with_kvcache(q, k, v, cache_seqlens=seqlens,
                                                  block_table=table, **descales)
        if provider == "twin":
            def on_the_twin():
                with attnmem.use_backend("torch"):
                    return call()
            return on_the_twin
        return call
    q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, heads, N, D)
    if provider == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if q.device.type != "cuda":
        raise RuntimeError("FlexAttention is timed on CUDA only: its CPU path compiles "
                           "through inductor's C++ backend at every shape")
    from torch.nn.attention.flex_attention import flex_attention

    return lambda: _compiled(flex_attention)(q, k, v, enable_gqa=True)


def build_decode(point, device):
    """(fn, bytes): the cache is read once (one byte an element in e4m3 for attnmem-fp8; an
    mla point's values are its keys' first columns, read with them), the query read and the
    output written once."""
    batch, n, d = point["batch"], point["x"], point["d"]
    dtype = dtype_for("decode", device)
    q = _randn(batch, 1, point["heads"], d, device=device, dtype=dtype)
    k = _randn(batch, n, point["kv_heads"], d, device=device, dtype=dtype)
    dv = point.get("dv")
    v = _randn(*k.shape, device=device, dtype=dtype) if dv is None else k[..., :dv]
    fn = _decode_fn(point["provider"], q, k, v, point["page_size"])
    cache_bytes = 1 if point["provider"] == "attnmem-fp8" else q.element_size()
    cache = k.numel() * (2 if dv is None else 1)
    work = cache_bytes * cache + q.element_size() * q.numel() // d * (d + (dv or d))
    return _timed("fwd", fn, ()), work


# ---------------------------------------------------------------------------------------
# Packed variable-length batches: attention_varlen on a packed batch of sequences whose
# lengths are spread uniformly up to x, against the same batch padded to x and run through
# attnmem.attention with kv_lengths ("padded"): the computation a user without a varlen op
# would run. Both count the same useful FLOPs (the padded call also computes the padding's).
# ---------------------------------------------------------------------------------------

VARLEN_SIZES = {
    "gpu": dict(x=[512, 1024, 2048, 4096, 8192], batch=16, heads=16, d=128),
    "gpu-check": dict(x=[1024, 4096], batch=16, heads=16, d=128),
    "cpu": dict(x=[128, 256, 512], batch=8, heads=4, d=64),
    "quick": dict(x=[128, 256], batch=8, heads=4, d=64),
    "smoke": dict(x=[16, 32], batch=3, heads=2, d=16),
}


def varlen_points(profile):
    sizes = VARLEN_SIZES[profile]
    fixed = {k: v for k, v in sizes.items() if k != "x"}
    return [dict(op="varlen", provider=provider, mode=mode, x=x, causal=causal, **fixed)
            for causal in (False, True) for mode in MODES["varlen"]
            for provider in PROVIDERS["varlen"] for x in sizes["x"]
            if mode in PROVIDER_MODES.get(provider, (mode,))]


def varlen_lengths(batch, longest):
    """The batch's sequence lengths: the longest, then uniform in [1, longest], the same for
    every provider and run (about half of the padded batch is padding)."""
    rest = torch.randint(1, longest + 1, (batch - 1,),
                         generator=torch.Generator().manual_seed(longest))
    return [longest, *rest.tolist()]


def build_varlen(point, device):
    """(fn, FLOPs): the useful work, each sequence's own attention, by FlashAttention's count."""
    longest, heads, d, causal = point["x"], point["heads"], point["d"], point["causal"]
    lengths = varlen_lengths(point["batch"], longest)
    dtype, grad = dtype_for("attention", device), point["mode"] != "fwd"
    if point["provider"].startswith("attnmem"):
        q, k, v = (_randn(sum(lengths), heads, d, device=device, dtype=dtype, grad=grad)
                   for _ in range(3))
        cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(device, torch.int32)
        fp8 = {}
        if point["provider"] == "attnmem-fp8":  # quantized per sequence, not timed
            (q, fp8["q_descale"]), (k, fp8["k_descale"]), (v, fp8["v_descale"]) = (
                attnmem.quantize_fp8(x, cu_seqlens=cu_seqlens) for x in (q, k, v))
            fp8["out_dtype"] = dtype
        forward = lambda: attnmem.attention_varlen(  # noqa: E731
            q, k, v, cu_seqlens, cu_seqlens, longest, longest, causal=causal, **fp8)
    else:
        q, k, v = (_randn(len(lengths), heads, longest, d, device=device, dtype=dtype,
                          grad=grad) for _ in range(3))
        kv_lengths = torch.tensor(lengths, device=device)
        forward = lambda: attnmem.attention(q, k, v, causal=causal,  # noqa: E731
                                            kv_lengths=kv_lengths)
    flops = sum(4 * heads * n * n * d for n in lengths) / (2 if causal else 1)
    return (_timed(point["mode"], forward, (q, k, v)),
            flops * {"fwd": 1.0, "fwd_bwd": 3.5}[point["mode"]])

# Product-key memory lookup (issue 14): `batch` query tokens of `heads` heads each score
# their two half-queries against n_keys sub-keys, keep the top-k of the k x k candidates
# and sum the softmax-weighted value rows; x is the value table's size, n_keys^2 rows.
# "attnmem" is attnmem.product_key_lookup ("attnmem-sparse": with sparse=True, the values'
# gradient a sparse tensor of the touched rows; its forward is attnmem's); "eager" the
# lookup as users write it in torch (two topk, the Cartesian sum, a topk, softmax,
# F.embedding_bag); "dense" memory_attend over all n_keys^2 rows with the same queries
# (every head's product keys materialised: the softmax over all rows that top-k prunes).
# ---------------------------------------------------------------------------------------

PRODUCT_KEY_SIZES = {
    "gpu": dict(n_keys=[100, 316, 1000, 3162], batch=1024, heads=4, dk=128, dv=256, topk=32),
    "gpu-check": dict(n_keys=[1000, 3162], batch=1024, heads=4, dk=128, dv=256, topk=32),
    "cpu": dict(n_keys=[100, 316, 1000], batch=64, heads=4, dk=64, dv=64, topk=16),
    "quick": dict(n_keys=[100, 316], batch=64, heads=4, dk=64, dv=64, topk=16),
    "smoke": dict(n_keys=[8, 16], batch=4, heads=2, dk=16, dv=16, topk=4),
}


def product_key_points(profile):
    sizes = PRODUCT_KEY_SIZES[profile]
    fixed = {k: v for k, v in sizes.items() if k != "n_keys"}
    return [dict(op="product_key", provider=provider, mode=mode, x=n * n, n_keys=n, **fixed)
            for mode in MODES["product_key"] for provider in PROVIDERS["product_key"]
            for n in sizes["n_keys"]]


def eager_product_key_lookup(queries, sub_keys, values, topk):
    """queries (B, H, Dk), sub_keys (H, 2, n, Dk / 2), values (n^2, Dv) -> (B, Dv)."""
    batch, heads, dk = queries.shape
    n_keys = sub_keys.shape[2]
    scores = torch.einsum("bhsd,hsnd->bhsn", queries.view(batch, heads, 2, dk // 2), sub_keys)
    half_scores, half_indices = scores.topk(topk, dim=-1)  # (B, H, 2, k)
    candidates = half_scores[:, :, 0, :, None] + half_scores[:, :, 1, None, :]
    rows = half_indices[:, :, 0, :, None] * n_keys + half_indices[:, :, 1, None, :]
    best, chosen = candidates.flatten(2).topk(topk, dim=-1)  # (B, H, k)
    rows = rows.flatten(2).gather(-1, chosen)
    weights = torch.softmax(best, -1)
    return F.embedding_bag(rows.reshape(batch, -1), values, mode="sum",
                           per_sample_weights=weights.reshape(batch, -1))


def dense_product_key_lookup(queries, keys, values):
    """memory_attend over all rows: per head, softmax(q . key) over its n^2 product keys
    (keys: (H, n^2, Dk)), the values shared; heads summed. A call reads at most
    memory.MAX_TRITON_HEADS queries per head (the kernel's limit), so the queries go in
    blocks of that many, each block a pass over the table."""
    from attnmem.memory import MAX_TRITON_HEADS

    values = values.expand(keys.shape[0], *values.shape)
    return torch.cat([attnmem.memory_attend(keys, block.transpose(0, 1), values=values,
                                            similarity="dot").sum(0)
                      for block in queries.split(MAX_TRITON_HEADS)])


def build_product_key(point, device):
    """(fn, bytes) for the forward: every selected value row read once per selection (B H k
    Dv), the sub-keys and queries read once, the output written once; the same count for
    every provider (dense reads all n^2 rows per block of queries). None for fwd_bwd."""
    batch, heads, dk, dv = point["batch"], point["heads"], point["dk"], point["dv"]
    n_keys, topk, mode = point["n_keys"], point["topk"], point["mode"]
    dtype = dtype_for("product_key", device)
    grad = mode != "fwd"
    queries = _randn(batch, heads, dk, device=device, dtype=dtype, grad=grad)
    sub_keys = _randn(heads, 2, n_keys, dk // 2, device=device, dtype=dtype) * dk ** -0.5
    sub_keys.requires_grad_(grad)
    values = _randn(n_keys ** 2, dv, device=device, dtype=dtype, grad=grad)
    provider = point["provider"]
    if provider == "dense":
        with torch.no_grad():
            keys = torch.cat([sub_keys[:, 0, :, None].expand(-1, -1, n_keys, -1),
                              sub_keys[:, 1, None, :].expand(-1, n_keys, -1, -1)], -1)
        keys = keys.view(heads, n_keys ** 2, dk).requires_grad_(grad)
        inputs = (queries, keys, values)
        forward = lambda: dense_product_key_lookup(queries, keys, values)  # noqa: E731
    else:
        inputs = (queries, sub_keys, values)
        if provider == "eager":
            forward = lambda: eager_product_key_lookup(queries, sub_keys, values, topk)  # noqa: E731
        else:
            sparse = provider == "attnmem-sparse"
            forward = lambda: attnmem.product_key_lookup(  # noqa: E731
                queries, sub_keys, values, topk=topk, sparse=sparse)
    work = queries.element_size() * (batch * heads * topk * dv + heads * n_keys * dk
                                     + batch * heads * dk + batch * dv)
    return _timed(mode, forward, inputs), work if mode == "fwd" else None


# ---------------------------------------------------------------------------------------
# The rotary embedding of a (B, x, H, D) query or key tensor over all D dims, GPT-NeoX pairs,
# at positions 0 to x - 1 (FlashAttention's apply_rotary_emb, as training applies it before
# the attention): "attnmem" is attnmem.apply_rotary, "eager" the rotation as users write it
# in torch (rotate_half, cos and sin repeated to D), "compile" that under torch.compile.
# ---------------------------------------------------------------------------------------

ROTARY_SIZES = {
    "gpu": dict(x=[1024, 4096, 16384, 65536], batch=4, heads=32, d=128),
    "gpu-check": dict(x=[4096, 65536], batch=4, heads=32, d=128),
    "cpu": dict(x=[256, 1024, 4096], batch=2, heads=8, d=64),
    "quick": dict(x=[256, 1024], batch=2, heads=8, d=64),
    "smoke": dict(x=[16, 32], batch=1, heads=2, d=16),
}


def rotary_points(profile):
    sizes = ROTARY_SIZES[profile]
    fixed = {k: v for k, v in sizes.items() if k != "x"}
    return [dict(op="rotary", provider=provider, mode=mode, x=x, **fixed)
            for mode in MODES["rotary"] for provider in PROVIDERS["rotary"] for x in sizes["x"]]


def eager_rotary(x, cos, sin):
    """x (B, S, H, D) rotated at positions 0 to S - 1 with cos, sin (>= S, D / 2)."""
    n = x.shape[1]
    cos, sin = (torch.cat([t[:n], t[:n]], -1)[:, None, :] for t in (cos, sin))
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def build_rotary(point, device):
    """(fn, bytes): x read once and the output written once, cos and sin read once (the
    backward moves the same bytes again, for the gradient)."""
    batch, n, heads, d, mode = point["batch"], point["x"], point["heads"], point["d"], \
        point["mode"]
    dtype = dtype_for("rotary", device)
    x = _randn(batch, n, heads, d, device=device, dtype=dtype, grad=mode != "fwd")
    angles = torch.arange(n, device=device)[:, None] * 10000.0 ** (
        -torch.arange(0, d, 2, device=device) / d)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    fn = {"attnmem": attnmem.apply_rotary, "eager": eager_rotary,
          "compile": _compiled(eager_rotary)}[point["provider"]]
    work = x.element_size() * (2 * x.numel() + 2 * cos.numel())
    return _timed(mode, lambda: fn(x, cos, sin), (x,)), work * (1 if mode == "fwd" else 2)


# NTM training steps on the copy task (issue 15): not in OPS; `python -m bench.ntm` runs
# them. x is the copy length L: a sequence is 2L + 1 NTM steps. A 128 x 20 memory, batch
# 16, 8-bit vectors, an LSTM controller of 100, as NTMs train. On a CPU, torch.compile
# takes minutes per length (inductor compiles the unrolled sequence, forward and backward).
NTM_PROVIDERS = ("attnmem", "attnmem-graphed", "eager", "compile")
NTM_SIZES = {
    "gpu": dict(x=[5, 10, 20], batch=16, slots=128, width=20, heads=2),
    "cpu": dict(x=[5, 10], batch=16, slots=128, width=20, heads=2),
    "quick": dict(x=[5], batch=16, slots=128, width=20, heads=2),
    "smoke": dict(x=[2], batch=2, slots=16, width=4, heads=1),
}
NTM_BITS = 8


def ntm_points(profile):
    sizes = NTM_SIZES[profile]
    fixed = {k: v for k, v in sizes.items() if k != "x"}
    return [dict(op="ntm", provider=provider, mode="train", x=x, **fixed)
            for provider in NTM_PROVIDERS for x in sizes["x"]]


def build_ntm(point, device):
    """(fn, None): one training step (forward over the sequence, loss, backward, Adam) of
    attnmem's NTM on its default backend ("attnmem"), replayed from CUDA graphs
    ("attnmem-graphed", NTM.graphed: CUDA only), on the pure-torch twins ("eager": the same
    model in eager torch) or under torch.compile ("compile": mode="reduce-overhead", CUDA
    graphs, on a GPU)."""
    from attnmem.nn import NTM

    provider, length, batch = point["provider"], point["x"], point["batch"]
    generator = torch.Generator().manual_seed(length)
    seq = torch.randint(0, 2, (length, batch, NTM_BITS), generator=generator).float()
    inputs = torch.zeros(2 * length + 1, batch, NTM_BITS + 1)
    inputs[:length, :, :NTM_BITS] = seq
    inputs[length, :, NTM_BITS] = 1.0
    inputs, targets = inputs.to(device), seq.to(device)
    torch.manual_seed(0)
    model = NTM(NTM_BITS + 1, NTM_BITS, controller_size=100, memory_slots=point["slots"],
                memory_width=point["width"], read_heads=point["heads"],
                write_heads=point["heads"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = model
    if provider == "attnmem-graphed":
        forward = model.graphed(inputs)
    elif provider == "compile":
        cuda = torch.device(device).type == "cuda"
        forward = torch.compile(model, mode="reduce-overhead" if cuda else None)
    backend = "torch" if provider == "eager" else "auto"

    def step():
        with attnmem.use_backend(backend):
            out, _ = forward(inputs)
            loss = F.binary_cross_entropy_with_logits(out[length + 1:], targets)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
    return step, None
