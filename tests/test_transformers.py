"""attnmem.integrations.transformers: tiny randomly initialised Llama, Mistral (sliding
window), Gemma 2 (softcapping and sliding window) and gpt-oss (sinks and sliding window)
models on attn_implementation="attnmem" against transformers' own attention, unpadded and
with right and left padding, forward, backward (the sinks' gradients too) and greedy
generation through the cache; packed sequences on attnmem.attention_varlen, and attention
dropout in training."""

import copy
import inspect
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

import attnmem
import attnmem.integrations.transformers as attnmem_transformers
from backends import BACKENDS, DEVICE

transformers = pytest.importorskip("transformers", minversion=attnmem_transformers.MIN_VERSION)

BATCH, LENGTH, VOCAB = 3, 9, 97
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=64)
SLIDING = ["sliding_attention", "full_attention"]
# name: (config, its extra arguments, transformers' attention to compare with, the word the
# fallback warning names, or None where attnmem's kernel runs every layer).
MODELS = {
    "llama": (transformers.LlamaConfig, {}, "sdpa", None),
    # A decoder made bidirectional (config.is_causal), as embedding models built on one are.
    "llama-bidirectional": (transformers.LlamaConfig, {"is_causal": False}, "eager", None),
    "mistral": (transformers.MistralConfig, {"sliding_window": 3}, "sdpa", None),
    "gemma2": (transformers.Gemma2Config,
               {"sliding_window": 3, "layer_types": SLIDING, "query_pre_attn_scalar": 16,
                "attn_logit_softcapping": 2.0}, "eager", None),
    "gemma2-nosoftcap": (transformers.Gemma2Config,
                         {"sliding_window": 3, "layer_types": SLIDING,
                          "query_pre_attn_scalar": 16, "attn_logit_softcapping": None},
                         "eager", None),
    "gpt_oss": (transformers.GptOssConfig,
                {"sliding_window": 3, "layer_types": SLIDING, "num_local_experts": 4,
                 "num_experts_per_tok": 2}, "eager", None),
}

_models = {}


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    attnmem_transformers.register()
    # Each test sees its fallback warnings, which are shown once per process.
    monkeypatch.setattr(attnmem_transformers, "_warned", set())


def _model(name):
    if name not in _models:
        config, extra, reference, _ = MODELS[name]
        model = transformers.AutoModelForCausalLM.from_config(
            config(**SMALL, **extra), attn_implementation=reference)
        if name == "gpt_oss":  # initialised with std 0.02, sinks would barely move a softmax
            for layer in model.model.layers:
                torch.nn.init.normal_(layer.self_attn.sinks)
        _models[name] = model.eval()
    return _models[name]


def _padding(kind, lengths):
    position = torch.arange(LENGTH)
    if kind == "none":
        return None
    if kind == "right":
        return (position < lengths[:, None]).long()
    return (position >= LENGTH - lengths[:, None]).long()


@pytest.fixture
def kernel_calls(monkeypatch):
    """The calls of attnmem.attention and attnmem.attention_varlen: (name, keywords)."""
    calls = []

    def counting(name):
        op = getattr(attnmem, name)

        def counted(*args, **kwargs):
            calls.append((name, kwargs))
            return op(*args, **kwargs)
        return counted

    for name in ("attention", "attention_varlen"):
        monkeypatch.setattr(attnmem, name, counting(name))
    return calls


