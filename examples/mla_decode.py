"""Serve a batch of prompts with a small DeepSeek-V2-style decoder whose attention is
multi-head latent attention (MLA): a packed prefill, then absorbed greedy decoding from a
paged latent cache with attnmem.attention_with_kvcache, checked token for token against the
same model run without a cache.

The model (RMSNorm, MLA, SwiGLU; random weights, nothing downloaded) is DeepSeek-V2's
attention (arXiv 2405.04434, section 2.1): with x a token's hidden state,
  c_q = RMSNorm(W_dq x) (q_rank),         q_nope, q_pe = split(W_uq c_q) per head,
  c_kv = RMSNorm(W_dkv x) (kv_rank),      k_pe = RoPE(W_kr x) (d_rope, shared by the heads),
  k_nope = W_uk c_kv and v = W_uv c_kv per head (d_nope and d_v),
  scores (q_nope . k_nope + RoPE(q_pe) . k_pe) / sqrt(d_nope + d_rope), output W_o [heads' v].
The rotary embedding (GPT-NeoX pairs (d, d + d_rope / 2)) is applied in torch to q_pe and
k_pe: the cache holds rotated k_pe, as DeepSeek's does, and FlashMLA takes no rotary either.
The attention's core, which the caller supplies, runs three ways:

- prefill: the prompts, of different lengths, packed one after another with no padding,
  attend without absorption through attnmem.attention_varlen: q and k of d_nope + d_rope
  (DeepSeek: 192) per head, v of d_v (128). Each token's latent [c_kv, k_pe] (kv_rank +
  d_rope: 576) goes into a paged latent cache with attnmem.kvcache_append(..., None,
  cu_seqlens=...): one kv head, whose values are the latents' first kv_rank columns, so the
  value cache is the view k_cache[..., :kv_rank] and nothing else is stored (a per-head
  cache of k and v would hold heads * (192 + 128) numbers per token where this holds 576).
- decode: absorbed, as DeepSeek-V2 serves (FlashMLA's workload): W_uk folds into the query,
  q_lat = W_uk^T q_nope per head (kv_rank), so q_nope . k_nope = q_lat . c_kv; the query
  [q_lat, RoPE(q_pe)] of kv_rank + d_rope attends over the latent cache with
  attention_with_kvcache (all query heads on its one kv head, v_cache the view, the step's
  latent as k with v=None, which the call appends first; the scale 1/sqrt(d_nope + d_rope)
  passed explicitly, as the default would be 1/sqrt(kv_rank + d_rope)), and W_uv maps each
  head's output latent to its value. The loop advances cache_seqlens on the device and
  takes each step's rotary positions from it: nothing in it reads a value back from the
  GPU.
- reference: examples/decode.py's own, no cache and no absorption: each step recomputes
  every sequence from its first token with attnmem.attention(causal=True) on the expanded
  heads, q = [q_pe, q_nope] and k = [k_pe, k_nope] (the rope parts first, where decode.py's
  rotary turns them; its default scale 1/sqrt(D) is MLA's), v of d_v.

The check (decode.py's too) feeds the reference the served tokens (teacher forcing) and
compares its greedy token at every step with the served one; a served token the reference
scores within decode.NEAR_TIE[dtype] of its best (a near tie: the absorbed and expanded
products round in different orders) is counted and reported, not failed; any other
difference exits with status 1. At DeepSeek-V2's attention sizes with 4 layers (batch 4,
prompts up to 64, 16 steps, seed 0, on the CPU) the served logits were at most 0.042 (bfloat16)
and 0.0056 (float16) from the reference's, against near-tie margins of 0.15 and 0.02.

The decode loop is timed, prefill excluded: CUDA events on a GPU (the Triton kernels, after
a warm-up run that compiles them), wall time on the CPU, where attnmem runs its pure-torch
fallback and the figure says nothing about the kernels. Defaults are small on the CPU. On a
GPU the attention's sizes are DeepSeek-V2's (kv_rank 512, d_rope 64, d_nope 128, d_v 128,
q_rank 1536), with 16 heads, hidden size 2048 and 4 layers where DeepSeek-V2 has 128, 5120
and 60 (DeepSeek-V2-Lite: 16 heads, hidden size 2048, no q compression: --q-rank 0), in
bfloat16 with pages of 64 tokens (FlashMLA's).

    python examples/mla_decode.py [--batch 16] [--steps 128] [--page-size 64]
"""

