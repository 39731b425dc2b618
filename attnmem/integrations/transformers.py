"""attnmem as an attention implementation of Hugging Face transformers.

    import attnmem.integrations.transformers as attnmem_transformers
    attnmem_transformers.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnmem")
    # or, on a loaded model: model.set_attn_implementation("attnmem")

`register()` adds "attnmem" to transformers' `AttentionInterface` (the attention function
every layer calls) and `AttentionMaskInterface` (the function a model calls once per forward
and mask type to build its mask). The mask function does not build the (B, 1, Nq, Nk) mask
transformers' sdpa path builds: it recognises the masks attnmem runs (causal, sliding-window
causal and bidirectional mask functions, with the keys ending at the last query, as dynamic
caches keep them, and transformers' packed-sequence wrapper of the causal ones) and hands the
layers the 2D padding mask with its layout. Each layer then runs `attnmem.attention`, or
`attnmem.attention_varlen` for packed sequences:

- no padding: causal=True (bottom-right), a sliding window w as window=(w - 1, 0);
- right padding (each row's tokens a prefix): kv_lengths;
- left padding (each row's tokens a suffix, as `generate` pads): queries, keys and values are
  flipped along the sequence, which turns the padding into kv_lengths and the causal mask
  and window into a window of fixed width; keys no query's window reaches are sliced off;
- one query (decoding) or a bidirectional mask, with any padding: each row's visible keys
  move to the front (a stable sort on the device) and become kv_lengths;
- packed sequences (several documents in one row, which transformers finds where
  position_ids do not step by 1, as when each document restarts at 0, given no padding
  mask and no cache, as in training; it combines the causal or sliding-window mask function
  with its packed_sequence_mask_function): attnmem.attention_varlen, every document of
  every row one sequence, causal and the window per document, with cumulative lengths
  from transformers' packed sequence indices (the document ids of each row's tokens).

A layer given no mask reads it as transformers' sdpa does: causal (top-left) past one query
when the module is causal. Real tokens get transformers' results; padded query positions,
which no real token reads, get attnmem's (zeros where they see no key). Logit softcapping
(Gemma 2's `softcap`) and attention sinks (gpt-oss's `s_aux`, differentiable) pass through
to attnmem.attention's `softcap` and `sinks`, and attention dropout (the `dropout`
transformers passes: the module's attention_dropout in training, 0.0 in evaluation) to its
`dropout_p`, on every path above (attention_varlen takes them too). attnmem draws its own
dropout mask (from torch's generator, reproducible under the same seed), not sdpa's.

Everything else runs on transformers' own attention, with a warning naming the reason shown
once per reason: masks attnmem cannot express (custom mask
functions, packed sequences while torch.compile traces, chunked attention, static caches
other than full sliding-window layers, 4D masks passed in, padding with holes under a causal
mask with more than one query), paged caches and position biases. They run on its sdpa, or
on the model's eager attention where the layer softcaps or has sinks, which sdpa lacks. The
fallbacks give transformers' results, never a different one.

Host syncs: the mask function reads the padding mask's layout once per forward and mask
type (one small device-to-host copy, as transformers' own sdpa and flash-attention mask
functions do when they check for padding), and for packed sequences where the documents
start (one device-to-host copy of B * N bools, and the cumulative lengths copied back); the
layers never sync. While torch.compile traces, neither is read: padded batches then take
the sort path or fall back, and packed sequences fall back.

Tested against transformers 5.23 and 5.24.
"""

import math
import sys
import warnings

import torch

import attnmem
from attnmem.nn.multihead import _compact_keys

NAME = "attnmem"
# The oldest transformers whose masks this module reads (pyproject's dev extra says so too):
# 5.17 has no remap_positions_for_packed_sequence.
MIN_VERSION = "5.23"

_warned: set = set()


def register():
    """Register attnmem with transformers as attn_implementation "attnmem" (attention and mask
    functions); calling it again changes nothing. Raises ImportError without transformers
    or with one older than MIN_VERSION."""
    try:
        import transformers
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as error:
        raise ImportError("attnmem.integrations.transformers.register() needs the transformers "
                          "package: pip install transformers") from error
    from packaging.version import Version
    if Version(transformers.__version__) < Version(MIN_VERSION):
        raise ImportError(f"attnmem.integrations.transformers.register() needs transformers >= "
                          f"{MIN_VERSION}, found {transformers.__version__}: pip install -U "
                          f"transformers")
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, build_mask)


