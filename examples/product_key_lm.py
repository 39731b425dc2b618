"""A product-key memory layer against a feed-forward layer in a small causal Transformer
language model, on a task that asks for capacity: recall of many fixed facts.

The facts map every pair of key tokens (a, b), from K key tokens, to a value token fixed
once at random: K^2 facts (4096 by default). Sequences are runs of facts, "a b v a b v ...",
and the loss is the value tokens' (a and b are drawn at random and cannot be predicted).
A key is two tokens, so that no token embedding can hold a fact by itself: the layers
that follow attention must store the K^2 answers. Attention brings a to b's position.

Two models of the same width and depth are trained with the same data, optimiser and
steps: one with a feed-forward network in every layer, one whose middle layer holds an
attnmem.nn.ProductKeyMemory (K_mem^2 value rows, top-k per head) in its place. Reported:
the final training loss, loss and accuracy over all facts, parameter counts and time per
training step, whichever way they come out.

    python examples/product_key_lm.py [--steps 1500] [--report product_key_lm.md]
    python examples/product_key_lm.py --quick        # seconds: checks that it runs
"""

import argparse
import math
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

import attnmem
from attnmem.nn import MultiheadSelfAttention, ProductKeyMemory, SinusoidalPositionalEncoding


class Facts:
    """K^2 facts (a, b) -> v over key tokens [0, K) and value tokens [K, K + V)."""

    def __init__(self, keys, values, generator):
        self.keys, self.values = keys, values
        self.table = torch.randint(keys, keys + values, (keys, keys), generator=generator)
        self.vocab = keys + values

    def sequences(self, a, b):
        """Token sequences (B, 3T) "a b v ..." for key tokens a, b: (B, T)."""
        return torch.stack([a, b, self.table[a, b]], -1).flatten(1)

    def batch(self, batch, triples, generator):
        a, b = torch.randint(0, self.keys, (2, batch, triples), generator=generator)
        return self.sequences(a, b)

    def all_facts(self, triples, generator):
        """Every fact once, in a random order, as sequences of `triples` facts (the last
        sequence is filled up with repeats)."""
        order = torch.randperm(self.keys ** 2, generator=generator)
        order = torch.cat([order, order[: -len(order) % triples]]).view(-1, triples)
        return self.sequences(order // self.keys, order % self.keys)


class Block(nn.Module):
    """A pre-norm causal Transformer layer: x + attention(norm(x)), then
    x + feed_forward(norm(x)), where feed_forward is an MLP or a product-key memory."""

    def __init__(self, dim, heads, feed_forward):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = MultiheadSelfAttention(dim, heads, causal=True)
        self.feed_forward = feed_forward

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.feed_forward(self.norm2(x))


class LanguageModel(nn.Module):
    def __init__(self, vocab, dim, heads, layers, hidden, memory=None):
        """memory: None (an MLP of `hidden` units in every layer) or (n_keys, topk, heads)
        of the ProductKeyMemory that replaces the middle layer's MLP."""
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = SinusoidalPositionalEncoding(dim)
        feed_forward = [nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                        for _ in range(layers)]
        if memory is not None:
            n_keys, topk, memory_heads = memory
            feed_forward[layers // 2] = ProductKeyMemory(dim, n_keys, topk, heads=memory_heads)
        self.blocks = nn.ModuleList(Block(dim, heads, f) for f in feed_forward)
        self.norm = nn.LayerNorm(dim)
        self.readout = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.position(self.embed(tokens))
        for block in self.blocks:
            x = block(x)
        return self.readout(self.norm(x))


def value_loss(model, tokens):
    """Cross-entropy and accuracy of the predictions of the value tokens (every third)."""
    logits = model(tokens[:, :-1])[:, 1::3]
    targets = tokens[:, 2::3]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return loss, (logits.argmax(-1) == targets).float().mean()


def train(name, model, facts, args):
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)  # then a cosine decay to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    generator = torch.Generator().manual_seed(args.seed + 1)  # the same batches for both
    losses, step_times = [], []
    for step in range(1, args.steps + 1):
        tokens = facts.batch(args.batch, args.triples, generator)
        begin = time.perf_counter()
        loss, _ = value_loss(model, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step_times.append(time.perf_counter() - begin)
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            print(f"  {name:<15} step {step:5d}  loss {sum(losses[-50:]) / len(losses[-50:]):.3f}"
                  f"  {1e3 * sum(step_times[-50:]) / len(step_times[-50:]):6.1f} ms/step",
                  flush=True)
    model.eval()
    with torch.no_grad():
        loss, accuracy = value_loss(model, facts.all_facts(args.triples, generator))
    model.train()
    warm = step_times[min(10, len(step_times) - 1):]  # the first steps allocate
    return dict(model=name, params=sum(p.numel() for p in model.parameters()),
                train_loss=sum(losses[-50:]) / len(losses[-50:]), loss=loss.item(),
                accuracy=accuracy.item(), step_ms=1e3 * sorted(warm)[len(warm) // 2],
                total_s=sum(step_times))


def report(args, results):
    facts = args.keys ** 2
    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join([f"OMP_NUM_THREADS={threads}"] * (threads is not None)
                       + ["python examples/product_key_lm.py"]
                       + [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                          if k not in ("report", "quick")])
    lines = [
        "# Product-key memory against a feed-forward layer: fact recall",
        "",
        f"Written by `{command}`.",
        "",
        f"The task: {facts} fixed facts (a, b) -> v over {args.keys} key tokens and "
        f"{args.values} value tokens; sequences of {args.triples} facts, \"a b v a b v ...\", "
        "loss on the value tokens. A key is two tokens, so no token embedding holds a fact: "
        "the layers after attention must store the answers. Both models: width "
        f"{args.dim}, {args.layers} pre-norm causal layers of {args.heads}-head attention "
        "(attnmem.nn.MultiheadSelfAttention), sinusoidal positions; the feed-forward model "
        f"has an MLP of {args.hidden} units in every layer, the memory model a "
        f"ProductKeyMemory of {args.mem_keys}^2 = {args.mem_keys ** 2} value rows, top "
        f"{args.topk} of {args.mem_heads} heads, in place of the MLP of layer "
        f"{args.layers // 2 + 1} of {args.layers}. AdamW, learning rate {args.lr} (warm-up, "
        f"cosine decay), {args.steps} steps of {args.batch} sequences, the same batches for "
        "both.",
        "",
        "| model | parameters | training loss (last 50 steps) | loss over all facts | "
        "accuracy over all facts | ms per training step (median) | training time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['model']} | {r['params']:,} | {r['train_loss']:.3f} | {r['loss']:.3f} | "
              f"{100 * r['accuracy']:.1f}% | {r['step_ms']:.1f} | {r['total_s']:.0f} |"
              for r in results]
    load = os.getloadavg()[0]
    lines += ["", f"Chance: loss {math.log(args.values):.3f}, accuracy {100 / args.values:.1f}%. "
              f"Measured on {platform.machine()}, {os.cpu_count()} CPUs, torch threads: "
              f"{torch.get_num_threads()}, 1-minute load average at the end: {load:.1f}; torch "
              f"{torch.__version__}, attnmem {attnmem.__version__}. On a CPU attnmem runs its "
              "pure-torch ops, so the step times compare torch code and say nothing about the "
              "Triton kernels."
              + (" The machine was busy with other work, which slows steps unevenly: the step "
                 "times are rough." if load > os.cpu_count() else ""), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=64, help="key tokens K: K^2 facts")
    parser.add_argument("--values", type=int, default=64, help="value tokens")
    parser.add_argument("--triples", type=int, default=8, help="facts per sequence")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128, help="MLP units")
    parser.add_argument("--mem-keys", type=int, default=64, help="sub-keys: mem_keys^2 rows")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--mem-heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--report", default=None, help="write a markdown report here")
    parser.add_argument("--quick", action="store_true", help="a tiny run: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.keys, args.values, args.dim, args.hidden, args.mem_keys = 8, 8, 16, 32, 8
        args.topk, args.steps, args.batch, args.log_every = 4, 10, 8, 5
    torch.manual_seed(args.seed)
    facts = Facts(args.keys, args.values, torch.Generator().manual_seed(args.seed))
    results = []
    for name, memory in (("feed-forward", None),
                         ("product-key", (args.mem_keys, args.topk, args.mem_heads))):
        torch.manual_seed(args.seed)
        model = LanguageModel(facts.vocab, args.dim, args.heads, args.layers, args.hidden,
                              memory)
        results.append(train(name, model, facts, args))
    text = report(args, results)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