import argparse
import functools
import sys

import torch
from decode import (
    DTYPES,
    RMSNorm,
    SwiGLU,
    backend_and_clock,
    check,
    random_prompts,
    reference_logits,
    rotary_tables,
    rotate,
    serve_pages,
)
from torch import nn

import attnmem


def rope(x, cos, sin):
    """x (..., heads, d_rope) rotated at positions whose cos, sin (..., d_rope / 2) are
    given, GPT-NeoX pairs, as decode.rotate rotates (it takes positions 0 to N - 1 of a
    (B, N, heads, D) x: here each token brings its own)."""
    shape = x.shape
    cos, sin = cos.flatten(0, -2), sin.flatten(0, -2)
    return rotate(x.flatten(0, -3)[None], cos, sin, False)[0].view(shape)


class LatentAttention(nn.Module):
    """DeepSeek-V2's multi-head latent attention whose core the caller supplies, one of:
    - attend(q, k, v), examples/decode.py's: per-head q, k (..., heads, d_rope + d_nope),
      the rope part first and not yet rotated, and v (..., heads, d_v);
    - with latent=True, attend(self, q_nope, q_pe, c_kv, k_pe) on q_nope (..., heads,
      d_nope), q_pe (..., heads, d_rope), c_kv (..., kv_rank) and k_pe (..., 1, d_rope), the
      rope parts not yet rotated, which uses expand() (per-head keys and values) or absorb()
      and unabsorb() (the latent cache's).
    Either returns (..., heads, d_v)."""

    def __init__(self, dim, heads, q_rank, kv_rank, d_nope, d_rope, d_v):
        super().__init__()
        self.heads, self.kv_rank, self.dims = heads, kv_rank, (d_nope, d_rope, d_v)
        self.scale = (d_nope + d_rope) ** -0.5
        # One latent kv head per token: PagePool's (Hkv, D).
        self.kv_shape = (1, 1, kv_rank + d_rope)
        q_up = nn.Linear(q_rank or dim, heads * (d_nope + d_rope), bias=False)
        self.q = (nn.Sequential(nn.Linear(dim, q_rank, bias=False), RMSNorm(q_rank), q_up)
                  if q_rank else q_up)
        self.kv_down = nn.Linear(dim, kv_rank + d_rope, bias=False)  # W_dkv and W_kr
        self.kv_norm = RMSNorm(kv_rank)
        self.kv_up = nn.Linear(kv_rank, heads * (d_nope + d_v), bias=False)  # W_uk, W_uv
        self.out = nn.Linear(heads * d_v, dim, bias=False)

    def forward(self, x, attend, latent):
        d_nope, d_rope, _ = self.dims
        q_nope, q_pe = self.q(x).unflatten(-1, (self.heads, -1)).split([d_nope, d_rope], -1)
        c_kv, k_pe = self.kv_down(x).split([self.kv_rank, d_rope], -1)
        c_kv, k_pe = self.kv_norm(c_kv), k_pe[..., None, :]
        if latent:
            out = attend(self, q_nope, q_pe, c_kv, k_pe)
        else:
            out = attend(torch.cat([q_pe, q_nope], -1), *self.expand(c_kv, k_pe))
        return self.out(out.flatten(-2))

    def up_weights(self):
        """W_uk (heads, d_nope, kv_rank) and W_uv (heads, d_v, kv_rank)."""
        d_nope, _, d_v = self.dims
        return self.kv_up.weight.unflatten(0, (self.heads, -1)).split([d_nope, d_v], 1)

    def expand(self, c_kv, k_pe):
        """Keys [k_pe, k_nope] (..., heads, d_rope + d_nope) and values (..., heads, d_v) per
        head."""
        d_nope, d_rope, d_v = self.dims
        k_nope, v = self.kv_up(c_kv).unflatten(-1, (self.heads, -1)).split([d_nope, d_v], -1)
        return torch.cat([k_pe.expand(*k_nope.shape[:-1], d_rope), k_nope], -1), v

    def absorb(self, q_nope):
        """q_lat = W_uk^T q_nope (..., heads, kv_rank): q_lat . c_kv = q_nope . k_nope."""
        return torch.einsum("...hn,hnr->...hr", q_nope, self.up_weights()[0])

    def unabsorb(self, out_latent):
        """W_uv out_latent (..., heads, d_v): the heads' values, from their output latents."""
        return torch.einsum("...hr,hvr->...hv", out_latent, self.up_weights()[1])