class _Mask:
    """The mask of one forward and mask type as attnmem arguments.

    causal: whether key j is hidden from queries before it (bottom-right aligned, as the keys
    end at the last query); window: the sliding window w (a query sees its w - 1 previous
    keys and itself) or None; padding: (B, Nk) bool, True for a real token, or None when
    every key is one; layout: "none", "right", "left", "any" or "packed"; lengths: padding's
    (B,) counts. For packed sequences, packed is (cu_seqlens, max_seqlen): the documents of
    every row, one after another, as attnmem.attention_varlen takes them. sdpa_kwargs
    rebuild transformers' sdpa mask for a fallback."""

    def __init__(self, causal, window, padding, layout, q_length, kv_length, sdpa_kwargs,
                 packed=None):
        self.causal, self.window = causal, window
        self.padding, self.layout, self.packed = padding, layout, packed
        self.lengths = None if padding is None else padding.sum(-1)
        self.q_length, self.kv_length = q_length, kv_length
        self.sdpa_kwargs = sdpa_kwargs
        self._dense = None

    def dense(self):
        """transformers' sdpa mask, (B, 1, Nq, Nk) bool, built once; never None, which sdpa
        would read as the module's is_causal rather than this mask."""
        if self._dense is None:
            from transformers.masking_utils import sdpa_mask
            self._dense = sdpa_mask(**{**self.sdpa_kwargs, "allow_is_causal_skip": False,
                                       "allow_is_bidirectional_skip": False})
        return self._dense


def _same_function(a, b) -> bool:
    """Whether mask functions a and b are the same closure over the same values: transformers
    builds its masks from closures, and a wrapped one (packed sequences, custom overlays,
    chunks) must not pass for the plain mask it wraps."""
    if a is b:
        return True
    if not callable(a) or getattr(a, "__code__", None) is not getattr(b, "__code__", False):
        return False
    cells_a, cells_b = a.__closure__ or (), b.__closure__ or ()
    return len(cells_a) == len(cells_b) and all(
        _same_value(x.cell_contents, y.cell_contents) for x, y in zip(cells_a, cells_b))


def _same_value(x, y) -> bool:
    if isinstance(x, tuple) and isinstance(y, tuple):
        return len(x) == len(y) and all(_same_value(*pair) for pair in zip(x, y))
    if callable(x):
        return _same_function(x, y)
    return type(x) is int and type(y) is int and x == y


def _kind(mask_function, local_size):
    """(causal, window) for the mask functions attnmem runs, None for any other."""
    from transformers import masking_utils as mu
    if _same_function(mask_function, mu.causal_mask_function):
        return True, None
    if _same_function(mask_function, mu.bidirectional_mask_function):
        return False, None
    if isinstance(local_size, int) and _same_function(
            mask_function, mu.sliding_window_causal_mask_function(local_size)):
        return True, local_size
    return None


def _cells(function) -> dict:
    """A closure's captured values by name."""
    return dict(zip(function.__code__.co_freevars,
                    (cell.cell_contents for cell in function.__closure__ or ())))


def _unpack(mask_function):
    """(the wrapped mask function, the packed sequence indices (B, N)) when mask_function is
    transformers' packed-sequence mask (and_masks of packed_sequence_mask_function, keys of
    the query's own document, and remap_positions_for_packed_sequence, positions remapped to
    position_ids: in that order up to transformers 5.23, wrapped as
    packed_sequence_compatibility_function, in the other from 5.24), else None."""
    from transformers import masking_utils as mu
    documents = mu.packed_sequence_mask_function(None)
    remapped = mu.remap_positions_for_packed_sequence(mu.causal_mask_function, None)
    if getattr(mask_function, "__code__", None) is not mu.and_masks(documents).__code__:
        return None
    parts = _cells(mask_function)["mask_functions"]
    codes = [getattr(f, "__code__", None) for f in parts]
    if len(parts) != 2 or set(codes) != {documents.__code__, remapped.__code__}:
        return None
    indices, wrapped = parts if codes[0] is documents.__code__ else parts[::-1]
    return _cells(wrapped)["mask_function"], _cells(indices)["packed_sequence_mask"]


@torch.compiler.disable
def _documents(indices):
    """(cu_seqlens int32 (documents + 1,), the longest document) of packed sequence indices
    (B, N), each row's documents one after another: one device-to-host copy of where the
    documents start. Called only outside tracing; disabled for dynamo, which would otherwise
    try to compile it where torch.compile runs the mask function eagerly."""
    starts = torch.ones_like(indices, dtype=torch.bool)
    starts[:, 1:] = indices[:, 1:] != indices[:, :-1]
    starts = starts.flatten().cpu().nonzero().flatten()
    cu_seqlens = torch.cat([starts, torch.tensor([indices.numel()])])
    return cu_seqlens.to(torch.int32).to(indices.device), int(cu_seqlens.diff().max())


