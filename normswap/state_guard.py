"""Did a forward write to the model? The modules' attributes and tensor versions, taken before and compared after.

The recorded pass (graph.py) runs with placeholder values where values cost; a
forward that writes to the model (an attention-bias cache) must then be undone
and redone for real. Taken once per fold on every module, so it is kept lean.
"""
from __future__ import annotations

import operator
from itertools import compress, repeat
from typing import Any, Iterable

import torch
import torch.nn as nn

# Module attributes a recording changes on purpose (hooks, train/eval flags) and restores itself.
_OWN_KEYS = frozenset(k for k in nn.Module().__dict__ if k not in ("_parameters", "_buffers", "_modules"))


class _BoxTypes(dict):
    """type -> is it a dict, list or set (subclasses too), memoized; looked up from C by ``map``."""

    def __missing__(self, kind: type) -> bool:
        self[kind] = is_box = issubclass(kind, (dict, list, set))
        return is_box


_is_box = _BoxTypes()
_version_of = operator.attrgetter("_version")
_user_keys_by_layout: dict[tuple, tuple[str, ...]] = {}  # a __dict__'s key order -> its keys not in _OWN_KEYS


def _user_keys(d: dict) -> tuple[str, ...]:
    layout = tuple(d)
    keys = _user_keys_by_layout.get(layout)
    if keys is None:
        keys = _user_keys_by_layout[layout] = tuple(k for k in layout if k not in _OWN_KEYS)
    return keys


def _same_items(box: Any, saved: Any) -> bool:
    """Same length and the same objects, in order (a dict: the same values)."""
    if len(box) != len(saved):
        return False
    if isinstance(box, dict):
        return all(map(operator.is_, box.values(), saved.values()))
    return all(map(operator.is_, box, saved))


class StateGuard:
    """The modules' attributes (one level into dicts, lists and sets) and their tensors' in-place version
    counters, taken before a forward: did the forward change any, and put the attributes back.

    Taken once per fold on every module, so the loops over attributes and tensors run in C (map,
    compress); only modules and containers cost a Python step.
    """

    def __init__(self, modules: Iterable[nn.Module]):
        self.saved = []  # (module, len(__dict__), keys, values, [(container, a shallow copy)])
        held: list = []  # every attribute value and container item: the tensors among them are picked at the end
        for m in modules:
            d = m.__dict__
            keys = _user_keys(d)
            values = tuple(map(d.__getitem__, keys))
            held.extend(values)
            boxes = []
            for v in compress(values, map(_is_box.__getitem__, map(type, values))):
                if isinstance(v, dict):
                    copied = dict(v)
                    held.extend(copied.values())
                else:
                    copied = list(v)
                    held.extend(copied)
                boxes.append((v, copied))
            self.saved.append((m, len(d), keys, values, boxes))
        self.tensors = list(compress(held, map(isinstance, held, repeat(torch.Tensor))))
        self.versions = list(map(_version_of, self.tensors))

    def _changed_modules(self) -> list:
        return [entry for entry in self.saved if not self._unchanged(*entry)]

    @staticmethod
    def _unchanged(m, n, keys, values, boxes) -> bool:
        d = m.__dict__
        return len(d) == n and all(map(operator.is_, map(d.get, keys), values)) \
            and all(_same_items(box, saved) for box, saved in boxes)

    def changed(self) -> bool:
        return bool(self._changed_modules()) or list(map(_version_of, self.tensors)) != self.versions

    def restore(self) -> None:
        """Put the attributes back; in-place writes into tensors cannot be undone (the real pass redoes them)."""
        for m, _, keys, values, boxes in self._changed_modules():
            d = m.__dict__
            for k in [k for k in d if k not in _OWN_KEYS and k not in keys]:
                del d[k]
            d.update(zip(keys, values))
            for box, saved in boxes:
                if not _same_items(box, saved):
                    box.clear()
                    box.update(saved) if isinstance(box, (dict, set)) else box.extend(saved)
