"""NTM, MemN2N and KeyValueMemory: interfaces, gradients, and both backends agreeing."""

import os

import pytest
import torch

import attnmem
from attnmem.nn import NTM, KeyValueMemory, MemN2N

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def test_ntm_steps_equal_the_sequence_and_train_every_parameter():
    ntm = NTM(input_size=5, output_size=4, controller_size=16, memory_slots=12, memory_width=6,
              read_heads=2, write_heads=2, shift_range=1)
    x = torch.randn(7, 3, 5)
    out, state = ntm(x)
    assert out.shape == (7, 3, 4) and state.memory.shape == (3, 12, 6)
    assert state.read_weights.shape == (3, 2, 12) and state.write_weights.shape == (3, 2, 12)
    torch.testing.assert_close(state.read_weights.sum(-1), torch.ones(3, 2))
    stepped, s = [], None
    for t in range(7):
        y, s = ntm.step(x[t], s)
        stepped.append(y)
    torch.testing.assert_close(torch.stack(stepped), out)
    out.sum().backward()
    for name, p in ntm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_ntm_batch_first_and_constant_memory():
    ntm = NTM(3, 2, controller_size=8, memory_slots=5, memory_width=4, memory_init="constant",
              batch_first=True)
    assert "memory_init" not in dict(ntm.named_parameters())
    out, _ = ntm(torch.randn(2, 6, 3))
    assert out.shape == (2, 6, 2)
    with pytest.raises(ValueError, match="memory_init must be"):
        NTM(3, 2, memory_init="zeros")
    with pytest.raises(ValueError, match="read_heads must be an int >= 1"):
        NTM(3, 2, read_heads=0)


@pytest.mark.skipif(not INTERPRET, reason="drives the kernels through the interpreter")
def test_ntm_backends_agree():
    torch.manual_seed(0)
    ntm = NTM(4, 3, controller_size=8, memory_slots=10, memory_width=5, read_heads=1,
              write_heads=1)
    x = torch.randn(3, 2, 4)
    results = {}
    for backend in ("torch", "triton"):
        ntm.zero_grad()
        with attnmem.use_backend(backend):
            out, _ = ntm(x)
        out.square().sum().backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in ntm.parameters()])
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-5, rtol=1e-4)
    for a, b in zip(results["triton"][1], results["torch"][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", ["torch"] + (
    [pytest.param("triton", marks=pytest.mark.slow)] if INTERPRET else []))
def test_ntm_training_step_traces_whole_and_matches_eager(backend):
    """Issue 15: a whole NTM training step (forward, loss, backward) under
    torch.compile(fullgraph=True): no host sync or data-dependent branch breaks the graph,
    which is what a CUDA graph (mode="reduce-overhead", NTM.graphed) needs."""
    torch.manual_seed(0)
    ntm = NTM(5, 4, controller_size=16, memory_slots=12, memory_width=6, read_heads=2,
              write_heads=2)
    x, target = torch.randn(4, 3, 5), torch.rand(4, 3, 4)

    def loss_fn(x, target):
        out, state = ntm(x)
        return (torch.nn.functional.binary_cross_entropy_with_logits(out, target)
                + state.memory.square().mean())

    params = list(ntm.parameters())
    torch._dynamo.reset()
    with attnmem.use_backend(backend):
        expect = loss_fn(x, target)
        expect_grads = torch.autograd.grad(expect, params)
        got = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, target)
        got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, expect)
    for a, b in zip(got_grads, expect_grads):
        torch.testing.assert_close(a, b)


def test_ntm_graphed_needs_cuda():
    ntm = NTM(5, 4, controller_size=8, memory_slots=6, memory_width=4)
    with pytest.raises(ValueError, match="CUDA device"):
        ntm.graphed(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="sample_inputs"):
        ntm.graphed(torch.randn(3, 2, 7))


def test_memn2n_position_encoding_and_tying():
    l = MemN2N.position_weights(4, 3)  # noqa: E741 (the paper's name)
    assert torch.isclose(l[0, 0], torch.tensor((1 - 1 / 4) - (1 / 3) * (1 - 2 / 4)))
    model = MemN2N(vocab_size=30, embed_dim=8, memory_size=10, hops=3)
    assert len(model.embeddings) == 4 and len(model.temporal) == 4  # A1=B, C_k = A_{k+1}, W