def _run(model, implementation, ids, mask, weights, **inputs):
    """Logits and every parameter's gradient of a weighted sum of the real positions' logits."""
    model.set_attn_implementation(implementation)
    model.zero_grad()
    logits = model(ids, attention_mask=mask, **inputs).logits
    (logits * weights).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _expect_path(name, record, kernel_calls):
    """The kernel ran, or the model's fallback warned once and named why."""
    messages = [str(w.message) for w in record if "attnmem" in str(w.message)]
    if MODELS[name][3] is None:
        assert kernel_calls and not messages
    else:
        assert not kernel_calls
        assert len(messages) == 1 and MODELS[name][3] in messages[0], messages


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_gradients(name, padding, kernel_calls):
    model = _model(name)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH))
    mask = _padding(padding, torch.tensor([LENGTH, 6, 2]))
    real = torch.ones(BATCH, LENGTH, dtype=torch.bool) if mask is None else mask.bool()
    weights = torch.randn(BATCH, LENGTH, VOCAB) * real[..., None]
    expect, expect_grads = _run(model, MODELS[name][2], ids, mask, weights)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, grads = _run(model, "attnmem", ids, mask, weights)
    _expect_path(name, record, kernel_calls)
    torch.testing.assert_close(got[real], expect[real], rtol=1e-4, atol=1e-5)
    assert len(grads) == len(expect_grads)
    for grad, expect_grad in zip(grads, expect_grads):
        torch.testing.assert_close(grad, expect_grad, rtol=1e-4,
                                   atol=1e-5 * max(1.0, expect_grad.abs().max().item()))


@pytest.mark.skipif("triton" not in BACKENDS, reason="no GPU and no Triton interpreter")
@pytest.mark.parametrize("name", ["mistral", "gemma2", "gpt_oss"])
def test_triton_backend(name, kernel_calls):
    """The same through attnmem's Triton kernels (the interpreter on a CPU): left padding
    and a sliding window, with softcapping (Gemma 2) and sinks (gpt-oss), forward and
    backward."""
    model = copy.deepcopy(_model(name)).to(DEVICE)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), device=DEVICE)
    mask = _padding("left", torch.tensor([LENGTH, 6, 2])).to(DEVICE)
    weights = torch.randn(BATCH, LENGTH, VOCAB, device=DEVICE) * mask[..., None]
    expect, expect_grads = _run(model, MODELS[name][2], ids, mask, weights)
    with attnmem.use_backend("triton"):
        got, grads = _run(model, "attnmem", ids, mask, weights)
    assert kernel_calls
    real = mask.bool()
    torch.testing.assert_close(got[real], expect[real], rtol=1e-4, atol=1e-5)
    for grad, expect_grad in zip(grads, expect_grads, strict=True):
        torch.testing.assert_close(grad, expect_grad, rtol=1e-4,
                                   atol=1e-5 * max(1.0, expect_grad.abs().max().item()))


def _generate(model, implementation, ids, mask):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              output_logits=True, return_dict_in_generate=True,
                              pad_token_id=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_generate(name, kernel_calls):
    """Greedy decoding through the dynamic cache from left-padded prompts, as transformers
    pads for generation: the same tokens, and the same logits at every step."""
    model = _model(name)
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH))
    mask = _padding("left", torch.tensor([LENGTH, 5, 1]))
    expect = _generate(model, MODELS[name][2], ids, mask)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _generate(model, "attnmem", ids, mask)
    _expect_path(name, record, kernel_calls)
    assert torch.equal(got.sequences, expect.sequences)
    for step, expect_step in zip(got.logits, expect.logits, strict=True):
        torch.testing.assert_close(step, expect_step, rtol=1e-4, atol=1e-5)


