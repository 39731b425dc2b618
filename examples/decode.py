"""Serve a batch of prompts with a small Llama-style decoder and attnmem.attention_with_kvcache:
a packed prefill, then greedy decoding from a paged KV cache with the rotary embedding fused
into the kernels, checked token for token against the same model run without a cache.

The model (RMSNorm, grouped-query attention, SwiGLU; random weights, nothing downloaded)
takes its attention from the caller, so that one set of modules runs three ways:

- prefill: the prompts, of different lengths, packed one after another with no padding
  (FlashAttention's varlen layout) through attention_with_kvcache with cu_seqlens_q and the
  prompts' keys and values as k and v. One call per layer then rotates the prompt's queries
  and keys in the kernel (rotary_cos, rotary_sin), writes the keys and values into their
  pages and attends, where attention_varlen (which takes no rotary) would need three:
  attnmem.apply_rotary, attention_varlen and attnmem.kvcache_append (vLLM's
  reshape_and_cache); the same call prefills a prompt in chunks (cache_seqlens = the tokens
  already in) or mixes prefill with decoding sequences.
- decode: one query per sequence per step, appended into a paged cache: one pool of pages
  per layer, shared by the batch, with a block table (B, max_blocks) whose pages are handed
  out from a free list as sequences grow, as a serving loop does. The loop advances
  cache_seqlens on the device and keeps the tokens there: nothing in it reads a value back
  from the GPU, so it queues work without waiting.
- reference: no cache; each step recomputes every sequence from its first token with
  attnmem.attention(causal=True), the rotary applied in torch.

The check feeds the reference the served tokens (teacher forcing) and compares its greedy
token at every step with the served one: all equal means that the reference, decoding by
itself, would produce the same tokens. A served token that the reference scores within
NEAR_TIE[dtype] of its best (a near tie: both runs round in the model's dtype, in different
orders) is counted and reported, not failed; any other difference exits with status 1.

--left-padded also serves the batch as Hugging Face's generate() lays it out: prompts
right-aligned in a contiguous cache (B, S_max, Hkv, D), one cache_seqlens for all,
cache_leftpad[b] marking where sequence b's keys start. Its rotary positions count slots
from 0, so a sequence padded by p slots is rotated p positions further on, queries and keys
alike: attention scores depend only on their difference, and the tokens agree up to rounding.

The decode loop is timed, prefill excluded: CUDA events on a GPU (the Triton kernels, after
a warm-up run that compiles them), wall time on the CPU, where attnmem runs its pure-torch
fallback and the figure says nothing about the kernels. Defaults are small on the CPU
and larger on a GPU.

    python examples/decode.py [--batch 16] [--steps 128] [--page-size 16] [--interleaved]
    python examples/decode.py --left-padded --dtype bfloat16
"""

import argparse
import functools
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import attnmem

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# How far below the reference's best logit a served token may score and still count as a
# near tie. The logits have std about 1 (Decoder's init); over 8 runs of each dtype on the
# CPU (seeds 0 to 3, both rotary layouts, --left-padded) the served logits were at most 2.6e-6,
# 0.0049 and 0.047 (float32, float16, bfloat16) from the reference's, one or two units in the
# last place of a logit of 4 in the 16-bit dtypes: these allow three to five times that.
NEAR_TIE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(
            x.dtype) * self.weight


