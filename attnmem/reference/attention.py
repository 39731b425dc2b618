"""Pure-torch attention: the reference the tests compare against, and the torch backend
wherever torch's fused CPU kernel does not run (other devices, a gradient of lse).

Masks are described by one window `(left, right)` of key offsets around each query's
bottom-right aligned position `a = i + (Nk - Nq)`: query i sees key j iff
`a - left <= j <= a + right` and `j < kv_lengths[b]`; `-1` leaves a side unbounded and
`causal` is `right = 0`. The masks align every batch to the padded key length Nk, whatever
its kv_lengths (see attnmem.attention). Keys that no query sees are zeroed before use, so
that padding holding NaN or inf contributes nothing, forward and backward. The work runs
over chunks of query rows, so no `Nq x Nk` score matrix exists for every head at once, and
the backward recomputes scores from the saved logsumexp, as the kernels do.

Score modifications, in this order on the scaled scores s = scale * q.k (FlashAttention's
and Gemma 2's): a softcap c > 0 makes them c * tanh(s / c); ALiBi slopes (H,) or (B, H) add
-slope * |a - j|; then the mask. Sinks (H,) add one logit per query head to every row's
softmax denominator, with no value (gpt-oss): the output is sum_j p_j v_j with
p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k)), and lse includes the sink.

Dropout (FlashAttention's and SDPA's): the softmax weights that a keep mask drops become
zeros and the rest are scaled by 1 / (1 - p); lse stays that of the undropped scores. The
dropout_mask of kept weights is a bool tensor (B, H, Nq, Nk) (the tests pass the kernels'
own) or a function of a row chunk, as seeded_keep makes for the torch backend.
"""

import torch

# Score elements held at once (64 MiB in float32).
CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_with_lse(scores):
    """(weights, lse) of a softmax over the last dim; a row of -inf scores, or an empty row,
    gets zero weights, lse -inf and zero gradients (never NaN)."""
    if scores.shape[-1] == 0:  # amax has nothing to reduce; both stay functions of scores
        return scores * 0, scores.sum(-1) + float("-inf")
    top = scores.amax(-1, keepdim=True).detach()
    exps = torch.exp(scores - torch.where(torch.isfinite(top), top, 0.0))
    total = exps.sum(-1, keepdim=True)
    nonempty = total > 0
    total = torch.where(nonempty, total, 1.0)
    lse = torch.where(nonempty, top + torch.log(total), float("-inf")).squeeze(-1)
    return exps / total, lse


def visible(rows, n_q, n_k, window_left, window_right, kv_lengths):
    """Bool mask (B or 1, 1, len(rows), Nk): query row i sees key j; None if all do."""
    if window_left < 0 and window_right < 0 and kv_lengths is None:
        return None
    aligned = rows[:, None] + (n_k - n_q)
    j = torch.arange(n_k, device=rows.device)[None, :]
    keep = torch.ones(len(rows), n_k, dtype=torch.bool, device=rows.device)
    if window_left >= 0:
        keep &= j >= aligned - window_left
    if window_right >= 0:
        keep &= j <= aligned + window_right
    keep = keep[None, None]
    if kv_lengths is not None:
        keep = keep & (j < kv_lengths.view(-1, 1, 1, 1))
    return keep


def without_unseen_keys(k, v, n_q, window_left, kv_lengths):
    """k, v (B, Hkv, Nk, D) with zeros for the keys that no query sees: those at or past
    kv_lengths[b] and those before every query's window (j < Nk - Nq - window_left). Whatever
    padding holds (NaN, inf) then adds nothing to p @ v, dp = dout @ v^T or ds @ k, where a
    zero weight times NaN would still be NaN."""
    n_k = k.shape[2]
    first = n_k - n_q - window_left if window_left >= 0 else 0
    if first <= 0 and kv_lengths is None:
        return k, v
    j = torch.arange(n_k, device=k.device)
    seen = (j >= first).view(1, 1, n_k, 1)
    if kv_lengths is not None:
        seen = seen & (j.view(1, 1, n_k, 1) < kv_lengths.view(-1, 1, 1, 1))
    return torch.where(seen, k, 0.0), torch.where(seen, v, 0.0)


def seeded_keep(seed, dropout_p, batch, heads, n_k, device):
    """The torch backend's keep mask, a function rows -> bool (B, H, len(rows), Nk): row i
    keeps torch.rand(B, H, Nk) >= p, drawn from a generator on device seeded with
    seed + i, so that the backward regenerates each row of the forward's mask from seed
    alone, whatever its row chunks."""
    generator = torch.Generator(device)

    def keep(rows):
        out = torch.empty(batch, heads, len(rows), n_k, dtype=torch.bool, device=device)
        for i, row in enumerate(rows.tolist()):
            generator.manual_seed(seed + row)
            out[:, :, i] = torch.rand(batch, heads, n_k, generator=generator,
                                      device=device) >= dropout_p
        return out
    return keep