def _layout(padding) -> str:
    """"none", "right" (each row's real tokens a prefix), "left" (a suffix) or "any": read
    with one device-to-host copy, and not at all while torch.compile traces."""
    if torch.compiler.is_compiling():
        return "any"
    n = padding.shape[-1]
    counts = padding.sum(-1, keepdim=True)
    position = torch.arange(n, device=padding.device)
    flags = torch.stack([(counts == n).all(), (padding == (position < counts)).all(),
                         (padding == (position >= n - counts)).all()])
    full, prefix, suffix = flags.tolist()
    return "none" if full else "right" if prefix else "left" if suffix else "any"


def build_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
         attention_mask=None, local_size=None, **kwargs):
    """transformers' AttentionMaskInterface function for "attnmem": a `_Mask` where attnmem
    runs the mask, else transformers' sdpa mask, which `attention_forward` hands to sdpa."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask
    sdpa_kwargs = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                       q_offset=q_offset, kv_offset=kv_offset,
                       mask_function=mask_function or causal_mask_function,
                       attention_mask=attention_mask, local_size=local_size, **kwargs)
    # Static caches give q_offset as a tensor and keys past the last query.
    aligned = (type(q_offset) is int and type(kv_offset) is int and kv_offset <= q_offset
               and kv_offset + kv_length == q_offset + q_length)
    packed = _unpack(sdpa_kwargs["mask_function"])
    if packed is not None:
        # transformers finds packed sequences only without a padding mask or a cache, where
        # a document's positions step by 1, so its causal mask and window on positions are
        # those on its rows. Reading where documents start needs the host: not while
        # torch.compile traces.
        kind, indices = _kind(packed[0], local_size), packed[1]
        if (kind is None or not kind[0] or attention_mask is not None or not aligned
                or q_offset != 0 or tuple(indices.shape) != (batch_size, q_length)
                or kv_length != q_length or torch.compiler.is_compiling()):
            return sdpa_mask(**sdpa_kwargs)
        return _Mask(*kind, None, "packed", q_length, kv_length, sdpa_kwargs,
                     packed=_documents(indices))
    kind = _kind(sdpa_kwargs["mask_function"], local_size)
    if kind is None or (kind[0] and not aligned):
        return sdpa_mask(**sdpa_kwargs)
    padding, layout = None, "none"
    if attention_mask is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, kv_offset:kv_offset + kv_length]
        layout = _layout(padding)
        if layout == "none":
            padding = None
    return _Mask(*kind, padding, layout, q_length, kv_length, sdpa_kwargs)


def _fall_back(reason, eager, module, query, key, value, attention_mask, dropout, scaling,
               is_causal, kwargs):
    """transformers' sdpa attention, or the model's eager attention (eager=True), on the
    exact mask transformers' sdpa path would use."""
    path = "eager" if eager else "sdpa"
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"attnmem: {reason}: this runs on transformers' {path} attention "
                      "instead of attnmem's (the same results; shown once)", stacklevel=3)
    dense = attention_mask.dense() if isinstance(attention_mask, _Mask) else attention_mask
    if not eager:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    eager_forward = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward",
                            None)
    if eager_forward is None:
        raise NotImplementedError(f"attnmem: {reason}, and {type(module).__name__}'s module has "
                                  "no eager_attention_forward to run it")
    if dense is None and _sdpa_causal(module, query, is_causal):
        # sdpa's is_causal: top-left aligned.
        n_q, n_k = query.shape[2], key.shape[2]
        dense = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()
    if dense is not None:
        dense = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
            ~dense, torch.finfo(query.dtype).min)
    return eager_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling,
                         **kwargs)


