"""`signalprop critical ACT --bias-var V`: the order-to-chaos line, the init std on it, the depth scales.

Poole et al. (2016) and Schoenholz et al. (2017): a deep net with weight variance sigma_w^2 / fan_in and
bias variance sigma_b^2 propagates signals furthest on the critical line chi1 = 1, where the correlation
depth scale xi_c diverges; about 6 xi_c layers are trainable off it.
"""

from __future__ import annotations

import argparse
import math

HELP = "print the critical weight variance (chi1 = 1) for an activation and bias variance, and the depth scales"

_AROUND = (0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 2.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("act", metavar="ACT", help="activation name: tanh, relu, erf, gelu, selu, leaky_relu(0.2), ...")
    parser.add_argument("--bias-var", type=float, default=0.0, help="bias variance sigma_b^2 (default 0)")
    parser.add_argument(
        "--fan-in", type=int, default=512, help="fan-in to turn the variance into an init std (default 512)"
    )


def run(args: argparse.Namespace) -> int:
    from .. import theory
    from .._errors import SignalpropError

    theory.resolve(args.act)  # raises with the list of known names
    name = theory.activation_name(args.act)
    bv = args.bias_var
    if not (math.isfinite(bv) and bv >= 0):
        raise SignalpropError(f"--bias-var must be a finite number >= 0, got {bv}")
    if args.fan_in < 1:
        raise SignalpropError(f"--fan-in must be a positive integer, got {args.fan_in}")
    wv = theory.critical_weight_var(name, bias_var=bv)
    q = theory.fixed_point(name, weight_var=wv, bias_var=bv)
    n = args.fan_in
    print(f"activation               {name}")
    print(f"bias variance sigma_b^2  {bv:g}")
    print(f"critical sigma_w^2       {wv:.6g}   (chi1 = 1, Poole et al. 2016)")
    if q == 0:  # theory gives the q* = 0 branch exactly (phi(0) = 0, no bias)
        q_text = "0   (the pre-activation variance decays to 0 with depth, as a power law on this line)"
    elif math.isinf(q):
        q_text = "none (q grows without bound)"
    else:
        q_text = f"{q:.6g}   (pre-activation variance the q-map settles at)"
    print(f"fixed point q*           {q_text}")
    print(f"init std, fan_in {n:<7} sqrt({wv:.4g}/{n}) = {math.sqrt(wv / n):.6g}   (bias std {math.sqrt(bv):.6g})")
    print()
    print("depth scales around the critical line (Schoenholz et al. 2017; trainable depth ~ 6 xi_c):")
    print(f"  {'sigma_w^2':>10}  {'chi1':>8}  {'xi_q':>9}  {'xi_c':>9}")
    for f in _AROUND:
        w = wv * f
        chi = theory.chi1(name, weight_var=w, bias_var=bv)
        xq, xc = theory.depth_scales(name, weight_var=w, bias_var=bv)
        mark = "  <- critical" if f == 1.0 else ""
        print(f"  {w:>10.4g}  {chi:>8.4f}  {_fmt(xq):>9}  {_fmt(xc):>9}{mark}")
    return 0


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}"