def _decode(model, implementation, ids, mask, new_ids, cache, chunk=1):
    """The logits of new_ids fed chunk tokens at a time through a cache that holds the
    prompts ids."""
    model.set_attn_implementation(implementation)
    # A dynamic cache built from the config trims sliding-window layers to their window;
    # one built without keeps every key, so the window masks the cache.
    if cache == "static":
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    else:
        cache = transformers.DynamicCache(**({"config": model.config} if cache == "sliding"
                                             else {}))
    # transformers 5.24 renamed forward's past_key_values to cache (the old name warns until
    # 5.40); 5.23 knows only the old one.
    cache = {("cache" if "cache" in inspect.signature(model.forward).parameters
              else "past_key_values"): cache}
    logits = []
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=True, **cache)
        for step in range(0, new_ids.shape[1], chunk):
            mask = torch.cat([mask, torch.ones_like(mask[:, step:step + chunk])], 1)
            logits.append(model(new_ids[:, step:step + chunk], attention_mask=mask,
                                use_cache=True, **cache).logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("cache", ["sliding", "full"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", list(MODELS))
def test_decode(name, padding, cache, kernel_calls):
    """Tokens decoded one at a time after padded prompts; after right-padded prompts the
    padding is a hole in the cache that each step's single query skips."""
    model = _model(name)
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH))
    mask = _padding(padding, torch.tensor([LENGTH, 5, 1]))
    new_ids = torch.randint(1, VOCAB, (BATCH, 3))
    expect = _decode(model, MODELS[name][2], ids, mask, new_ids, cache)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _decode(model, "attnmem", ids, mask, new_ids, cache)
    _expect_path(name, record, kernel_calls)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cache", ["sliding", "full"])
@pytest.mark.parametrize("name", [name for name in MODELS if MODELS[name][3] is None])
def test_decode_chunks_after_left_padding(name, cache, kernel_calls):
    """Three tokens at once through the cache after left-padded prompts (speculative
    decoding, chunked prefill): queries that end the keys, with padding at the start."""
    model = _model(name)
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH))
    mask = _padding("left", torch.tensor([LENGTH, 5, 1]))
    new_ids = torch.randint(1, VOCAB, (BATCH, 6))
    expect = _decode(model, MODELS[name][2], ids, mask, new_ids, cache, chunk=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _decode(model, "attnmem", ids, mask, new_ids, cache, chunk=3)
    _expect_path(name, record, kernel_calls)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def _holes():
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, 3:5] = 0
    return {"attention_mask": mask}


def _packed():
    # Two sequences packed in one row, found from position_ids restarting at 0 where there
    # is no cache (as in training).
    return {"position_ids": torch.cat([torch.arange(5), torch.arange(LENGTH - 5)])[None],
            "use_cache": False}


@pytest.mark.parametrize("name, inputs, warning, reference", [
    ("llama", _holes, "padding on both sides or in between", "sdpa"),
    ("gpt_oss", _holes, "padding on both sides or in between", "eager"),
], ids=["holes", "holes-sinks"])
def test_masks_attnmem_cannot_express_fall_back(name, inputs, warning, reference,
                                                kernel_calls):
    """Padding inside a sequence under a causal mask with many queries: sdpa runs it, or
    the model's eager attention where it has sinks (sdpa has none), with a warning, and the
    results are theirs."""
    model = _model(name)
    inputs = inputs()
    batch = inputs.get("attention_mask", inputs.get("position_ids")).shape[0]
    ids = torch.randint(0, VOCAB, (batch, LENGTH))
    model.set_attn_implementation(reference)
    expect = model(ids, **inputs).logits
    model.set_attn_implementation("attnmem")
    with pytest.warns(UserWarning, match=f"{warning}.*: this runs on transformers' {reference} "):
        got = model(ids, **inputs).logits
    assert not kernel_calls
    real = inputs.get("attention_mask", torch.ones(batch, LENGTH)).bool()
    torch.testing.assert_close(got[real], expect[real], rtol=1e-4, atol=1e-5)


# Each row packs 3 documents (lengths 1 and 2 included: shorter than the window of 3).
DOCUMENTS = [[4, 1, 6], [2, 5, 4]]


