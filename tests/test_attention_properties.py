"""Random shapes and mask combinations, drawn by hypothesis, against float64: v's head dim
Ev drawn apart from q's and k's D or equal to it."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attention import check_against_float64

BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
side = st.one_of(st.none(), st.integers(0, 40))


@st.composite
def problems(draw):
    batch, kv_heads, group = (draw(st.integers(1, n)) for n in (3, 2, 3))
    n_q, n_k, head_dim = (draw(st.integers(1, n)) for n in (70, 70, 72))
    value_head_dim = draw(st.none() | st.integers(1, 72)) or head_dim
    lengths = draw(st.none() | st.lists(st.integers(-2, n_k + 2), min_size=batch,
                                        max_size=batch))
    return dict(shape=(batch, kv_heads * group, kv_heads, n_q, n_k, head_dim, value_head_dim),
                causal=draw(st.booleans()), window=draw(st.none() | st.tuples(side, side)),
                lengths=lengths, scale=draw(st.none() | st.floats(0.05, 2.0)),
                seed=draw(st.integers(0, 2**31)))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_random_problems_match_float64(backend, problem):
    b, h, hkv, nq, nk, d, ev = problem["shape"]
    torch.manual_seed(problem["seed"])
    q, k, v = (torch.randn(b, heads, n, dim)
               for heads, n, dim in ((h, nq, d), (hkv, nk, d), (hkv, nk, ev)))
    lengths = None if problem["lengths"] is None else torch.tensor(problem["lengths"])
    kwargs = dict(causal=problem["causal"], window=problem["window"], kv_lengths=lengths,
                  scale=problem["scale"])
    check_against_float64(q, k, v, kwargs, backend)