def _sdpa_causal(module, query, is_causal) -> bool:
    """What transformers' sdpa does without a mask: causal, top-left, past one query."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return bool(is_causal) and query.shape[2] > 1


def _reason(attention_mask, query, key, value, is_causal, module, kwargs):
    """Why attnmem cannot run this call, or None."""
    if kwargs.get("position_bias") is not None:
        return "attnmem.attention takes no position bias"
    if kwargs.get("cache") is not None:
        return "paged caches are not implemented in attnmem.attention yet"
    if value.shape[-1] != key.shape[-1]:
        return "values with another head dim than the keys"
    n_q, n_k = query.shape[2], key.shape[2]
    if isinstance(attention_mask, torch.Tensor):
        return ("a mask attnmem cannot express (a custom mask function, packed sequences "
                "while torch.compile traces, chunked attention, a static cache or a 4D mask "
                "passed in)")
    if attention_mask is None:
        if _sdpa_causal(module, query, is_causal) and n_k < n_q:
            return "a causal mask over fewer keys than queries without a mask"
        return None
    if (attention_mask.q_length, attention_mask.kv_length) != (n_q, n_k):
        return "keys or queries of another length than their mask"
    if attention_mask.causal and attention_mask.layout == "any" and n_q > 1:
        return ("a causal mask with padding on both sides or in between (or any padding "
                "while torch.compile traces)")
    return None


def _attend(m, q, k, v, scale, mods):
    """attnmem.attention on (B, H, Nq, D) q and (B, Hkv, Nk, D) k, v under mask m, with
    `mods` (softcap, sinks, dropout_p); packed sequences on attnmem.attention_varlen."""
    n_q, n_k = q.shape[2], k.shape[2]
    w = m.window
    if m.layout == "packed":
        batch, heads, _, dim = q.shape
        q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], dim) for x in (q, k, v))
        cu_seqlens, max_seqlen = m.packed
        out = attnmem.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                       causal=m.causal, scale=scale,
                                       window=None if w is None else (w - 1, 0), **mods)
        return out.view(batch, n_q, heads, dim).transpose(1, 2)
    if m.layout == "none":
        return attnmem.attention(q, k, v, causal=m.causal, scale=scale,
                                 window=None if w is None else (w - 1, 0), **mods)
    if m.layout == "right":
        return attnmem.attention(q, k, v, causal=m.causal, scale=scale, kv_lengths=m.lengths,
                                 window=None if w is None else (w - 1, 0), **mods)
    if m.causal and m.layout == "left":
        # Flipped, query i* = Nq - 1 - i sees key j* = Nk - 1 - j when i* <= j* (causal)
        # <= i* + w - 1 (window) and j* < length: at attnmem's a = i* + Nk - Nq that is the
        # window (Nk - Nq, w - 1 - (Nk - Nq)), whose right side the slice keeps >= 0.
        padding = m.padding
        if w is not None and n_k > n_q + w - 1:
            cut = n_k - (n_q + w - 1)
            k, v, padding, n_k = k[:, :, cut:], v[:, :, cut:], padding[:, cut:], n_k - cut
        window = (n_k - n_q, None if w is None else w - 1 - (n_k - n_q))
        out = attnmem.attention(q.flip(2), k.flip(2), v.flip(2), scale=scale, window=window,
                                kv_lengths=padding.sum(-1), **mods)
        return out.flip(2)
    # One query, or no causal mask: the keys it sees, in any layout, move to the front.
    visible = m.padding
    if m.causal and w is not None:
        visible = visible & (torch.arange(n_k, device=k.device) >= n_k - w)
    k, v, lengths = _compact_keys(k, v, ~visible)
    return attnmem.attention(q, k, v, scale=scale, kv_lengths=lengths, **mods)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, softcap=None, s_aux=None, **kwargs):
    """transformers' AttentionInterface function for "attnmem".

    query (B, H, Nq, D); key, value (B, Hkv, Nk, D) with Hkv dividing H (grouped-query
    attention runs as is); attention_mask as `build_mask` made it (or None: sdpa's meaning, a
    top-left causal mask past one query when the module is causal); softcap (Gemma 2) and
    s_aux, the sinks (H,) (gpt-oss), go to attnmem.attention's softcap and sinks, dropout to
    its dropout_p. Returns the output (B, Nq, H, D) and None for the attention weights."""
    reason = _reason(attention_mask, query, key, value, is_causal, module, kwargs)
    if reason is not None:
        # sdpa has no softcap and no sinks: such layers fall back to their eager attention.
        eager = softcap is not None or s_aux is not None
        return _fall_back(reason, eager, module, query, key, value, attention_mask, dropout,
                          scaling, is_causal, dict(kwargs, softcap=softcap, s_aux=s_aux))
    scale = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
    # transformers passes the module's attention_dropout in training and 0.0 in evaluation.
    mods = dict(softcap=softcap, sinks=s_aux, dropout_p=dropout)
    if isinstance(attention_mask, _Mask):
        out = _attend(attention_mask, query, key, value, scale, mods)
    else:
        causal = _sdpa_causal(module, query, is_causal)
        if causal:
            # sdpa's top-left causal mask reads no key past the last query.
            key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
        out = attnmem.attention(query, key, value, causal=causal, scale=scale, **mods)
    return out.transpose(1, 2).contiguous(), None
