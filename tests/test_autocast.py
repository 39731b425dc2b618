"""torch.autocast: the memory and additive ops promote mixed floating dtypes to the widest
(torch.cat's policy) while autocast is on, and raise a TypeError naming the argument
outside it; the modules built on them run forward and backward under autocast.

The ops are compared exactly with themselves run outside autocast on the promoted inputs;
the modules with their float64 twins given the Linear layers' outputs as autocast
rounded them (the narrow inputs the ops promote), within the autocast dtype's rounding
units (the modules' own torch math on those outputs runs in it): under bfloat16, over 300
seeds on the torch backend and 20 on triton's, the largest error was 0.28 of the bound
for an output and 0.51 for a gradient; float16 passed 200 seeds on the torch backend.
"""

import copy

import pytest
import torch

import attnmem
from attnmem.memory import SparseWeights
from attnmem.nn import (
    NTM,
    AdditiveAttention,
    HardAttention,
    KeyValueMemory,
    LuongAttention,
    MemN2N,
    PointerAttention,
)
from backends import BACKENDS, DEVICE, INTERPRET
from tolerance import ATOL

B, R, N, D = 2, 3, 7, 5


def _softmax(*shape):
    return torch.randn(*shape, device=DEVICE).softmax(-1)


def _sparse(heads):
    indices = torch.randint(-1, N, (B, heads, 3), device=DEVICE)
    return SparseWeights(indices, torch.rand(B, heads, 3, device=DEVICE))


def _case(name):
    """-> (op, args, kwargs, the names of the narrow (16-bit) arguments, the argument a
    TypeError names outside autocast). Wide arguments are the memory and what the modules
    hold in their parameters' dtype (values, v)."""
    memory = torch.randn(B, N, D, device=DEVICE)
    keys = torch.randn(B, R, D, device=DEVICE)
    strength = torch.rand(B, R, device=DEVICE) * 3
    mask = torch.rand(B, N, device=DEVICE) > 0.3
    erase, add = torch.rand(B, 2, D, device=DEVICE), torch.randn(B, 2, D, device=DEVICE)
    q, k = torch.randn(B, 4, 6, device=DEVICE), torch.randn(B, 5, 6, device=DEVICE)
    v, values = torch.randn(6, device=DEVICE), torch.randn(B, 5, 3, device=DEVICE)
    lengths = torch.tensor([5, 2], device=DEVICE)
    return {
        "memory_address": (attnmem.memory_address, dict(memory=memory, keys=keys,
                                                        strength=strength),
                           dict(mask=mask), ("keys", "strength"), "keys"),
        "memory_address_topk": (attnmem.memory_address, dict(memory=memory, keys=keys,
                                                             strength=strength),
                                dict(topk=3), ("keys", "strength"), "keys"),
        "memory_attend": (attnmem.memory_attend, dict(
            memory=memory, keys=keys, values=torch.randn(B, N, 4, device=DEVICE),
            strength=strength), dict(mask=mask, return_weights=True), ("keys", "strength"),
            "keys"),
        "memory_read": (attnmem.memory_read, dict(memory=memory, weights=_softmax(B, R, N)), {},
                        ("weights",), "weights"),
        "memory_read_sparse": (attnmem.memory_read, dict(memory=memory, weights=_sparse(R)), {},
                               ("weights",), "weights"),
        "memory_write": (attnmem.memory_write, dict(memory=memory, weights=_softmax(B, 2, N),
                                                    erase=erase, add=add), {},
                         ("weights", "erase", "add"), "weights"),
        "memory_write_sparse": (attnmem.memory_write, dict(memory=memory, weights=_sparse(2),
                                                           erase=erase, add=add), {},
                                ("weights", "erase", "add"), "weights"),
        "location_address": (attnmem.location_address, dict(
            content_weights=_softmax(B, R, N), prev_weights=_softmax(B, R, N),
            gate=torch.rand(B, R, device=DEVICE), shift=_softmax(B, R, 3),
            gamma=1 + torch.rand(B, R, device=DEVICE)), {}, ("gate", "shift", "gamma"),
            "gate"),
        "additive_attention": (attnmem.additive_attention, dict(q=q, k=k, values=values, v=v),
                               dict(kv_lengths=lengths, return_weights=True), ("q", "k"),
                               "v"),
        "pointer_attention": (attnmem.pointer_attention, dict(q=q, k=k, v=v),
                              dict(kv_lengths=lengths), ("q", "k"), "v"),
    }[name]


def _cast(x, dtype):
    if isinstance(x, SparseWeights):
        return SparseWeights(x.indices, x.weights.to(dtype))
    return x.to(dtype)