def _kept(dropout_mask, rows, kv_heads, dropout_p):
    """(mask of the row chunk grouped as (B, Hkv, G, rows, Nk), the survivors' scale
    1 / (1 - p), 0 at p = 1 where none survives), or None without dropout."""
    if dropout_p == 0:
        return None
    chunk = dropout_mask(rows) if callable(dropout_mask) else dropout_mask[:, :, rows]
    return _grouped(chunk, kv_heads), 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0


def _dropout(x, kept):
    """x (B, Hkv, G, rows, Nk), zero where _kept's mask drops, scaled elsewhere."""
    if kept is None:
        return x
    mask, rescale = kept
    return torch.where(mask, x, 0.0) * rescale


def _row_chunks(q, n_k):
    batch, heads, n_q, _ = q.shape
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * n_k))
    for start in range(0, n_q, step):
        yield torch.arange(start, min(n_q, start + step), device=q.device)


def _grouped(x, kv_heads):
    """(B, H, N, D) -> (B, Hkv, G, N, D): query head h = kv * G + g reads kv head h // G."""
    return x.unflatten(1, (kv_heads, x.shape[1] // kv_heads))


def _scores(qg_rows, k, rows, n_q, scale, window_left, window_right, kv_lengths, softcap=0.0,
            alibi=None):
    """Scaled scores (B, Hkv, G, rows, Nk) of one row chunk, capped at softcap and biased by
    the ALiBi slopes `alibi` (B or 1, Hkv, G, 1, 1), their visibility mask, and the cap's
    tanh (None without one)."""
    s, t = torch.matmul(qg_rows, k[:, :, None].transpose(-1, -2)) * scale, None
    if softcap:
        t = torch.tanh(s / softcap)
        s = t * softcap
    if alibi is not None:
        distance = rows[:, None] + (k.shape[2] - n_q) - torch.arange(k.shape[2], device=k.device)
        s = s - alibi * distance.abs().to(s.dtype)
    keep = visible(rows, n_q, k.shape[2], window_left, window_right, kv_lengths)
    return s, None if keep is None else keep[:, :, None], t


def _slopes(alibi_slopes, heads, kv_heads, ct):
    """ALiBi slopes (H,) or (B, H) -> (B or 1, Hkv, G, 1, 1) in ct, or None."""
    if alibi_slopes is None:
        return None
    return _grouped(alibi_slopes.to(ct).reshape(-1, heads, 1, 1), kv_heads)


def attention_forward(q, k, v, kv_lengths, scale, window_left, window_right, softcap=0.0,
                      sinks=None, alibi_slopes=None, dropout_p=0.0, dropout_mask=None):
    """q: (B, H, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Ev) -> out (B, H, Nq, Ev) in
    q's dtype and the natural-log logsumexp (B, H, Nq) of the scaled, masked scores (and
    the sinks) in compute_dtype (-inf where a query sees no key and no sink; its output is
    zero).
    Differentiable through torch autograd, in the sinks too. dropout_p > 0: dropout on the
    weights with dropout_mask (see the module's docstring)."""
    ct = compute_dtype(q.dtype)
    if q.shape[2] == 0 or k.shape[2] == 0:
        # No query, or no key to see: zero output (still a function of q for autograd), with
        # v's head dim.
        lse = torch.full(q.shape[:3], float("-inf"), dtype=ct, device=q.device)
        if sinks is not None:  # only the sink: all weight on it
            lse = lse.maximum(sinks.to(ct)[:, None])
        return q[..., :1] * 0 + q.new_zeros(v.shape[-1]), lse
    n_q, kv_heads = q.shape[2], k.shape[1]
    kc, vc = without_unseen_keys(k.to(ct), v.to(ct), n_q, window_left, kv_lengths)
    qg = _grouped(q, kv_heads).to(ct)
    alibi = _slopes(alibi_slopes, q.shape[1], kv_heads, ct)
    sink = None if sinks is None else _grouped(sinks.to(ct).view(1, -1, 1, 1), kv_heads)
    outs, lses = [], []
    for rows in _row_chunks(q, k.shape[2]):
        s, keep, _ = _scores(qg[..., rows, :], kc, rows, n_q, scale, window_left, window_right,
                             kv_lengths, softcap, alibi)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        # The row max only shifts the exponent; softmax does not depend on it.
        m = s.amax(-1, keepdim=True)
        if sink is not None:
            m = torch.maximum(m, sink)
        m = m.detach()
        m = torch.where(torch.isfinite(m), m, 0.0)
        p = torch.exp(s - m)
        row_sum = p.sum(-1, keepdim=True)
        if sink is not None:
            row_sum = row_sum + torch.exp(sink - m)
        seen = row_sum > 0
        l_safe = torch.where(seen, row_sum, 1.0)
        p = _dropout(p, _kept(dropout_mask, rows, kv_heads, dropout_p))
        outs.append(torch.matmul(p, vc[:, :, None]) / l_safe)
        lses.append(torch.where(seen, m + torch.log(l_safe), float("-inf")).squeeze(-1))
    out = torch.cat(outs, dim=-2).flatten(1, 2).to(q.dtype)
    lse = torch.cat(lses, dim=-1).flatten(1, 2)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, dlse, kv_lengths, scale, window_left,
                       window_right, softcap=0.0, sinks=None, alibi_slopes=None,
                       dropout_p=0.0, dropout_mask=None):
    """Gradients (dq, dk, dv) of attention_forward, given dout and optionally dlse, and the
    forward's dropout_p and dropout_mask; with sinks also dsinks: -sum over batches and rows
    of exp(sink - lse) * delta, where delta = rowsum(dout * out) - dlse (the sink's value is
    zero). ALiBi slopes get none."""
    ct = compute_dtype(q.dtype)
    n_q, kv_heads = q.shape[2], k.shape[1]
    kc, vc = without_unseen_keys(k.to(ct), v.to(ct), n_q, window_left, kv_lengths)
    qg = _grouped(q, kv_heads).to(ct)
    dog = _grouped(dout, kv_heads).to(ct)
    delta = (dout.to(ct) * out.to(ct)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(ct)
    dsinks = None
    if sinks is not None:
        lse_c = lse.to(ct)
        p_sink = torch.exp(sinks.to(ct)[:, None] - lse_c)
        dsinks = -torch.where(lse_c == float("-inf"), 0.0, p_sink * delta).sum((0, 2))
        dsinks = dsinks.to(sinks.dtype)
    alibi = _slopes(alibi_slopes, q.shape[1], kv_heads, ct)
    delta, lse_g = _grouped(delta[..., None], kv_heads), _grouped(lse.to(ct)[..., None], kv_heads)
    dq = torch.empty_like(qg)
    dk, dv = torch.zeros_like(kc), torch.zeros_like(vc)
    for rows in _row_chunks(q, k.shape[2]):
        s, keep, t = _scores(qg[..., rows, :], kc, rows, n_q, scale, window_left, window_right,
                             kv_lengths, softcap, alibi)
        p = torch.exp(s - lse_g[..., rows, :])
        if keep is not None:  # rows that see no key have lse = -inf: the mask zeroes them
            p = torch.where(keep, p, 0.0)
        do_rows = dog[..., rows, :]
        kept = _kept(dropout_mask, rows, kv_heads, dropout_p)
        dv += torch.matmul(_dropout(p, kept).transpose(-1, -2), do_rows).sum(2)
        dp = _dropout(torch.matmul(do_rows, vc[:, :, None].transpose(-1, -2)), kept)
        ds = p * (dp - delta[..., rows, :])
        if t is not None:  # the cap c tanh(x / c) has derivative 1 - tanh^2
            ds = ds * (1 - t * t)
        dq[..., rows, :] = torch.matmul(ds, kc[:, :, None]) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qg[..., rows, :]).sum(2) * scale
    grads = dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    return grads if sinks is None else (*grads, dsinks)


def dequantize(x, descale):
    """x (B, Hx, N, D) float8 and its descale (B, Hkv) -> x * descale[b, h // (Hx // Hkv)]
    in float32."""
    grouped = _grouped(x.to(torch.float32), descale.shape[1])
    return (grouped * descale.to(torch.float32)[:, :, None, None, None]).flatten(1, 2)


def attention_forward_fp8(q, k, v, descales, kv_lengths, scale, window_left, window_right,
                          out_dtype, softcap=0.0, sinks=None, alibi_slopes=None):
    """The FP8 forward's twin: q, k, v float8 with descales (B, Hkv, 3) (q's, k's, v's),
    dequantized, then attention_forward in float32 -> out in out_dtype, lse float32. The
    kernel also rounds the softmax weights to e4m3; the twin does not."""
    q, k, v = (dequantize(x, descales[..., i]) for i, x in enumerate((q, k, v)))
    with torch.no_grad():
        out, lse = attention_forward(q, k, v, kv_lengths, scale, window_left, window_right,
                                     softcap, sinks, alibi_slopes)
    return out.to(out_dtype), lse
