"""AdditiveAttention, PointerAttention, HardAttention and LuongAttention against their
papers' formulas, written out per query in float64; the kernel paths on both backends. The
self-attention modules' score modifications (softcap, sinks, ALiBi) against plain torch."""

import math
import os

import pytest
import torch

import attnmem
from attnmem.nn import (
    AdditiveAttention,
    HardAttention,
    LuongAttention,
    MultiheadSelfAttention,
    PointerAttention,
    TransformerEncoderLayer,
)
from attnmem.nn.additive import MODES, SCORES
from attnmem.nn.attention import alibi_slopes

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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [AdditiveAttention, PointerAttention, HardAttention])
def test_additive_modules_ignore_whatever_padding_holds(cls, backend):
    """Keys and values past kv_lengths count for nothing, NaN or inf there included: the
    outputs and gradients, the key projection's included, of zeros there."""
    module = cls(HID, 7, 9).eval()
    padding = (torch.arange(NS) >= LENGTHS[:, None])[..., None]
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        xs = [Q.clone().requires_grad_(), K.masked_fill(padding, fill).requires_grad_(),
              V.masked_fill(padding, fill).requires_grad_()]
        with attnmem.use_backend(backend):
            if cls is PointerAttention:
                out = module(*xs[:2], LENGTHS)
            else:
                out = module(*xs, LENGTHS)
        out = out[2] if cls is HardAttention else out
        loss = torch.where(torch.isfinite(out), out, 0).sum()  # padding's log-probs are -inf
        results.append([out, *torch.autograd.grad(loss, [*module.parameters(), *xs],
                                                  allow_unused=True)])
    for got in results[1:]:
        for g, e in zip(got, results[0]):
            if e is not None:
                torch.testing.assert_close(g, e)


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
    positions = torch.tensor([3]) if mode == "local-m" else None
    step = module(query[:, 3], source, LENGTHS, positions=positions)
    torch.testing.assert_close(step, out[:, 3])


@pytest.mark.parametrize("mode", ["global", "local-m", "local-p"])
@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_attention_ignores_whatever_padding_holds(score, mode):
    """Source positions past source_lengths count for nothing, NaN or inf there included,
    weights returned or not: the outputs and gradients (the parameters' included) of zeros
    there, zero gradients there."""
    module = LuongAttention(HID, score=score, mode=mode, window=2).double()
    query = torch.randn(B, NQ, HID, dtype=torch.float64)
    source = torch.randn(B, NS, HID, dtype=torch.float64)
    padding = (torch.arange(NS) >= LENGTHS[:, None])[..., None]
    for return_weights in (False, True):
        results = []
        for fill in (0.0, float("nan"), float("inf")):
            xs = [query.clone().requires_grad_(),
                  source.masked_fill(padding, fill).requires_grad_()]
            out = module(*xs, LENGTHS, return_weights=return_weights)
            out = out if return_weights else (out,)
            grads = torch.autograd.grad(sum(o.sum() for o in out),
                                        [*module.parameters(), *xs])
            results.append([*out, *grads])
        for got in results[1:]:
            for g, e in zip(got, results[0]):
                torch.testing.assert_close(g, e)
        assert (results[0][-1].masked_select(padding) == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["general", "concat"])
def test_luong_global_attention_runs_on_the_kernels(score, backend):
    module = LuongAttention(HID, score=score)
    query, source = torch.randn(B, NQ, HID), torch.randn(B, NS, HID)
    expect = luong_reference(module.double(), query.double(), source.double(), LENGTHS)[0]
    with attnmem.use_backend(backend):
        got = module.float()(query, source, LENGTHS)
    torch.testing.assert_close(got.double(), expect, atol=1e-5, rtol=1e-5)


def test_a_source_of_length_zero_gives_a_zero_context():
    with torch.no_grad():
        out = LuongAttention(HID)(torch.randn(2, HID), torch.randn(2, 3, HID), torch.tensor([0, 3]))
    assert math.isfinite(out.sum().item())


def _additive(cls=AdditiveAttention):
    return cls(HID, 7, 9)


Q, K, V = torch.randn(B, NQ, HID), torch.randn(B, NS, 7), torch.randn(B, NS, 5)


