"""Leave the user's model as signalprop found it: one definition for every stage, safe beside other threads.

measure, diagnose, predict, graph capture and the fix planner run the user's model (or read weights whose
parametrization runs code), and a read-only call must leave nothing changed, also when the model raises
half-way. Inside ``with preserved(model) as state:`` each part of the model's state is kept this way:

- **parameter and buffer values**: copy on write. While the block is open, a ``TorchDispatchMode`` (thread
  local) sees every op this thread runs; right before an op writes the storage of a parameter or buffer
  (BatchNorm's running statistics and ``num_batches_tracked`` in train mode, spectral norm's ``_u``/``_v``,
  a forward that writes its own weights), that tensor is cloned. :meth:`ModelState.restore` copies the
  clone back in place (``copy_``: same tensor object, same storage, views keep aliasing it) where its bits
  differ (a bitwise comparison: a NaN equals itself). Only what this thread wrote is put back: another
  thread's optimizer step or BatchNorm update is never undone, and nothing is copied that was not written
  (no copy of the model up front);
- **tensor identity**: a parameter or buffer whose storage, shape or strides were replaced (``t.data = ...``,
  ``set_``, ``resize_``) gets its own storage back; entries of ``_parameters`` / ``_buffers`` that a
  forward reassigned, added or removed are put back;
- **random numbers**: every random op this thread runs in the block (dropout's masks, ``torch.randn``)
  draws from a generator of the block's own, seeded per run (:meth:`ModelState.run`), never from torch's
  global generators, so the global RNG streams are neither consumed nor rewound, and a measurement repeats
  exactly. An op that takes no generator (none in torch itself today) is run on the global generator of its
  device, reseeded from the block's generator and restored, under a lock;
- **train/eval modes**: changed only by :func:`eval_mode`, which gives back exactly the flags it changed;
- **gradients, requires_grad, hooks**: signalprop differentiates with ``torch.autograd.grad`` towards
  chosen tensors (no ``.grad`` is written, no ``requires_grad`` flag of a parameter changed), and removes
  the hooks it registers by their handles (:class:`signalprop._hooks.HookSet`); nothing of these is saved,
  so nothing another thread sets is ever overwritten.

Blocks nest: a stage that opens ``preserved(model)`` inside another stage's block on the same model and
thread joins that block's snapshot (one snapshot per :func:`signalprop.diagnose` call) and restores on exit.

What this makes safe between threads (the guide, docs/measure.md, says the same): measuring, diagnosing,
predicting or capturing different models at once; and any of them on a model that another thread trains,
except a model in train mode whose forward updates buffers (BatchNorm, spectral norm): the measurement
writes those buffers and puts them back, which can undo an update the other thread makes in between:
measure such a model in eval mode, or on the thread that trains it. Not safe: the fixes (``lsuv_``,
``auto_init_``) change weights and switch the model to eval mode for their passes; never run them while
another thread uses the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _disable_current_modes,
    _get_current_dispatch_mode_stack,
)

from ._hooks import internal_run, is_real

__all__ = ["ModelState", "eval_mode", "forked_rng", "preserved", "preserving", "same_bits", "untracked"]

P = ParamSpec("P")
R = TypeVar("R")

_SEEDED = torch.Tag.nondeterministic_seeded
_SEED_MIX = 0x2545F4914F6CDD1D  # a run's generator is seeded with seed ^ this: apart from a cotangent seeded `seed`
_GLOBAL_RNG_LOCK = threading.Lock()
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` hold the same bits (so NaN equals NaN, and -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    try:
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        if a.is_floating_point():
            kind = _INT_OF_SIZE[a.element_size()]
            a, b = a.view(kind), b.view(kind)
        return bool(torch.equal(a, b))
    except (RuntimeError, KeyError, NotImplementedError):  # a subclass without views: compare as values
        return bool(torch.equal(a, b))


def _storage_key(t: torch.Tensor) -> Any:
    """What identifies ``t``'s memory: device and storage address (views share it); ``t``'s id for tensors
    without storage (subclasses such as DTensor); None for storage that holds nothing (meta, empty)."""
    if type(t) not in (torch.Tensor, nn.Parameter):
        return ("id", id(t))
    if t.is_meta:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return ("id", id(t))
    return (t.device.type, t.device.index, ptr) if ptr else None


# ---- the ops the mode acts on -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Op:
    writes: tuple[tuple[int, str], ...]  # (position, name) of every argument the op writes
    rng: str  # "": not random; "kw": takes generator=; "alt": an overload does; "dropout"; "global"
    gen_pos: int = -1  # position of the generator argument ("kw")
    alt: Any = None


_OPS: dict[Any, _Op] = {}

# Ops that write arguments their schema does not mark as written: the batch-norm kernels update the running
# statistics they are given in training.
_UNMARKED_WRITES = {
    "aten::native_batch_norm": ("running_mean", "running_var"),
    "aten::cudnn_batch_norm": ("running_mean", "running_var"),
    "aten::miopen_batch_norm": ("running_mean", "running_var"),
}


def _generator_overload(func: Any) -> Any:
    """The overload of ``func``'s op that takes the same arguments plus a keyword-only ``generator``."""
    names = [a.name for a in func._schema.arguments]
    packet = func.overloadpacket
    for name in packet.overloads():
        alt = getattr(packet, name)
        args = alt._schema.arguments
        if [a.name for a in args if a.name != "generator"] == names and any(
            a.name == "generator" and a.kwarg_only for a in args
        ):
            return alt
    return None