def test_memn2n_ignores_padding_sentences_and_trains():
    torch.manual_seed(0)
    model = MemN2N(vocab_size=20, embed_dim=8, memory_size=8, hops=2, temporal_encoding=False)
    story = torch.randint(1, 20, (3, 4, 5))
    query = torch.randint(1, 20, (3, 5))
    logits = model(story, query)
    assert logits.shape == (3, 20)
    padded = torch.cat([story, torch.zeros(3, 2, 5, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, query), logits)
    model.linear_start = True
    linear = model(story, query)
    assert not torch.allclose(linear, logits)
    linear.sum().backward()
    assert all(e.weight.grad is not None for e in model.embeddings)
    with pytest.raises(ValueError, match="more than memory_size"):
        model(torch.randint(1, 20, (1, 9, 5)), query[:1])


def test_key_value_memory_fixed_and_learned():
    keys, values = torch.randn(50, 6), torch.randn(50, 7)
    fixed = KeyValueMemory(state_dim=9, keys=keys, values=values)
    assert "keys" in dict(fixed.named_buffers()) and "keys" not in dict(fixed.named_parameters())
    h = torch.randn(4, 9)
    out, weights = fixed(h, return_weights=True)
    assert out.shape == (4, 9) and weights.shape == (4, 50)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    learned = KeyValueMemory(state_dim=9, num_slots=30, key_dim=5, value_dim=4)
    multi = learned(torch.randn(4, 3, 9))
    assert multi.shape == (4, 3, 9)
    multi.sum().backward()
    assert learned.keys.grad is not None and learned.values.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pass both keys and values"):
        KeyValueMemory(9, keys=keys)
    with pytest.raises(ValueError, match="num_slots"):
        KeyValueMemory(9)


@pytest.mark.skipif(not INTERPRET, reason="drives the kernels through the interpreter")
def test_key_value_memory_backends_agree():
    kv = KeyValueMemory(state_dim=8, num_slots=40, key_dim=16, value_dim=12)
    h = torch.randn(3, 2, 8)
    outs = []
    for backend in ("torch", "triton"):
        kv.zero_grad()
        with attnmem.use_backend(backend):
            out = kv(h)
        out.sum().backward()
        outs.append((out.detach(), kv.keys.grad.clone(), kv.values.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if INTERPRET else []))
def test_key_value_memory_sparse_trains_with_sparse_adam(backend):
    """KeyValueMemory(topk, sparse=True): keys' and values' gradients are sparse COO tensors
    of the touched slots, equal densified to the dense ones (sparse=False), and one
    SparseAdam step moves the memory as one Adam step on those dense gradients does (Adam's
    first step leaves zero-gradient rows where they are)."""
    torch.manual_seed(0)
    sparse = KeyValueMemory(state_dim=8, num_slots=40, key_dim=6, value_dim=5, topk=3,
                            sparse=True)
    dense = KeyValueMemory(state_dim=8, num_slots=40, key_dim=6, value_dim=5, topk=3)
    dense.load_state_dict(sparse.state_dict())
    h = torch.randn(3, 2, 8)
    h[1, 0] = h[0, 0]  # two batch entries read the same slots
    start = {name: getattr(sparse, name).detach().clone() for name in ("keys", "values")}
    for model, optimizer in ((sparse, torch.optim.SparseAdam), (dense, torch.optim.Adam)):
        with attnmem.use_backend(backend):
            model(h).square().sum().backward()
        optimizer([model.keys, model.values], lr=0.1).step()
    for name in ("keys", "values"):
        got, expect = getattr(sparse, name), getattr(dense, name)
        assert got.grad.layout == torch.sparse_coo and expect.grad.layout == torch.strided
        touched = (expect.grad != 0).any(-1)
        assert 3 <= touched.sum() <= 15  # 6 queries of 3 slots, two of them the same
        assert torch.equal(got.grad.coalesce().indices()[0], touched.nonzero()[:, 0])
        torch.testing.assert_close(got.grad.to_dense(), expect.grad, rtol=1e-6, atol=1e-7)
        # Adam's first step is lr * g / (|g| + eps): rounding in small g moves it a little.
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-4)
        assert torch.equal(got[~touched], start[name][~touched])
        assert ((got - start[name])[touched].abs().amax(-1) > 0.09).all()


def _ntm(**kwargs):
    return NTM(4, 3, controller_size=8, memory_slots=6, memory_width=5, read_heads=2, **kwargs)


def _state(**changes):
    return _ntm().initial_state(2)._replace(**changes)


IDS = torch.randint(1, 20, (2, 4, 5))
KV = dict(keys=torch.randn(10, 6), values=torch.randn(10, 7))