class Block(nn.Module):
    def __init__(self, dim, *mla):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attention = LatentAttention(dim, *mla)
        self.mlp = SwiGLU(dim, 4 * dim)

    def forward(self, x, attend, latent):
        x = x + self.attention(self.norm1(x), attend, latent)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    """tokens (...) -> logits (..., vocab). attend(layer, ...) computes each layer's
    attention core (LatentAttention's, per-head or with latent=True on the latents) and owns
    its cache: examples/decode.py's Decoder and reference_logits take it as it is."""

    def __init__(self, vocab, layers, dim, *mla):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, *mla) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        # Weights N(0, 1 / fan_in), as examples/decode.py's: a cache that attends wrongly
        # changes most tokens.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)

    def forward(self, tokens, attend, latent=False):
        x = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            x = block(x, functools.partial(attend, layer), latent)
        return self.head(self.norm(x))


def serve_paged(model, prompts, steps, page_size, cos, sin, generator):
    """Greedy decoding from a paged latent cache: the logits (B, steps + 1, vocab) that chose
    each token, the prefill's then one per decode step, the decode loop's milliseconds and a
    note on the cache."""
    first = model.blocks[0].attention
    packed = torch.cat([torch.arange(len(p), device=cos.device) for p in prompts])

    def rotated(q_pe, k_pe, positions):
        return (rope(x, cos[positions], sin[positions]) for x in (q_pe, k_pe))

    def attends(pool, cache_seqlens, cu_seqlens, longest):
        # The values are the latents' first kv_rank columns: a view of the keys' pages,
        # no storage of their own.
        pool.v = pool.k[..., :first.kv_rank]

        def prefill(layer, attention, q_nope, q_pe, c_kv, k_pe):  # packed: (total, ...)
            q_pe, k_pe = rotated(q_pe, k_pe, packed)
            attnmem.kvcache_append(pool.k[layer], pool.v[layer],
                                   torch.cat([c_kv[:, None], k_pe], -1), None,
                                   cache_seqlens=cache_seqlens, block_table=pool.block_table,
                                   cu_seqlens=cu_seqlens, max_seqlen=longest)
            k, v = attention.expand(c_kv, k_pe)
            return attnmem.attention_varlen(torch.cat([q_pe, q_nope], -1), k, v, cu_seqlens,
                                            cu_seqlens, longest, longest, causal=True,
                                            scale=attention.scale)

        def decode(layer, attention, q_nope, q_pe, c_kv, k_pe):  # (B, 1, ...)
            # The new tokens' positions are their slots, read on the device.
            q_pe, k_pe = rotated(q_pe, k_pe, cache_seqlens[:, None].long())
            out = attnmem.attention_with_kvcache(
                torch.cat([attention.absorb(q_nope), q_pe], -1), pool.k[layer],
                pool.v[layer], k=torch.cat([c_kv[..., None, :], k_pe], -1), v=None,
                cache_seqlens=cache_seqlens, block_table=pool.block_table,
                scale=attention.scale)
            return attention.unabsorb(out)

        return prefill, decode

    logits, ms, pool, used = serve_pages(model, prompts, steps, page_size, generator, attends,
                                         latent=True)
    latent = pool.k.shape[-1]
    per_head = first.heads * sum(first.dims)
    return logits, ms, (
        f"{used} pages of {page_size} latents of {latent} numbers; per-head keys and values "
        f"(d_nope + d_rope + d_v each head) would take {per_head / latent:.1f} times that")


