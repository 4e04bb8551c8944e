"""Effective fans: how many inputs feed one output unit (fan_in) and how many outputs one input feeds (fan_out).

He et al. (2015, Sec. 2.2) keep the forward second moment steady with ``Var[w] = gain^2 / fan_in`` and the
backward one with ``Var[w] = gain^2 / fan_out``; both are only right when the fans count what the layer
really connects. PyTorch's ``_calculate_fan_in_and_fan_out`` reads them off the weight's shape, which is
right for Linear and stride-1 convolutions and wrong for strided ones:

* ``Conv{1,2,3}d`` (weight ``[out, in/groups, *k]``): every output sees ``in/groups * prod(k)`` inputs, so
  ``fan_in = in/groups * prod(k)``. Going back, one input position is covered by ``prod(k/stride)`` output
  positions on average (exactly, in the interior, when the stride divides the kernel), each with
  ``out/groups`` channels: ``fan_out = out/groups * prod(k) / prod(stride)``. At stride 1 this is
  PyTorch's ``out/groups * prod(k)``. Grouped and depthwise convolutions divide by ``groups``.
* ``ConvTranspose{1,2,3}d`` (weight ``[in, out/groups, *k]``) is the adjoint of a strided convolution, so
  the roles swap: one input position scatters its ``prod(k)`` taps onto distinct output positions, each
  in ``out/groups`` channels, so ``fan_out = out/groups * prod(k)``; an interior output position gathers
  ``prod(k/stride)`` taps from each of ``in/groups`` channels, so ``fan_in = in/groups * prod(k) /
  prod(stride)``. ``ConvTranspose2d(256, 128, 4, stride=2)``: fan_in 1024 where PyTorch says 2048. When
  the stride does not divide the kernel, output positions alternate between ``floor(k/s)`` and
  ``ceil(k/s)`` taps per dimension (the checkerboard of Odena et al. 2016) and fan_in is their mean.
  Dilation and padding change neither count away from the borders.
* ``nn.MultiheadAttention``: the packed ``in_proj_weight`` ``[3E, E]`` is three ``E x E`` projections (q, k,
  v), each with fans ``(E, E)`` (``(kdim, E)`` and ``(vdim, E)`` for k and v when those differ); PyTorch's
  shape rule would give fan_out ``3E``. Its ``out_proj`` is an ``nn.Linear`` of its own.
* ``nn.Embedding`` (weight ``[num_embeddings, dim]``): an embedding is a linear map applied to a one-hot
  vector, so each output unit is fed by exactly one nonzero input of value 1: ``fan_in = 1``, and each
  token feeds ``dim`` outputs: ``fan_out = dim``. Then He/LeCun with a linear gain give ``N(0, 1)``, which
  is PyTorch's default for embeddings and keeps the output's second moment at 1. (PyTorch's shape rule
  reads the weight as a Linear from ``dim`` to ``num_embeddings``, which is the view of a *tied output
  head*; initialize such a head through the head layer, not the embedding.)
* transformers' ``Conv1D`` (GPT-2; weight ``[in, out]``): fans swapped against Linear. It is recognised by
  class name, so transformers is never imported.
* ``nn.RNN``, ``nn.LSTM``, ``nn.GRU``: each layer and direction stacks its gates' matrices in rows (LSTM:
  input, forget, cell, output; GRU: reset, update, new), so every gate is a block of its own of ``H``
  rows: ``weight_ih_l{k}`` blocks have ``fan_in`` = that layer's input size (``input_size`` for layer 0,
  ``H`` or ``2H`` above it), ``weight_hh_l{k}`` blocks ``fan_in`` = ``H`` (``proj_size`` with a
  projection), both ``fan_out = H``; an LSTM's projection ``weight_hr_l{k}`` is one ``proj_size x H``
  block. PyTorch's shape rule would read a ``[4H, in]`` matrix as one layer of fan_out ``4H``.

Anything else raises :class:`~signalprop.SignalpropError` that says how to pass fans; add a layer type with
:func:`register_fans`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .._errors import SignalpropError
from ..layers import is_weight_layer, weight_names

FanRule = Callable[[nn.Module], "tuple[float, float]"]


@dataclass(frozen=True)
class WeightBlock:
    """One independently initialized block of a layer's weight.

    ``param`` names the parameter on the layer (``"weight"``, ``"in_proj_weight"``); ``rows`` selects a
    range of its first dimension (the q, k, v thirds of a packed attention projection) or is None for all;
    ``groups`` splits the block further into that many equal matrices along dim 0 for the orthogonal schemes
    (grouped convolutions: each group is its own map); ``out_dim`` is the dimension that indexes output
    units (1 for transformers' Conv1D and for transposed convolutions, 0 otherwise).

    Attributes:
        param: The parameter's name on the layer.
        fan_in: Inputs per output unit (He et al. 2015, Sec. 2.2; the module docstring has each rule).
        fan_out: Outputs per input unit.
        rows: The block's range of dim 0, or None for the whole parameter.
        groups: Equal independent matrices along dim 0 (grouped convolutions).
        out_dim: The dimension that indexes output units.

    Examples:
        A grouped convolution: each output sees ``32/4 * 9 = 72`` inputs, each input feeds ``64/4 * 9``:

        >>> weight_blocks(nn.Conv2d(32, 64, 3, groups=4))
        [WeightBlock(param='weight', fan_in=72, fan_out=144, rows=None, groups=4, out_dim=0)]
    """

    param: str
    fan_in: float
    fan_out: float
    rows: tuple[int, int] | None = None
    groups: int = 1
    out_dim: int = 0


def _num(x: float) -> float:
    """An int when the count is whole (1024, not 1024.0), else the float mean."""
    r = round(x)
    return int(r) if abs(x - r) < 1e-9 else float(x)


def _prod(xs: tuple[int, ...] | list[int]) -> int:
    return int(math.prod(int(v) for v in xs))


# ---- built-in rules: layer -> list of blocks ------------------------------------------------------
def _linear(m: nn.Module) -> list[WeightBlock]:
    assert isinstance(m, nn.Linear)
    return [WeightBlock("weight", m.in_features, m.out_features)]


def _conv(m: nn.Module) -> list[WeightBlock]:
    assert isinstance(m, nn.modules.conv._ConvNd)
    k = _prod(list(m.kernel_size))
    s = _prod(list(m.stride))
    g = int(m.groups)
    if m.transposed:
        fan_in = m.in_channels / g * k / s
        fan_out = m.out_channels / g * k
        return [WeightBlock("weight", _num(fan_in), _num(fan_out), groups=g, out_dim=1)]
    fan_in = m.in_channels / g * k
    fan_out = m.out_channels / g * k / s
    return [WeightBlock("weight", _num(fan_in), _num(fan_out), groups=g)]


def _mha(m: nn.Module) -> list[WeightBlock]:
    assert isinstance(m, nn.MultiheadAttention)
    e = int(m.embed_dim)
    if m.in_proj_weight is not None:
        return [WeightBlock("in_proj_weight", e, e, rows=(i * e, (i + 1) * e)) for i in range(3)]
    return [
        WeightBlock("q_proj_weight", e, e),
        WeightBlock("k_proj_weight", int(m.kdim), e),
        WeightBlock("v_proj_weight", int(m.vdim), e),
    ]


def _embedding(m: nn.Module) -> list[WeightBlock]:
    assert isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    return [WeightBlock("weight", 1, int(m.embedding_dim), out_dim=1)]


def _hf_conv1d(m: nn.Module) -> list[WeightBlock]:
    w = m.weight
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise SignalpropError(
            f"{type(m).__name__} looks like transformers' Conv1D but its weight is not a 2-D [in, out] "
            "tensor; pass fans=(fan_in, fan_out) or register the type with signalprop.init.register_fans"
        )
    return [WeightBlock("weight", int(w.shape[0]), int(w.shape[1]), out_dim=1)]


def _rnn(m: nn.Module) -> list[WeightBlock]:
    assert isinstance(m, nn.RNNBase)
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    h = int(m.hidden_size)
    blocks: list[WeightBlock] = []
    for name in m._flat_weights_names:
        w = getattr(m, name, None)
        if not name.startswith("weight_") or not isinstance(w, torch.Tensor) or w.ndim != 2:
            continue
        cols = int(w.shape[1])
        if name.startswith("weight_hr_"):
            blocks.append(WeightBlock(name, cols, int(w.shape[0])))
        else:
            blocks += [WeightBlock(name, cols, h, rows=(g * h, (g + 1) * h)) for g in range(gates)]
    return blocks


_TYPE_RULES: dict[type, Callable[[nn.Module], list[WeightBlock]]] = {
    nn.Linear: _linear,
    nn.modules.conv._ConvNd: _conv,
    nn.MultiheadAttention: _mha,
    nn.Embedding: _embedding,
    nn.EmbeddingBag: _embedding,
    nn.RNNBase: _rnn,
}
"""Layer type -> rule. Looked up along the class's MRO, so subclasses (``NonDynamicallyQuantizableLinear``,
a user's ``MyConv(nn.Conv2d)``) inherit their parent's rule."""

_NAME_RULES: dict[str, Callable[[nn.Module], list[WeightBlock]]] = {
    "Conv1D": _hf_conv1d,  # transformers.pytorch_utils.Conv1D, duck-typed so transformers is not imported
}
"""Class name -> rule, for layer types of libraries that are not imported here."""


def register_fans(layer_type: type | str, rule: FanRule, *, param: str = "weight") -> None:
    """Teach signalprop the fans of a layer type whose tensor ``param`` has rows = output units.

    ``layer_type`` is a class (subclasses inherit the rule) or a class name (matched exactly, for types of
    libraries you do not want to import). ``rule(layer) -> (fan_in, fan_out)``. ``param`` names the tensor
    the initializers draw (``"weight"`` by default; a custom layer used through ``F.linear`` may call it
    ``w``); its first dimension must index the output units, as in ``nn.Linear`` (``[out, in]``) and
    ``nn.Conv2d`` (``[out, in, *kernel]``). A registration replaces the built-in rule for that type.

    Args:
        layer_type: An ``nn.Module`` subclass (its subclasses inherit the rule) or a class name.
        rule: ``rule(layer) -> (fan_in, fan_out)``, two positive numbers.
        param: The name of the tensor the initializers draw; its dim 0 indexes output units.

    Returns:
        None; the rule is used from then on by :func:`fans`, :func:`weight_blocks` and every initializer.

    Raises:
        SignalpropError: ``rule`` is not callable, ``param`` is not an identifier, or ``layer_type`` is
            neither a module class nor a name.

    Examples:
        >>> class Scale(nn.Module):
        ...     def __init__(self): super().__init__(); self.weight = nn.Parameter(torch.empty(8, 4))
        >>> register_fans(Scale, lambda m: (4, 8))
        >>> fans(Scale())
        (4, 8)
        >>> class MyLinear(nn.Module):
        ...     def __init__(self): super().__init__(); self.w = nn.Parameter(torch.empty(8, 4))
        >>> register_fans(MyLinear, lambda m: (m.w.shape[1], m.w.shape[0]), param="w")
        >>> weight_blocks(MyLinear())[0].param
        'w'
    """
    if not callable(rule):
        raise SignalpropError(
            f"register_fans needs a callable rule(layer) -> (fan_in, fan_out); got {type(rule).__name__}"
        )
    if not isinstance(param, str) or not param.isidentifier():
        raise SignalpropError(
            f"register_fans: param must name the layer's weight tensor (an attribute name such as 'weight' "
            f"or 'w'), got {param!r}"
        )

    def blocks(m: nn.Module) -> list[WeightBlock]:
        out = rule(m)
        try:
            fi, fo = out
            fi, fo = float(fi), float(fo)
        except (TypeError, ValueError) as exc:
            raise SignalpropError(
                f"the fan rule registered for {type(m).__name__} returned {out!r}; it must return a pair "
                "of positive numbers (fan_in, fan_out)"
            ) from exc
        return [WeightBlock(param, _num(fi), _num(fo))]

    if isinstance(layer_type, str):
        _NAME_RULES[layer_type] = blocks
    elif isinstance(layer_type, type) and issubclass(layer_type, nn.Module):
        _TYPE_RULES[layer_type] = blocks
    else:
        raise SignalpropError(
            f"register_fans needs an nn.Module subclass or a class name, got {layer_type!r}"
        )
    _RULE_PARAMS[blocks] = param


_RULE_PARAMS: dict[Callable[[nn.Module], list[WeightBlock]], str] = {}
"""Registered rule -> the tensor it describes, when that is not ``weight``."""


def _rule_for(m: nn.Module) -> Callable[[nn.Module], list[WeightBlock]] | None:
    for cls in type(m).__mro__:
        if cls in _TYPE_RULES:
            return _TYPE_RULES[cls]
        if cls.__name__ in _NAME_RULES:
            return _NAME_RULES[cls.__name__]
    return None


def has_fan_rule(m: nn.Module) -> bool:
    """True when ``m`` is a weight layer whose type has a fan rule (built in or registered) and its weight.

    These are the layers init can draw. A weight layer (:func:`signalprop.layers.is_weight_layer`) without
    one needs :func:`register_fans`.

    Args:
        m: Any module.

    Returns:
        Whether :func:`weight_blocks` gives ``m``'s blocks.

    Examples:
        >>> has_fan_rule(nn.Linear(2, 3)), has_fan_rule(nn.LayerNorm(3)), has_fan_rule(nn.ReLU())
        (True, False, False)
    """
    rule = _rule_for(m)
    if rule is None:
        return False
    if isinstance(m, nn.MultiheadAttention):
        return m.in_proj_weight is not None or m.q_proj_weight is not None
    if isinstance(m, nn.RNNBase):
        return True  # its weight_ih_l* / weight_hh_l* always exist
    return isinstance(getattr(m, _RULE_PARAMS.get(rule, "weight"), None), torch.Tensor)


def _unknown(m: nn.Module) -> SignalpropError:
    names = weight_names(m)
    w = getattr(m, names[0], None) if names else getattr(m, "weight", None)
    what = "weight" if not names or names[0] == "weight" else f"weight {names[0]!r}"
    shape = f"{what} shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else "no weight"
    how = register_call(m) if names else f"sp.init.register_fans({type(m).__name__}, lambda m: (fan_in, fan_out))"
    return SignalpropError(
        f"cannot find fans for {type(m).__name__} ({shape}); known layer types are Linear, Conv1d/2d/3d, "
        "ConvTranspose1d/2d/3d, MultiheadAttention, Embedding, EmbeddingBag, RNN/LSTM/GRU and transformers' "
        f"Conv1D. Pass fans=(fan_in, fan_out) or register the type: {how}{_rows_note(m) if names else ''}."
    )


def _check_layer(m: object, what: str) -> nn.Module:
    if isinstance(m, torch.Tensor):
        raise SignalpropError(
            f"{what} needs an nn.Module layer, got a tensor of shape {tuple(m.shape)}; for a bare tensor use "
            "the tensor-level functions in signalprop.init.schemes (they take fans=(fan_in, fan_out))"
        )
    if not isinstance(m, nn.Module):
        raise SignalpropError(
            f"{what} needs an nn.Module layer (nn.Linear, nn.Conv2d, ...), got {type(m).__name__}"
        )
    return m


def weight_blocks(layer: nn.Module) -> list[WeightBlock]:
    """The independently initialized blocks of ``layer``'s weight, each with its effective fans.

    One block for most layers; three (q, k, v) for ``nn.MultiheadAttention``; one per gate and weight
    matrix for RNN/LSTM/GRU.

    Args:
        layer: One weight layer.

    Returns:
        The :class:`WeightBlock` list, with fans by the rules of the module docstring.

    Raises:
        SignalpropError: A layer type without a fan rule (the message gives the :func:`register_fans`
            call), a layer without its weight, a lazy layer before its first forward.

    Examples:
        Attention with ``kdim=8``: the key projection has fan_in 8, the query and value ones 16:

        >>> [(b.param, b.fan_in) for b in weight_blocks(nn.MultiheadAttention(16, 2, kdim=8))]
        [('q_proj_weight', 16), ('k_proj_weight', 8), ('v_proj_weight', 16)]
        >>> [b.rows for b in weight_blocks(nn.LSTM(8, 16))][:4]  # input, forget, cell, output gates
        [(0, 16), (16, 32), (32, 48), (48, 64)]
    """
    layer = _check_layer(layer, "weight_blocks")
    rule = _rule_for(layer)
    if rule is None:
        raise _unknown(layer)
    param = _RULE_PARAMS.get(rule, "weight")
    if not has_fan_rule(layer):
        raise SignalpropError(
            f"{type(layer).__name__} has no weight to initialize (its {param} is None); nothing to compute"
        )
    for name in (param, "in_proj_weight", "q_proj_weight"):
        if isinstance(getattr(layer, name, None), nn.parameter.UninitializedParameter):
            raise SignalpropError(
                f"{type(layer).__name__} is a lazy layer whose {name} has no shape yet; run one forward pass "
                "first (or build the model on the meta device and use signalprop.init.materialize_)"
            )
    blocks = rule(layer)
    for b in blocks:
        if not (b.fan_in > 0 and b.fan_out > 0):
            raise SignalpropError(
                f"{type(layer).__name__} has fans ({b.fan_in}, {b.fan_out}); both must be positive "
                "(a layer with a zero-sized dimension has nothing to initialize)"
            )
    return blocks


def fans(layer: nn.Module) -> tuple[float, float]:
    """The effective ``(fan_in, fan_out)`` of one layer: inputs per output unit, outputs per input unit.

    See the module docstring for each layer type's rule and why it differs from PyTorch's where it does.
    Whole counts come back as ``int``; a strided layer whose stride does not divide its kernel gets the
    mean count as a ``float``. For ``nn.MultiheadAttention`` this is the query projection's ``(E, E)``
    (the k and v blocks agree unless ``kdim``/``vdim`` differ; :func:`weight_blocks` lists all three).

    Args:
        layer: One weight layer.

    Returns:
        ``(fan_in, fan_out)`` of its first weight block.

    Raises:
        SignalpropError: As :func:`weight_blocks`.

    Examples:
        A stride-2 transposed convolution gathers ``128 * 16 / 4`` taps per output, not PyTorch's 2048;
        a depthwise convolution sees one channel's 3x3 window:

        >>> fans(nn.ConvTranspose2d(256, 128, 4, stride=2))
        (1024, 2048)
        >>> fans(nn.Conv2d(32, 32, 3, groups=32))
        (9, 9)
    """
    b = weight_blocks(layer)[0]
    return (b.fan_in, b.fan_out)


def weight_layers(model: nn.Module, *, strict: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, module)`` for every weight layer of ``model``, in ``named_modules`` order.

    Yields the weight layers (:func:`signalprop.layers.is_weight_layer`) that have a fan rule (Linear,
    ConvNd, ConvTransposeNd, MultiheadAttention, Embedding, transformers' Conv1D, registered types);
    ``model`` itself is included when it is one. With ``strict=True`` (the initializers) a weight layer
    without a fan rule is never skipped silently: one whose ``weight`` has two or more dimensions (a custom
    layer used through ``F.linear``) raises :class:`~signalprop.SignalpropError` naming ``register_fans``;
    one holding other tensors of two or more dimensions (a class token, a position table) gets an
    :class:`UnplannedLayerWarning` naming them.

    Args:
        model: A layer or a model.
        strict: Raise (or warn) for weight layers without a fan rule instead of skipping them.

    Yields:
        ``(qualified_name, module)`` pairs; the name is ``""`` for ``model`` itself.

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> [name for name, _ in weight_layers(net)]
        ['0', '3']
    """
    model = _check_layer(model, "weight_layers")
    left: list[str] = []
    for name, m in model.named_modules():
        if has_fan_rule(m):
            yield name, m
        elif strict and is_weight_layer(m):
            if "weight" in weight_names(m):
                err = _unknown(m)
                raise SignalpropError(f"layer {name or '<model>'!r}: {err}") from None
            left.append(unplanned(name, m))
    if left:
        warnings.warn("; ".join(left), UnplannedLayerWarning, stacklevel=3)


class UnplannedLayerWarning(UserWarning):
    """A weight layer was left as it is because no fan rule knows its type (the message names the fix).

    Examples:
        >>> import warnings
        >>> class Tokens(nn.Module):
        ...     def __init__(self): super().__init__(); self.cls = nn.Parameter(torch.zeros(2, 8))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = list(weight_layers(nn.Sequential(nn.Linear(8, 8), Tokens()), strict=True))
        >>> [type(w.message).__name__ for w in caught]
        ['UnplannedLayerWarning']
    """


def unplanned(name: str, m: nn.Module) -> str:
    """One sentence: which tensors of ``m`` no initializer draws, and the exact ``register_fans`` call that would.

    The call reads the fans off the first such tensor's shape as ``nn.Linear`` and ``nn.Conv2d`` do (rows
    = output units: fan_in = one row's size, fan_out = rows x kernel size) and names it with ``param=``
    when it is not called ``weight``.

    Args:
        name: The layer's qualified name (``""``: the model itself).
        m: The layer.

    Returns:
        The sentence.

    Examples:
        >>> class MyLinear(nn.Module):
        ...     def __init__(self): super().__init__(); self.w = nn.Parameter(torch.empty(8, 4))
        >>> print(unplanned("fc", MyLinear()))  # doctest: +NORMALIZE_WHITESPACE
        fc (MyLinear: w (8, 4)) left as it is: no fan rule for MyLinear;
        sp.init.register_fans(MyLinear, lambda m: (m.w.shape[1], m.w.shape[0]), param="w") to draw it
        (rows of w = output units)
    """
    return f"{name or '<model>'} ({_tensors(m)}) left as it is: no fan rule for {type(m).__name__}; " \
        f"{register_call(m)} to draw it{_rows_note(m)}"


def register_call(m: nn.Module) -> str:
    """The ``sp.init.register_fans(...)`` call that teaches signalprop the fans of ``m``'s type.

    The rule reads the fans off ``m``'s first weight tensor (:func:`signalprop.layers.weight_names`) the way
    PyTorch reads a Linear or Conv weight ``[out, in, *kernel]``; ``param=`` names the tensor when it is not
    called ``weight``.

    Args:
        m: A layer of a type without a fan rule.

    Returns:
        The call, as Python source.

    Examples:
        >>> class Gate(nn.Module):
        ...     def __init__(self): super().__init__(); self.weight = nn.Parameter(torch.empty(8, 4))
        >>> register_call(Gate())
        'sp.init.register_fans(Gate, lambda m: (m.weight.shape[1], m.weight.shape[0]))'
    """
    kind = type(m).__name__
    names = weight_names(m)
    t = names[0] if names else "weight"
    w = getattr(m, t, None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        rule = f"lambda m: (m.{t}.shape[1], m.{t}.shape[0])"
    else:
        rule = f"lambda m: (m.{t}[0].numel(), m.{t}.shape[0] * m.{t}[0, 0].numel())"
    extra = "" if t == "weight" else f', param="{t}"'
    return f"sp.init.register_fans({kind}, {rule}{extra})"


def _tensors(m: nn.Module) -> str:
    return f"{type(m).__name__}: " + ", ".join(f"{k} {tuple(getattr(m, k).shape)}" for k in weight_names(m))


def _rows_note(m: nn.Module) -> str:
    names = weight_names(m)
    t = names[0] if names else "weight"
    return f" (rows of {t} = output units)"
