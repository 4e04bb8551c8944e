"""Package surface: light import, the public names of DESIGN.md, the CLI's entry point."""

from __future__ import annotations

import subprocess
import sys

import signalprop as sp

PUBLIC = ["gain", "fans", "init", "theory", "measure", "predict", "diagnose", "fix", "Monitor", "models",
          "Trace", "Stats", "LayerStats", "Finding", "Report", "SignalpropError"]


def test_import_is_light() -> None:
    code = ("import sys, signalprop; heavy = [m for m in ('matplotlib', 'rich', 'transformers', 'sklearn', "
            "'scipy', 'pandas', 'lightning', 'tensorboard') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


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
