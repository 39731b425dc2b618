"""An encoder-decoder with attention on a task it generates: reverse a string of digits
(lengths 3 to 12, padded in batches). The decoder attends with Bahdanau's additive
attention (the previous decoder state queries the encoder at every step, on the fused
additive kernel) or Luong's global "general" attention (the current state queries; all
target steps at once under teacher forcing). Reports token and whole-sequence accuracy of
greedy decoding on held-out strings and saves an alignment heatmap: reversal shows as an
anti-diagonal.

    python examples/seq2seq_attention.py [--attention bahdanau|luong] [--steps 1500]
                                         [--heatmap seq2seq_alignment.png]
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from attnmem.nn import AdditiveAttention, LuongAttention
from attnmem.viz import plot_attention

PAD, BOS, EOS = 10, 11, 12
VOCAB = 13


def reversal_batch(batch, min_len, max_len, generator=None):
    """Sources (B, S) of digits padded with PAD, their lengths, and targets: the reversed
    digits then EOS, padded, (B, S + 1)."""
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=generator)
    digits = torch.randint(0, 10, (batch, max_len), generator=generator)
    positions = torch.arange(max_len)
    source = torch.where(positions < lengths[:, None], digits, PAD)
    reverse_index = (lengths[:, None] - 1 - positions).clamp(min=0)
    target = torch.full((batch, max_len + 1), PAD)
    target[:, :max_len] = torch.where(positions < lengths[:, None],
                                      digits.gather(1, reverse_index), PAD)
    target[torch.arange(batch), lengths] = EOS
    return source, lengths, target


class Seq2Seq(nn.Module):
    def __init__(self, attention, hidden=128, embed=32):
        super().__init__()
        self.attention_kind = attention
        self.embed = nn.Embedding(VOCAB, embed)
        self.encoder = nn.GRU(embed, hidden // 2, batch_first=True, bidirectional=True)
        if attention == "bahdanau":
            self.attention = AdditiveAttention(hidden, hidden, hidden)
            self.cell = nn.GRUCell(embed + hidden, hidden)
            self.readout = nn.Linear(2 * hidden, VOCAB)
        else:
            self.attention = LuongAttention(hidden, score="general", mode="global")
            self.decoder = nn.GRU(embed, hidden, batch_first=True)
            self.readout = nn.Linear(hidden, VOCAB)

    def encode(self, source, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(source), lengths,
                                                   batch_first=True, enforce_sorted=False)
        states, last = self.encoder(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(states, batch_first=True,
                                                     total_length=source.shape[1])
        return states, torch.cat([last[0], last[1]], -1)  # (B, S, H), (B, H)

    def forward(self, source, lengths, previous_tokens):
        """Teacher forcing: logits (B, T, VOCAB) and alignments (B, T, S) for the tokens
        that precede each target position."""
        states, state = self.encode(source, lengths)
        inputs = self.embed(previous_tokens)
        if self.attention_kind == "luong":
            outputs, _ = self.decoder(inputs, state[None].contiguous())
            attentional, weights = self.attention(outputs, states, lengths, return_weights=True)
            return self.readout(attentional), weights
        keys = self.attention.project_keys(states)
        logits, alignments = [], []
        for t in range(inputs.shape[1]):
            step_logits, state, weights = self.step(inputs[:, t], state, states, lengths, keys)
            logits.append(step_logits)
            alignments.append(weights)
        return torch.stack(logits, 1), torch.stack(alignments, 1)

    def step(self, token_embedding, state, states, lengths, keys):
        context, weights = self.attention(state, states, kv_lengths=lengths, return_weights=True,
                                          projected_keys=keys)
        state = self.cell(torch.cat([token_embedding, context], -1), state)
        return self.readout(torch.cat([state, context], -1)), state, weights

    @torch.no_grad()
    def greedy(self, source, lengths, steps):
        """Greedy decoding: tokens (B, steps) and alignments (B, steps, S)."""
        if self.attention_kind == "luong":  # re-run the decoder on its own outputs
            tokens = torch.full((source.shape[0], 1), BOS)
            for _ in range(steps):
                logits, weights = self(source, lengths, tokens)
                tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], 1)
            return tokens[:, 1:], weights
        states, state = self.encode(source, lengths)
        keys = self.attention.project_keys(states)
        token = torch.full((source.shape[0],), BOS)
        tokens, alignments = [], []
        for _ in range(steps):
            logits, state, weights = self.step(self.embed(token), state, states, lengths, keys)
            token = logits.argmax(-1)
            tokens.append(token)
            alignments.append(weights)
        return torch.stack(tokens, 1), torch.stack(alignments, 1)


def accuracy(model, batch, min_len, max_len, seed):
    source, lengths, target = reversal_batch(batch, min_len, max_len,
                                             torch.Generator().manual_seed(seed))
    tokens, alignments = model.greedy(source, lengths, target.shape[1])
    real = target != PAD
    token_acc = ((tokens == target) & real).sum().item() / real.sum().item()
    sequence_acc = ((tokens == target) | ~real).all(1).float().mean().item()
    return token_acc, sequence_acc, (source, lengths, tokens, alignments)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", choices=["bahdanau", "luong"], default="bahdanau")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heatmap", default="seq2seq_alignment.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    model = Seq2Seq(args.attention, hidden=args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.time()
    for step in range(1, args.steps + 1):
        source, lengths, target = reversal_batch(args.batch, args.min_len, args.max_len)
        previous = torch.cat([torch.full((args.batch, 1), BOS), target[:, :-1]], 1)
        previous = previous.masked_fill(previous == EOS, PAD)
        logits, _ = model(source, lengths, previous)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f} s",
                  flush=True)

    token_acc, sequence_acc, example = accuracy(model, 1000, args.min_len, args.max_len, 1234)
    print(f"{args.attention} attention, held-out strings of length {args.min_len}-"
          f"{args.max_len}: token accuracy {100 * token_acc:.1f}%, "
          f"sequence accuracy {100 * sequence_acc:.1f}%")

    source, lengths, tokens, alignments = example
    n = int(lengths[0])
    source_labels = [str(int(d)) for d in source[0, :n]]
    target_labels = ["<eos>" if int(t) == EOS else str(int(t)) for t in tokens[0, :n + 1]]
    figure = plot_attention(alignments[0, :n + 1, :n], source_labels, target_labels,
                            title=f"{args.attention} attention: reversing digits")
    figure.savefig(args.heatmap, dpi=120)
    print(f"alignment of a held-out example saved to {args.heatmap}")


if __name__ == "__main__":
    main()