@pytest.mark.parametrize("message,call", [
    ("query_dim must be an int >= 1, got 0", lambda: AdditiveAttention(0, 7, 9)),
    ("attn_dim must be an int, got bool", lambda: PointerAttention(HID, 7, True)),
    ("query must be \\(B, Nq, 12\\) or \\(B, 12\\), got shape \\(12,\\)",
     lambda: _additive()(torch.randn(HID), K)),
    ("query must be \\(B, Nq, 12\\) or \\(B, 12\\), got shape \\(3, 6, 5\\)",
     lambda: _additive()(torch.randn(B, NQ, 5), K)),
    ("keys must be \\(3, Nk, 7\\), got shape \\(3, 11, 4\\)",
     lambda: _additive()(Q, torch.randn(B, NS, 4))),
    ("keys must be \\(3, Nk, 7\\), got shape \\(2, 11, 7\\)", lambda: _additive()(Q, K[:2])),
    ("values must be \\(3, 11, Dv\\), got shape \\(3, 10, 5\\)",
     lambda: _additive()(Q, K, V[:, :10])),
    ("kv_lengths must be \\(B,\\) = \\(3,\\), got shape \\(3, 1\\)",
     lambda: _additive()(Q, K, kv_lengths=LENGTHS[:, None])),
    ("kv_lengths must be an integer tensor", lambda: _additive()(Q, K, kv_lengths=LENGTHS * 1.0)),
    ("projected_keys must be \\(3, 11, 9\\), got shape \\(3, 11, 7\\)",
     lambda: _additive()(Q, K, projected_keys=K)),
    ("query must be a floating-point tensor",
     lambda: _additive()(torch.ones(B, NQ, HID, dtype=torch.long), K)),
    ("query must have the module's dtype torch.float32", lambda: _additive()(Q.double(), K)),
    ("return_weights must be a bool", lambda: _additive()(Q, K, return_weights="yes")),
    ("keys must be \\(3, Nk, 7\\)", lambda: _additive(PointerAttention)(Q, K[..., :6])),
    ("values must be \\(3, 11, Dv\\)", lambda: _additive(HardAttention)(Q, K, V[:1])),
    ("sample must be a bool", lambda: _additive(HardAttention)(Q, K, sample=1)),
    ("generator must be a torch.Generator", lambda: _additive(HardAttention)(Q, K, generator=0)),
    ("hidden_size must be an int >= 1", lambda: LuongAttention(0)),
    ("score must be one of", lambda: LuongAttention(HID, score="bilinear")),
    ("mode must be one of", lambda: LuongAttention(HID, mode="local")),
    ("window must be an int >= 0, got -1", lambda: LuongAttention(HID, mode="local-m", window=-1)),
    ("window must be an int, got float", lambda: LuongAttention(HID, mode="local-m", window=2.0)),
    ("needs source_size == hidden_size", lambda: LuongAttention(HID, score="dot",
                                                               source_size=HID + 1)),
    ("attn_dim must be an int >= 1", lambda: LuongAttention(HID, score="concat", attn_dim=0)),
    ("source must be \\(3, Ns, 12\\), got shape \\(3, 11, 7\\)",
     lambda: LuongAttention(HID)(Q, K)),
    ("query must be \\(B, Nq, 12\\) or \\(B, 12\\)",
     lambda: LuongAttention(HID, source_size=7)(K, K)),
    *[("source_lengths must be \\(B,\\) = \\(3,\\), got shape \\(1,\\)",
       lambda mode=mode: LuongAttention(HID, mode=mode)(Q, Q, LENGTHS[:1])) for mode in MODES],
    *[("source_lengths must be an integer tensor",
       lambda mode=mode: LuongAttention(HID, mode=mode)(Q, Q, LENGTHS.float())) for mode in MODES],
    ("source is on meta but the module is on cpu",
     lambda: LuongAttention(HID)(Q, Q.to("meta"))),
    ("source_lengths is on meta but the module is on cpu",
     lambda: LuongAttention(HID, mode="local-p")(Q, Q, LENGTHS.to("meta"))),
    ("kv_lengths is on meta but the module is on cpu",
     lambda: _additive()(Q, K, kv_lengths=LENGTHS.to("meta"))),
    ("positions is read only by mode='local-m', not 'local-p'",
     lambda: LuongAttention(HID, mode="local-p")(Q, Q, positions=torch.arange(NQ))),
    ("positions must be \\(3, 6\\) or \\(6,\\), got shape \\(5,\\)",
     lambda: LuongAttention(HID, mode="local-m")(Q, Q, positions=torch.arange(5))),
    ("positions must be an integer or floating-point tensor",
     lambda: LuongAttention(HID, mode="local-m")(Q, Q, positions=torch.ones(NQ, dtype=torch.bool))),
])
def test_bad_inputs_raise_named_errors(message, call):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_numpy_integers_and_step_positions():
    np = pytest.importorskip("numpy")
    module = LuongAttention(np.int64(HID), mode="local-m", window=np.int32(2),
                            source_size=np.int16(7))
    assert module.window == 2 and type(module.window) is int
    query, source = torch.randn(B, NQ, HID), torch.randn(B, NS, 7)
    positions = torch.tensor([3, 1, 0])
    out = module(query, source, LENGTHS, positions=positions[:, None].expand(B, NQ))
    step = module(query[:, 2], source, LENGTHS, positions=positions)  # (B,) for one step
    torch.testing.assert_close(step, out[:, 2])
    assert AdditiveAttention(np.int64(HID), np.int8(7), np.uint8(9))(Q, K).shape == (B, NQ, 7)


