"""Load the model a CLI command works on: ``TARGET`` is ``path/to/file.py:factory`` or
``package.module:factory``, optionally with literal arguments, ``signalprop.models:plain_cnn(depth=30)``.

``factory`` is a function or class called with those arguments, or an ``nn.Module`` instance used as it is.
Weights load with ``torch.load(path, weights_only=True)`` (no code from the file runs): a state dict, or a
checkpoint dict holding one under ``state_dict``, ``model_state_dict`` or ``model``. Every failure raises
:class:`~signalprop.SignalpropError` with a one-line reason, which the CLI turns into exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._errors import SignalpropError

if TYPE_CHECKING:
    from ..diagnosis import Report

_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


# ---- what a command does with the arguments of ``_args`` ----------------------------------------------
def check_input_arguments(args: argparse.Namespace, *, min_batch: int = 1) -> tuple[int, ...]:
    """Validate ``--input-shape``, ``--batch`` (at least ``min_batch``) and ``--vocab``; return the shape."""
    shape = parse_shape(args.input_shape)
    if args.batch < min_batch:
        if min_batch == 1:
            raise SignalpropError(f"--batch must be a positive integer, got {args.batch}")
        raise SignalpropError(
            f"--batch must be an integer >= {min_batch} (a std needs a sample), got {args.batch}"
        )
    if args.vocab is not None and args.vocab < 1:
        raise SignalpropError(f"--vocab must be a positive integer, got {args.vocab}")
    return shape


def random_input(
    args: argparse.Namespace,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device | None = None,
    draw_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A batch of ``args.batch`` random inputs seeded by ``args.seed``: token ids in ``[0, args.vocab)``
    when ``--vocab`` is given, else N(0, 1) values drawn in ``draw_dtype`` and cast to ``dtype``."""
    gen = torch.Generator().manual_seed(args.seed)
    if args.vocab is not None:
        return torch.randint(0, args.vocab, (args.batch, *shape), generator=gen).to(device)
    return torch.randn((args.batch, *shape), generator=gen, dtype=draw_dtype).to(device=device, dtype=dtype)


def check_forward(model: nn.Module, x: torch.Tensor) -> None:
    """Run ``model(x)`` without gradients; a failure is the user's usage error (shape, dtype), in one line."""
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # the user's forward on our input: a usage error (shape, dtype), one line
        raise SignalpropError(
            f"the model's forward failed on an input of shape {tuple(x.shape)} ({x.dtype}): "
            f"{type(exc).__name__}: {first_line(exc)}; check --input-shape, --dtype or --vocab"
        ) from None


def show_report(report: Report, quiet: bool) -> None:
    """Print the findings (``quiet``) or the layer table, then the report's notes on stderr."""
    if quiet:
        print(report.summary())
    else:
        report.table()
        if not report.findings:
            print(report.summary())
    for note in report.meta.get("notes", []):
        print(f"note: {note}", file=sys.stderr)


# ---- TARGET -----------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` (or ``"3x224x224"``) -> ``(3, 224, 224)``: positive integers, batch excluded."""
    parts = [p.strip() for p in str(text).replace("x", ",").replace("X", ",").split(",")]
    if not parts or any(p == "" for p in parts):
        raise SignalpropError(
            f"bad input shape {text!r}: give positive integers separated by commas, without the batch "
            "dimension, e.g. 3,224,224 or 784"
        )
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise SignalpropError(
            f"bad input shape {text!r}: {', '.join(p for p in parts if not p.lstrip('-').isdigit())} is not "
            "an integer; give e.g. 3,224,224"
        ) from None
    if any(s < 1 for s in shape):
        raise SignalpropError(f"bad input shape {text!r}: every size must be at least 1, e.g. 3,224,224")
    return shape