def _packed_positions():
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCUMENTS])


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2-nosoftcap", "gemma2"])
def test_packed_sequences(name, kernel_calls):
    """Rows of 3 packed documents, found from position_ids restarting at 0, run on
    attnmem.attention_varlen (one sequence per document, the window per document; Gemma 2's
    sliding and full layers side by side): the logits and gradients of transformers' own
    attention on the same packed rows, and those of each document run alone."""
    model, reference = _model(name), MODELS[name][2]
    positions = _packed_positions()
    ids = torch.randint(0, VOCAB, positions.shape)
    weights = torch.randn(*positions.shape, VOCAB)

    def run(implementation, ids, weights, **inputs):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        logits = model(ids, use_cache=False, **inputs).logits
        (logits * weights).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    expect, expect_grads = run(reference, ids, weights, position_ids=positions)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got, grads = run("attnmem", ids, weights, position_ids=positions)
    assert not [w for w in record if "attnmem" in str(w.message)]
    assert [op for op, _ in kernel_calls] == ["attention_varlen"] * 2  # both layers
    tolerance = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, expect, **tolerance)
    for grad, expect_grad in zip(grads, expect_grads, strict=True):
        torch.testing.assert_close(grad, expect_grad, rtol=1e-4,
                                   atol=1e-5 * max(1.0, expect_grad.abs().max().item()))
    # Each document alone: its logits, and gradients that sum over the documents.
    alone_grads = None
    for row, lengths in enumerate(DOCUMENTS):
        for start, end in zip([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()],
                              torch.tensor(lengths).cumsum(0).tolist()):
            logits, doc_grads = run(reference, ids[row:row + 1, start:end],
                                    weights[row:row + 1, start:end])
            torch.testing.assert_close(got[row:row + 1, start:end], logits, **tolerance)
            alone_grads = doc_grads if alone_grads is None else [
                a + b for a, b in zip(alone_grads, doc_grads)]
    for grad, alone_grad in zip(grads, alone_grads, strict=True):
        torch.testing.assert_close(grad, alone_grad, rtol=1e-4,
                                   atol=1e-5 * max(1.0, alone_grad.abs().max().item()))


@pytest.mark.skipif("triton" not in BACKENDS, reason="no GPU and no Triton interpreter")
def test_packed_sequences_triton_backend(kernel_calls):
    """Packed documents under a sliding window through attnmem's varlen Triton kernels (the
    interpreter on a CPU), forward and backward, against sdpa."""
    model = copy.deepcopy(_model("mistral")).to(DEVICE)
    positions = _packed_positions().to(DEVICE)
    ids = torch.randint(0, VOCAB, positions.shape, device=DEVICE)
    weights = torch.randn(*positions.shape, VOCAB, device=DEVICE)
    packed = dict(position_ids=positions, use_cache=False)
    expect, expect_grads = _run(model, "sdpa", ids, None, weights, **packed)
    with attnmem.use_backend("triton"):
        got, grads = _run(model, "attnmem", ids, None, weights, **packed)
    assert [op for op, _ in kernel_calls] == ["attention_varlen"] * 2
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    for grad, expect_grad in zip(grads, expect_grads, strict=True):
        torch.testing.assert_close(grad, expect_grad, rtol=1e-4,
                                   atol=1e-5 * max(1.0, expect_grad.abs().max().item()))


def test_static_cache_falls_back(kernel_calls):
    """A static cache holds keys past the last query and gives its offset as a tensor:
    decoding from it runs on sdpa, with a warning, and gives sdpa's logits."""
    model = _model("llama")
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH))
    mask = _padding("left", torch.tensor([LENGTH, 5, 1]))
    new_ids = torch.randint(1, VOCAB, (BATCH, 3))
    expect = _decode(model, "sdpa", ids, mask, new_ids, "static")
    with pytest.warns(UserWarning, match="a static cache"):
        got = _decode(model, "attnmem", ids, mask, new_ids, "static")
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def test_static_sliding_cache(kernel_calls):
    """A full static sliding-window cache keeps its keys ending at the last query, as a
    dynamic one does: attnmem runs it."""
    model = _model("mistral")
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH))
    mask = _padding("left", torch.tensor([LENGTH, 5, 1]))
    new_ids = torch.randint(1, VOCAB, (BATCH, 3))
    expect = _decode(model, "sdpa", ids, mask, new_ids, "static")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _decode(model, "attnmem", ids, mask, new_ids, "static")
    _expect_path("mistral", record, kernel_calls)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def _dropout_model():
    config = transformers.LlamaConfig(**SMALL, attention_dropout=0.1)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@pytest.mark.parametrize("padding", ["none", "left"])