class Attention(nn.Module):
    """Grouped-query attention whose core, attend(q, k, v) on tokens laid out (..., heads,
    head_dim), the caller supplies: a cache, or none."""

    def __init__(self, dim, heads, kv_heads, head_dim):
        super().__init__()
        self.shape, self.kv_shape = (heads, head_dim), (2, kv_heads, head_dim)
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x, attend):
        k, v = self.kv(x).unflatten(-1, self.kv_shape).unbind(-3)
        return self.out(attend(self.q(x).unflatten(-1, self.shape), k, v).flatten(-2))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, head_dim):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attention = Attention(dim, heads, kv_heads, head_dim)
        self.mlp = SwiGLU(dim, 4 * dim)

    def forward(self, x, attend):
        x = x + self.attention(self.norm1(x), attend)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    """tokens (...) -> logits (..., vocab). attend(layer, q, k, v) computes each layer's
    attention and owns its cache."""

    def __init__(self, vocab, layers, heads, kv_heads, head_dim):
        super().__init__()
        dim = heads * head_dim
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, head_dim)
                                    for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        # Weights N(0, 1 / fan_in): every layer keeps its input's scale, so that attention
        # moves the logits as much as the embedding does and a cache that attends wrongly
        # changes most tokens (with torch's default init it changes few).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)

    def forward(self, tokens, attend):
        x = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            x = block(x, functools.partial(attend, layer))
        return self.head(self.norm(x))


def rotary_tables(positions, rotary_dim, device, base=10000.0):
    """cos, sin (positions, rotary_dim / 2) in float32, Llama's frequencies."""
    inv_freq = base ** -(torch.arange(0, rotary_dim, 2, device=device) / rotary_dim)
    angles = torch.arange(positions, device=device)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def rotate(x, cos, sin, interleaved):
    """x (B, N, H, D) rotated at positions 0 to N - 1, as the kernels rotate: pairs (d, d + R
    / 2) (GPT-NeoX, Hugging Face's Llama) or (2i, 2i + 1) (GPT-J, Meta's Llama) in float32,
    rounded to x's dtype; dims past R = 2 * cos.shape[1] untouched."""
    half = cos.shape[1]
    cos, sin = cos[:x.shape[1], None], sin[:x.shape[1], None]
    pairs = x[..., :2 * half].float()
    if interleaved:
        first, second = pairs[..., 0::2], pairs[..., 1::2]
    else:
        first, second = pairs[..., :half], pairs[..., half:]
    rotated = (first * cos - second * sin, second * cos + first * sin)
    rotated = torch.stack(rotated, -1).flatten(-2) if interleaved else torch.cat(rotated, -1)
    return torch.cat([rotated.to(x.dtype), x[..., 2 * half:]], -1)


class PagePool:
    """Each layer's keys and values in pages (num_pages, page_size, Hkv, D) shared by the
    batch, the free pages, and the block table (B, max_blocks) int32 saying which pages hold
    each sequence's tokens."""

    def __init__(self, model, num_pages, page_size, batch, max_blocks, dtype, device,
                 generator):
        attention = model.blocks[0].attention
        shape = (len(model.blocks), num_pages, page_size, *attention.kv_shape[1:])
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))
        self.page_size = page_size
        # Handed out in a shuffled order: no sequence's pages lie side by side.
        self.free = torch.randperm(num_pages, generator=generator).tolist()
        # Entries past a sequence's pages are never read: 0 stands in for "none yet".
        self.block_table = torch.zeros(batch, max_blocks, dtype=torch.int32, device=device)
        self.pages = [0] * batch

    def reserve(self, b, tokens):
        """Hands sequence b pages until it has room for `tokens` tokens."""
        while self.pages[b] * self.page_size < tokens:
            # One small write on the device per new page: no host-to-device copy to wait on.
            self.block_table[b, self.pages[b]] = self.free.pop()
            self.pages[b] += 1


