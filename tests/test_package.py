"""Package surface: light import, the public names of DESIGN.md, the CLI's entry point."""

from __future__ import annotations

import subprocess
import sys

import signalprop as sp

PUBLIC = ["gain", "fans", "init", "theory", "measure", "predict", "diagnose", "fix", "Monitor", "models",
          "Trace", "Stats", "LayerStats", "Finding", "Report", "SignalpropError"]


def test_import_is_light() -> None:
    code = ("import sys, signalprop; heavy = [m for m in ('torch', 'numpy', 'matplotlib', 'rich', 'transformers', "
            "'sklearn', 'scipy', 'pandas', 'lightning', 'tensorboard') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_lazy_names_load_on_first_use() -> None:
    code = (
        "import sys, signalprop\n"
        "assert 'torch' not in sys.modules\n"
        "from signalprop import measure, Trace\n"
        "import signalprop.measurement, signalprop.trace\n"
        "assert measure is signalprop.measurement.measure and Trace is signalprop.trace.Trace\n"
        "assert signalprop.diagnose is signalprop.diagnosis.diagnose and callable(signalprop.layers.is_weight_layer)\n"
        "ns = {}\n"
        "exec('from signalprop import *', ns)\n"
        "assert set(signalprop.__all__) <= set(ns) and ns['Monitor'] is signalprop.Monitor\n"
        "try:\n"
        "    signalprop.nope\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "module 'signalprop' has no attribute 'nope'"
    assert set(sp.__all__) <= set(dir(sp))
    assert {"diagnosis", "measurement", "prediction", "layers", "stats", "trace"} <= set(dir(sp))


def test_public_names_resolve() -> None:
    for name in PUBLIC:
        assert getattr(sp, name) is not None, name
    for name in ["he_", "glorot_", "lecun_", "orthogonal_", "delta_orthogonal_", "variance_scaling_"]:
        assert callable(getattr(sp.init, name))
    for name in ["qmap", "fixed_point", "chi1", "critical_weight_var", "depth_scales", "cmap"]:
        assert callable(getattr(sp.theory, name))
    assert callable(sp.fix.auto_init_) and callable(sp.fix.lsuv_)
    for name in ["alexnet", "plain_cnn", "mlp"]:
        assert callable(getattr(sp.models, name))


def test_cli_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "signalprop", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for cmd in ["demo", "diagnose", "fix", "reproduce", "gain", "critical"]:
        assert cmd in out.stdout
