"""Attention saturation: softmax rows that put almost all their weight on one key, which no output std shows.

A transformer's LayerNorms keep every layer's output near unit scale whatever the weights, so an attention
whose query and key projections are far too large leaves the forward drift small; yet the logits
``q k^T / sqrt(d)`` then have a std of order ``d`` (N(0, 1) weights on unit inputs: each component of q and k
has variance ``fan_in``, so the logits' variance is ``fan_in^2``, against about ``(fan_in Var w)^2 ~ 1`` for
weights drawn at ``1/sqrt(fan_in)``), the softmax becomes one-hot, and its backward ``dp_i/dz_j = p_i
(delta_ij - p_j)`` is near zero: the query and key projections get no gradient (Vaswani et al. 2017, Sec.
3.2.1: the ``1/sqrt(d_k)`` scale exists to keep the softmax out of this regime; Zhai et al. 2023 call the
trained version "attention entropy collapse").

:func:`watch_attention` records, during one forward pass, every softmax over the last dimension of a tensor
of three or more dimensions (the eager attention of ``q @ k.transpose``) and every
``F.scaled_dot_product_attention`` call (whose logits it recomputes, with the mask and causal flag it was
given), under the innermost module running it. Per module: how many query rows have two or more keys not
masked out, how many of those put more than 99% of their weight on one key (the 1%-from-the-bound of the
saturation rule), and the logits' std over the unmasked keys. :func:`rule_attention_saturation` turns that
into a ``saturation`` finding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..trace import Trace
from ._findings import Finding
from ._rulekit import RuleContext, g, planned_fix

__all__ = ["rule_attention_saturation", "watch_attention"]

_ONE_HOT = 0.99  # a row whose largest probability exceeds this passes (almost) no gradient to its logits
_SOFTMAX = {torch.softmax, torch.Tensor.softmax, F.softmax}
_QK = re.compile(r"(^|_)(q|k|qk|qkv|kv|query|key|wq|wk|wqkv|c_attn|in_proj)(_|$)")


def _row_facts(logits: torch.Tensor, probs: torch.Tensor | None = None) -> dict[str, float]:
    """Counts over the rows (all but the last dimension) with two or more unmasked keys: rows, one-hot
    rows (max probability above 0.99), and the sum of the logits' std over the unmasked keys."""
    z = logits.detach().float()
    masked = ~torch.isfinite(z) | (logits.detach() <= torch.finfo(logits.dtype).min / 2)  # -inf or finfo.min
    keys = (~masked).sum(-1)
    live = keys >= 2
    rows = int(live.sum())
    if rows == 0:
        return {"rows": 0.0, "one_hot": 0.0, "std_sum": 0.0}
    p = probs.detach().float() if probs is not None else torch.softmax(z.masked_fill(masked, -math.inf), -1)
    one_hot = int(((p.amax(-1) > _ONE_HOT) & live).sum())
    zz = z.masked_fill(masked, 0.0)
    n = keys.clamp(min=1).float()
    mean = zz.sum(-1) / n
    var = ((zz - mean.unsqueeze(-1)).masked_fill(masked, 0.0).pow(2).sum(-1) / n).clamp(min=0)
    std_sum = float(var.sqrt()[live].double().sum())
    return {"rows": float(rows), "one_hot": float(one_hot), "std_sum": std_sum, "keys": float(z.shape[-1])}


def _sdpa_logits(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The masked logits ``q k^T * scale`` of a ``scaled_dot_product_attention`` call (-inf where masked)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, args, strict=False)) | kwargs
    q, k = a.get("query"), a.get("key")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() < 2 or q.is_nested:
        return None
    q, k = q.detach().float(), k.detach().float()
    if q.dim() >= 3 and k.dim() == q.dim() and k.shape[-3] != q.shape[-3] and q.shape[-3] % k.shape[-3] == 0:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)  # grouped-query attention
    scale = a.get("scale")
    z = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    mask = a.get("attn_mask")
    if isinstance(mask, torch.Tensor):
        z = z.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else z + mask.detach().float()
    if a.get("is_causal"):
        keep = torch.ones(z.shape[-2], z.shape[-1], dtype=torch.bool, device=z.device).tril()
        z = z.masked_fill(~keep, -math.inf)
    return z


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
             "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")