class Timer:
    """Milliseconds between start() and stop(): CUDA events on a GPU, wall time on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def start(self):
        if self.cuda:
            self.events[0].record()
        self.wall = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.events[1].record()
            self.events[1].synchronize()
            return self.events[0].elapsed_time(self.events[1])
        return (time.perf_counter() - self.wall) * 1e3


def serve_pages(model, prompts, steps, page_size, generator, attends, **forward):
    """The paged serving loop, whatever attention the model runs: a PagePool with room for
    each prompt and its steps, cache_seqlens on the device, and attends(pool, cache_seqlens,
    cu_seqlens, longest prompt) -> (prefill, decode): the model's attend for the packed
    prompts and for each decode step (forward: more keyword arguments for the model). The
    loop advances cache_seqlens on the device and keeps the tokens there: nothing in it reads
    a value back from the GPU. Returns the logits (B, steps + 1, vocab) that chose each
    token, the prefill's then one per decode step, the decode loop's milliseconds, the pool
    and the number of pages used."""
    device, batch = prompts[0].device, len(prompts)
    lengths = [len(p) for p in prompts]
    max_blocks = -(-(max(lengths) + steps) // page_size)
    num_pages = sum(-(-(n + steps) // page_size) for n in lengths)
    pool = PagePool(model, num_pages, page_size, batch, max_blocks, model.head.weight.dtype,
                    device, generator)
    for b, n in enumerate(lengths):
        pool.reserve(b, n)
    cu_seqlens = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
    prefill, decode = attends(pool, cache_seqlens, cu_seqlens, max(lengths))
    logits = [model(torch.cat(prompts), prefill, **forward)[cu_seqlens[1:].long() - 1]]
    cache_seqlens += torch.tensor(lengths, dtype=torch.int32, device=device)
    timer = Timer(device)
    timer.start()
    for _ in range(steps):
        for b in range(batch):
            lengths[b] += 1
            pool.reserve(b, lengths[b])
        logits.append(model(logits[-1].argmax(-1)[:, None], decode, **forward)[:, -1])
        cache_seqlens += 1
    return torch.stack(logits, 1), timer.stop(), pool, num_pages - len(pool.free)


def serve_paged(model, prompts, steps, page_size, rotary, generator):
    """Greedy decoding: the logits (B, steps + 1, vocab) that chose each token, the
    prefill's then one per decode step, the decode loop's milliseconds and a note on the
    cache."""

    def attends(pool, cache_seqlens, cu_seqlens, longest):
        def prefill(layer, q, k, v):  # q (total, H, D), k, v (total, Hkv, D)
            return attnmem.attention_with_kvcache(
                q, pool.k[layer], pool.v[layer], k=k, v=v, cache_seqlens=cache_seqlens,
                block_table=pool.block_table, cu_seqlens_q=cu_seqlens, max_seqlen_q=longest,
                causal=True, **rotary)

        def decode(layer, q, k, v):  # q (B, 1, H, D), k, v (B, 1, Hkv, D)
            return attnmem.attention_with_kvcache(
                q, pool.k[layer], pool.v[layer], k=k, v=v, cache_seqlens=cache_seqlens,
                block_table=pool.block_table, **rotary)

        return prefill, decode

    logits, ms, pool, used = serve_pages(model, prompts, steps, page_size, generator, attends)
    slots = len(prompts) * (max(len(p) for p in prompts) + steps)
    return logits, ms, (
        f"{used} pages of {page_size} hold {used * page_size} slots, where a contiguous cache "
        f"(B, longest prompt + steps) holds {slots}")


def serve_left_padded(model, prompts, steps, rotary):
    """serve_paged's logits, decode milliseconds and note, from a contiguous cache (B, S_max,
    Hkv, D) holding each prompt right-aligned at slot longest - len(prompt)."""
    device, batch = prompts[0].device, len(prompts)
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    leftpad = torch.tensor(pads, dtype=torch.int32, device=device)
    padded = torch.stack([F.pad(p, (pad, 0)) for p, pad in zip(prompts, pads)])
    shape = (len(model.blocks), batch, longest + steps, *model.blocks[0].attention.kv_shape[1:])
    k_cache, v_cache = (torch.zeros(shape, dtype=model.head.weight.dtype, device=device)
                        for _ in range(2))
    filled = 0  # the slots every sequence has filled: one cache_seqlens for the batch

    def attend(layer, q, k, v):  # q (B, Sq, H, D), k, v (B, Sq, Hkv, D)
        # The padding's queries see no key (all lie below cache_leftpad) and output zeros.
        return attnmem.attention_with_kvcache(
            q, k_cache[layer], v_cache[layer], k=k, v=v, cache_seqlens=filled,
            cache_leftpad=leftpad, causal=True, **rotary)

    logits = [model(padded, attend)[:, -1]]
    filled = longest
    timer = Timer(device)
    timer.start()
    for _ in range(steps):
        logits.append(model(logits[-1].argmax(-1)[:, None], attend)[:, -1])
        filled += 1
    ms = timer.stop()
    return torch.stack(logits, 1), ms, (
        f"a contiguous cache of {batch * shape[2]} slots, cache_leftpad "
        f"{', '.join(map(str, pads))}")


def reference_logits(model, prompts, served, cos, sin, interleaved):
    """Logits (B, steps + 1, vocab) for each served token's position, with no cache: step t
    runs every sequence from its first token, prompt then served[:, :t], right-padded to the
    longest (causal: padding at the end changes no earlier position)."""
    lengths = torch.tensor([len(p) for p in prompts], device=served.device)
    (batch, generated), longest = served.shape, int(lengths.max())
    tokens = torch.zeros(batch, longest + generated, dtype=served.dtype, device=served.device)
    for b, prompt in enumerate(prompts):
        tokens[b, :len(prompt)] = prompt

    def attend(layer, q, k, v):  # q (B, N, H, D), k, v (B, N, Hkv, D)
        q, k = rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved)
        out = attnmem.attention(*(x.transpose(1, 2) for x in (q, k, v)), causal=True)
        return out.transpose(1, 2)

    rows, logits = torch.arange(batch, device=served.device), []
    for t in range(generated):
        logits.append(model(tokens[:, :longest + t], attend)[rows, lengths - 1])
        tokens[rows, lengths] = served[:, t]
        lengths += 1
    return torch.stack(logits, 1)


def check(name, logits, reference, dtype):
    """Prints how the served tokens (logits' greedy ones) compare with the reference's;
    False on a difference that is not a near tie."""
    served, best = logits.argmax(-1), reference.argmax(-1)
    shortfall = reference.max(-1).values - reference.gather(-1, served[..., None])[..., 0]
    differ = best != served
    ties = differ & (shortfall <= NEAR_TIE[dtype])
    wrong = differ & ~ties
    print(f"  {int((~differ).sum())} of {served.numel()} greedy tokens equal the "
          f"reference's" + (f", {int(ties.sum())} near ties (the reference's best logit "
                            f"within {NEAR_TIE[dtype]:g} of the served token's)" if ties.any()
                            else ""))
    error = (logits.float() - reference.float()).abs().max()
    print(f"  largest |logit - reference logit|: {float(error):.3g} (the reference's logits "
          f"have std {float(reference.float().std()):.3g})")
    if wrong.any():
        b, t = (int(i) for i in wrong.nonzero()[0])
        print(f"  MISMATCH: sequence {b}, token {t}: served {int(served[b, t])}, reference "
              f"{int(best[b, t])}, whose logit is {float(shortfall[b, t]):.3g} higher")
    return not wrong.any()


def random_prompts(batch, longest, vocab, generator, device):
    """batch prompts of random tokens, the first `longest` long, the others 1 to that; prints
    their lengths."""
    lengths = torch.randint(1, longest + 1, (batch,), generator=generator)
    lengths[0] = longest
    print(f"prompts of {', '.join(str(int(n)) for n in lengths)} tokens")
    return [torch.randint(vocab, (int(n),), generator=generator).to(device) for n in lengths]


def backend_and_clock(cuda):
    """What runs attnmem's ops and what times the decode loop, in words; prints the first."""
    requested = attnmem.backend.requested_backend()  # ATTNMEM_BACKEND, "auto" if unset
    backend = ("pure-torch fallback" if requested == "torch" or not cuda and requested == "auto"
               else "triton kernels" if cuda else "triton interpreter")
    clock = "CUDA events" if cuda else "CPU wall time, which says nothing about the kernels"
    print(f"attnmem {attnmem.__version__} on {torch.cuda.get_device_name() if cuda else 'CPU'}"
          f" | {backend} | torch {torch.__version__}")
    return backend, clock


def main():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16 if cuda else 4)
    parser.add_argument("--layers", type=int, default=4 if cuda else 2)
    parser.add_argument("--heads", type=int, default=16 if cuda else 4)
    parser.add_argument("--kv-heads", type=int, default=4 if cuda else 2)
    parser.add_argument("--head-dim", type=int, default=128 if cuda else 32)
    parser.add_argument("--prompt", type=int, default=512 if cuda else 24,
                        help="the longest prompt; the others are 1 to this long")
    parser.add_argument("--steps", type=int, default=128 if cuda else 16,
                        help="decode steps, each one token per sequence")
    parser.add_argument("--page-size", type=int, default=16 if cuda else 8)
    parser.add_argument("--vocab", type=int, default=1024 if cuda else 256)
    parser.add_argument("--dtype", choices=DTYPES, default="float16" if cuda else "float32")
    parser.add_argument("--interleaved", action="store_true",
                        help="GPT-J rotary pairs (2i, 2i + 1) instead of GPT-NeoX's")
    parser.add_argument("--left-padded", action="store_true",
                        help="also serve from a left-padded contiguous cache (cache_leftpad)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.batch, args.layers, args.kv_heads, args.prompt, args.page_size) < 1:
        parser.error("--batch, --layers, --kv-heads, --prompt and --page-size must be positive")
    if args.heads % args.kv_heads or args.head_dim % 2 or args.steps < 0:
        parser.error("--kv-heads must divide --heads, --head-dim must be even and --steps "
                     "at least 0")
    device, dtype = torch.device("cuda" if cuda else "cpu"), DTYPES[args.dtype]
    backend, clock = backend_and_clock(cuda)
    print(f"B={args.batch} layers={args.layers} H={args.heads} Hkv={args.kv_heads} "
          f"D={args.head_dim} steps={args.steps} page_size={args.page_size} {args.dtype} "
          f"rotary {'interleaved (GPT-J)' if args.interleaved else 'GPT-NeoX'}")

    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = Decoder(args.vocab, args.layers, args.heads, args.kv_heads, args.head_dim)
    model = model.to(device, dtype).eval()
    prompts = random_prompts(args.batch, args.prompt, args.vocab, generator, device)
    # seqlen_ro must cover every slot of the caches: the paged one's capacity is the largest.
    capacity = -(-(args.prompt + args.steps) // args.page_size) * args.page_size
    cos, sin = rotary_tables(capacity, args.head_dim, device)
    rotary = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=args.interleaved)

    ok = True
    with torch.inference_mode():
        runs = [("paged", lambda: serve_paged(model, prompts, args.steps, args.page_size,
                                              rotary, generator))]
        if args.left_padded:
            runs.append(("left-padded", lambda: serve_left_padded(model, prompts, args.steps,
                                                                  rotary)))
        for name, serve in runs:
            if cuda:
                serve()  # compiles the kernels
            logits, ms, cache = serve()
            print(f"{name}: {cache}")
            reference = reference_logits(model, prompts, logits.argmax(-1), cos, sin,
                                         args.interleaved)
            ok &= check(name, logits, reference, dtype)
            tokens = args.batch * args.steps
            print(f"  decode loop: {tokens / ms * 1e3:,.0f} tokens/s ({tokens} tokens in "
                  f"{ms:.1f} ms; {backend}, {clock})")
    print("tokens match the no-cache reference" if ok else "tokens DIFFER from the reference")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
