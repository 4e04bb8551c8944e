"""`signalprop gain ACT`: He's gain next to PyTorch's ``calculate_gain``, and why they differ."""

from __future__ import annotations

import argparse
import math

HELP = "print He's gain 1/sqrt(E[act(z)^2]) beside PyTorch's calculate_gain, with the init std for a fan-in"

_WHY: dict[str, str] = {
    "tanh": (
        "PyTorch's 5/3 is a heuristic (LeCun et al. 1998 scaled tanh so that unit-variance inputs give "
        "unit-variance outputs near the origin); He's gain keeps E[y^2] exactly steady for unit-variance "
        "pre-activations. 5/3 is {ratio:.1%} larger, so each layer multiplies the pre-activation variance by "
        "{vr:.3f} until tanh's bound stops it: the q-map settles at q* = {qstar:.3g} (chi1 = {chi:.3g}: "
        "{phase}), where |tanh| > 0.99 for {sat:.1%} of the units."
    ),
    "sigmoid": (
        "sigmoid is not centred: E[sigmoid(z)] = 1/2, so most of E[sigmoid(z)^2] = {m2:.3f} is the mean. "
        "He's gain divides by the second moment, mean included; PyTorch's gain 1 ignores the activation. "
        "Neither removes the mean: sigmoid nets drift (Glorot & Bengio 2010); prefer tanh or a norm layer."
    ),
    "selu": (
        "PyTorch's 3/4 deliberately gives up SELU's self-normalizing fixed point for steadier gradients in "
        "non-square layers; for self-normalizing nets (Klambauer et al. 2017) use gain 1 (LeCun normal). "
        "He's gain keeps E[y^2] = 1 for unit-variance inputs."
    ),
    "relu": "They agree: E[relu(z)^2] = 1/2 exactly, so both give sqrt(2) (He et al. 2015, Eq. 10).",
    "linear": "They agree: a linear layer keeps E[y^2] with Var[w] = 1/fan_in (LeCun et al. 1998).",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("act", metavar="ACT", help="activation name: relu, tanh, sigmoid, gelu, silu, selu, leaky_relu(0.2), elu(0.5), ...")
    parser.add_argument("--fan-in", type=int, default=None, help="also print the init std gain/sqrt(fan_in)")


def run(args: argparse.Namespace) -> int:
    from .. import theory
    from .._errors import SignalpropError

    theory.resolve(args.act)  # raises with the list of known names
    name = theory.activation_name(args.act)  # canonical: Leaky-ReLU(0.20) -> leaky_relu(0.2)
    if args.fan_in is not None and args.fan_in < 1:
        raise SignalpropError(f"--fan-in must be a positive integer, got {args.fan_in}")
    m2 = float(theory.second_moment(name, 1.0))
    he = theory.gain(name)
    pt = theory.torch_gain(name)
    print(f"activation          {name}")
    print(f"E[{name}(z)^2], z~N(0,1)  {m2:.6g}")
    print(f"He's gain           {he:.6g}   (1/sqrt(E[act(z)^2]), He et al. 2015)")
    if pt is None:
        print("PyTorch's gain      -        (torch.nn.init.calculate_gain has no entry for it)")
    else:
        key, params = theory.parse_name(name)
        call = f"'{key}'" + (f", {name[len(key) + 1:-1]}" if params else "")  # leaky_relu's slope: param
        print(f"PyTorch's gain      {pt:.6g}   (torch.nn.init.calculate_gain({call}))")
        print(f"ratio PyTorch/He    {pt / he:.6g}")
    if args.fan_in is not None:
        n = args.fan_in
        print(f"init std, fan_in {n}: He {he / math.sqrt(n):.6g}" + (f", PyTorch {pt / math.sqrt(n):.6g}" if pt else ""))
    why = _explain(name, m2, he, pt)
    if why:
        print()
        print(why)
    return 0


def _explain(name: str, m2: float, he: float, pt: float | None) -> str:
    from .. import theory

    if name not in _WHY:
        return ""
    if name != "tanh" or pt is None:
        return _WHY[name].format(m2=m2)
    wv = pt * pt
    qstar = theory.fixed_point("tanh", weight_var=wv)
    chi = theory.chi1("tanh", weight_var=wv)
    sat = math.erfc(math.atanh(0.99) / math.sqrt(2 * qstar)) if qstar > 0 else 0.0
    phase = "chaotic: nearby inputs drift apart" if chi > 1 else "ordered"
    return _WHY["tanh"].format(ratio=pt / he - 1, vr=(pt / he) ** 2, qstar=qstar, chi=chi, phase=phase, sat=sat)
