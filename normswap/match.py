"""Selectors: which modules a rule applies to.

Path globs use dots as separators: ``*`` matches one path segment, ``**`` any
number of segments (zero included), ``?`` and ``[abc]`` work inside a segment.
``layer1.*.bn1`` matches ``layer1.0.bn1``; ``layer1.**`` matches everything
below ``layer1``; ``**.bn1`` matches every ``bn1`` at any depth.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch.nn as nn

from .families import channels_of, family_classes, family_of, near_family_of
from .norm_probe import why_unidentified


@functools.lru_cache(maxsize=4096)
def _split(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split(".")) if pattern else ()


def glob_match(pattern: str, path: str) -> bool:
    """True if the dotted module ``path`` matches the dotted glob ``pattern``."""
    return _match(_split(pattern), _split(path))


@functools.lru_cache(maxsize=65536)
def _match(pat: tuple[str, ...], segs: tuple[str, ...]) -> bool:
    if not pat:
        return not segs
    head, rest = pat[0], pat[1:]
    if head == "**":
        return any(_match(rest, segs[i:]) for i in range(len(segs) + 1))
    return bool(segs) and fnmatchcase(segs[0], head) and _match(rest, segs[1:])


@dataclass(frozen=True)
class ChannelRange:
    min: int | None = None
    max: int | None = None
    values: tuple[int, ...] = ()

    def __contains__(self, c: int | None) -> bool:
        if c is None:
            return False
        if self.values and c not in self.values:
            return False
        if self.min is not None and c < self.min:
            return False
        if self.max is not None and c > self.max:
            return False
        return True


@dataclass(frozen=True)
class Selector:
    """A validated ``match:`` block. Every given criterion must hold."""

    families: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    channels: ChannelRange | None = None
    include_subclasses: bool = False

    def type_matches(self, module: nn.Module) -> bool:
        """Family/type criteria only (no paths): does the class qualify?"""
        if not self.families and not self.types:
            return True
        cls = type(module)
        if self.types and _type_name_matches(cls, self.types, self.include_subclasses):
            return True
        if self.families:
            fam = family_of(module)
            if fam in self.families:
                return True
            if self.include_subclasses:
                bases = tuple(c for f in self.families for c in family_classes()[f])
                if isinstance(module, bases):
                    return True
        return False

    def near_miss(self, module: nn.Module) -> str | None:
        """Why a module that looks like the family was not taken, or None."""
        if self.include_subclasses or not self.families:
            return None
        fam = near_family_of(module)
        if fam == "unidentified_norm" and {"layernorm", "rmsnorm"} & set(self.families):
            return why_unidentified(module)
        if fam in self.families:
            return (
                f"{type(module).__module__}.{type(module).__qualname__} subclasses a {fam} class "
                f"but is not one of its known classes; add 'include_subclasses: true' to the match to take it"
            )
        return None

    def path_matches(self, paths: list[str]) -> bool:
        """Any of a module's paths (aliases included) is selected and none is excluded."""
        if any(glob_match(x, p) for x in self.exclude for p in paths):
            return False
        if not self.paths:
            return True
        return any(glob_match(g, p) for g in self.paths for p in paths)

    def matches(self, module: nn.Module, paths: list[str]) -> bool:
        if not self.type_matches(module) or not self.path_matches(paths):
            return False
        if self.channels is not None and channels_of(module) not in self.channels:
            return False
        return True


def _type_name_matches(cls: type, names: tuple[str, ...], include_subclasses: bool) -> bool:
    candidates = cls.__mro__ if include_subclasses else (cls,)
    for c in candidates:
        if c.__name__ in names or f"{c.__module__}.{c.__qualname__}" in names:
            return True
    return False
