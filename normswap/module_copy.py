"""``copy.deepcopy`` of a module tree, without the generic pickling protocol for each module.

A deep copy of an ``nn.Module`` goes through ``__reduce_ex__`` and a deep copy of
its ``__dict__``: about twenty small dicts per module (hooks, buffers, ...), most
of them empty, each through the generic machinery. That is most of a copy's time
on models of many small layers. Here a module whose class keeps nn.Module's own
pickling gets the same result built directly: a new instance, a new ``__dict__``,
empty dicts made new, plain values shared (as deepcopy shares them), everything
else (tensors, hooks, user attributes) through ``copy.deepcopy`` with the same memo.
Any other class (a custom ``__deepcopy__``, ``__getstate__``, slots, a
parametrized module) is copied by ``copy.deepcopy`` itself.
"""
from __future__ import annotations

import copy
import types
import weakref
from collections import OrderedDict
from typing import Any

import torch.nn as nn

# Values deepcopy returns as they are.
_ATOMIC = frozenset({
    type(None), int, float, bool, complex, bytes, str, type, range, types.BuiltinFunctionType,
    types.FunctionType, weakref.ref, property, type(Ellipsis), type(NotImplemented), types.CodeType,
})
_fast_classes: dict[type, bool] = {}


def _is_fast(cls: type) -> bool:
    known = _fast_classes.get(cls)
    if known is None:
        known = (
            issubclass(cls, nn.Module)
            and getattr(cls, "__deepcopy__", None) is None
            and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is nn.Module.__getstate__
            and not any("__slots__" in vars(c) for c in cls.__mro__[:-1])
        )
        _fast_classes[cls] = known
    return known


def _atomic_tuple(value: tuple) -> bool:
    return all(type(v) in _ATOMIC or (type(v) is tuple and _atomic_tuple(v)) for v in value)


def _copy(value: Any, memo: dict) -> Any:
    kind = type(value)
    if kind in _ATOMIC:
        return value
    found = memo.get(id(value), memo)
    if found is not memo:
        return found
    if kind is tuple and _atomic_tuple(value):
        return value
    if kind is dict or kind is OrderedDict:
        if all(type(k) is str for k in value):  # empty ones too: most of a module's dicts
            new = _memoize(value, kind(), memo)
            for k, v in value.items():
                new[k] = _copy(v, memo)
            return new
    elif (kind is set or kind is list) and not value:
        return _memoize(value, kind(), memo)
    elif isinstance(value, nn.Module) and _is_fast(kind):
        return _copy_module(value, memo)
    return copy.deepcopy(value, memo)


def _memoize(value: Any, new: Any, memo: dict) -> Any:
    """As deepcopy does: ``new`` stands for ``value`` from now on, and ``value`` stays alive while the memo maps
    its id."""
    memo[id(value)] = new
    try:
        memo[id(memo)].append(value)
    except KeyError:
        memo[id(memo)] = [value]
    return new


def _copy_module(module: nn.Module, memo: dict) -> nn.Module:
    cls = type(module)
    new = _memoize(module, cls.__new__(cls), memo)
    state = {}
    for k, v in module.__dict__.items():
        if k != "_compiled_call_impl":  # what nn.Module.__getstate__ leaves out
            state[k] = _copy(v, memo)
    if cls.__setstate__ is nn.Module.__setstate__:
        new.__dict__.update(state)  # what it does for a state that has every attribute
    else:
        new.__setstate__(state)
    return new


def deepcopy_module(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """The same result as ``copy.deepcopy(module, memo)``, faster on plain module trees."""
    memo = {} if memo is None else memo
    return _copy(module, memo)
