"""State-dict keys of spectral and weight norm, between torch's old hook API and its parametrizations API.

Pure key renames on a state dict; the tensors are the same in both formats:

=========================  =======================================  ==================================
what                       old hooks (``torch.nn.utils.*``)           parametrizations
=========================  =======================================  ==================================
spectral norm, weight      ``{p}.{n}_orig``                          ``{p}.parametrizations.{n}.original``
spectral norm, u / v       ``{p}.{n}_u`` / ``{p}.{n}_v``             ``{p}.parametrizations.{n}.0._u`` / ``._v``
weight norm, g / v         ``{p}.{n}_g`` / ``{p}.{n}_v``             ``{p}.parametrizations.{n}.original0`` / ``original1``
=========================  =======================================  ==================================

(``{p}`` the module's path, ``{n}`` the parametrized tensor's name, usually ``weight``.)
Old spectral norm is told from old weight norm by ``_orig`` (spectral) or ``_g`` (weight).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping

import torch

from .errors import InputSpecError

FORMATS = ("parametrized", "legacy")
# (old-hook suffix of the tensor's name, key under parametrizations.<name>.)
_SPECTRAL = (("_orig", "original"), ("_u", "0._u"), ("_v", "0._v"))
_WEIGHT = (("_g", "original0"), ("_v", "original1"))
_NEW_SN = re.compile(r"^(?P<p>(?:.*\.)?)parametrizations\.(?P<n>[^.]+)\.(?:original|0\._u|0\._v)$")
_NEW_WN = re.compile(r"^(?P<p>(?:.*\.)?)parametrizations\.(?P<n>[^.]+)\.original[01]$")


def _old_sites(sd: Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(spectral, weight) sites in the old format, each (prefix, name)."""
    spectral, weight = [], []
    for key in sd:
        if key.endswith("_orig"):
            stem = key[: -len("_orig")]
            if stem + "_u" in sd and stem + "_v" in sd:
                spectral.append(_split(stem))
        elif key.endswith("_g"):
            stem = key[: -len("_g")]
            if stem + "_v" in sd:
                weight.append(_split(stem))
    return spectral, weight


def _new_sites(sd: Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    spectral, weight = [], []
    for key in sd:
        if (m := _NEW_SN.match(key)) and key.endswith(".original"):
            base = f"{m['p']}parametrizations.{m['n']}"
            if f"{base}.0._u" in sd and f"{base}.0._v" in sd:
                spectral.append((m["p"], m["n"]))
        elif (m := _NEW_WN.match(key)) and key.endswith(".original0"):
            if f"{m['p']}parametrizations.{m['n']}.original1" in sd:
                weight.append((m["p"], m["n"]))
    return spectral, weight


def _split(stem: str) -> tuple[str, str]:
    prefix, _, name = stem.rpartition(".")
    return (prefix + "." if prefix else ""), name


def detect(sd: Mapping[str, torch.Tensor]) -> str | None:
    """``legacy``, ``parametrized``, or None when the state dict has no spectral/weight-norm keys."""
    if any(_old_sites(sd)):
        return "legacy"
    if any(_new_sites(sd)):
        return "parametrized"
    return None


def convert(sd: Mapping[str, torch.Tensor], to: str) -> tuple[OrderedDict, list[str]]:
    """The state dict with its spectral/weight-norm keys renamed into format ``to``, and what was renamed."""
    if to not in FORMATS:
        raise InputSpecError(f"unknown state-dict format {to!r}", fix=f"use one of {', '.join(FORMATS)}")
    spectral, weight = _old_sites(sd) if to == "parametrized" else _new_sites(sd)
    renames: dict[str, str] = {}
    for sites, table in ((spectral, _SPECTRAL), (weight, _WEIGHT)):
        for p, n in sites:
            for old, new in table:
                legacy_key, new_key = f"{p}{n}{old}", f"{p}parametrizations.{n}.{new}"
                if to == "parametrized":
                    renames[legacy_key] = new_key
                else:
                    renames[new_key] = legacy_key
    out = OrderedDict((renames.get(k, k), v) for k, v in sd.items())
    notes = []
    if spectral:
        notes.append(f"spectral norm: {len(spectral)} layer(s) ({_names(spectral)})")
    if weight:
        notes.append(f"weight norm: {len(weight)} layer(s) ({_names(weight)})")
    return out, notes


def _names(sites: list[tuple[str, str]]) -> str:
    paths = [f"{p}{n}" for p, n in sites]
    return ", ".join(paths[:4]) + (f", and {len(paths) - 4} more" if len(paths) > 4 else "")
