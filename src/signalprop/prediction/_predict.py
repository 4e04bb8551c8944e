"""Data-free prediction of every layer's forward and gradient statistics, from the weights and the theory.

``sp.predict(model, input_shape)`` captures the model's graph (:func:`signalprop.graph.capture`) and walks
it once forward and once backward with mean-field moments instead of tensors (Poole et al. 2016;
Schoenholz et al. 2017). The input is i.i.d. with mean 0 and variance ``input_var``. For each element it
tracks the mean and the variance over weight draws:

* weight layers (Linear, ConvNd, ConvTransposeNd, transformers' Conv1D): ``Var[y] = fan_in * mean(w^2) *
  E[x^2]``, mean = bias, from the layer's actual weights (He et al. 2015, Eq. 7: the *second moment*
  E[x^2] of the input, which for a ReLU output is ``Var[y_prev] / 2``). On a chain of ReLU layers without
  bias this is He's product ``Var[y_L] = Var[y_1] prod_{l=2..L} (n_l mean(w_l^2) / 2)``, exactly.
  Convolutions are predicted for interior positions (zero padding lowers the border outputs' variance);
* activations (any: name, callable, module or functional op): E[phi], E[phi^2], E[phi'^2] by quadrature
  over each element's Gaussian pre-activation N(bias, var);
* channels share a random offset: besides each element's mean and variance, the covariance ``s`` of two
  distinct elements of one channel, ``fan_in * mean(w^2) * (s_in + m_in^2)`` after a weight layer (1/pi of
  the variance after a ReLU). Per-element E[x^2] and He's formula are unchanged; pooling keeps ``s``
  (average: ``(v - s)/k + s``; max: the maximum of k equicorrelated Gaussians), training-mode BatchNorm
  normalizes by the within-channel ``v - s`` and removes it (derivation in ``_predict_rules``);
* flatten and views move the moments; dropout: identity in eval, E[x^2] / (1 - p) in training; BatchNorm:
  running statistics in eval; LayerNorm, GroupNorm, RMSNorm; residual additions add the branches' means,
  variances and shared parts (a branch ending in zero-mean weights is uncorrelated with its skip);
  products of independent values multiply second moments.
* gradients: the cotangent at the output is N(0, 1) per element (as ``sp.measure`` draws it) and goes
  back with ``fan_out * mean(w^2)`` through weight layers and ``E[phi'^2]`` through activations (chi1 of
  Poole et al. 2016), the adjoint of each pooling and view.

**Finite width.** The mean-field value is the expectation over weight draws. One network of width n
multiplies its variance at each layer by a random factor of relative variance beta / n with
``beta = E[x^4] / E[x^2]^2 - 1`` of the layer's input units (5 after ReLU, 2 for a Gaussian; Hanin 2018,
Hanin & Nica 2019), so one network's log-variance at a layer has standard deviation
``s = sqrt(sum_l beta_l / n_l)`` over the weight layers up to it whose input is itself random (not the
first). ``Stats.var_band = (var e^{-1.645 s}, var e^{1.645 s})`` holds one network 90% of the time;
normalization (BatchNorm in training, LayerNorm) removes the accumulated fluctuation. n is the layer's
input features (Linear) or input channels (convolutions). One network also misses the spread of its G
channel offsets: the band is centred on ``var - mean(s) / G`` (``meta["expected_var"]``) and widened by
``2 (s / var)^2 / G`` in log-variance; ``fwd.var`` stays the mean-field value.

Module types with no rule are passed through unchanged when they keep the shape (one
:class:`PredictWarning` names them all) and raise :class:`~signalprop.SignalpropError` when they change
it; add a rule with :func:`register_rule`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from .._state import preserving
from ..graph._analysis import ACTIVATION_OPS, activation_module, fn_activation
from ..graph._graph import capture
from ..graph._ir import Node, Ref
from ..graph._types import Graph
from ..init.fans import has_fan_rule
from ..layers import is_norm
from ..trace import LayerStats, Stats, Trace
from . import _pool as P
from . import _rules as R

Z90 = 1.6448536269514722  # the standard normal's 95% quantile: a two-sided 90% band
Rule = Callable[[nn.Module, "R.Moments", Node], "tuple[R.Moments, R.Back]"]

MODULE_RULES: dict[str, Rule] = {}
"""Module class name -> rule(module, input moments, node) -> (output moments, backward). One line to add."""

IDENTITY_OPS = frozenset({"to", "type", "float", "half", "double", "bfloat16", "detach", "alias", "clone",
                          "contiguous", "identity", "lift_fresh_copy"})
SHAPE_OPS = frozenset({"view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "unsqueeze",
                       "squeeze", "expand", "getitem", "narrow", "slice", "select", "cat", "concat", "pad",
                       "constant_pad_nd", "repeat", "stack", "movedim", "split", "chunk"})
SHAPE_MODULES = frozenset({"Flatten", "Unflatten", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d"})


class PredictWarning(UserWarning):
    """Some module or op has no prediction rule and was passed through unchanged."""


def register_rule(kind: str, rule: Rule) -> None:
    """Add a prediction rule for modules of class name ``kind`` (see :data:`MODULE_RULES`)."""
    if not isinstance(kind, str) or not callable(rule):
        raise SignalpropError("register_rule needs a module class name (str) and a callable "
                              "rule(module, moments, node) -> (moments, backward)")
    MODULE_RULES[kind] = rule


@preserving  # the capture and the weight reads leave the model as found (spectral norm's u, v included)
def predict(
    model: nn.Module,
    input_shape: Sequence[int] | torch.Size,
    *,
    input_var: float = 1.0,
    graph: Graph | None = None,
) -> Trace:
    """Predict per-layer forward and gradient statistics of ``model`` without data (see module docstring).

    ``input_shape`` is the shape of one sample without the batch dimension (``(3, 224, 224)``, ``(784,)``),
    a tuple, list or ``torch.Size``; ``input_var`` the variance of its i.i.d. zero-mean elements. A graph
    captured before (:func:`signalprop.graph.capture` with the same shape) can be passed to skip capture.
    Returns a :class:`~signalprop.Trace` with ``source="predicted"`` and one entry per module call, named
    as ``sp.measure`` names them; ``fwd.var_band`` is the 90% finite-width band of one network.

    >>> import signalprop as sp
    >>> t = sp.predict(sp.models.mlp(3, 64, bias=False), (64,))
    >>> t["4"].fwd.var > 0
    True
    """
    if not isinstance(model, nn.Module):
        raise SignalpropError(f"predict needs an nn.Module, got {type(model).__name__}")
    if not (isinstance(input_var, int | float) and math.isfinite(input_var) and input_var > 0):
        raise SignalpropError(f"input_var must be a positive finite number, got {input_var!r}")
    g = graph if graph is not None else capture(model, input_shape=input_shape)
    with torch.no_grad():
        return _Predictor(model, g, float(input_var)).run(input_shape)


class _Predictor:
    def __init__(self, model: nn.Module, graph: Graph, input_var: float) -> None:
        self.model = model
        self.graph = graph
        self.input_var = input_var
        self.modules = dict(model.named_modules())
        self.unknown: dict[str, int] = {}

    def run(self, input_shape: Any) -> Trace:
        nodes = self.graph.nodes
        vals: dict[int, R.Moments] = {}
        backs: dict[int, R.Back] = {}
        data_in: dict[int, list[int]] = {}
        wanted = {j for n in nodes if n.op == "fn" for j in n.inputs}
        for n in nodes:
            if n.op == "alias" or (n.op == "const" and n.index not in wanted):
                continue
            out, back, used = self._forward(n, vals)
            vals[n.index] = out
            if back is not None:
                backs[n.index] = back
                data_in[n.index] = used
        g2: dict[int, torch.Tensor] = {}
        for o in self.graph.outputs[:1]:
            g2[o] = torch.ones((1,) * len(vals[o].shape or ()), dtype=torch.float64)
        for n in reversed(nodes):
            if n.index not in g2 or n.index not in backs:
                continue
            for j, gin in zip(data_in[n.index], backs[n.index](g2[n.index])):
                if gin is None or nodes[j].op in ("const", "input"):
                    continue
                if n.op == "fn" and n.name in ("add", "sub", "rsub", "mul", "div"):
                    gin = _sum_to(gin, vals[n.index].shape or (), vals[j].shape or ())
                g2[j] = g2[j] + gin if j in g2 else gin
        if self.unknown:
            warnings.warn(
                "predict has no rule for " + ", ".join(f"{k} (x{v})" for k, v in self.unknown.items())
                + " and passed their inputs through unchanged; add one with "
                "signalprop.predict.register_rule(kind, rule)",
                PredictWarning, stacklevel=3,
            )
        return self._trace(vals, g2, input_shape)

    # ---- forward -----------------------------------------------------------------------------------------
    def _forward(self, n: Node, vals: dict[int, R.Moments]) -> tuple[R.Moments, R.Back | None, list[int]]:
        shape = n.shape or ()
        if n.op == "input":
            if n.dtype is not None and not n.dtype.startswith(("float", "bfloat", "complex")):
                z = torch.zeros((1,) * len(shape), dtype=torch.float64)
                return R.Moments(z, z.clone(), shape=shape), None, []
            var = torch.full((1,) * len(shape), self.input_var, dtype=torch.float64)
            return R.Moments(torch.zeros_like(var), var, shape=shape), None, []
        if n.op == "const":
            if n.value is not None and n.value.is_floating_point():
                return R.const(n.value), None, []
            z = torch.zeros(shape, dtype=torch.float64) if n.value is None else n.value.to(torch.float64)
            return R.const(z), None, []
        if n.op == "call":
            return self._call(n, vals)
        return self._fn(n, vals)

    def _call(self, n: Node, vals: dict[int, R.Moments]) -> tuple[R.Moments, R.Back | None, list[int]]:
        m = self.modules[n.module or ""]
        shape = n.shape or ()
        data = [i for i in n.inputs if self.graph.nodes[i].op != "const"]
        if not data:
            data = list(n.inputs[:1])
        x = vals[data[0]] if data else R.const(torch.zeros(shape))
        kind = type(m).__name__
        if kind in MODULE_RULES:
            out, back = MODULE_RULES[kind](m, x, n)
        elif isinstance(m, nn.Embedding):
            out, back = R.embedding(m, shape)
        elif has_fan_rule(m) and not isinstance(m, nn.MultiheadAttention):
            out, back = R.weight_layer(m, x, shape)
        elif activation_module(m):
            out, back = R.activation(m, x)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out, back = R.batch_norm(m, x)
        elif isinstance(m, nn.GroupNorm):
            out, back = R.group_norm(m, x)
        elif isinstance(m, nn.LayerNorm) or (is_norm(m) and "RMS" not in kind and "Layer" in kind):
            out, back = R.layer_norm(m, x)
        elif "RMSNorm" in kind:
            out, back = R.layer_norm(m, x, rms=True)
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            out, back = R.dropout(x, float(m.p), m.training)
        elif "Pool" in kind:
            out, back = _pool(n, m, x)
        elif kind in SHAPE_MODULES:
            key = data[0]
            out, back = P.view_moments(lambda vals: m(vals[key]), {key: x})
        elif kind == "Identity":
            out, back = x, _identity_back
        else:
            out, back = self._unknown(kind, n, x)
        return out, back, data[:1]

    def _unknown(self, kind: str, n: Node, x: R.Moments) -> tuple[R.Moments, R.Back]:
        if n.shape is not None and tuple(x.shape or ()) != tuple(n.shape):
            raise SignalpropError(
                f"predict has no rule for {kind} ({n.name}), which changes the shape from "
                f"{x.shape} to {n.shape}; add one with signalprop.predict.register_rule("
                f"{kind!r}, rule), where rule(module, moments, node) returns (moments, backward)"
            )
        self.unknown[kind] = self.unknown.get(kind, 0) + 1
        return x, _identity_back

    def _fn(self, n: Node, vals: dict[int, R.Moments]) -> tuple[R.Moments, R.Back | None, list[int]]:
        ins = {i: vals[i] for i in n.inputs}
        data = list(ins)
        name = n.name
        if not data:  # a tensor built from nothing (arange, ones): its value is known
            value = P.replay(n, {})
            return R.const(value if isinstance(value, torch.Tensor) else torch.tensor(float(value))), None, []
        x = ins[data[0]]
        if name in ACTIVATION_OPS:
            out, back = R.activation(fn_activation(n, self.graph.nodes), x)
            return out, back, data[:1]
        if name in IDENTITY_OPS:
            return x, _identity_back, data[:1]
        if name in SHAPE_OPS:
            out, back = P.shape_op(n, ins)
            return out, back, data
        if name == "dropout":
            p = _arg(n, 1, "p", 0.5)
            train = _arg(n, 2, "train", _arg(n, 2, "training", True))
            out, back = R.dropout(x, float(p), bool(train))
            return out, back, data[:1]
        if name in ("add", "sub", "rsub"):
            return _add(n, ins, vals)
        if name in ("mul", "div", "neg"):
            return _mul(n, ins)
        if name == "mean":
            out, back = P.mean_reduce(n, x)
            return out, back, data[:1]
        if "pool" in name:
            out, back = _pool(n, None, x)
            return out, back, data[:1]
        out, back = self._unknown(name, n, x)
        return out, back, data[:1]

    # ---- trace -----------------------------------------------------------------------------------------
    def _trace(self, vals: dict[int, R.Moments], g2: dict[int, torch.Tensor], input_shape: Any) -> Trace:
        nodes = self.graph.nodes
        layers = []
        for c in self.graph.calls:
            i = c.node
            while nodes[i].op == "alias" and nodes[i].inputs:
                i = nodes[i].inputs[0]
            x = vals.get(i)
            meta: dict[str, Any] = {"log_var_std": None}
            if x is None:
                fwd = Stats()
                bwd = None
            else:
                fwd, meta = _stats(x)
                gg = g2.get(i)
                bwd = Stats.from_moments(0.0, float(gg.mean()) if gg is not None else 0.0, numel=fwd.numel)
            layers.append(LayerStats(c.name, c.kind, fwd, bwd, tuple(c.shape or ()),
                                     str(nodes[c.node].dtype or "float32"), c.weight_layer, meta))
        meta_t = {"input_shape": list(input_shape), "input_var": self.input_var, "graph": self.graph.method,
                  "capture_failures": dict(self.graph.failures), "batch": 2}
        return Trace(layers, source="predicted", meta=meta_t)


def _stats(x: R.Moments) -> tuple[Stats, dict[str, Any]]:
    """Stats of one predicted value: the mean-field mean and variance, the band of one finite network.

    ``var`` is the per-element variance ``mean(q) - mean^2`` (He's formula). One network measures the
    population variance over its whole tensor, from which the spread of its G channel offsets is missing:
    ``E[measured var] = var - mean(s) / G`` (``meta["expected_var"]``, the band's centre), and those G
    offsets add a relative variance ``2 (s / var)^2 / G`` (a chi-square with G degrees of freedom) to the
    Hanin-Nica log-variance. ``chan_sq_mean`` and ``chan_var`` follow ``sp.measure``'s channels (dim 1):
    a channel's mean carries its offset, ``chan_sq_mean = mean_c(m_c^2 + s_c / G_c)``,
    ``chan_var = mean(q) - chan_sq_mean`` (Brock et al. 2021).
    """
    shape = tuple(x.shape or ())
    nd = len(shape)
    numel = math.prod(shape)
    mean = float(x.mean.mean())
    q = float(x.q.mean())
    var = max(q - mean * mean, 0.0)
    s_bar = float(x.shared.mean())
    chan = None if x.chan is None or nd == 0 else x.chan % nd
    groups = float(shape[chan]) if chan is not None else float(math.prod(shape[1:]) or 1)
    expected = max(var - s_bar / groups, 0.0)
    lv = max(x.lv, 0.0) + (2.0 * (s_bar / var) ** 2 / groups if var > 0 else 0.0)
    sd = math.sqrt(lv)
    band = (expected * math.exp(-Z90 * sd), expected * math.exp(Z90 * sd))
    extra: dict[str, float] = {}
    if nd >= 2:
        dims = [d for d in range(nd) if d != 1]
        m_c = R._mean_over(x.mean, nd, dims)
        s_c = R._mean_over(x.shared, nd, dims)
        g_c = 1.0 if chan == 1 else (float(shape[chan]) if chan is not None else float(math.prod(shape[2:]) or 1))
        extra["chan_sq_mean"] = float((m_c * m_c + s_c / g_c).mean())
        extra["chan_var"] = max(q - extra["chan_sq_mean"], 0.0)
    fwd = Stats.from_moments(mean, var, var_band=band, numel=numel, **extra)
    return fwd, {"log_var_std": sd, "expected_var": expected, "shared_var": s_bar}


def _pool(n: Node, m: nn.Module | None, x: R.Moments) -> tuple[R.Moments, R.Back]:
    pk, k, pool, avg, dims = P.pool_fns(n, m, x)
    same = P.coherent(x, dims)
    if pk == "max":
        return P.max_pool(x, int(round(k)), pool, avg, same)
    return P.avg_pool(x, k, pool, same)


def _identity_back(g2: torch.Tensor) -> list[torch.Tensor | None]:
    return [g2]


def _arg(n: Node, i: int, key: str, default: Any) -> Any:
    v = n.args[i] if len(n.args) > i else n.kwargs.get(key, default)
    return default if isinstance(v, Ref) or v is None else v


def _sum_to(g: torch.Tensor, out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> torch.Tensor:
    """A gradient moment at an input that was broadcast into a larger output: summed over the copies."""
    if tuple(out_shape) == tuple(in_shape) or not out_shape:
        return g if g.dim() == len(in_shape) else g.reshape((1,) * len(in_shape)) if g.numel() == 1 else g
    return g.expand(out_shape).sum_to_size(in_shape)


def _operand(n: Node, pos: int, ins: dict[int, R.Moments], key: str = "other") -> tuple[R.Moments, int | None]:
    v = n.args[pos] if len(n.args) > pos else n.kwargs.get(key, 0.0)
    if isinstance(v, Ref):
        return ins[v.index], v.index
    return R.const(float(v) if not isinstance(v, torch.Tensor) else v), None


def _add(n: Node, ins: dict[int, R.Moments], vals: dict[int, R.Moments]) -> tuple[R.Moments, R.Back, list[int]]:
    """Sum (or difference) of independent values: means add (subtract), variances and shared parts add."""
    a, ia = _operand(n, 0, ins, "input")
    b, ib = _operand(n, 1, ins, "other")
    alpha = float(_arg(n, 2, "alpha", 1.0))
    sign = -1.0 if n.name == "sub" else 1.0
    if n.name == "rsub":
        a, b, ia, ib, sign = b, a, ib, ia, -1.0
    s = sign * alpha
    mean = a.mean + s * b.mean
    var = a.var + s * s * b.var
    shared = a.shared + s * s * b.shared if (a.s is not None or b.s is not None) else None
    va, vb = float(a.var.mean()), float(b.var.mean())
    lv = (va * va * a.lv + (s * s * vb) ** 2 * b.lv) / ((va + s * s * vb) ** 2) if va + vb > 0 else 0.0
    chan = a.chan if a.chan is not None else b.chan
    out = R.Moments(mean, var, None, None, lv, a.rnd or b.rnd, _bshape(a, b), R.clamp_shared(shared, var), chan)
    used = [i for i in (ia, ib) if i is not None]

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        res: list[torch.Tensor | None] = []
        for i in (ia, ib):
            if i is not None:
                res.append(g2 if i == ia else g2 * s * s)
        return res

    return out, back, used


def _bshape(a: R.Moments, b: R.Moments) -> tuple[int, ...]:
    return tuple(torch.broadcast_shapes(a.shape or (), b.shape or ()))


def _mul(n: Node, ins: dict[int, R.Moments]) -> tuple[R.Moments, R.Back, list[int]]:
    """Product of independent values: E[ab] = E[a]E[b], E[(ab)^2] = E[a^2]E[b^2]; division by a constant."""
    a, ia = _operand(n, 0, ins, "input")
    if n.name == "neg":
        b, ib = R.const(-1.0), None
    else:
        b, ib = _operand(n, 1, ins, "other")
        if n.name == "div":
            b = R.const(1.0 / b.mean)
            ib = None
    mean = a.mean * b.mean
    var = (a.q * b.q - mean * mean).clamp_min(0)
    shared = None
    if a.s is not None or b.s is not None:  # E[(ab)_1 (ab)_2] = E[a_1 a_2] E[b_1 b_2] for independent a, b
        shared = a.cross * b.cross - mean * mean
    chan = a.chan if a.chan is not None else b.chan
    out = R.Moments(mean, var, None, None, max(a.lv, b.lv), a.rnd or b.rnd, _bshape(a, b),
                    R.clamp_shared(shared, var), chan)
    used = [i for i in (ia, ib) if i is not None]

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        res: list[torch.Tensor | None] = []
        if ia is not None:
            res.append(g2 * b.q)
        if ib is not None:
            res.append(g2 * a.q)
        return res

    return out, back, used