def main():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16 if cuda else 4)
    parser.add_argument("--layers", type=int, default=4 if cuda else 2)
    parser.add_argument("--dim", type=int, default=2048 if cuda else 64, help="hidden size")
    parser.add_argument("--heads", type=int, default=16 if cuda else 4)
    parser.add_argument("--q-rank", type=int, default=1536 if cuda else 48,
                        help="the queries' compression rank, 0 for none")
    parser.add_argument("--kv-rank", type=int, default=512 if cuda else 32,
                        help="the latent c_kv's size (DeepSeek's kv_lora_rank)")
    parser.add_argument("--d-nope", type=int, default=128 if cuda else 16)
    parser.add_argument("--d-rope", type=int, default=64 if cuda else 16)
    parser.add_argument("--d-v", type=int, default=128 if cuda else 16)
    parser.add_argument("--prompt", type=int, default=512 if cuda else 24,
                        help="the longest prompt; the others are 1 to this long")
    parser.add_argument("--steps", type=int, default=128 if cuda else 16,
                        help="decode steps, each one token per sequence")
    parser.add_argument("--page-size", type=int, default=64 if cuda else 8)
    parser.add_argument("--vocab", type=int, default=1024 if cuda else 256)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16" if cuda else "float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = ("batch", "layers", "dim", "heads", "kv_rank", "d_nope", "d_rope", "d_v", "prompt",
             "page_size")
    if min(getattr(args, name) for name in sizes) < 1:
        parser.error(f"--{', --'.join(s.replace('_', '-') for s in sizes)} must be positive")
    if args.d_rope % 2 or args.steps < 0 or args.q_rank < 0:
        parser.error("--d-rope must be even, --steps and --q-rank at least 0")
    device, dtype = torch.device("cuda" if cuda else "cpu"), DTYPES[args.dtype]
    backend, clock = backend_and_clock(cuda)
    print(f"B={args.batch} layers={args.layers} dim={args.dim} H={args.heads} "
          f"q_rank={args.q_rank} kv_rank={args.kv_rank} d_nope={args.d_nope} "
          f"d_rope={args.d_rope} d_v={args.d_v} steps={args.steps} "
          f"page_size={args.page_size} {args.dtype}")
    print(f"prefill: q, k of {args.d_nope + args.d_rope}, v of {args.d_v} per head; decode: "
          f"absorbed queries of {args.kv_rank + args.d_rope} over one latent kv head, values "
          f"its first {args.kv_rank}")

    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = Decoder(args.vocab, args.layers, args.dim, args.heads, args.q_rank, args.kv_rank,
                    args.d_nope, args.d_rope, args.d_v)
    model = model.to(device, dtype).eval()
    prompts = random_prompts(args.batch, args.prompt, args.vocab, generator, device)
    cos, sin = rotary_tables(args.prompt + args.steps, args.d_rope, device)

    with torch.inference_mode():
        serve = lambda: serve_paged(model, prompts, args.steps, args.page_size,  # noqa: E731
                                    cos, sin, generator)
        if cuda:
            serve()  # compiles the kernels
        logits, ms, cache = serve()
        print(f"paged latent cache: {cache}")
        reference = reference_logits(model, prompts, logits.argmax(-1), cos, sin, False)
        ok = check("paged", logits, reference, dtype)
        tokens = args.batch * args.steps
        print(f"  decode loop: {tokens / ms * 1e3:,.0f} tokens/s ({tokens} tokens in "
              f"{ms:.1f} ms; {backend}, {clock})")
    print("tokens match the no-cache reference" if ok else "tokens DIFFER from the reference")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
