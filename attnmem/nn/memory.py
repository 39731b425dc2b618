"""Memory-augmented networks on attnmem's memory ops: NTM, MemN2N and a key-value memory."""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

import attnmem


class NTMState(NamedTuple):
    """Recurrent state of an NTM: controller (h, c), memory (B, N, M), the last read and
    write weights (B, R, N) and (B, W, N), and the last read vectors (B, R, M)."""

    h: torch.Tensor
    c: torch.Tensor
    memory: torch.Tensor
    read_weights: torch.Tensor
    write_weights: torch.Tensor
    reads: torch.Tensor


class NTM(nn.Module):
    """Neural Turing Machine (Graves et al. 2014) with an LSTM controller.

    Each of the R read and W write heads emits a key, a key strength, an interpolation gate,
    a shift distribution over 2 * shift_range + 1 offsets and a sharpening exponent (write
    heads also an erase and an add vector); addressing runs attnmem.memory_address then
    attnmem.location_address. Per step the heads write, then read the written memory.

    memory_init: "learned" (a trained (N, M) matrix) or "constant" (every cell 1e-6).
    Inputs (T, B, input_size), or (B, T, input_size) with batch_first.
    """

    def __init__(self, input_size, output_size, controller_size=100, memory_slots=128,
                 memory_width=20, read_heads=1, write_heads=1, shift_range=1,
                 memory_init="learned", batch_first=False):
        super().__init__()
        if memory_init not in ("learned", "constant"):
            raise ValueError(f"memory_init must be 'learned' or 'constant', got {memory_init!r}")
        for name, value in (("memory_slots", memory_slots), ("memory_width", memory_width),
                            ("read_heads", read_heads), ("write_heads", write_heads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if shift_range < 0:
            raise ValueError(f"shift_range must be >= 0, got {shift_range}")
        self.slots, self.width = memory_slots, memory_width
        self.read_heads, self.write_heads = read_heads, write_heads
        self.shifts = 2 * shift_range + 1
        self.batch_first = batch_first
        self.controller = nn.LSTMCell(input_size + read_heads * memory_width, controller_size)
        # Per head: key (M), strength, gate, shift (S), gamma; write heads add erase and add.
        self.addressing = memory_width + 3 + self.shifts
        self.read_params = nn.Linear(controller_size, read_heads * self.addressing)
        self.write_params = nn.Linear(controller_size,
                                      write_heads * (self.addressing + 2 * memory_width))
        self.output = nn.Linear(controller_size + read_heads * memory_width, output_size)
        if memory_init == "learned":
            self.memory_init = nn.Parameter(torch.randn(memory_slots, memory_width) * 0.05)
        else:
            self.register_buffer("memory_init", torch.full((memory_slots, memory_width), 1e-6))
        self.read_init = nn.Parameter(torch.zeros(read_heads, memory_width))

    def initial_state(self, batch: int) -> NTMState:
        """Zero controller state, the initial memory, every head focused on slot 0."""
        p = self.read_init
        focus = torch.zeros(self.slots, dtype=p.dtype, device=p.device)
        focus[0] = 1
        zeros = p.new_zeros(batch, self.controller.hidden_size)
        return NTMState(zeros, zeros.clone(),
                        self.memory_init.expand(batch, -1, -1).to(p.dtype),
                        focus.expand(batch, self.read_heads, -1),
                        focus.expand(batch, self.write_heads, -1),
                        torch.tanh(self.read_init).expand(batch, -1, -1))

    def _address(self, params, memory, prev_weights):
        m, s = self.width, self.shifts
        key, strength = params[..., :m], F.softplus(params[..., m])
        gate = torch.sigmoid(params[..., m + 1])
        shift = torch.softmax(params[..., m + 2:m + 2 + s], dim=-1)
        gamma = 1 + F.softplus(params[..., m + 2 + s])
        content = attnmem.memory_address(memory, key, strength=strength, similarity="cosine")
        return attnmem.location_address(content, prev_weights, gate, shift, gamma)

    def step(self, x: torch.Tensor, state: Optional[NTMState] = None):
        """One time step: x (B, input_size) -> (y (B, output_size), new state)."""
        if state is None:
            state = self.initial_state(x.shape[0])
        batch = x.shape[0]
        h, c = self.controller(torch.cat([x, state.reads.flatten(1)], dim=1), (state.h, state.c))
        write = self.write_params(h).view(batch, self.write_heads, -1)
        write_weights = self._address(write[..., :self.addressing], state.memory,
                                      state.write_weights)
        erase = torch.sigmoid(write[..., self.addressing:self.addressing + self.width])
        add = torch.tanh(write[..., self.addressing + self.width:])
        memory = attnmem.memory_write(state.memory, write_weights, erase, add)
        read = self.read_params(h).view(batch, self.read_heads, -1)
        read_weights = self._address(read, memory, state.read_weights)
        reads = attnmem.memory_read(memory, read_weights)
        y = self.output(torch.cat([h, reads.flatten(1)], dim=1))
        return y, NTMState(h, c, memory, read_weights, write_weights, reads)

    def forward(self, inputs: torch.Tensor, state: Optional[NTMState] = None):
        """The whole sequence: inputs (T, B, I) -> (outputs (T, B, O), final state)."""
        if self.batch_first:
            inputs = inputs.transpose(0, 1)
        outputs = []
        for x in inputs:
            y, state = self.step(x, state)
            outputs.append(y)
        outputs = torch.stack(outputs)
        return (outputs.transpose(0, 1) if self.batch_first else outputs), state


class MemN2N(nn.Module):
    """End-to-end memory network (Sukhbaatar et al. 2015) for question answering.

    story: (B, S, W) token ids, S sentences of W words; query: (B, W); id 0 is padding, and
    sentences of padding only are not attended to. Returns answer logits (B, vocab_size).
    hops K; adjacent weight tying (A_{k+1} = C_k, B = A_1, the answer matrix W^T = C_K);
    position encoding of word order; temporal encoding T_A, T_C of sentence order; with
    `linear_start = True` (the paper's LS training) the hops' softmax is removed.
    """

    def __init__(self, vocab_size, embed_dim=20, memory_size=50, hops=3,
                 position_encoding=True, temporal_encoding=True):
        super().__init__()
        if hops < 1:
            raise ValueError(f"hops must be >= 1, got {hops}")
        self.hops, self.memory_size = hops, memory_size
        self.position_encoding = position_encoding
        self.linear_start = False
        # Adjacent tying: embeddings[k] is A_{k+1} and C_k at once.
        self.embeddings = nn.ModuleList(nn.Embedding(vocab_size, embed_dim, padding_idx=0)
                                        for _ in range(hops + 1))
        for e in self.embeddings:
            nn.init.normal_(e.weight, std=0.1)
            e.weight.data[0] = 0
        self.temporal = nn.ParameterList(
            nn.Parameter(torch.randn(memory_size, embed_dim) * 0.1) for _ in range(hops + 1)
        ) if temporal_encoding else None

    @staticmethod
    def position_weights(words: int, dim: int, device=None) -> torch.Tensor:
        """l_kj = (1 - j/J) - (k/d)(1 - 2j/J), j and k from 1: (J, d)."""
        j = torch.arange(1, words + 1, device=device, dtype=torch.float32)[:, None]
        k = torch.arange(1, dim + 1, device=device, dtype=torch.float32)[None, :]
        return (1 - j / words) - (k / dim) * (1 - 2 * j / words)

    def _encode(self, tokens, k):
        """Sum of word embeddings under position encoding: (..., W) -> (..., d)."""
        e = self.embeddings[k](tokens)
        if self.position_encoding:
            e = e * self.position_weights(tokens.shape[-1], e.shape[-1], e.device).to(e.dtype)
        return e.sum(-2)

    def forward(self, story: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        if story.ndim != 3 or query.ndim != 2 or story.shape[0] != query.shape[0]:
            raise ValueError(f"story must be (B, S, W) and query (B, W), got "
                             f"{tuple(story.shape)} and {tuple(query.shape)}")
        if story.shape[1] > self.memory_size:
            raise ValueError(f"story has {story.shape[1]} sentences, more than memory_size="
                             f"{self.memory_size}")
        sentences = story.shape[1]
        mask = (story != 0).any(-1)
        u = self._encode(query, 0)
        for k in range(self.hops):
            m, c = self._encode(story, k), self._encode(story, k + 1)
            if self.temporal is not None:
                m = m + self.temporal[k][:sentences]
                c = c + self.temporal[k + 1][:sentences]
            if self.linear_start:
                scores = torch.matmul(m, u[:, :, None]).squeeze(-1) * mask
                o = attnmem.memory_read(c, scores[:, None, :]).squeeze(1)
            else:
                o = attnmem.memory_attend(m, u[:, None, :], values=c, similarity="dot",
                                          mask=mask).squeeze(1)
            u = u + o
        return u @ self.embeddings[self.hops].weight.t()


class KeyValueMemory(nn.Module):
    """A large external memory of keys (N, Dk) and values (N, Dv), fixed or learned, that a
    model queries by attention and fuses into its state through a learned gate:
    out = h + sigmoid(W_g [h, r]) * W_o r, with r = memory_attend(keys, W_q h).

    h: (B, state_dim) or (B, R, state_dim) for R queries. Pass keys/values tensors to use a
    given memory (stored as buffers unless learn=True); otherwise a memory of num_slots is
    learned from a random start. The memory is shared by the batch without copies.
    """

    def __init__(self, state_dim, num_slots=None, key_dim=64, value_dim=64, keys=None,
                 values=None, learn=None, similarity="scaled_dot"):
        super().__init__()
        given = keys is not None
        if given != (values is not None):
            raise ValueError("pass both keys and values, or neither")
        if given:
            if keys.ndim != 2 or values.ndim != 2 or keys.shape[0] != values.shape[0]:
                raise ValueError(f"keys must be (N, Dk) and values (N, Dv), got "
                                 f"{tuple(keys.shape)} and {tuple(values.shape)}")
            key_dim, value_dim = keys.shape[1], values.shape[1]
        elif num_slots is None or num_slots < 1:
            raise ValueError("give num_slots >= 1, or keys and values")
        else:
            keys, values = torch.randn(num_slots, key_dim), torch.randn(num_slots, value_dim)
        learn = (not given) if learn is None else learn
        for name, tensor in (("keys", keys), ("values", values)):
            if learn:
                setattr(self, name, nn.Parameter(tensor.clone()))
            else:
                self.register_buffer(name, tensor.clone())
        self.similarity = similarity
        self.query = nn.Linear(state_dim, key_dim)
        self.out = nn.Linear(value_dim, state_dim)
        self.gate = nn.Linear(state_dim + value_dim, state_dim)

    def forward(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None,
                return_weights: bool = False):
        single = h.ndim == 2
        if single:
            h = h[:, None]
        batch = h.shape[0]
        read = attnmem.memory_attend(
            self.keys.expand(batch, -1, -1), self.query(h),
            values=self.values.expand(batch, -1, -1), similarity=self.similarity,
            mask=mask, return_weights=return_weights)
        read, weights = read if return_weights else (read, None)
        fused = h + torch.sigmoid(self.gate(torch.cat([h, read], -1))) * self.out(read)
        if single:
            fused = fused[:, 0]
            weights = None if weights is None else weights[:, 0]
        return (fused, weights) if return_weights else fused