def test_dropout(padding, kernel_calls):
    """A model with attention_dropout = 0.1 runs on attnmem.attention with dropout_p: in
    evaluation (dropout 0) sdpa's logits; in training logits that differ from those without
    dropout, the same logits and gradients again under the same torch seed, finite
    gradients, and no fallback."""
    model = _dropout_model().eval()
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH))
    mask = _padding(padding, torch.tensor([LENGTH, 6, 2]))
    real = torch.ones(BATCH, LENGTH, dtype=torch.bool) if mask is None else mask.bool()
    weights = torch.randn(BATCH, LENGTH, VOCAB) * real[..., None]
    expect, _ = _run(model, "sdpa", ids, mask, weights)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        evaluated, _ = _run(model, "attnmem", ids, mask, weights)
        torch.testing.assert_close(evaluated[real], expect[real], rtol=1e-4, atol=1e-5)
        assert {kw["dropout_p"] for _, kw in kernel_calls} == {0.0}
        kernel_calls.clear()
        model.train()
        torch.manual_seed(0)
        trained, grads = _run(model, "attnmem", ids, mask, weights)
        torch.manual_seed(0)
        again, grads_again = _run(model, "attnmem", ids, mask, weights)
    assert not [w for w in record if "attnmem" in str(w.message)]
    assert {kw["dropout_p"] for _, kw in kernel_calls} == {0.1}
    assert not torch.allclose(trained[real], evaluated[real], rtol=1e-3, atol=1e-3)
    assert torch.equal(trained, again)
    for grad, grad_again in zip(grads, grads_again, strict=True):
        assert grad.isfinite().all()
        assert torch.equal(grad, grad_again)


def test_dropout_on_packed_sequences(kernel_calls):
    """Packed sequences in training with attention dropout run on attention_varlen with the
    module's dropout: repeatable under the same seed, unlike evaluation, finite gradients."""
    model = _dropout_model()
    positions = _packed_positions()
    ids = torch.randint(0, VOCAB, positions.shape)
    weights = torch.randn(*positions.shape, VOCAB)
    packed = dict(position_ids=positions, use_cache=False)
    evaluated, _ = _run(model.eval(), "attnmem", ids, None, weights, **packed)
    model.train()
    torch.manual_seed(0)
    trained, grads = _run(model, "attnmem", ids, None, weights, **packed)
    torch.manual_seed(0)
    again, grads_again = _run(model, "attnmem", ids, None, weights, **packed)
    assert {op for op, _ in kernel_calls} == {"attention_varlen"}
    assert {kw["dropout_p"] for _, kw in kernel_calls} == {0.0, 0.1}
    assert not torch.allclose(trained, evaluated, rtol=1e-3, atol=1e-3)
    assert torch.equal(trained, again)
    for grad, grad_again in zip(grads, grads_again, strict=True):
        assert grad.isfinite().all()
        assert torch.equal(grad, grad_again)


def test_from_pretrained(tmp_path, kernel_calls):
    """from_pretrained(..., attn_implementation="attnmem") loads a model that runs attnmem."""
    model = _model("llama")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="attnmem").eval()
    assert loaded.config._attn_implementation == "attnmem"
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH))
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    assert kernel_calls


def test_register_is_idempotent():
    from transformers import AttentionInterface, AttentionMaskInterface
    attnmem_transformers.register()
    attnmem_transformers.register()
    assert AttentionInterface._global_mapping["attnmem"] is attnmem_transformers.attention_forward
    assert AttentionMaskInterface._global_mapping["attnmem"] is attnmem_transformers.build_mask
    assert "attnmem" in transformers.AttentionInterface().valid_keys()


def test_register_refuses_an_older_transformers(monkeypatch):
    # The module register() imports: transformers replaces its sys.modules entry once models
    # are built, so this file's `transformers` may be an older object.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.17.0")
    with pytest.raises(ImportError, match="needs transformers >= 5.23, found 5.17.0"):
        attnmem_transformers.register()


def test_imports_without_transformers():
    """The module imports without transformers; register() then raises an ImportError that
    says what to install."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import attnmem.integrations.transformers as t\n"
            "try:\n    t.register()\nexcept ImportError as e:\n    print(e)\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=root)
    assert "needs the transformers package: pip install transformers" in result.stdout
