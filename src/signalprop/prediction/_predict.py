"""Data-free prediction of every layer's forward and gradient statistics, from the weights and the theory.

``sp.predict(model, input_shape)`` (or ``inputs=``) captures the model's graph
(:func:`signalprop.graph.capture`) and walks it once forward and once backward with mean-field moments
instead of tensors (Poole et al. 2016; Schoenholz et al. 2017). Floating inputs are i.i.d. with mean 0 and
variance ``input_var``; integer inputs (token ids, attention masks) are taken as given. For each element
it tracks the mean and the variance over weight draws:

* weight layers (Linear, ConvNd, ConvTransposeNd, transformers' Conv1D, and ``F.linear`` / ``F.conv1d`` /
  ``matmul`` on a known weight, such as a ``weight_norm`` parametrization or a custom layer's own
  parameter): ``Var[y] = fan_in * mean(w^2) * E[x^2]``, mean = bias, from the layer's actual weights
  (He et al. 2015, Eq. 7: the *second moment* E[x^2] of the input, which for a ReLU output is
  ``Var[y_prev] / 2``). On a chain of ReLU layers without bias this is He's product
  ``Var[y_L] = Var[y_1] prod_{l=2..L} (n_l mean(w_l^2) / 2)``, exactly. Convolutions are predicted for
  interior positions (zero padding lowers the border outputs' variance);
* embeddings: token ids are data, so the output's per-feature mean and variance are the table's over
  the vocabulary (uniformly random tokens); known ids (positions) select their exact rows;
* activations (any: name, callable, module or functional op), and ``exp``, ``sin``, ``cos`` of data:
  E[phi], E[phi^2], E[phi'^2] by quadrature over each element's Gaussian pre-activation N(bias, var);
* channels share a random offset: besides each element's mean and variance, the covariance ``s`` of two
  distinct elements of one channel, ``fan_in * mean(w^2) * (s_in + m_in^2)`` after a weight layer (1/pi of
  the variance after a ReLU). Per-element E[x^2] and He's formula are unchanged; pooling keeps ``s``
  (average: ``(v - s)/k + s``; max: the maximum of k equicorrelated Gaussians), training-mode BatchNorm
  normalizes by the within-channel ``v - s`` and removes it (derivation in ``_rules``);
* flatten, views, indexing and gathering with known indices, masking (``where``, ``masked_fill``) and
  nearest upsampling move the moments; bilinear (linear, bicubic, trilinear) upsampling averages
  neighbours with the interpolation weights a_k: ``Var = sum a_k^2 (v - s) + s`` per output position;
  dropout: identity in eval, E[x^2] / (1 - p) in training; BatchNorm: running statistics in eval;
  LayerNorm, GroupNorm, RMSNorm; residual additions add the branches' means, variances and shared parts;
  products of independent values multiply second moments; the product of two activations (``matmul``)
  sums the products of their second moments over the contracted size;
* attention (``scaled_dot_product_attention``, or ``matmul`` + ``softmax`` + ``matmul``): the scores'
  spread within a row gives ``W = E[sum_j P_j^2]`` exactly for i.i.d. Gaussian scores, and the output's
  variance is ``W (v - s) + s`` of the values (uniform attention: W = 1/n); see ``_attention``;
* modules with no rule of their own are predicted from the ops inside them (their captured body);
* gradients: the cotangent at the output is N(0, 1) per element (as ``sp.measure`` draws it) and goes
  back with ``fan_out * mean(w^2)`` through weight layers and ``E[phi'^2]`` through activations (chi1 of
  Poole et al. 2016), the adjoint of each pooling and view.

**Bands.** The mean-field value is the expectation over weight draws and inputs; ``Stats.var_band`` is
the 90% range of what one network measures on one batch (``_band``): the finite-width fluctuation that
compounds over layers (Hanin & Nica 2019), the spread of the G channel offsets, the first layer's own
finite fan-in and the sampling noise of a variance taken over ``batch`` samples.

Module types and ops with no rule are passed through unchanged when they keep the shape (one
:class:`PredictWarning` names them all) and raise :class:`~signalprop.SignalpropError` when they change
it; add a rule with :func:`register_rule`.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from .._hooks import internal_run
from .._state import preserving, untracked
from ..graph._analysis import ACTIVATION_OPS, activation_module, fn_activation
from ..graph._graph import capture, example_inputs
from ..graph._ir import Node, Ref
from ..graph._types import Graph
from ..init.fans import has_fan_rule
from ..layers import is_norm
from ..trace import LayerStats, Stats, Trace
from . import _attention as A
from . import _band as B
from . import _inputs as I
from . import _ops as O
from . import _pool as P
from . import _rules as R
from ._registry import (
    ELEMENTWISE,
    IDENTITY_OPS,
    MODULE_RULES,
    MULTI_OPS,
    NO_OPS,
    SHAPE_ATTRS,
    SHAPE_MODULES,
    SHAPE_OPS,
    VALUE_FREE_OPS,
    PredictWarning,
)

Step = tuple["R.Moments", "R.Back | None", list[int]]




@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Python's cycle collector paused for a prediction: the walk allocates a few objects per node, and the
    collections those allocations triggered scanned every live object (the model's modules, the graph):
    a quarter of a 1,000-layer prediction, at random calls. What the walk leaves is collected afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@_no_cycle_collection()
@preserving  # the capture and the weight reads leave the model as found (spectral norm's u, v included)
def predict(
    model: nn.Module,
    input_shape: Sequence[int] | torch.Size | None = None,
    *,
    inputs: Any = None,
    input_var: float | Sequence[float] | None = None,
    graph: Graph | None = None,
    batch: int | None = None,
) -> Trace:
    """Predict per-layer forward and gradient statistics of ``model`` without data (see module docstring).

    Give either ``input_shape``, the shape of one sample without the batch dimension (``(3, 224, 224)``,
    ``(784,)``), or ``inputs``: example inputs as ``sp.measure`` takes them (a tensor, a tuple of positional
    inputs, a dict of keyword inputs), which is how models with token ids (``{"input_ids": ids}``) or
    several inputs are predicted: integer inputs are used as given, floating ones only for their shape.
    ``input_var`` is the variance of the i.i.d. zero-mean floating inputs: one number for all, one per
    floating input in order, or None for each example input's mean square (1.0 with ``input_shape``).
    ``batch``: the batch one measurement averages over, for the finite-batch part of the band (default:
    the first dimension of ``inputs``; with ``input_shape``, None: the band of an infinite batch). A graph
    captured before from the same inputs can be passed to skip capture.

    Args:
        model: The model; its weights are read, never changed.
        input_shape: The shape of one sample without the batch dimension, or None when ``inputs`` is given.
        inputs: Example inputs as ``sp.measure`` takes them (tensor, tuple, dict).
        input_var: The floating inputs' variance: one number, one per floating input, or None.
        graph: A graph captured before from the same inputs (:func:`signalprop.graph.capture`).
        batch: The batch one measurement averages over, for the band (None: an infinite batch).

    Returns:
        A :class:`~signalprop.Trace` with ``source="predicted"`` and one entry per module call, named as
        ``sp.measure`` names them; ``fwd.var_band`` is the 90% band of one network on one batch.

    Raises:
        SignalpropError: Not a module, neither or both of ``input_shape`` and ``inputs``, or inputs that do
            not fit the model.

    Examples:
        He's formula on a bias-free ReLU MLP with orthogonal weights of gain sqrt(2) (so n Var[w] = 2
        exactly, whatever the draw): every weight layer's output keeps E[y^2] = 1/2 n Var[w] x 2 = 2:

        >>> import signalprop as sp
        >>> net = sp.init.orthogonal_(sp.models.mlp(3, 64, bias=False), gain=2 ** 0.5)
        >>> t = sp.predict(net, (64,))
        >>> [round(t[name].fwd.rms ** 2, 6) for name in ("0", "2", "4", "6")]
        [2.0, 2.0, 2.0, 2.0]
    """
    if not isinstance(model, nn.Module):
        raise SignalpropError(f"predict needs an nn.Module, got {type(model).__name__}")
    if (input_shape is None) == (inputs is None):
        raise SignalpropError("predict needs either input_shape (one sample's shape, without the batch "
                              "dimension, e.g. (3, 224, 224)) or inputs (example inputs: a tensor, a tuple or "
                              "a dict such as {'input_ids': ids}), not both")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise SignalpropError(f"batch must be a positive int or None, got {batch!r}")
    cond = 0.0
    if inputs is not None:
        args, kwargs = example_inputs(model, inputs)
        flat = [t for t in I.tensors((args, kwargs)) if t.is_floating_point()]
        batch = batch if batch is not None else I.batch_of(args, kwargs)
        if input_var is None and flat and batch:
            cond = I.input_relvar(flat[0], batch)
    else:
        args, kwargs = example_inputs(model, input_shape=input_shape)
        flat = []
    variances = I.input_vars(input_var, flat, inputs is not None)
    g = graph if graph is not None else capture(model, I.capture_inputs(args, kwargs))
    shape = list(input_shape) if input_shape is not None else [list(t.shape[1:]) for t in I.tensors((args, kwargs))]
    with torch.no_grad(), internal_run():
        p = _Predictor(model, g, variances, batch)
        p.cond = cond
        return p.run(shape)


class _Predictor:
    def __init__(self, model: nn.Module, graph: Graph, input_var: list[float] | float, batch: int | None
                 ) -> None:
        self.model = model
        self.graph = graph
        self.input_var = input_var
        self.batch = batch
        self.modules = dict(model.named_modules())
        self.unknown: dict[str, int] = {}
        self.node_of: dict[int, Node] = {n.index: n for n in graph.nodes}
        self.vals: dict[int, R.Moments] = {}
        self.backs: dict[int, R.Back] = {}
        self.data_in: dict[int, list[int]] = {}
        self.n_float = 0
        self.cond = 0.0  # the input-second-moment part of the batch band already in the prediction
        self.context: list[str] = []  # the modules whose bodies are being walked (for messages)
        self.layers = self._read_layers()
        self.pure: set[int] = set()  # nodes whose rule and backward touch only predict's own tensors

    def _read_layers(self) -> dict[str, R.LayerNumbers]:
        """Every weight layer's fans, bias and mean(w^2), read before the walk: the weights' attributes
        under the model's tracker (a parametrization's code runs there), their mean squares in one batched
        computation with one transfer (:func:`_rules.mean_squares`)."""
        names: list[str] = []
        nums: list[R.LayerNumbers] = []
        weights: list[torch.Tensor] = []
        seen: set[str] = set()
        for n in self.graph.nodes:
            name = n.module or ""
            if n.op != "call" or name in seen:
                continue
            seen.add(name)
            m = self.modules.get(name)
            if m is None or type(m).__name__ in MODULE_RULES or not _fan_layer(m):
                continue
            num, w = R.layer_numbers(m)
            names.append(name)
            nums.append(num)
            weights.append(w)
        with untracked():
            w2s = R.mean_squares(weights)
            biases = iter(R.host_biases([u.bias for u in nums]))
        return {k: R.LayerNumbers(u.fan_in, u.fan_out, u.n_in, next(biases), u.conv, u.overlap, w2)
                for k, u, w2 in zip(names, nums, w2s)}

    def run(self, input_shape: Any) -> Trace:
        nodes = self.graph.nodes
        self._walk(nodes)
        g2: dict[int, torch.Tensor] = {}
        for o in self.graph.outputs[:1]:
            out = self.val(o)
            if not out.known:
                g2[o] = torch.ones((1,) * len(out.shape or ()), dtype=torch.float64)
        self._backward(nodes, g2)
        if self.unknown:
            warnings.warn(
                "predict has no rule for " + ", ".join(f"{k} (x{v})" for k, v in self.unknown.items())
                + " and passed their inputs through unchanged; add one with "
                "signalprop.prediction.register_rule(kind, rule)",
                PredictWarning, stacklevel=3,
            )
        return self._trace(g2, input_shape)

    # ---- walking ---------------------------------------------------------------------------------------
    def val(self, i: int) -> R.Moments:
        """The moments of node ``i``; constants are made when first read."""
        v = self.vals.get(i)
        if v is None:
            n = self.node_of[i]
            if n.op == "const":
                v = R.const(n.value if n.value is not None else torch.zeros(n.shape or ()))
            elif n.op == "alias" and n.inputs:
                v = self.val(n.inputs[0])
            else:
                v = R.const(None)
            self.vals[i] = v
        return v

    def _walk(self, nodes: Sequence[Node]) -> None:
        """Each node's moments in order; nodes that touch only predict's own tensors run untracked, the
        others (module attributes, replayed ops, registered rules) under the model's tracker."""
        with untracked() as tracked:
            for n in nodes:
                if n.op in ("alias", "const"):
                    continue
                if self._is_pure(n):
                    self.pure.add(n.index)
                    out, back, used = self._forward(n)
                else:
                    with tracked:
                        out, back, used = self._forward(n)
                self._keep(n, out, back, used)

    def _keep(self, n: Node, out: R.Moments, back: R.Back | None, used: list[int]) -> None:
        self.vals[n.index] = out
        if back is not None and not out.known:
            self.backs[n.index] = back
            self.data_in[n.index] = used

    def _backward(self, nodes: Sequence[Node], g2: dict[int, torch.Tensor]) -> None:
        """Push E[g^2] from each node to its data inputs, in reverse order, accumulating in ``g2``."""
        with untracked() as tracked:
            for n in reversed(nodes):
                if n.index not in g2 or n.index not in self.backs:
                    continue
                if n.index in self.pure:
                    gins = self.backs[n.index](g2[n.index])
                else:
                    with tracked:
                        gins = self.backs[n.index](g2[n.index])
                for j, gin in zip(self.data_in[n.index], gins):
                    if gin is None or j not in self.node_of or self.node_of[j].op in ("const", "input"):
                        continue
                    if self.val(j).known:
                        continue
                    if n.op == "fn" and n.name in O.BROADCAST_OPS:
                        gin = _sum_to(gin, self.val(n.index).shape or (), self.val(j).shape or ())
                    g2[j] = g2[j] + gin if j in g2 else gin

    def _is_pure(self, n: Node) -> bool:
        """True for a weight layer read before the walk (:meth:`_read_layers`) or an activation that runs no
        model code: its forward and backward are arithmetic on predict's own tensors, run untracked."""
        if n.op == "call":
            if n.body and self._body_known(n):
                return False
            name = n.module or ""
            m = self.modules.get(name)
            if m is None or type(m).__name__ in MODULE_RULES:
                return False
            return name in self.layers or (activation_module(m) and _stateless(m))
        # a functional activation on data (on known values only it is replayed, maybe in place)
        return n.op == "fn" and (n.name in ACTIVATION_OPS or n.name in ELEMENTWISE) and any(
            not self.val(i).known for i in n.inputs)

    def _forward(self, n: Node) -> Step:
        if n.op == "input":
            return self._input(n), None, []
        if n.op == "call":
            return self._call(n)
        return self._fn(n)

    def _input(self, n: Node) -> R.Moments:
        shape = n.shape or ()
        if n.shape is None and n.dtype is None:
            return R.const(n.value)
        if n.dtype is not None and not n.dtype.startswith(("float", "bfloat", "complex")):
            if n.value is None:
                raise SignalpropError(
                    f"predict needs the values of the integer input {n.name!r} (token ids, a mask): pass "
                    "them with predict(model, inputs={...}) instead of input_shape")
            return R.const(n.value, tokens=True)
        if isinstance(self.input_var, list):
            if self.n_float >= len(self.input_var):
                raise SignalpropError(f"input_var has {len(self.input_var)} values but the graph has more "
                                      "floating inputs; capture the graph from the same inputs")
            v = self.input_var[self.n_float]
        else:
            v = self.input_var
        self.n_float += 1
        var = torch.full((1,) * len(shape), v, dtype=torch.float64)
        return R.Moments(torch.zeros_like(var), var, shape=tuple(shape))

    # ---- module calls ------------------------------------------------------------------------------------
    def _call(self, n: Node) -> Step:
        m = self.modules[n.module or ""]
        shape = n.shape or ()
        data = [i for i in n.inputs if self.node_of[i].op != "const"]
        if not data:
            data = list(n.inputs[:1])
        kind = type(m).__name__
        rule = self._module_rule(m, kind, n, data)
        if n.body and (rule is None or self._body_known(n)):
            return self._body_call(n)
        if rule is None:
            known = _known_call(m, n, [self.val(i) for i in n.inputs])
            if known is not None:
                return known, None, []
            x = self.val(data[0]) if data else R.const(torch.zeros(shape))
            out, back = self._unknown(kind, n, x)
            return out, back, data[:1]
        x = self.val(data[0]) if data else R.const(torch.zeros(shape))
        out, back = rule(x)
        return out, back, data[:1]

    def _module_rule(self, m: nn.Module, kind: str, n: Node, data: list[int]
                     ) -> Callable[[R.Moments], tuple[R.Moments, R.Back]] | None:
        """The rule for this module call, or None when only its body (or nothing) can predict it."""
        shape = n.shape or ()
        if kind in MODULE_RULES:
            return lambda x: MODULE_RULES[kind](m, x, n)
        if isinstance(m, nn.Embedding):
            return None if n.body else (lambda x: R.embedding(m.weight, x if data else None, shape))
        if _fan_layer(m):
            nums = self.layers.get(n.module or "")
            return lambda x: R.weight_layer(m, x, shape, nums)
        if activation_module(m):
            return lambda x: R.activation(m, x)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return lambda x: R.batch_norm(m, x)
        if isinstance(m, nn.GroupNorm):
            return lambda x: R.group_norm(m, x)
        if isinstance(m, nn.LayerNorm) or (is_norm(m) and "RMS" not in kind and "Layer" in kind):
            return lambda x: R.layer_norm(m, x)
        if "RMSNorm" in kind:
            return lambda x: R.layer_norm(m, x, rms=True)
        if isinstance(m, nn.modules.dropout._DropoutNd):
            return lambda x: R.dropout(x, float(m.p), m.training)
        if isinstance(m, nn.Softmax | nn.Softmin | nn.LogSoftmax):
            return None
        if "Pool" in kind:
            return lambda x: _pool(n, m, x)
        if kind in SHAPE_MODULES:
            key = data[0]
            return lambda x: P.view_moments(lambda vals: m(vals[key]), {key: x})
        if kind == "Identity":
            return lambda x: (x, _identity_back)
        return None

    def _body_known(self, n: Node) -> bool:
        """True when every value the body reads from outside is known: the call is computed exactly."""
        return all(self.val(j).known for b in n.body for j in b.inputs if j >= 0)

    def _body_call(self, n: Node) -> Step:
        """A module predicted from the ops inside it: walk its body, and go back through it. An op inside
        that cannot be followed (its rule fails on these arguments) makes the module pass its input
        through, with the reason in the warning, when it keeps the shape."""
        for b in n.body:
            self.node_of[b.index] = b
        self.context.append(n.kind)
        try:
            self._walk(n.body)
        except Exception as exc:  # noqa: BLE001 - one module predict cannot follow; the rest goes on
            self.context.pop()
            data = [i for i in n.inputs if self.node_of[i].op != "const"]
            x = self.val(data[0]) if data else R.const(torch.zeros(n.shape or ()))
            if n.shape is None or tuple(x.shape or ()) != tuple(n.shape):
                raise
            why = str(exc) if isinstance(exc, SignalpropError) else f"{type(exc).__name__}: {exc}"
            passed, ident = self._unknown(f"{n.kind} ({why.split('; add one')[0]})", n, x)
            return passed, ident, data[:1]
        self.context.pop()
        out = self.val(n.body_out if n.body_out is not None else n.body[-1].index)
        used = sorted({j for b in n.body for j in b.inputs if j >= 0 and not self.val(j).known})
        body = n.body
        out_index = n.body_out if n.body_out is not None else body[-1].index

        def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
            acc: dict[int, torch.Tensor] = {out_index: g2}
            self._backward(body, acc)
            return [acc.get(j) for j in used]

        return out, back, used

    def _unknown(self, kind: str, n: Node, x: R.Moments) -> tuple[R.Moments, R.Back]:
        """Pass the input through (shape kept: counted for the warning) or raise (shape changed). Inside a
        module's body the rule to add is the module's."""
        owner = self.context[-1] if self.context else kind
        label = f"{kind} in {owner}" if self.context else kind
        if n.shape is not None and tuple(x.shape or ()) != tuple(n.shape):
            raise SignalpropError(
                f"predict has no rule for {label} ({n.name}), which changes the shape from "
                f"{x.shape} to {n.shape}; add one with signalprop.prediction.register_rule("
                f"{owner!r}, rule), where rule(module, moments, node) returns (moments, backward)"
            )
        self.unknown[label] = self.unknown.get(label, 0) + 1
        return x, _identity_back

    # ---- functions ---------------------------------------------------------------------------------------
    def _fn(self, n: Node) -> Step:
        name = n.name
        if name == "output":  # a module's second (third, ...) output: read from its body, no gradient
            call, k = n.args[0], n.args[1]
            return self.vals.get(k, self.val(call.index)), None, []
        if name in NO_OPS:
            return R.const(None), None, []
        ins = {i: self.val(i) for i in n.inputs}
        if name == "embedding":
            emb = O.embedding_fn(n, ins)
            if emb is not None:
                return emb
        if not ins:  # a tensor built from nothing (arange, ones): its value is known
            return R.const(P.replay(n, {})), None, []
        if all(v.known for v in ins.values()):
            return R.const(P.replay(n, {i: v.value for i, v in ins.items()}),
                           tokens=any(v.tokens for v in ins.values())), None, []
        if name in VALUE_FREE_OPS or (name == "getattr" and len(n.args) > 1 and n.args[1] in SHAPE_ATTRS):
            return R.const(P.replay(n, {i: v.value if v.known else _placeholder(self.node_of[i], v)
                                        for i, v in ins.items()})), None, []
        data = [i for i in ins if not ins[i].known]
        x = ins[data[0]]
        if name == "getitem" and x.lazy is not None:
            return _lazy_item(n, x)
        if name in MULTI_OPS:
            return R.Moments(x.mean, x.var, shape=x.shape, lazy=(n, ins)), None, []
        if name in ACTIVATION_OPS or name in ELEMENTWISE:
            act = ELEMENTWISE[name] if name in ELEMENTWISE else fn_activation(n, self.graph.nodes)
            out, back = R.activation(act, x)
            return out, back, data[:1]
        if name in IDENTITY_OPS:
            return x, _identity_back, data[:1]
        if name in SHAPE_OPS:
            return P.shape_op(n, ins)
        rule = O.FN_RULES.get(name) or A.FN_RULES.get(name)
        step = rule(n, ins) if rule is not None else None
        if step is not None:
            return step
        if name == "dropout":
            p = _arg(n, 1, "p", 0.5)
            train = _arg(n, 2, "train", _arg(n, 2, "training", True))
            out, back = R.dropout(x, float(p), bool(train))
            return out, back, data[:1]
        if name in ("add", "sub", "rsub"):
            return O.add(n, ins)
        if name in ("mul", "div", "neg"):
            return O.mul(n, ins)
        if "pool" in name:
            out, back = _pool(n, None, x)
            return out, back, data[:1]
        out, back = self._unknown(name, n, x)
        return out, back, data[:1]

    # ---- trace -----------------------------------------------------------------------------------------
    def _trace(self, g2: dict[int, torch.Tensor], input_shape: Any) -> Trace:
        nodes = self.graph.nodes
        layers = []
        with untracked() as tracked:  # one exit from the tracker for the whole loop, not one per call
            for c in self.graph.calls:
                i = c.node
                while nodes[i].op == "alias" and nodes[i].inputs:
                    i = nodes[i].inputs[0]
                x = self.vals.get(i)
                meta: dict[str, Any] = {"log_var_std": None}
                if x is None or x.lazy is not None or (x.known and not isinstance(x.value, torch.Tensor)):
                    fwd = Stats()
                    bwd = None
                elif x.src is None or _stateless(x.src[0]):  # the band evaluates the activation
                    fwd, meta = B.stats(x, self.batch, self.cond)
                    bwd = B.grad_stats(g2.get(i), fwd.numel)
                else:  # a module's own activation code runs under the model's tracker
                    with tracked:
                        fwd, meta = B.stats(x, self.batch, self.cond)
                        bwd = B.grad_stats(g2.get(i), fwd.numel)
                layers.append(LayerStats(c.name, c.kind, fwd, bwd, tuple(c.shape or ()),
                                         str(nodes[c.node].dtype or "float32"), c.weight_layer, meta))
        meta_t = {"input_shape": input_shape, "input_var": self.input_var, "graph": self.graph.method,
                  "capture_failures": dict(self.graph.failures), "batch": self.batch}
        return Trace(layers, source="predicted", meta=meta_t)


