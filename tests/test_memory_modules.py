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
    with pytest.raises(ValueError, match="read_heads must be >= 1"):
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