def _leaves(args):
    """args with every floating tensor a fresh leaf requiring grad; -> (args, the leaves)."""
    out, leaves = {}, []
    for name, x in args.items():
        t = x.weights if isinstance(x, SparseWeights) else x
        t = t.detach().requires_grad_()
        leaves.append(t)
        out[name] = SparseWeights(x.indices, t) if isinstance(
            x, SparseWeights) else t
    return out, leaves


def _floats(result):
    parts = result if isinstance(result, tuple) and not isinstance(result, SparseWeights) \
        else (result,)
    return [p.weights if isinstance(p, SparseWeights) else p for p in parts]


OPS = ["memory_address", "memory_address_topk", "memory_attend", "memory_read",
       "memory_read_sparse", "memory_write", "memory_write_sparse", "location_address",
       "additive_attention", "pointer_attention"]
# (wide, narrow) dtypes and the dtype they promote to; float64 has no triton kernel.
MIXES = {"fp32+bf16": (torch.float32, torch.bfloat16, torch.float32),
         "fp32+fp16": (torch.float32, torch.float16, torch.float32),
         "bf16+fp16": (torch.bfloat16, torch.float16, torch.float32),
         "fp64+bf16": (torch.float64, torch.bfloat16, torch.float64)}


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_op_promotes_under_autocast(name, backend, mix):
    """The result (dtype and values) and the gradients of the op on the promoted inputs;
    the narrow inputs' gradients come back in their dtype."""
    wide, narrow, promoted = MIXES[mix]
    if backend == "triton" and promoted == torch.float64:
        pytest.skip("float64 runs on the torch backend only")
    op, args, kwargs, narrow_names, _ = _case(name)
    args = {n: _cast(x, narrow if n in narrow_names else wide) for n, x in args.items()}
    mixed, mixed_leaves = _leaves(args)
    same, same_leaves = _leaves({n: _cast(x, promoted) for n, x in args.items()})
    with attnmem.use_backend(backend):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            got = _floats(op(**mixed, **kwargs))
        expect = _floats(op(**same, **kwargs))
    # pointer_attention's log-probabilities are float32 whatever its inputs' dtype.
    assert [g.dtype for g in got] == [e.dtype for e in expect]
    assert expect[0].dtype == (torch.float32 if name == "pointer_attention" else promoted)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, equal_nan=True)
    ups = [torch.randn_like(e) for e in expect]
    grads = torch.autograd.grad(got, mixed_leaves, ups, allow_unused=True)
    expect_grads = torch.autograd.grad(expect, same_leaves, ups, allow_unused=True)
    for leaf, g, e in zip(mixed_leaves, grads, expect_grads):
        if e is None:  # no gradient (a shared input the op ignores)
            assert g is None
            continue
        assert g.dtype == leaf.dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g, e.to(leaf.dtype))


@pytest.mark.parametrize("name", OPS)
def test_op_mixed_dtypes_raise_outside_autocast(name):
    op, args, kwargs, narrow_names, named = _case(name)
    args = {n: _cast(x, torch.bfloat16) if n in narrow_names else x for n, x in args.items()}
    with pytest.raises(TypeError, match=f"^{named} must have"):
        op(**args, **kwargs)


def test_inplace_write_keeps_memory_and_refuses_a_copy():
    """memory_write(inplace=True) under autocast writes the float32 memory itself, the
    16-bit erase and add cast up; a 16-bit memory beside float32 weights would be written
    as a float32 copy, so it raises."""
    memory = torch.randn(B, N, D, device=DEVICE)
    weights = _softmax(B, 2, N)
    erase, add = torch.rand(B, 2, D, device=DEVICE), torch.randn(B, 2, D, device=DEVICE)
    expect = attnmem.memory_write(memory, weights, erase.bfloat16().float(),
                                  add.bfloat16().float())
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = attnmem.memory_write(memory, weights, erase.bfloat16(), add.bfloat16(),
                                   inplace=True)
        assert out is memory
        with pytest.raises(TypeError, match="inplace=True.* writes memory, torch.bfloat16"):
            attnmem.memory_write(memory=memory.bfloat16(), weights=weights, erase=erase,
                                 add=add, inplace=True)
    torch.testing.assert_close(memory, expect)


def test_ops_trace_whole_under_autocast():
    """The promotion traces into one graph: a write then a read of a float32 memory by
    bfloat16 heads, compiled (fullgraph) under autocast, equals eager."""
    memory = torch.randn(B, N, D, device=DEVICE)
    keys = torch.randn(B, R, D, device=DEVICE, dtype=torch.bfloat16)
    erase = torch.rand(B, R, D, device=DEVICE, dtype=torch.bfloat16)

    def step(memory, keys, erase):
        weights = attnmem.memory_address(memory, keys)
        memory = attnmem.memory_write(memory, weights, erase, keys)
        return memory, attnmem.memory_read(memory, weights)

    torch._dynamo.reset()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        expect = step(memory, keys, erase)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(memory, keys, erase)
    for g, e in zip(got, expect):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e)