def _op(func: Any) -> _Op:
    info = _OPS.get(func)
    if info is not None:
        return info
    args = func._schema.arguments
    unmarked = _UNMARKED_WRITES.get(func._schema.name, ())
    writes = tuple(
        (i, a.name)
        for i, a in enumerate(args)
        if (a.alias_info is not None and a.alias_info.is_write) or a.name in unmarked
    )
    rng, gen_pos, alt = "", -1, None
    if _SEEDED in func.tags:
        gen_pos = next((i for i, a in enumerate(args) if a.name == "generator"), -1)
        if gen_pos >= 0:
            rng = "kw"
        elif func is torch.ops.aten.native_dropout.default:
            rng = "dropout"
        else:
            alt = _generator_overload(func)
            rng = "alt" if alt is not None else "global"
    info = _Op(writes, rng, gen_pos, alt)
    _OPS[func] = info
    return info


def _op_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    """The device a random op draws on: its first tensor argument's, else its ``device=``; None for fake
    and meta tensors (nothing to draw)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device if is_real(a) else None
        if isinstance(a, list | tuple) and a and isinstance(a[0], torch.Tensor):
            return a[0].device if is_real(a[0]) else None
    dev = kwargs.get("device")
    dev = torch.device(dev) if dev is not None else torch.device("cpu")
    return None if dev.type == "meta" else dev


class _Tracker(TorchDispatchMode):
    """Copy a parameter or buffer before this thread first writes it; draw random numbers privately."""

    def __init__(self, state: ModelState) -> None:
        super().__init__()
        self.state = state
        self.seed = 0
        self.gens: dict[torch.device, torch.Generator | None] = {}

    def reseed(self, seed: int) -> None:
        self.seed = (int(seed) ^ _SEED_MIX) % (1 << 63)
        self.gens.clear()

    def gen(self, dev: torch.device) -> torch.Generator | None:
        if dev not in self.gens:
            try:
                self.gens[dev] = torch.Generator(device=dev).manual_seed(self.seed)
            except RuntimeError:  # a device type without its own generators
                self.gens[dev] = None
        return self.gens[dev]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        info = _OPS.get(func) or _op(func)
        if info.writes and not self.state.restoring:
            for pos, name in info.writes:
                v = args[pos] if pos < len(args) else kwargs.get(name)
                for t in v if isinstance(v, list | tuple) else (v,):
                    if isinstance(t, torch.Tensor):
                        self.state.before_write(t)
        if info.rng:
            dev = _op_device(args, kwargs)
            g = self.gen(dev) if dev is not None else None
            if g is not None:
                return self._draw(func, info, args, kwargs, g)
        return func(*args, **kwargs)

    def _draw(self, func: Any, info: _Op, args: Any, kwargs: dict[str, Any], g: torch.Generator) -> Any:
        if info.rng == "kw":
            if info.gen_pos < len(args):
                if args[info.gen_pos] is None:
                    args = (*args[: info.gen_pos], g, *args[info.gen_pos + 1 :])
            elif kwargs.get("generator") is None:
                kwargs = {**kwargs, "generator": g}
            return func(*args, **kwargs)
        if info.rng == "alt":
            return info.alt(*args, **kwargs, generator=g)
        if info.rng == "dropout":
            return _native_dropout(args, kwargs, g)
        return _on_global_generator(func, args, kwargs, g)


def _native_dropout(args: Any, kwargs: dict[str, Any], g: torch.Generator) -> Any:
    """``aten.native_dropout`` (the fused kernel of CUDA and other accelerators, which takes no generator):
    the same (output, mask) pair, its mask drawn from ``g``."""
    x, p = args[0], float(args[1])
    train = args[2] if len(args) > 2 else kwargs.get("train")
    if train is False or x.numel() == 0:
        return torch.ops.aten.native_dropout.default(*args, **kwargs)
    keep = 1.0 - p
    mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(keep, generator=g)
    return x * mask * (1.0 / keep if keep > 0 else 0.0), mask


def _on_global_generator(func: Any, args: Any, kwargs: dict[str, Any], g: torch.Generator) -> Any:
    """Run a random op that takes no generator on its device's global generator, seeded from ``g`` and put
    back after (under a lock: another signalprop thread waits; a thread outside signalprop drawing on the
    same device in that instant would see the reseeded stream)."""
    dev = g.device
    if dev.type == "cpu":
        glob: torch.Generator | None = torch.default_generator
    elif dev.type == "cuda":
        glob = torch.cuda.default_generators[dev.index if dev.index is not None else torch.cuda.current_device()]
    else:
        glob = None
    if glob is None:
        return func(*args, **kwargs)
    seed = int(torch.randint(0, 1 << 62, (), generator=g, device=dev))
    with _GLOBAL_RNG_LOCK:
        saved = glob.get_state()
        glob.manual_seed(seed)
        try:
            return func(*args, **kwargs)
        finally:
            glob.set_state(saved)


# ---- the snapshot ---------------------------------------------------------------------------------------------
class ModelState:
    """What :func:`preserved` keeps of one model (see the module docstring): references, not copies.

    ``restores`` counts :meth:`restore` calls; ``copies`` the tensors cloned before a write.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.restoring = False
        self.restores = 0
        self.copies = 0
        self._dicts = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
        seen: set[int] = set()
        self._tensors: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, an alias of its storage)
        self._owners: dict[Any, list[torch.Tensor]] = {}
        for _, params, bufs in self._dicts:
            for t in (*params.values(), *bufs.values()):
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                self._tensors.append((t, t.detach()))
                key = _storage_key(t)
                if key is not None:
                    self._owners.setdefault(key, []).append(t)
        self._saved: dict[Any, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._mode = _Tracker(self)

    def before_write(self, t: torch.Tensor) -> None:
        """Clone the parameters and buffers that share ``t``'s storage, once, before it is first written."""
        key = _storage_key(t)
        if key is None or key in self._saved:
            return
        owners = self._owners.get(key)
        if owners is not None:
            self._saved[key] = [(o, o.detach().clone()) for o in owners]
            self.copies += len(owners)

    @contextlib.contextmanager
    def run(self, *, seed: int = 0, eval: bool = False, private_weights: bool = False) -> Iterator[None]:
        """One forward (and backward) that signalprop runs itself: marked as internal
        (:func:`signalprop._hooks.internal_run`), its random numbers from a fresh generator seeded with
        ``seed`` (so repeated runs draw the same dropout masks), in eval mode with ``eval=True``.

        ``private_weights=True`` hands every torch function a copy of each parameter and buffer it reads,
        taken at first use (:class:`_PrivateWeights`): a pass that another thread's optimizer steps would
        otherwise break (autograd refuses a backward through weights written since the forward) sees one
        consistent set of weights, and its own writes (BatchNorm statistics) go to the copies. Costs one
        copy of the model's tensors for the run.
        """
        self._mode.reseed(seed)
        private = _PrivateWeights(self._tensors) if private_weights else contextlib.nullcontext()
        with internal_run(), eval_mode(self.model) if eval else contextlib.nullcontext(), private:
            yield

    def restore(self) -> None:
        """Put back what this thread changed since the snapshot (values in place, where their bits differ)."""
        self.restores += 1
        self.restoring = True
        try:
            for m, params, bufs in self._dicts:
                _put_back(m._parameters, params)
                _put_back(m._buffers, bufs)
            with torch.no_grad():
                for t, alias in self._tensors:
                    if _moved(t, alias):
                        t.data = alias
                for items in self._saved.values():
                    for t, saved in items:
                        if not same_bits(t, saved):
                            t.copy_(saved)
        finally:
            self.restoring = False


class _PrivateWeights(TorchFunctionMode):
    """Give torch functions a private copy of the model's parameters and buffers, copied at first use.

    A torch function mode sits above autograd, so the graph records the copies: the backward uses the values
    the forward used, whatever another thread writes into the model meanwhile. Thread-local, like the
    dispatch mode: the other thread keeps using the model's own tensors.
    """

    def __init__(self, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.originals = {id(t): t for t, _ in tensors}
        self.copies: dict[int, torch.Tensor] = {}

    def _swap(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in self.originals:
                return obj
            copy = self.copies.get(id(obj))
            if copy is None:
                copy = obj.detach().clone().requires_grad_(obj.requires_grad)
                self.copies[id(obj)] = copy
            return copy
        if type(obj) in (list, tuple):
            return type(obj)(self._swap(o) for o in obj)
        if type(obj) is dict:
            return {k: self._swap(v) for k, v in obj.items()}
        return obj

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*self._swap(tuple(args)), **self._swap(dict(kwargs or {})))


def _put_back(d: dict[str, Any], saved: dict[str, Any]) -> None:
    if len(d) != len(saved) or any(d.get(k, d) is not v for k, v in saved.items()):
        d.clear()
        d.update(saved)


def _moved(t: torch.Tensor, alias: torch.Tensor) -> bool:
    """True when ``t`` no longer sits where ``alias`` (taken at the snapshot) does."""
    try:
        return t.data_ptr() != alias.data_ptr() or t.shape != alias.shape or t.stride() != alias.stride()
    except (RuntimeError, NotImplementedError):  # no storage to compare (meta, subclasses)
        return False


_ACTIVE: contextvars.ContextVar[tuple[ModelState, ...]] = contextvars.ContextVar("signalprop_state", default=())


def preserving(fn: Callable[Concatenate[nn.Module, P], R]) -> Callable[Concatenate[nn.Module, P], R]:
    """Decorate a function of a model (its first argument) to run inside :func:`preserved`: one snapshot
    for everything it calls (a stage's inner blocks join it)."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if not isinstance(model, nn.Module):  # the function's own check says what is wrong
            return fn(model, *args, **kwargs)
        with preserved(model):
            return fn(model, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[ModelState]:
    """Put back on exit everything this thread changes about ``model`` inside the block, also on an error.

    Parameter and buffer values (copy on write), tensor identity and the ``_parameters``/``_buffers``
    entries are restored, random ops draw from the block's own generator (see the module docstring).
    Inside another ``preserved`` block of the same model on this thread, the block joins that snapshot and
    restores on exit.

    Args:
        model: The model to keep as found.

    Yields:
        The :class:`ModelState` of the block (``state.run(...)`` marks the forwards signalprop runs).

    Examples:
        A BatchNorm in train mode updates its running mean in a forward; the block puts it back:

        >>> bn = nn.BatchNorm1d(3)
        >>> with preserved(bn):
        ...     _ = bn(torch.full((4, 3), 5.0))
        ...     inside = bn.running_mean.tolist()
        >>> inside, bn.running_mean.tolist()
        ([0.5, 0.5, 0.5], [0.0, 0.0, 0.0])
    """
    for st in _ACTIVE.get():
        if st.model is model:
            try:
                yield st
            finally:
                st.restore()
            return
    st = ModelState(model)
    token = _ACTIVE.set((*_ACTIVE.get(), st))
    try:
        with st._mode:
            yield st
    finally:
        _ACTIVE.reset(token)
        st.restore()


@contextlib.contextmanager
def untracked() -> Iterator[contextlib.AbstractContextManager[Any]]:
    """Run the block outside this thread's :func:`preserved` dispatch mode (a no-op outside ``preserved``).

    Inside :func:`preserved` every op of this thread goes through the tracker's Python dispatch (about
    20 us an op). Two kinds of work write no model state and must not pay that: a collective (its tensors
    must not pass through Python on the way), and predict's moment arithmetic, thousands of ops on tiny
    tensors of its own. Never read a model's attribute inside the block: a parametrization's code (spectral
    norm's ``u``, ``v``) would write unseen. The block gets a context manager that puts the tracker back
    for a nested stretch that does touch the model.

    Example:
        >>> import torch
        >>> with untracked() as tracked:
        ...     with tracked:
        ...         pass
        ...     float(torch.ones(3).sum())
        3.0
    """
    trackers = [m for m in _get_current_dispatch_mode_stack() if isinstance(m, _Tracker)]
    if not trackers:
        yield contextlib.nullcontext()
        return
    with _disable_current_modes():
        yield trackers[-1]


# ---- modes and the global RNG -----------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the block (``model.eval()``); afterwards each module whose flag
    that changed gets its own flag back, and only those.

    Eval mode makes a forward deterministic (dropout off) and read-only on buffers (BatchNorm uses and does
    not update its running statistics). Flags are kept per module because a model may hold a mix (a frozen
    BatchNorm in eval inside a model in training).
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            if m.training != training:
                m.training = training


@contextlib.contextmanager
def forked_rng(model: nn.Module) -> Iterator[None]:
    """A block that draws from torch's global generators on purpose (LSUV's orthogonal matrices, seeded by
    the caller with ``torch.manual_seed``) and gives their states back afterwards: the CPU one and that of
    the model's GPU. Process-wide: another thread drawing meanwhile shares these streams."""
    dev = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