@pytest.mark.parametrize("message,call", [
    ("input_size must be an int >= 1, got 0", lambda: NTM(0, 3)),
    ("memory_slots must be an int, got float", lambda: NTM(4, 3, memory_slots=8.0)),
    ("controller_size must be an int, got bool", lambda: NTM(4, 3, controller_size=True)),
    ("shift_range must be an int >= 0, got -1", lambda: NTM(4, 3, shift_range=-1)),
    ("memory_init must be one of", lambda: NTM(4, 3, memory_init="zeros")),
    ("batch_first must be a bool", lambda: NTM(4, 3, batch_first="yes")),
    ("inputs must be \\(T, B, 4\\), got shape \\(7, 2, 5\\)", lambda: _ntm()(torch.randn(7, 2, 5))),
    ("inputs must be \\(B, T, 4\\), got shape \\(7, 4\\)",
     lambda: _ntm(batch_first=True)(torch.randn(7, 4))),
    ("inputs must be a floating-point tensor",
     lambda: _ntm()(torch.ones(7, 2, 4, dtype=torch.long))),
    ("inputs must have the module's dtype torch.float32",
     lambda: _ntm()(torch.randn(7, 2, 4, dtype=torch.float64))),
    ("x must be \\(B, 4\\), got shape \\(2, 5\\)", lambda: _ntm().step(torch.randn(2, 5))),
    ("state must be an NTMState", lambda: _ntm().step(torch.randn(2, 4), tuple(_state()))),
    ("state.memory must be \\(2, 6, 5\\), got shape \\(2, 7, 5\\)",
     lambda: _ntm().step(torch.randn(2, 4), _state(memory=torch.zeros(2, 7, 5)))),
    ("state.h must be \\(3, 8\\), got shape \\(2, 8\\)",
     lambda: _ntm()(torch.randn(1, 3, 4), _state())),
    ("state.read_weights must be \\(2, 2, 6\\)",
     lambda: _ntm().step(torch.randn(2, 4), _state(read_weights=torch.zeros(2, 1, 6)))),
    ("vocab_size must be an int >= 1, got 0", lambda: MemN2N(0)),
    ("hops must be an int >= 1, got 0", lambda: MemN2N(20, hops=0)),
    ("position_encoding must be a bool", lambda: MemN2N(20, position_encoding=None)),
    ("story must be \\(B, S, W\\), got shape \\(4, 5\\)", lambda: MemN2N(20)(IDS[0], IDS[:, 0])),
    ("query must be \\(2, W\\), got shape \\(3, 5\\)",
     lambda: MemN2N(20)(IDS, torch.randint(1, 20, (3, 5)))),
    ("story must be an integer tensor of token ids, got torch.float32",
     lambda: MemN2N(20)(IDS.float(), IDS[:, 0])),
    ("query must be an integer tensor of token ids, got torch.bool",
     lambda: MemN2N(20)(IDS, IDS[:, 0] > 3)),
    ("story is on meta but the module is on cpu", lambda: MemN2N(20)(IDS.to("meta"), IDS[:, 0])),
    ("state.c is on meta but the module is on cpu",
     lambda: _ntm().step(torch.randn(2, 4), _state(c=torch.zeros(2, 8, device="meta")))),
    ("story has 4 sentences, more than memory_size=3",
     lambda: MemN2N(20, memory_size=3)(IDS, IDS[:, 0])),
    ("state_dim must be an int >= 1", lambda: KeyValueMemory(0, num_slots=4)),
    ("num_slots must be an int >= 0, got -1", lambda: KeyValueMemory(9, num_slots=-1)),
    ("give num_slots", lambda: KeyValueMemory(9)),
    ("pass both keys and values", lambda: KeyValueMemory(9, keys=KV["keys"])),
    ("similarity must be one of", lambda: KeyValueMemory(9, 4, similarity="l2")),
    ("keys must be \\(N, Dk\\), got shape \\(10,\\)",
     lambda: KeyValueMemory(9, keys=torch.randn(10), values=KV["values"])),
    ("keys must be \\(N, 5\\), got shape \\(10, 6\\)", lambda: KeyValueMemory(9, key_dim=5, **KV)),
    ("values must be \\(10, Dv\\), got shape \\(9, 7\\)",
     lambda: KeyValueMemory(9, keys=KV["keys"], values=KV["values"][:9])),
    ("num_slots=4 but keys has 10 slots", lambda: KeyValueMemory(9, 4, **KV)),
    ("learn must be a bool", lambda: KeyValueMemory(9, learn=1, **KV)),
    ("h must be \\(B, 9\\) or \\(B, R, 9\\), got shape \\(4, 8\\)",
     lambda: KeyValueMemory(9, **KV)(torch.randn(4, 8))),
    ("h must have the module's dtype", lambda: KeyValueMemory(9, **KV)(torch.randn(4, 9).double())),
    ("mask must be \\(B, N\\) = \\(4, 10\\), got shape \\(10,\\)",
     lambda: KeyValueMemory(9, **KV)(torch.randn(4, 9), mask=torch.ones(10, dtype=torch.bool))),
    ("mask must be a bool tensor", lambda: KeyValueMemory(9, **KV)(torch.randn(4, 9),
                                                                   mask=torch.ones(4, 10))),
])
def test_bad_inputs_raise_named_errors(message, call):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    ntm = NTM(np.int64(4), np.int32(3), controller_size=np.int16(8), memory_slots=np.uint8(6),
              memory_width=np.int64(5), shift_range=np.int64(1), batch_first=np.True_)
    assert ntm(torch.randn(2, 3, 4))[0].shape == (2, 3, 3)
    assert MemN2N(np.int64(20), np.int32(8), hops=np.int8(2))(IDS, IDS[:, 0]).shape == (2, 20)
    kv = KeyValueMemory(np.int64(9), num_slots=np.int32(4), key_dim=np.int8(3))
    assert kv.keys.shape == (4, 3) and kv(torch.randn(2, 9)).shape == (2, 9)


BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])


def _assert_zero_grads(tensors):
    for t in tensors:
        assert t.grad is None or not t.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps,batch", [(0, 2), (3, 0)])
def test_ntm_takes_empty_inputs(steps, batch, backend):
    """No time steps: no outputs and the initial state; zero batch: empty everything."""
    ntm = _ntm()
    x = torch.randn(steps, batch, 4, requires_grad=True)
    with attnmem.use_backend(backend):
        out, state = ntm(x)
        (out.sum() + state.memory.sum()).backward()
    assert out.shape == (steps, batch, 3) and state.memory.shape == (batch, 6, 5)
    torch.testing.assert_close(state.memory, ntm.memory_init.expand(batch, -1, -1)
                               if steps == 0 else state.memory.new_zeros(0, 6, 5))
    _assert_zero_grads([x, *(p for name, p in ntm.named_parameters() if name != "memory_init")])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("linear_start", [False, True])
@pytest.mark.parametrize("batch,sentences,words", [(0, 4, 5), (2, 0, 5), (2, 4, 0)])
def test_memn2n_takes_empty_inputs(batch, sentences, words, linear_start, backend):
    """Zero batch, no sentences (every hop reads zeros: the answer is u W^T) or no words."""
    model = MemN2N(20, embed_dim=8, memory_size=6, hops=2)
    model.linear_start = linear_start
    story = torch.randint(1, 20, (batch, sentences, words))
    query = torch.randint(1, 20, (batch, 5))
    with attnmem.use_backend(backend):
        logits = model(story, query)
        logits.square().sum().backward()
    assert logits.shape == (batch, 20) and torch.isfinite(logits).all()
    if sentences == 0:
        u = model._encode(query, 0)
        torch.testing.assert_close(logits, u @ model.embeddings[-1].weight.t())
        _assert_zero_grads(model.embeddings[1:-1].parameters())
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,queries,slots", [(0, 2, 10), (3, 0, 10), (3, 2, 0)])
def test_key_value_memory_takes_empty_inputs(batch, queries, slots, backend):
    """Zero batch, zero queries (h (B, 0, state_dim)) or zero memory slots (a zero read:
    out = h + sigmoid(W_g [h, 0]) * b_o), forward and backward."""
    kv = KeyValueMemory(9, num_slots=slots, key_dim=6, value_dim=7)
    h = torch.randn(batch, queries, 9, requires_grad=True)
    with attnmem.use_backend(backend):
        out, weights = kv(h, return_weights=True)
        (out.sum() + weights.sum()).backward()
    assert out.shape == h.shape and weights.shape == (batch, queries, slots)
    if slots == 0:
        read = h.new_zeros(batch, queries, 7)
        torch.testing.assert_close(out, h + torch.sigmoid(kv.gate(torch.cat([h, read], -1)))
                                   * kv.out.bias)
    _assert_zero_grads([kv.keys, kv.values, kv.query.weight])