def _inputs_f64(inputs):
    return [x.double() if x.dtype.is_floating_point else x for x in inputs]


def _hook_linears(module, recorded=None):
    """Forward hooks on module's nn.Linear layers -> (each layer's outputs in call order,
    the hooks' handles). Given recorded (a run under autocast), the layers output those
    values instead, as autocast rounded them, with gradients flowing through the layer:
    the float64 twin then computes what the ops computed on the promoted inputs."""
    calls = {} if recorded is None else {name: iter(x) for name, x in recorded.items()}

    def hook(name):
        def record_or_replay(layer, args, out):
            if recorded is None:
                calls.setdefault(name, []).append(out.detach())
                return None
            return out + (next(calls[name]).to(out.dtype) - out).detach()
        return record_or_replay

    return calls, [layer.register_forward_hook(hook(name))
                   for name, layer in module.named_modules()
                   if isinstance(layer, torch.nn.Linear)]


def _run(module, inputs, autocast_dtype=None, recorded=None, **kwargs):
    """-> (the floating outputs, the parameters' gradients, the Linear layers' outputs) of
    a forward and backward of a fixed linear loss of the outputs (outputs of a NamedTuple
    state too); recorded: see _hook_linears."""
    module.zero_grad()
    calls, handles = _hook_linears(module, recorded)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        result = module(*inputs, **kwargs)
    for handle in handles:
        handle.remove()
    parts = []
    for x in result if isinstance(result, tuple) else (result,):
        parts += list(x) if isinstance(x, tuple) else [x]
    outs = [x for x in parts if isinstance(x, torch.Tensor) and x.dtype.is_floating_point]
    gen = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in outs
               if o.requires_grad)
    loss.backward()
    return outs, [p.grad for p in module.parameters() if p.requires_grad], calls


def _assert_like_float64(got, expect, dtype, condition=1.0):
    """Finite where float64 is (-inf log-probabilities of padding stay -inf), and within
    dtype's rounding units (scaled by the largest value and by condition) of float64."""
    for i, (g, e) in enumerate(zip(got, expect, strict=True)):
        assert g is not None and e is not None, i
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(g), finite) and (g[~finite] == e[~finite]).all(), i
        err = (g.double() - e)[finite].abs().max().item()
        bound = ATOL[dtype] * max(1.0, e[finite].abs().max().item()) * condition
        assert err <= bound, (i, err, bound)


def _modules(low=torch.bfloat16):
    """name: (module, inputs, forward kwargs, the dtypes of its floating outputs under
    autocast to the 16-bit dtype low)."""
    f32 = torch.float32
    story = torch.randint(0, 20, (2, 4, 3))
    story[1, 3] = 0
    return {
        # outputs, then the state: h and c (CPU autocast leaves the LSTM cell in float32),
        # the memory, the weights and the reads, accumulated in float32.
        "ntm": (NTM(4, 3, controller_size=16, memory_slots=8, memory_width=5, read_heads=2,
                    write_heads=2), [torch.randn(3, 2, 4)], {},
                [f32] * 7),
        "key_value_memory": (KeyValueMemory(6, 10, 4, 5), [torch.randn(2, 3, 6)],
                             dict(mask=torch.rand(2, 10) > 0.2, return_weights=True), [f32, f32]),
        "key_value_memory_topk": (KeyValueMemory(6, 10, 4, 5, topk=3), [torch.randn(2, 6)],
                                  dict(return_weights=True), [f32, f32]),
        "memn2n": (MemN2N(20, embed_dim=8, memory_size=5, hops=2), [story, story[:, 0]], {},
                   [low]),
        "additive": (AdditiveAttention(6, 5, 7), [torch.randn(2, 3, 6), torch.randn(2, 4, 5)],
                     dict(kv_lengths=torch.tensor([4, 2]), return_weights=True), [f32, f32]),
        "pointer": (PointerAttention(6, 5, 7), [torch.randn(2, 3, 6), torch.randn(2, 4, 5)],
                    dict(kv_lengths=torch.tensor([4, 2])), [f32]),
        "luong_concat": (LuongAttention(6, "concat"), [torch.randn(2, 3, 6),
                                                       torch.randn(2, 4, 6)],
                         dict(return_weights=True), [low, f32]),
        "luong_general": (LuongAttention(6, "general"), [torch.randn(2, 3, 6),
                                                         torch.randn(2, 4, 6)],
                          dict(return_weights=True), [low, low]),
        "luong_local_m": (LuongAttention(6, "general", mode="local-m", window=1),
                          [torch.randn(2, 3, 6), torch.randn(2, 4, 6)],
                          dict(return_weights=True), [low, f32]),
    }


