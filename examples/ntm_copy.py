"""The NTM copy task (Graves et al. 2014): read a sequence of random 8-bit vectors, then
write it back from memory. Trained on lengths 1 to 20; reports bit errors per sequence at
lengths 20, 40 and 80 (beyond the training lengths: generalisation).

    python examples/ntm_copy.py [--steps 20000] [--batch 16] [--save ntm_copy.pt]

The data is generated; the paper's model copies perfectly at 20 after enough training
(tens of thousands of sequences): with few steps expect many bit errors.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from attnmem.nn import NTM

BITS = 8


def copy_batch(batch, length, generator=None):
    """Inputs (2L + 1, B, BITS + 1) with a delimiter channel; targets (L, B, BITS)."""
    seq = torch.randint(0, 2, (length, batch, BITS), generator=generator).float()
    inputs = torch.zeros(2 * length + 1, batch, BITS + 1)
    inputs[:length, :, :BITS] = seq
    inputs[length, :, BITS] = 1.0
    return inputs, seq


def bit_errors(model, length, batch=32, seed=1234):
    """Mean number of wrong bits per sequence at this length."""
    generator = torch.Generator().manual_seed(seed + length)
    inputs, targets = copy_batch(batch, length, generator)
    with torch.no_grad():
        out, _ = model(inputs)
    guess = (out[length + 1:] > 0).float()
    return (guess != targets).float().sum(dim=(0, 2)).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="write the trained weights here")
    parser.add_argument("--load", default=None, help="start from these weights")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = NTM(BITS + 1, BITS, controller_size=100, memory_slots=128, memory_width=20,
                read_heads=1, write_heads=1, shift_range=1)
    if args.load:
        model.load_state_dict(torch.load(args.load))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start, running = time.time(), None
    for step in range(1, args.steps + 1):
        length = int(torch.randint(1, args.max_length + 1, ()))
        inputs, targets = copy_batch(args.batch, length)
        out, _ = model(inputs)
        loss = F.binary_cross_entropy_with_logits(out[length + 1:], targets)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 500 == 0 or step == args.steps:
            print(f"step {step:6d}  loss {running:.4f}  bit errors at 20: "
                  f"{bit_errors(model, 20):5.2f}  ({time.time() - start:.0f} s)", flush=True)
    if args.save:
        torch.save(model.state_dict(), args.save)
    print(f"after {args.steps} steps of batch {args.batch} (lengths 1-{args.max_length}):")
    for length in (20, 40, 80):
        print(f"  length {length:3d}: {bit_errors(model, length):6.2f} bit errors per "
              f"sequence of {length * BITS} bits")


if __name__ == "__main__":
    main()
