"""The public API documents itself: every public function and class of every stage has a summary, Args,
Returns and an example that runs as a doctest in ``make test``; and no source file is over 600 lines."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import signalprop

SRC = Path(signalprop.__file__).parent
MAX_LINES = 600

DOCUMENTED = [
    "signalprop._errors",
    "signalprop.activations",
    "signalprop.theory",
    "signalprop.stats",
    "signalprop.trace",
    "signalprop.layers",
    "signalprop.models",
    "signalprop.graph",
    "signalprop.measurement",
    "signalprop.monitor",
    "signalprop.report.table",
    "signalprop.report.plots",
    "signalprop.report.html",
    "signalprop.report.training",
    "signalprop.init",
    "signalprop.fix",
    "signalprop.diagnosis",
    "signalprop.prediction",
    "signalprop.experiments.he2015",
    "signalprop.experiments.glorot2010",
    "signalprop.experiments.criticality",
    "signalprop.experiments.sweep",
    "signalprop.experiments.xiao2018",
]


def _public(module_name: str) -> list[tuple[str, object]]:
    """The functions and classes a module offers: its ``__all__``, else its names without an underscore,
    defined in it or its package (a name it re-exports from elsewhere is checked where it is defined)."""
    mod = importlib.import_module(module_name)
    names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
    if module_name == "signalprop._errors":
        names = ["SignalpropError"]
    out = []
    for name in names:
        obj = getattr(mod, name, None)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__.startswith(module_name):
            out.append((f"{module_name}.{name}", obj))
    return out


def _lacking(obj: object) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    missing = []
    if not doc.strip() or not doc.strip().splitlines()[0].strip():
        missing.append("summary")
    if ">>> " not in doc:
        missing.append("example")
    if inspect.isfunction(obj):
        params = [p for p in inspect.signature(obj).parameters if p != "self"]
        if params and "Args:" not in doc:
            missing.append("Args")
        if "Returns:" not in doc and "Yields:" not in doc and inspect.signature(obj).return_annotation not in (
            "None", None
        ):
            missing.append("Returns")
    return missing


@pytest.mark.parametrize("module_name", DOCUMENTED)
def test_public_api_is_documented(module_name: str) -> None:
    items = _public(module_name)
    assert items, f"{module_name} offers no public function or class"
    lacking = {name: miss for name, obj in items if (miss := _lacking(obj))}
    assert lacking == {}


def test_theory_keeps_the_activation_names() -> None:
    """signalprop.activations holds the registry; sp.theory offers the same objects (a public contract)."""
    from signalprop import activations, theory

    for name in ["resolve", "parse_name", "activation_name", "activation_key", "known_activations"]:
        assert getattr(theory, name) is getattr(activations, name)
    assert theory.activation_name("Leaky-ReLU( 0.20 )") == "leaky_relu(0.2)"
    assert theory._MODULE_NAMES["GELUActivation"] == "gelu"


def test_no_source_file_over_600_lines() -> None:
    lengths = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in sorted(SRC.rglob("*.py"))}
    assert len(lengths) > 50
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_sources_cite_only_files_in_the_repository() -> None:
    """The design lives in docs/; no source file points at a design file outside the repository."""
    texts = {str(p.relative_to(SRC)): p.read_text() for p in SRC.rglob("*.py")}
    cited = {name for name, text in texts.items() if "DESIGN.md" in text or "../shared" in text}
    assert cited == set()
