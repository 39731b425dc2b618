"""Memory-augmented networks on attnmem's memory ops: NTM, MemN2N and a key-value memory."""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

import attnmem
from attnmem.memory import SIMILARITIES
from attnmem.nn import _checks


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

    A step makes a dozen small kernel launches, too few cycles each to keep a GPU busy at
    the sizes NTMs train with (a 128 x 20 memory, batch 16). `step` and `forward` have no
    host syncs, no data-dependent branches and static shapes, so a whole sequence can run as
    one CUDA graph: `torch.compile(model, mode="reduce-overhead")` (traced whole, no graph
    breaks: tests/test_memory_modules.py checks it on the CPU), or `model.graphed(inputs)`,
    which captures forward and backward for one input shape. Neither CUDA-graph path has
    been run on a GPU yet.

    Under torch.autocast the heads' Linear outputs come in the autocast dtype and the
    memory ops promote them to the memory's float32 (attnmem.memory_address): the memory,
    the weights and the reads stay float32 across steps, and step takes back the state it
    returned.
    """

    def __init__(self, input_size, output_size, controller_size=100, memory_slots=128,
                 memory_width=20, read_heads=1, write_heads=1, shift_range=1,
                 memory_init="learned", batch_first=False):
        super().__init__()
        memory_init = _checks.choice("memory_init", memory_init, ("learned", "constant"))
        input_size, output_size, controller_size, memory_slots, memory_width, read_heads, \
            write_heads = (_checks.integer(name, given) for name, given in (
                ("input_size", input_size), ("output_size", output_size),
                ("controller_size", controller_size), ("memory_slots", memory_slots),
                ("memory_width", memory_width), ("read_heads", read_heads),
                ("write_heads", write_heads)))
        shift_range = _checks.integer("shift_range", shift_range, 0)
        batch_first = _checks.flag("batch_first", batch_first)
        self.input_size = input_size
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

    def _check_state(self, state, batch):
        if not isinstance(state, NTMState):
            raise TypeError(f"state must be an NTMState (or None), got {type(state).__name__}")
        n, m, hidden = self.slots, self.width, self.controller.hidden_size
        for name, expected in (("h", (batch, hidden)), ("c", (batch, hidden)),
                               ("memory", (batch, n, m)),
                               ("read_weights", (batch, self.read_heads, n)),
                               ("write_weights", (batch, self.write_heads, n)),
                               ("reads", (batch, self.read_heads, m))):
            _checks.tensor(f"state.{name}", getattr(state, name), [expected], self.read_init)

    def step(self, x: torch.Tensor, state: Optional[NTMState] = None):
        """One time step: x (B, input_size) -> (y (B, output_size), new state)."""
        _checks.tensor("x", x, [("B", self.input_size)], self.read_init)
        batch = x.shape[0]
        if state is None:
            state = self.initial_state(batch)
        else:
            self._check_state(state, batch)
        return self._step(x, state)

    def _step(self, x, state):
        h, c = self.controller(torch.cat([x, state.reads.flatten(1)], dim=1), (state.h, state.c))
        write = self.write_params(h).unflatten(-1, (self.write_heads, -1))
        write_weights = self._address(write[..., :self.addressing], state.memory,
                                      state.write_weights)
        erase = torch.sigmoid(write[..., self.addressing:self.addressing + self.width])
        add = torch.tanh(write[..., self.addressing + self.width:])
        memory = attnmem.memory_write(state.memory, write_weights, erase, add)
        read = self.read_params(h).unflatten(-1, (self.read_heads, -1))
        read_weights = self._address(read, memory, state.read_weights)
        reads = attnmem.memory_read(memory, read_weights)
        y = self.output(torch.cat([h, reads.flatten(1)], dim=1))
        return y, NTMState(h, c, memory, read_weights, write_weights, reads)

    def graphed(self, sample_inputs: torch.Tensor):
        """This model's forward from the initial state and its backward captured in CUDA
        graphs (torch.cuda.make_graphed_callables) for inputs of sample_inputs' shape: a
        callable inputs (T, B, I) -> (outputs, final state) like `self(inputs)`, replaying
        one graph forward and one backward instead of launching every kernel. The model and
        the inputs must be on a CUDA device, in training mode as they will be used; other
        shapes need another `graphed`. Capture runs the model a few times first (warm-up,
        autotuning) and leaves `self` unchanged. Untested on a GPU so far."""
        _checks.tensor("sample_inputs", sample_inputs,
                       [("B", "T", self.input_size) if self.batch_first
                        else ("T", "B", self.input_size)], self.read_init)
        if sample_inputs.device.type != "cuda":
            raise ValueError(f"NTM.graphed captures CUDA graphs: the model and sample_inputs "
                             f"must be on a CUDA device, got {sample_inputs.device}; on the "
                             f"CPU call the model itself")
        return torch.cuda.make_graphed_callables(_Sequence(self), (sample_inputs,))

    def forward(self, inputs: torch.Tensor, state: Optional[NTMState] = None):
        """The whole sequence: inputs (T, B, I) -> (outputs (T, B, O), final state); T = 0
        gives no outputs and the state it was given (the initial one by default)."""
        _checks.tensor("inputs", inputs, [("B", "T", self.input_size) if self.batch_first
                                          else ("T", "B", self.input_size)], self.read_init)
        if self.batch_first:
            inputs = inputs.transpose(0, 1)
        if state is None:
            state = self.initial_state(inputs.shape[1])
        else:
            self._check_state(state, inputs.shape[1])
        outputs = [inputs.new_empty(0, inputs.shape[1], self.output.out_features)]
        for x in inputs:
            y, state = self._step(x, state)
            outputs.append(y[None])
        outputs = torch.cat(outputs)
        return (outputs.transpose(0, 1) if self.batch_first else outputs), state


class _Sequence(nn.Module):
    """ntm(inputs) from the initial state, as a module of its own: make_graphed_callables
    replaces the forward of the module it is given, and takes its parameters from it."""

    def __init__(self, ntm):
        super().__init__()
        self.ntm = ntm

    def forward(self, inputs):
        return self.ntm(inputs)


class MemN2N(nn.Module):
    """End-to-end memory network (Sukhbaatar et al. 2015) for question answering.

    story: (B, S, W) token ids, S sentences of W words; query: (B, W); id 0 is padding, and
    sentences of padding only are not attended to. Returns answer logits (B, vocab_size).
    hops K; adjacent weight tying (A_{k+1} = C_k, B = A_1, the answer matrix W^T = C_K);
    position encoding of word order; temporal encoding T_A, T_C of sentence order; with
    `linear_start = True` (the paper's LS training) the hops' softmax is removed.
    Under torch.autocast the hops read in the embeddings' dtype (the memory ops promote,
    attnmem.memory_attend) and the answer matmul runs in the autocast dtype.
    """

    def __init__(self, vocab_size, embed_dim=20, memory_size=50, hops=3,
                 position_encoding=True, temporal_encoding=True):
        super().__init__()
        vocab_size, embed_dim, memory_size, hops = (
            _checks.integer(name, given) for name, given in (
                ("vocab_size", vocab_size), ("embed_dim", embed_dim),
                ("memory_size", memory_size), ("hops", hops)))
        temporal_encoding = _checks.flag("temporal_encoding", temporal_encoding)
        self.hops, self.memory_size = hops, memory_size
        self.position_encoding = _checks.flag("position_encoding", position_encoding)
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
        """story (B, S, W) and query (B, W) token ids -> answer logits (B, vocab_size)."""
        like = self.embeddings[0].weight
        _checks.token_ids("story", story, ("B", "S", "W"), like)
        _checks.token_ids("query", query, (story.shape[0], "W"), like)
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
    given memory (stored as buffers unless learn=True; key_dim and value_dim, if given, must
    match); otherwise a memory of num_slots (0 is valid: the read is zero) is learned from a
    random start, key_dim and value_dim 64 by default. The memory is shared by the batch
    without copies.

    topk=K reads each query's K best-scoring slots only (attnmem.memory_attend's topk):
    after one pass over the keys a read costs O(K), and only those K slots' keys and values
    get gradients, summed straight into the (N, Dk) and (N, Dv) gradients (the memory is
    passed shared, never expanded to the batch, so no (B, N, D) gradient is built). K must
    not exceed the slot count; forward's weights are then SparseWeights (indices and
    weights (B, K) or (B, R, K)). sparse=True (with topk) makes the keys' and values'
    gradients sparse COO tensors of the touched slots, as nn.Embedding(sparse=True) does,
    for torch.optim.SparseAdam (other parameters take a dense optimizer).

    Under torch.autocast the query layer's keys come in the autocast dtype and the read
    promotes them to the memory's (attnmem.memory_attend): a float32 memory is read in
    float32, never copied down.
    """

    def __init__(self, state_dim, num_slots=None, key_dim=None, value_dim=None, keys=None,
                 values=None, learn=None, similarity="scaled_dot", topk=None, sparse=False):
        super().__init__()
        state_dim = _checks.integer("state_dim", state_dim)
        num_slots = _checks.optional_integer("num_slots", num_slots, 0)
        topk = _checks.optional_integer("topk", topk)
        key_dim = _checks.optional_integer("key_dim", key_dim)
        value_dim = _checks.optional_integer("value_dim", value_dim)
        similarity = _checks.choice("similarity", similarity, SIMILARITIES)
        sparse = _checks.flag("sparse", sparse)
        if sparse and topk is None:
            raise ValueError("sparse=True needs topk: a dense read touches every slot")
        given = keys is not None
        if given != (values is not None):
            raise ValueError("pass both keys and values, or neither")
        if given:
            _checks.tensor("keys", keys, [("N", key_dim or "Dk")])
            _checks.tensor("values", values, [(keys.shape[0], value_dim or "Dv")])
            if num_slots is not None and num_slots != keys.shape[0]:
                raise ValueError(f"num_slots={num_slots} but keys has {keys.shape[0]} slots")
            key_dim, value_dim = keys.shape[1], values.shape[1]
        elif num_slots is None:
            raise ValueError("give num_slots (an int >= 0), or keys and values")
        else:
            key_dim, value_dim = key_dim or 64, value_dim or 64
            keys, values = torch.randn(num_slots, key_dim), torch.randn(num_slots, value_dim)
        if topk is not None and topk > keys.shape[0]:
            raise ValueError(f"topk={topk} is more than the memory's {keys.shape[0]} slots")
        learn = (not given) if learn is None else _checks.flag("learn", learn)
        for name, tensor in (("keys", keys), ("values", values)):
            if learn:
                setattr(self, name, nn.Parameter(tensor.clone()))
            else:
                self.register_buffer(name, tensor.clone())
        self.state_dim = state_dim
        self.similarity = similarity
        self.topk, self.sparse = topk, sparse
        self.query = nn.Linear(state_dim, key_dim)
        self.out = nn.Linear(value_dim, state_dim)
        self.gate = nn.Linear(state_dim + value_dim, state_dim)

    # ShardedKeyValueMemory reads through attnmem.distributed.memory_attend instead.
    _memory_attend = staticmethod(attnmem.memory_attend)

    def forward(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None,
                return_weights: bool = False):
        """h (B, state_dim) or (B, R, state_dim); mask (B, N) bool, True = usable slot ->
        h fused with its reads, like h, and with return_weights=True the weights (B, N) or
        (B, R, N); with topk, SparseWeights of (B, K) or (B, R, K)."""
        shape = _checks.tensor("h", h, [("B", self.state_dim), ("B", "R", self.state_dim)],
                               self.query.weight)
        return_weights = _checks.flag("return_weights", return_weights)
        single = len(shape) == 2
        if single:
            h = h[:, None]
        batch = h.shape[0]
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = usable slot), got "
                                f"{getattr(mask, 'dtype', type(mask).__name__)}")
            if tuple(mask.shape) != (batch, self.keys.shape[0]):
                raise ValueError(f"mask must be (B, N) = ({batch}, {self.keys.shape[0]}), got "
                                 f"shape {tuple(mask.shape)}")
            _checks.same_device("mask", mask, self.query.weight)
        keys, values = self.keys, self.values  # top-k reads take the shared (N, D) memory
        sparse = {"topk": self.topk, "sparse_grad": self.sparse}
        if self.topk is None:  # dense reads (and ShardedKeyValueMemory's) take (B, N, D)
            keys, values, sparse = keys.expand(batch, -1, -1), values.expand(batch, -1, -1), {}
        read = self._memory_attend(
            keys, self.query(h), values=values, similarity=self.similarity, mask=mask,
            return_weights=return_weights, **sparse)
        read, weights = read if return_weights else (read, None)
        fused = h + torch.sigmoid(self.gate(torch.cat([h, read], -1))) * self.out(read)
        if single:
            fused = fused[:, 0]
            if weights is not None:
                weights = type(weights)(*(w[:, 0] for w in weights)) if sparse \
                    else weights[:, 0]
        return (fused, weights) if return_weights else fused