def _fan_layer(m: nn.Module) -> bool:
    """A module the weight-layer rule predicts (a fan rule; attention and recurrent layers have their own)."""
    return has_fan_rule(m) and not isinstance(m, nn.MultiheadAttention | nn.RNNBase)


def _stateless(act: Any) -> bool:
    """An activation whose evaluation runs no model code that could write: a name or function, or one of
    torch's own activation modules holding no parameter, buffer or parametrization."""
    if not isinstance(act, nn.Module):
        return True
    return (type(act).__module__.startswith("torch.nn.") and not act._parameters and not act._buffers
            and not act._modules)


def _known_call(m: nn.Module, n: Node, ins: list[R.Moments]) -> R.Moments | None:
    """A module with no rule whose inputs are all known tensors (a weight parametrization reading its
    parameters, as the recorded forward captures ``weight_norm``): its output is known, computed by calling
    it on them in order. None when an input is data, or the call does not give a tensor of the node's shape."""
    if not ins or not all(v.known and isinstance(v.value, torch.Tensor) for v in ins):
        return None
    try:
        out = m(*[v.value for v in ins])
    except Exception:  # noqa: BLE001 - inputs recorded in another order or with keywords: not this path
        return None
    if not isinstance(out, torch.Tensor) or n.shape is None or tuple(out.shape) != tuple(n.shape):
        return None
    return R.const(out.detach())


def _placeholder(node: Node, x: R.Moments) -> torch.Tensor:
    """A zero tensor of the node's shape and dtype, for ops that read only those."""
    dtype = getattr(torch, node.dtype or "float32", torch.float32)
    return torch.zeros(tuple(node.shape or x.shape or ()), dtype=dtype if isinstance(dtype, torch.dtype) else None)


def _lazy_item(n: Node, x: R.Moments) -> Step:
    """``split(...)[k]`` on data: the split replayed and indexed, as one view of the split's inputs."""
    node, ins = x.lazy
    k = n.args[1]
    fixed = {i: v.value for i, v in ins.items() if v.known and not P._floating(v.value)}
    data = {i: v for i, v in ins.items() if i not in fixed}
    out, back = P.view_moments(lambda vals: P.replay(node, {**fixed, **vals})[k], data)
    return out, back, list(data)


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
