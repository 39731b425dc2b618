"""AdditiveAttention, PointerAttention, HardAttention and LuongAttention against their
papers' formulas, written out per query in float64; the kernel paths on both backends."""

import math
import os

import pytest
import torch

import attnmem
from attnmem.nn import AdditiveAttention, HardAttention, LuongAttention, PointerAttention

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])
B, NQ, NS, HID = 3, 6, 11, 12
LENGTHS = torch.tensor([11, 5, 1])


def additive_scores(module, query, keys):
    """v . tanh(W_q q_i + b + W_k k_j), one (i, j) at a time."""
    w_q, b, w_k, v = (module.query_proj.weight, module.query_proj.bias, module.key_proj.weight,
                      module.v)
    return torch.stack([torch.stack([v @ torch.tanh(w_q @ q + b + w_k @ k) for k in keys])
                        for q in query])


def masked_softmax(scores, length):
    scores = scores.clone()
    scores[..., length:] = float("-inf")
    return torch.softmax(scores, -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_additive_pointer_and_hard_attention_follow_the_formula(backend):
    module = AdditiveAttention(HID, 7, 9).double()
    query, keys, values = (torch.randn(B, NQ, HID, dtype=torch.float64),
                           torch.randn(B, NS, 7, dtype=torch.float64),
                           torch.randn(B, NS, 5, dtype=torch.float64))
    weights = torch.stack([masked_softmax(additive_scores(module, query[b], keys[b]), LENGTHS[b])
                           for b in range(B)])
    pointer, hard = PointerAttention(HID, 7, 9).double(), HardAttention(HID, 7, 9).double()
    pointer.load_state_dict(module.state_dict())
    hard.load_state_dict(module.state_dict())
    with attnmem.use_backend(backend):
        if backend == "triton":  # the kernels take float32
            for m in (module, pointer, hard):
                m.float()
            query, keys, values = query.float(), keys.float(), values.float()
        context, got = module(query, keys, values, LENGTHS, return_weights=True)
        step_context, step_weights = module(query[:, 2], keys, values, LENGTHS,
                                            return_weights=True,
                                            projected_keys=module.project_keys(keys))
        log_probs = pointer(query, keys, LENGTHS)
        hard.eval()
        indices, chosen, chosen_log_prob = hard(query, keys, values, LENGTHS)
        hard.train()
        sampled, _, sampled_log_prob = hard(query, keys, values, LENGTHS)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), weights, **tol)
    torch.testing.assert_close(context.double(), weights @ values.double(), **tol)
    torch.testing.assert_close(step_context, context[:, 2])
    torch.testing.assert_close(step_weights, got[:, 2])
    torch.testing.assert_close(log_probs.exp().double(), weights, **tol)
    assert torch.equal(indices, log_probs.argmax(-1))
    assert torch.equal(chosen, values.gather(1, indices[..., None].expand(-1, -1, 5)))
    assert (sampled < LENGTHS[:, None]).all(), "samples only from the unpadded inputs"
    sampled_log_prob.sum().backward()  # REINFORCE reaches the parameters
    assert hard.v.grad is not None and hard.v.grad.abs().sum() > 0
    torch.testing.assert_close(chosen_log_prob, log_probs.gather(2, indices[..., None])[..., 0])


def luong_reference(module, query, source, lengths):
    """Luong et al.'s equations for one query at a time: (h~, weights)."""
    outs, all_weights = [], []
    for b in range(query.shape[0]):
        length = int(lengths[b])
        for t in range(query.shape[1]):
            h = query[b, t]
            if module.score == "dot":
                scores = source[b] @ h
            elif module.score == "general":
                scores = (source[b] @ module.W_a.weight.T) @ h
            else:
                scores = additive_scores(module.concat, h[None], source[b])[0]
            positions = torch.arange(source.shape[1], dtype=query.dtype)
            visible = positions < length
            if module.mode == "local-m":
                p_t = torch.tensor(float(t), dtype=query.dtype)
            elif module.mode == "local-p":
                p_t = length * torch.sigmoid(module.v_p.weight @ torch.tanh(module.W_p.weight @ h)
                                             )[0]
            if module.mode != "global":
                visible &= (positions - torch.round(p_t)).abs() <= module.window
            weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
            weights = torch.nan_to_num(weights)  # no visible position: zero weights
            if module.mode == "local-p":
                weights = weights * torch.exp(-(positions - p_t) ** 2
                                              / (2 * (module.window / 2) ** 2))
            context = weights @ source[b]
            outs.append(torch.tanh(module.W_c.weight @ torch.cat([context, h])))
            all_weights.append(weights)
    shape = (query.shape[0], query.shape[1])
    return torch.stack(outs).view(*shape, -1), torch.stack(all_weights).view(*shape, -1)


@pytest.mark.parametrize("mode", ["global", "local-m", "local-p"])
@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_attention_follows_the_paper(score, mode):
    module = LuongAttention(HID, score=score, mode=mode, window=2).double()
    query = torch.randn(B, NQ, HID, dtype=torch.float64, requires_grad=True)
    source = torch.randn(B, NS, HID, dtype=torch.float64)
    out, weights = module(query, source, LENGTHS, return_weights=True)
    expect, expect_weights = luong_reference(module, query, source, LENGTHS)
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(weights, expect_weights)
    grads = torch.autograd.grad(out.sum(), [query, *module.parameters()])
    expect_grads = torch.autograd.grad(expect.sum(), [query, *module.parameters()])
    for g, e in zip(grads, expect_grads):
        torch.testing.assert_close(g, e)
    step = module(query[:, 3], source, LENGTHS, positions=torch.tensor([3]))
    torch.testing.assert_close(step, out[:, 3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["general", "concat"])
def test_luong_global_attention_runs_on_the_kernels(score, backend):
    module = LuongAttention(HID, score=score)
    query, source = torch.randn(B, NQ, HID), torch.randn(B, NS, HID)
    expect = luong_reference(module.double(), query.double(), source.double(), LENGTHS)[0]
    with attnmem.use_backend(backend):
        got = module.float()(query, source, LENGTHS)
    torch.testing.assert_close(got.double(), expect, atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_named_errors():
    with pytest.raises(ValueError, match="score must be one of"):
        LuongAttention(HID, score="bilinear")
    with pytest.raises(ValueError, match="mode must be one of"):
        LuongAttention(HID, mode="local")
    with pytest.raises(ValueError, match="window must be an int"):
        LuongAttention(HID, mode="local-m", window=-1)
    with pytest.raises(ValueError, match="needs source_size == hidden_size"):
        LuongAttention(HID, score="dot", source_size=HID + 1)
    with pytest.raises(ValueError, match="query must be"):
        AdditiveAttention(HID, 7, 9)(torch.randn(HID), torch.randn(B, NS, 7))
    with torch.no_grad():  # a source of length 0 gives a zero context, not NaN
        out = LuongAttention(HID)(torch.randn(2, HID), torch.randn(2, 3, HID), torch.tensor([0, 3]))
    assert math.isfinite(out.sum().item())