def _mha_logits(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The masked logits (batch, heads, queries, keys) of an ``F.multi_head_attention_forward`` call
    (``nn.MultiheadAttention``), from its query/key inputs and projections; None for the rare forms it does
    not rebuild (an extra bias key, a zero key, static keys)."""
    a = dict(zip(_MHA_ARGS, args, strict=False)) | kwargs
    q, k, h = a.get("query"), a.get("key"), a.get("num_heads")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or not isinstance(h, int) or q.dim() != 3:
        return None
    if a.get("bias_k") is not None or a.get("add_zero_attn") or a.get("static_k") is not None:
        return None
    e = q.shape[-1]
    if a.get("use_separate_proj_weight"):
        wq, wk = a.get("q_proj_weight"), a.get("k_proj_weight")
    else:
        w = a.get("in_proj_weight")
        wq, wk = (w[:e], w[e:2 * e]) if isinstance(w, torch.Tensor) else (None, None)
    if not isinstance(wq, torch.Tensor) or not isinstance(wk, torch.Tensor):
        return None
    b = a.get("in_proj_bias")
    bq, bk = (b[:e], b[e:2 * e]) if isinstance(b, torch.Tensor) else (None, None)
    qp = F.linear(q.detach().float(), wq.detach().float(), None if bq is None else bq.detach().float())
    kp = F.linear(k.detach().float(), wk.detach().float(), None if bk is None else bk.detach().float())
    L, n, _ = qp.shape  # (sequence, batch, embedding): the layout F.multi_head_attention_forward takes
    S = kp.shape[0]
    qh = qp.reshape(L, n, h, e // h).permute(1, 2, 0, 3)
    kh = kp.reshape(S, n, h, e // h).permute(1, 2, 0, 3)
    z = qh @ kh.transpose(-2, -1) / math.sqrt(e // h)
    pad = a.get("key_padding_mask")
    if isinstance(pad, torch.Tensor):
        pad = pad.bool() if pad.dtype == torch.bool else pad.detach().float() < -1e30
        z = z.masked_fill(pad[:, None, None, :], -math.inf)
    mask = a.get("attn_mask")
    if isinstance(mask, torch.Tensor):
        mask = mask.reshape(n, h, L, S) if mask.dim() == 3 else mask
        z = z.masked_fill(mask, -math.inf) if mask.dtype == torch.bool else z + mask.detach().float()
    elif a.get("is_causal"):
        z = z.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=z.device).tril(), -math.inf)
    return z


class _Watch(TorchFunctionMode):
    """Records attention softmaxes under the innermost running module (``stack[-1]``)."""

    def __init__(self, stack: list[str], found: dict[str, dict[str, float]]) -> None:
        super().__init__()
        self.stack = stack
        self.found = found

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            facts = None
            if func is F.scaled_dot_product_attention or func is F.multi_head_attention_forward:
                z = (_sdpa_logits if func is F.scaled_dot_product_attention else _mha_logits)(tuple(args), kwargs)
                facts = _row_facts(z) if z is not None else None
            elif func in _SOFTMAX and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                x = args[0]
                dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                if x.dim() >= 3 and x.is_floating_point() and isinstance(dim, int) and dim in (-1, x.dim() - 1):
                    facts = _row_facts(x, out)
            if facts is not None and self.stack:
                acc = self.found.setdefault(self.stack[-1], {"rows": 0.0, "one_hot": 0.0, "std_sum": 0.0})
                for key in ("rows", "one_hot", "std_sum"):
                    acc[key] += facts[key]
                acc["keys"] = max(acc.get("keys", 0.0), facts.get("keys", 0.0))
        except Exception:  # noqa: BLE001 - watching must never change or break the user's forward
            pass
        return out


@contextmanager
def watch_attention(model: nn.Module) -> Iterator[dict[str, dict[str, float]]]:
    """Inside the block, every attention softmax the model computes is recorded (module name -> rows,
    one_hot, std_sum, keys); the hooks come off and the mode ends on exit."""
    found: dict[str, dict[str, float]] = {}
    stack: list[str] = []
    handles = []

    def pre(name: str) -> Any:
        return lambda m, a: stack.append(name)

    def post(m: nn.Module, a: Any, o: Any) -> None:
        if stack:
            stack.pop()

    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name or type(model).__name__)))
        handles.append(m.register_forward_hook(post, always_call=True))
    try:
        with _Watch(stack, found):
            yield found
    finally:
        for h in handles:
            h.remove()


def _qk_layers(trace: Trace, module: str) -> list[str]:
    """The weight layers inside ``module`` that make its queries and keys (by name), else all of them."""
    inside = [x.name for x in trace if x.name.startswith(module + ".") and x.meta.get("mixing", x.weight_layer)]
    qk = [n for n in inside if _QK.search(n.rsplit(".", 1)[-1].split("#")[0].lower())]
    own = [module] if module in trace.names and trace[module].meta.get("mixing", trace[module].weight_layer) else []
    return qk or own or inside  # own: nn.MultiheadAttention holds its in_proj_weight itself


def rule_attention_saturation(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """saturation (attention): the share of an attention's query rows whose softmax puts more than 99% of
    its weight on one key (rows with two or more unmasked keys), from ``trace.meta["attention"]``; a warning
    from ``attn_sat_warning`` (25%), an error from ``attn_sat_error`` (75%: attention is a hard argmax)."""
    att = trace.meta.get("attention")
    if not isinstance(att, dict):
        return []
    th = ctx.thresholds
    hits = []
    for module, f in att.items():
        rows = float(f.get("rows", 0))
        if rows <= 0:
            continue
        frac = float(f.get("one_hot", 0)) / rows
        if frac >= th["attn_sat_info"]:
            hits.append((frac, module, f))
    if not hits:
        return []
    frac, module, f = max(hits, key=lambda h: h[0])
    std = float(f["std_sum"]) / float(f["rows"])
    severity = "error" if frac >= th["attn_sat_error"] else "warning" if frac >= th["attn_sat_warning"] else "info"
    qk = _qk_layers(trace, module)
    msg = (
        f"{module}: {frac:.1%} of its {int(f['rows'])} attention rows put more than 99% of their weight on one "
        f"key (the attention logits have std {g(std)} over {int(f.get('keys', 0))} keys; a sound init keeps them "
        "about 1 or below). The softmax's backward p_i (delta_ij - p_j) is almost 0 on a "
        "one-hot row, so "
        + (f"{', '.join(qk)} get" if qk else "the query and key projections get")
        + " almost no gradient, while LayerNorm keeps every output std in range."
    )
    if len(hits) > 1:
        msg += f" {len(hits)} attention modules saturate."
    data: dict[str, Any] = {"sat_frac": frac, "logit_std": std, "attention": True,
                            "layers": {m: float(x["one_hot"]) / float(x["rows"]) for _, m, x in hits},
                            "qk_layers": qk}
    if qk and qk[0] in trace.names:
        text, fix_data = planned_fix(ctx, trace[qk[0]], "linear")
        data.update(fix_data)
        fix = (f"shrink the query and key weights to the scale their fan calls for: {text} (and the same for "
               f"{', '.join(qk[1:]) or 'the other projections'}); the logits' std then falls to about 1")
    else:
        fix = ("draw the query and key projections at std 1/sqrt(fan_in) (sp.fix.auto_init_(model)); the "
               "logits' std then falls to about 1")
    return [Finding("saturation", severity, module, msg, fix, data)]