def _sizes(batch, n_q, n_s):
    return (torch.randn(batch, n_q, HID, requires_grad=True),
            torch.randn(batch, n_s, 7, requires_grad=True),
            torch.randn(batch, n_s, 5, requires_grad=True),
            torch.full((batch,), n_s))


EMPTY = [(0, NQ, NS), (B, 0, NS), (B, NQ, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,n_q,n_s", EMPTY)
def test_additive_and_pointer_attention_take_empty_inputs(batch, n_q, n_s, backend):
    """Zero batch, queries or keys, forward and backward on both backends: a query that
    sees no key gives a zero context, pointer log-probabilities (B, Nq, 0), and zero
    gradients."""
    additive, pointer = _additive(AdditiveAttention), _additive(PointerAttention)
    query, keys, values, lengths = _sizes(batch, n_q, n_s)
    with attnmem.use_backend(backend):
        context, weights = additive(query, keys, values, lengths, return_weights=True)
        log_probs = pointer(query, keys, lengths)
        (context.sum() + weights.sum() + log_probs.exp().sum()).backward()
    assert context.shape == (batch, n_q, 5) and not context.any()
    assert weights.shape == log_probs.shape == (batch, n_q, n_s)
    for t in (query, keys, values, *additive.parameters(), *pointer.parameters()):
        assert t.grad is not None and not t.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,n_q,n_s", EMPTY)
def test_hard_attention_takes_empty_inputs(batch, n_q, n_s, backend):
    """With no input to choose, as with inputs all -inf: index 0, a zero value and
    log-probability -inf; zero batch or queries give empty results."""
    hard = _additive(HardAttention)
    query, keys, values, lengths = _sizes(batch, n_q, n_s)
    with attnmem.use_backend(backend):
        for sample in (False, True):
            indices, chosen, log_prob = hard(query, keys, values, lengths, sample=sample)
            assert indices.shape == log_prob.shape == (batch, n_q)
            assert chosen.shape == (batch, n_q, 5) and not chosen.any()
            assert not indices.any() and (log_prob == float("-inf")).all()


@pytest.mark.parametrize("batch,n_q,n_s", EMPTY)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("score", SCORES)
def test_luong_attention_takes_empty_inputs(score, mode, batch, n_q, n_s):
    """No source position: a zero context, h~ = tanh(W_c [0; h]), finite gradients; on the
    kernels' backends for global mode (the local modes run in torch)."""
    module = LuongAttention(HID, score=score, mode=mode, window=2)
    for backend in BACKENDS if mode == "global" else ["torch"]:
        module.zero_grad()
        query, source = (torch.randn(batch, n, HID, requires_grad=True) for n in (n_q, n_s))
        with attnmem.use_backend(backend):
            out, weights = module(query, source, torch.full((batch,), n_s),
                                  return_weights=True)
            out.square().sum().backward()
        assert out.shape == (batch, n_q, HID) and weights.shape == (batch, n_q, n_s)
        if n_s == 0:
            zeros = torch.zeros(batch, n_q, HID)
            torch.testing.assert_close(out, torch.tanh(module.W_c(torch.cat([zeros, query], -1))))
        for t in (query, source, *module.parameters()):
            assert t.grad is None or torch.isfinite(t.grad).all()


def plain_self_attention(layer, x, lengths):
    """layer's attention written out: scores, cap, ALiBi's -slope |i - j|, masks, and the
    sink as one more logit in each row's softmax, whose weight is dropped."""
    batch, n, _ = x.shape
    heads, kv_heads, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = layer.qkv(x).split([heads * d, kv_heads * d, kv_heads * d], -1)
    q = q.view(batch, n, heads, d).transpose(1, 2)
    k, v = (t.view(batch, n, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
            for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if layer.softcap:
        scores = layer.softcap * torch.tanh(scores / layer.softcap)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if layer.alibi_slopes is not None:
        scores = scores - layer.alibi_slopes[:, None, None] * (i - j).abs()
    hidden = j >= lengths[:, None, None, None]
    if layer.causal:
        hidden = hidden | (j > i)
    if layer.window is not None:
        left, right = layer.window
        hidden = hidden | (j < i - (n if left is None else left))
        hidden = hidden | (j > i + (n if right is None else right))
    scores = scores.masked_fill(hidden, float("-inf"))
    sink = (torch.full((heads,), float("-inf"), dtype=x.dtype) if layer.sinks is None
            else layer.sinks)
    scores = torch.cat([scores, sink.view(1, heads, 1, 1).expand(batch, heads, n, 1)], -1)
    weights = torch.softmax(scores, -1)[..., :-1].nan_to_num()  # no key, no sink: zeros
    return layer.out((weights @ v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("kv_heads,causal,window,softcap,sinks,alibi", [
    (2, True, None, 5.0, True, True),
    (4, False, (2, 1), None, True, False),
    (1, False, None, 3.0, False, True),
    (4, True, (3, None), None, False, True),
])
def test_self_attention_score_mods_match_plain_torch(kv_heads, causal, window, softcap, sinks,
                                                     alibi):
    """Outputs and the gradients of x, the projections and the sinks, in float64; a batch
    entry that sees no key outputs the bias only (its weights are zeros, or the sink's)."""
    layer = MultiheadSelfAttention(24, 4, kv_heads, causal=causal, window=window,
                                   softcap=softcap, sinks=sinks, alibi=alibi).double()
    if sinks:
        with torch.no_grad():
            layer.sinks.normal_()
    x = torch.randn(3, 9, 24, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([9, 4, 0])
    got = layer(x, lengths)
    params = [x, layer.qkv.weight, layer.out.bias] + ([layer.sinks] if sinks else [])
    grads = torch.autograd.grad(got.square().sum(), params)
    expect = plain_self_attention(layer, x, lengths)
    torch.testing.assert_close(got, expect)
    for name, g, e in zip(("x", "qkv", "out bias", "sinks"), grads,
                          torch.autograd.grad(expect.square().sum(), params)):
        torch.testing.assert_close(g, e, msg=lambda detail, name=name: f"d{name}: {detail}")


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_passes_score_mods_to_its_attention(norm_first):
    layer = TransformerEncoderLayer(16, 4, dim_feedforward=20, dropout=0.0, norm_first=norm_first,
                                    causal=True, softcap=4.0, sinks=True, alibi=True).double()
    with torch.no_grad():
        layer.self_attn.sinks.normal_()
    x, lengths = torch.randn(2, 7, 16, dtype=torch.float64), torch.tensor([7, 3])

    def plain(x):
        feed_forward = lambda x: layer.linear2(torch.relu(layer.linear1(x)))  # noqa: E731
        if norm_first:
            x = x + plain_self_attention(layer.self_attn, layer.norm1(x), lengths)
            return x + feed_forward(layer.norm2(x))
        x = layer.norm1(x + plain_self_attention(layer.self_attn, x, lengths))
        return layer.norm2(x + feed_forward(x))

    got, expect = layer(x, lengths), plain(x)
    torch.testing.assert_close(got, expect)
    sinks = layer.self_attn.sinks
    torch.testing.assert_close(torch.autograd.grad(got.sum(), sinks),
                               torch.autograd.grad(expect.sum(), sinks))


def test_alibi_slopes_are_blooms():
    """Press et al.'s geometric sequence as BLOOM builds it: 2^(-8 i / n) for n a power of 2;
    for 12 heads, those of 8 heads, then slopes 1, 3, 5, 7 of 16 heads. A buffer, not
    saved."""
    torch.testing.assert_close(alibi_slopes(8), 2.0 ** -torch.arange(1.0, 9.0))
    torch.testing.assert_close(alibi_slopes(12), torch.cat([2.0 ** -torch.arange(1.0, 9.0),
                                                            2.0 ** -torch.tensor([0.5, 1.5,
                                                                                  2.5, 3.5])]))
    torch.testing.assert_close(alibi_slopes(1), torch.tensor([2.0 ** -8]))
    layer = MultiheadSelfAttention(24, 12, alibi=True)
    assert torch.equal(layer.alibi_slopes, alibi_slopes(12)) and layer.sinks is None
    assert "alibi_slopes" not in layer.state_dict()
    assert MultiheadSelfAttention(24, 12).alibi_slopes is None


@pytest.mark.parametrize("message,call", [
    ("softcap must be in \\(0.0, inf\\), got 0", lambda: MultiheadSelfAttention(8, 2, softcap=0)),
    ("softcap must be a number, got str", lambda: TransformerEncoderLayer(8, 2, softcap="50")),
    ("sinks must be a bool, got int", lambda: MultiheadSelfAttention(8, 2, sinks=1)),
    ("alibi must be a bool, got Tensor",
     lambda: TransformerEncoderLayer(8, 2, alibi=torch.ones(2))),
    ("num_heads must be an int >= 1, got 0", lambda: alibi_slopes(0)),
])
def test_score_mod_options_are_checked(message, call):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