def _split(spec: str) -> tuple[str, str, list[Any], dict[str, Any]]:
    """'where:factory(args)' -> (where, factory name, args, kwargs)."""
    if ":" not in spec or spec.startswith(":") or spec.endswith(":"):
        raise SignalpropError(
            f"bad target {spec!r}: write path/to/file.py:factory or package.module:factory "
            "(e.g. signalprop.models:alexnet)"
        )
    where, _, call = spec.rpartition(":")
    if len(where) == 1 and where.isalpha():  # a Windows drive letter, not a separator: no factory given
        raise SignalpropError(f"bad target {spec!r}: missing ':factory' after the file")
    try:
        node = ast.parse(call.strip(), mode="eval").body
    except SyntaxError:
        raise SignalpropError(
            f"bad factory {call!r} in target {spec!r}: write a name, or a call with literal arguments such "
            "as plain_cnn(depth=30, act='tanh')"
        ) from None
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if isinstance(node, ast.Call):
        func = node.func
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {str(k.arg): ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            raise SignalpropError(
                f"bad factory arguments in {call!r}: only literals (numbers, strings, tuples, lists, dicts, "
                "True/False/None) can be passed from the command line"
            ) from None
        if any(k.arg is None for k in node.keywords):
            raise SignalpropError(f"bad factory arguments in {call!r}: **kwargs cannot be passed; name each one")
        node = func
    if not isinstance(node, ast.Name):
        raise SignalpropError(
            f"bad factory {call!r} in target {spec!r}: the part after ':' must be a plain name (or a call of "
            "one), e.g. alexnet or plain_cnn(depth=30)"
        )
    return where, node.id, args, kwargs


def _import(where: str, spec: str) -> Any:
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise SignalpropError(f"bad target {spec!r}: no such file {where}")
        name = f"_signalprop_target_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise SignalpropError(f"bad target {spec!r}: {where} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.resolve().parent))
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise SignalpropError(f"importing {where} failed: {type(exc).__name__}: {first_line(exc)}") from exc
        finally:
            sys.path.remove(str(path.resolve().parent))
        return module
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        raise SignalpropError(
            f"bad target {spec!r}: no module named {exc.name!r}; give an importable module or a path to a .py file"
        ) from None
    except Exception as exc:
        raise SignalpropError(f"importing {where} failed: {type(exc).__name__}: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_target(spec: str, weights: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` and load ``weights`` (a checkpoint path) into it when given."""
    where, name, args, kwargs = _split(spec)
    module = _import(where, spec)
    if not hasattr(module, name):
        options = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise SignalpropError(
            f"{where} has no factory {name!r}; callables there: {', '.join(options[:15]) or 'none'}"
        )
    obj = getattr(module, name)
    if isinstance(obj, nn.Module):
        if args or kwargs:
            raise SignalpropError(f"{where}:{name} is a model instance, not a factory; drop the arguments")
        model = obj
    elif callable(obj):
        try:
            model = obj(*args, **kwargs)
        except Exception as exc:
            raise SignalpropError(f"calling {name}(...) from {where} failed: {type(exc).__name__}: {first_line(exc)}") from exc
    else:
        raise SignalpropError(f"{where}:{name} is a {type(obj).__name__}, not a model factory or an nn.Module")
    if not isinstance(model, nn.Module):
        raise SignalpropError(
            f"{where}:{name} returned a {type(model).__name__}, not an nn.Module; the factory must build the model"
        )
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load a checkpoint with ``torch.load(weights_only=True)`` into ``model`` (strict key and shape match).

    Keys and shapes are compared before anything is copied, so a checkpoint that does not fit leaves the
    model as it was and the error names the keys that differ.
    """
    p = Path(path)
    if not p.is_file():
        raise SignalpropError(f"no such weights file: {path}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SignalpropError(
            f"cannot read weights from {path} with torch.load(weights_only=True): {first_line(exc)}; save them with "
            "torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(obj, dict):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SignalpropError(
            f"{path} holds no state dict (a dict of tensors, or a checkpoint with one under "
            f"{', '.join(_CHECKPOINT_KEYS)}); save it with torch.save(model.state_dict(), path)"
        )
    problems = state_dict_mismatch(model.state_dict(), obj)
    if problems:
        raise SignalpropError(
            f"the weights in {path} do not fit the model: {problems}; check the factory's arguments"
        )
    try:
        model.load_state_dict(obj, strict=True)
    except RuntimeError as exc:  # keys and shapes fit, so what is left is listed after torch's header line
        details = [line.strip() for line in str(exc).strip().splitlines()[1:] if line.strip()]
        raise SignalpropError(
            f"the weights in {path} do not fit the model: {'; '.join(details[:3]) or first_line(exc)}"
        ) from None


def state_dict_mismatch(model_sd: dict[str, Any], ckpt: dict[str, Any], *, show: int = 3) -> str:
    """Which keys differ between a model's state dict and a checkpoint's, in one line ('' when they fit).

    Missing keys (the model has them, the checkpoint not), unexpected ones (the other way round) and shape
    mismatches, each counted, the first ``show`` of each named: the three ways ``load_state_dict`` fails.
    """

    def listed(names: list[str], what: str) -> str:
        more = f", ... ({len(names) - show} more)" if len(names) > show else ""
        return f"{len(names)} {what} ({', '.join(names[:show])}{more})"

    missing = [k for k in model_sd if k not in ckpt]
    unexpected = [k for k in ckpt if k not in model_sd]
    shapes = [
        f"{k}: checkpoint {tuple(ckpt[k].shape)}, model {tuple(model_sd[k].shape)}"
        for k in model_sd
        if k in ckpt and tuple(ckpt[k].shape) != tuple(model_sd[k].shape)
    ]
    parts = []
    if missing:
        parts.append(listed(missing, "missing"))
    if unexpected:
        parts.append(listed(unexpected, "unexpected"))
    if shapes:
        parts.append(listed(shapes, "shape mismatch" if len(shapes) == 1 else "shape mismatches"))
    return ", ".join(parts)


def output_path(path: str, option: str) -> Path:
    """Check an output file path before the work starts; its missing parent folders are created.

    A folder in the way, a parent that is a file or one the user cannot write raises
    :class:`SignalpropError` (exit status 2) before a long diagnosis, not after it.
    """
    p = Path(path)
    if p.is_dir():
        raise SignalpropError(f"{option} {path!r} is a folder; give a file name, e.g. {p / 'report'}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SignalpropError(f"cannot create the folder of {option} {path!r}: {exc.strerror or exc}") from None
    if not os.access(p.parent, os.W_OK):
        raise SignalpropError(f"cannot write {option} {path!r}: the folder {str(p.parent)!r} is not writable")
    return p


def write_output(path: str, option: str, write: Callable[[str], Any], *, announce: bool = True) -> None:
    """``write(path)`` for an output option, then ``wrote PATH`` (when ``announce``); an OS error (disk
    full, permission) becomes a one-line :class:`SignalpropError`."""
    try:
        write(path)
    except OSError as exc:
        raise SignalpropError(f"cannot write {option} {path!r}: {exc.strerror or first_line(exc)}") from None
    if announce:
        print(f"wrote {path}")
