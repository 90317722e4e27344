"""Setting a wrapper on a module instance from outside, and taking exactly that wrapper off again.

The engine replaces a block's callable by an instance attribute (``module.forward`` for a child module,
``layer.sa_block`` for a bound method). Other tools do the same: diffusers' hooks (``module._diffusers_hook``,
a ``HookRegistry``, rewrite ``module.forward``), cache-dit, a second engine. Two wrappers on one callable would
cache twice or lose one of them, so ``install`` refuses a module that already carries one, with the name of
the culprit. The one exception is diffusers' leftover after its hooks are removed: the module's own forward,
bound to it and set on the instance; it is wrapped and put back as it was.

``uninstall`` takes off only what ``install`` set. If another tool wrapped the engine's wrapper afterwards, the
other tool's forward stays; within a diffusers hook chain the engine's link is replaced by what it wrapped,
so diffusers keeps working and, when its hooks go, leaves the module as it found it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn

_MARK = "__bac_engine__"


class WrapperConflict(RuntimeError):
    """A callable the engine must wrap is already wrapped by something else (another engine, diffusers hooks,
    cache-dit, a hand-set forward)."""


@dataclass
class Installed:
    obj: object  # the instance whose attribute was set
    name: str  # the attribute: "forward" or a branch method's name
    wrapper: Callable
    previous: Callable | None  # what the instance held before (a diffusers leftover), or None for nothing
    original: Callable  # the callable the wrapper calls


def _is_own_bound(obj, name: str, value) -> bool:
    """``value`` is the class's own ``name`` bound to ``obj`` (diffusers leaves this after removing its hooks)."""
    func = getattr(type(obj), name, None)
    return getattr(value, "__self__", None) is obj and getattr(value, "__func__", None) is func


def check_free(obj, name: str, label: str) -> None:
    """Raise ``WrapperConflict`` if ``obj.<name>`` is already wrapped on the instance (see the module docstring)."""
    registry = getattr(obj, "_diffusers_hook", None) if isinstance(obj, nn.Module) and name == "forward" else None
    if registry is not None and getattr(registry, "hooks", None):
        raise WrapperConflict(f"{label} carries diffusers hooks {list(registry.hooks)}; remove them first "
                              "(model.disable_cache() or HookRegistry.remove_hook) or cache it with one of the two")
    current = vars(obj).get(name) if hasattr(obj, "__dict__") else None
    if current is None or _is_own_bound(obj, name, current):
        return
    if getattr(current, _MARK, None) is not None:
        raise WrapperConflict(f"{label} is already wrapped by another bac engine; detach it first")
    raise WrapperConflict(f"{label}.{name} is already replaced on the instance by {current!r} (another cache or "
                          "hook library: diffusers hooks, cache-dit, ...); remove it before attaching")


def install(obj, name: str, make_wrapper: Callable[[Callable], Callable], owner: object) -> Installed:
    """Set ``obj.<name>`` on the instance to ``make_wrapper(original)``; ``check_free`` must have passed."""
    previous = vars(obj).get(name)
    original = getattr(obj, name)
    wrapper = make_wrapper(original)
    setattr(wrapper, _MARK, owner)
    vars(obj)[name] = wrapper
    return Installed(obj, name, wrapper, previous, original)


def uninstall(entry: Installed) -> bool:
    """Take ``entry``'s wrapper off. Returns False (and warns) where another tool's wrapper around it had to stay
    and the engine's could only be bypassed."""
    obj, name, wrapper = entry.obj, entry.name, entry.wrapper
    state = vars(obj)
    if state.get(name) is wrapper:
        if entry.previous is None:
            del state[name]
        else:
            state[name] = entry.previous
        return True
    restored = entry.previous if entry.previous is not None else entry.original
    registry = getattr(obj, "_diffusers_hook", None)
    for ref in getattr(registry, "_fn_refs", ()):  # a diffusers hook chain built on top of the engine's wrapper
        if ref.forward is wrapper:
            ref.forward = restored
            return True
        if ref.original_forward is wrapper:
            ref.original_forward = restored
            return True
    warnings.warn(f"{type(obj).__name__}.{name} was wrapped again after the cache engine attached "
                  f"({state.get(name)!r}); that wrapper stays and the engine's inside it now only passes calls through",
                  RuntimeWarning, stacklevel=3)
    return False