# The modules run under CPU autocast, and the dtypes they expect are its policy's (CUDA
# autocast casts the LSTM cell down and the softmax up): triton runs their CPU tensors only
# through its interpreter.
CPU_BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])

# Luong's general scores are autocast's bfloat16 matmuls (not an attnmem op): their
# softmax's rounding scales with the largest score, as tolerance.py's condition says.
LOGITS = dict.fromkeys(("luong_general", "luong_local_m"), lambda twin, query, source:
                       query @ twin.W_a(source).transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(_modules()))
def test_module_under_autocast_matches_float64(name, backend, dtype):
    module, inputs, kwargs, dtypes = _modules(dtype)[name]
    twin = copy.deepcopy(module).double()
    with attnmem.use_backend(backend):
        got, grads, linears = _run(module, inputs, dtype, **kwargs)
    expect, expect_grads, _ = _run(twin, _inputs_f64(inputs), recorded=linears, **kwargs)
    condition = 1.0
    if name in LOGITS:
        with torch.no_grad():
            condition = max(1.0, LOGITS[name](twin, *_inputs_f64(inputs)).abs().max().item())
    assert [g.dtype for g in got] == dtypes
    _assert_like_float64(got, expect, dtype, condition)
    # A gradient through autocast's 16-bit Linear rounds twice per product: the incoming
    # gradient and the saved input.
    _assert_like_float64(grads, expect_grads, dtype, 2 * condition)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ntm_steps_carry_state_under_float16_autocast(backend):
    """NTM.step by step under float16 autocast: the state each step returns is taken back
    by the next (checked against the module's dtype outside autocast only), and its float32
    memory, weights and reads match float64's."""
    ntm = NTM(4, 3, controller_size=16, memory_slots=8, memory_width=5)
    twin = copy.deepcopy(ntm).double()
    x = torch.randn(4, 2, 4)
    state, expect_state = None, None
    with attnmem.use_backend(backend):
        for t in range(4):
            with torch.autocast("cpu", dtype=torch.float16):
                y, state = ntm.step(x[t], state)
    for t in range(4):
        _, expect_state = twin.step(x[t].double(), expect_state)
    assert y.dtype == torch.float16 and state.memory.dtype == torch.float32
    (y.float().sum() + state.memory.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in ntm.parameters())
    for got, expect in zip(state[2:], expect_state[2:]):
        err = (got.double() - expect).abs().max().item()
        assert err <= ATOL[torch.float16] * max(1.0, expect.abs().max().item()), err


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hard_attention_under_autocast(backend):
    """The chosen input's log-probability is the float64 twin's best within rounding, and
    its value is the input's (values keep their dtype)."""
    module = HardAttention(6, 5, 7).eval()
    twin = copy.deepcopy(module).double()
    query, keys, values = torch.randn(2, 3, 6), torch.randn(2, 4, 5), torch.randn(2, 4, 3)
    with attnmem.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            indices, chosen, log_prob = module(query, keys, values)
    log_probs = PointerAttention.forward(twin, query.double(), keys.double())
    assert log_prob.dtype == torch.float32 and chosen.dtype == torch.float32
    torch.testing.assert_close(chosen, values.gather(1, indices[..., None].expand(-1, -1, 3)))
    best = log_probs.max(-1).values
    assert (log_prob.double() - best).abs().max() <= ATOL[torch.bfloat16] * best.abs().max()
    log_prob.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_luong_local_p_under_autocast():
    """local-p's window centre p_t = S sigmoid(v_p . tanh(W_p h_t)) comes from bfloat16
    layers, so its rounding to a position may differ from float64's (not compared): finite
    outputs and gradients, in the dtypes autocast gives."""
    module = LuongAttention(6, "dot", mode="local-p", window=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = module(torch.randn(2, 3, 6), torch.randn(2, 4, 6), return_weights=True)
    assert out.dtype == torch.bfloat16 and weights.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_luong_local_positions_past_bfloat16_integers():
    """local-m windows centre on t for t past 256, which bfloat16 (an autocast decoder's
    states) rounds: the positions are kept in float32."""
    module = LuongAttention(4, "dot", mode="local-m", window=1)
    query, source = torch.randn(1, 300, 4), torch.randn(1, 300, 4)
    expect = module.double()(query.double(), source.double(), return_weights=True)[1]
    weights = module.bfloat16()(query.bfloat16(), source.bfloat16(), return_weights=True)[1]
    assert ((weights != 0) == (expect != 0)).all()
