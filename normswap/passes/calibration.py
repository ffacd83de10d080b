"""Calibrated swaps: fit each new normalization layer's affine so the swapped model starts where the original was.

A BN → GN/LN/IN swap carries γ/β, but the new layer normalizes over another set,
so each channel comes out at another scale. Calibration fixes the per-channel
affine of each new layer, in execution order, on a few batches, with every
layer upstream already swapped and calibrated (``lockstep.Lockstep``: all
batches stop at each new layer, which is fitted on all of them before any goes
on). Only the new layers' weight and bias change.

The original network runs beside the candidate, on the same batches, in the
same lockstep, so at each swapped layer every sample's original BN output z
(before any activation) is paired with the new layer's normalized input n (no
affine). Fits (``fit=``), per channel:

- ``least_squares`` (default): γ, β minimizing ‖γ·n + β − z‖² over the data:
  the best per-channel affine map to the original network's output at that
  point, absorbing the drift of every swap upstream.
- ``moments``: the mean and standard deviation of γ·n + β matched to those of z.

Measured in ``docs/calibration.md``: least squares keeps more of the function.

Under torch.distributed each process passes its own shard of the batches: the
sums of every fit and the held-back figures are gathered and pooled in rank
order (``processes.py``), so every process fits the same bits and reports the
same figures.
"""
from __future__ import annotations

import copy
import functools
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..devices import to_device
from ..errors import InputSpecError, NormswapError
from ..families import family_of
from ..fold_math import bn_affine
from ..inputs import model_dtype_device
from ..verify.metrics import channel_affine, cosine, looks_like_logits, top1_matches
from .lockstep import Lockstep
from .processes import gathered, summed

FITS = ("least_squares", "moments")
GROUP_TOLERANCE = 0.002  # calibration_groups="auto": own error within this of the best count's (see docs)
SMALL_GROUP = 3  # channels per group at or below which a GroupNorm is close to InstanceNorm


@dataclass
class CalibrationReport:
    fit: str
    batches: int  # over every process, held-back ones included
    held_back: int  # over every process: each holds back the last eighth of its own batches
    samples: int = 0  # in all the batches, over every process
    world_size: int = 1
    layers: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    fidelity: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    group_tolerance: float | None = None  # set when calibration chose the group counts

    def to_json(self) -> dict:
        return {"fit": self.fit, "batches": self.batches, "held_back": self.held_back, "samples": self.samples,
                "world_size": self.world_size, "layers": self.layers,
                "skipped": self.skipped, "fidelity": self.fidelity, "notes": self.notes,
                "group_tolerance": self.group_tolerance}

    def lines(self) -> list[str]:
        head = (f"calibration ({self.fit}): {len(self.layers)} layer(s) fitted on {self.batches - self.held_back} "
                f"batch(es), {self.held_back} held back, {self.samples} sample(s) in all")
        if self.world_size > 1:
            head += f", {self.world_size} processes (each holds back the last eighth of its own batches)"
        out = [head]
        if self.layers:
            before = statistics.median_high(r["error_before"] for r in self.layers)
            after = statistics.median_high(r["error_after"] for r in self.layers)
            out.append(f"  layer output error vs the original BN (median): {before:.3g} -> {after:.3g}")
        chosen = [r for r in self.layers if "groups_built" in r]
        if chosen:
            fewer = [r for r in chosen if r["groups"] < r["groups_built"]]
            text = (f"  group counts chosen (own error within {self.group_tolerance:g} of the best count's): "
                    f"{len(fewer)} of {len(chosen)} GroupNorm layer(s) took fewer groups than the recipe built")
            if fewer:
                text += f", e.g. {fewer[0]['path']} {fewer[0]['groups_built']} -> {fewer[0]['groups']}"
            out.append(text)
        f = self.fidelity
        if f:
            text = f"  held-back fidelity: cosine {f['cosine_before']:.4f} -> {f['cosine_after']:.4f}"
            if f.get("top1_after") is not None:
                text += f", top-1 agreement {f['top1_before']:.3f} -> {f['top1_after']:.3f}"
            out.append(text)
        out += [f"  warning: {r['path']}: {r['warning']}" for r in self.layers if r.get("warning")]
        out += [f"  not calibrated: {s['path']}: {s['reason']}" for s in self.skipped]
        out += [f"  note: {n}" for n in self.notes]
        return out


def normalizer(module: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], int] | None:
    """(the layer's normalization without its affine, the channel axis), or None if not calibratable."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or getattr(module, "bias", None) is None:
        return None
    fam, name, eps = family_of(module), type(module).__name__, float(getattr(module, "eps", 1e-5))
    if fam == "groupnorm":
        return (lambda x: F.group_norm(x, module.num_groups, None, None, eps)), 1
    if fam == "layernorm" and name in ("LayerNorm2d", "LayerNormAct2d"):
        shape = tuple(module.normalized_shape)
        return (lambda x: F.layer_norm(x.permute(0, 2, 3, 1), shape, None, None, eps).permute(0, 3, 1, 2)), 1
    if fam == "layernorm" and len(module.normalized_shape) == 1:
        shape = tuple(module.normalized_shape)
        return (lambda x: F.layer_norm(x, shape, None, None, eps)), -1
    if fam == "instancenorm" and not module.track_running_stats:
        return (lambda x: F.instance_norm(x, eps=eps)), 1
    return None


def _bn_function(old: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The original BN's eval-mode affine (before any activation it carried), or None without running stats."""
    if getattr(old, "running_mean", None) is None:
        return None
    s, t = bn_affine(old.running_mean, old.running_var, getattr(old, "weight", None), getattr(old, "bias", None),
                     float(old.eps))
    return lambda x: channel_affine(x, s, t, 1)


def _sums(n: torch.Tensor, z: torch.Tensor | None, axis: int) -> torch.Tensor:
    """Per-channel [count, Σn, Σn², Σz, Σz², Σnz] (rows), float64, from one batch."""
    axis = axis % n.ndim
    dims = [d for d in range(n.ndim) if d != axis]  # reduce in place: no transposed copies
    if n.dtype in (torch.float16, torch.bfloat16):  # sums of squares overflow float16
        n, z = n.float(), (z.float() if z is not None else None)
    count = n.numel() // n.shape[axis]
    rows = [torch.full((n.shape[axis],), float(count), dtype=torch.float64, device=n.device),
            n.sum(dims).double(), (n * n).sum(dims).double()]
    if z is not None:
        rows += [z.sum(dims).double(), (z * z).sum(dims).double(), (n * z).sum(dims).double()]
    return torch.stack(rows)


def _fit(s: torch.Tensor, target: torch.Tensor, fit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ, β) per channel from the paired sums ``s`` and the target's [count, Σz, Σz²]."""
    count = s[0].clamp_min(1)
    m_n, v_n = s[1] / count, (s[2] / count - (s[1] / count).square()).clamp_min(0)
    if fit == "least_squares":
        m_z = s[3] / count
        cov = s[5] / count - m_n * m_z
        gamma = torch.where(v_n > 1e-12, cov / v_n.clamp_min(1e-12), torch.zeros_like(cov))
        return gamma, m_z - gamma * m_n
    tc = target[0].clamp_min(1)
    m_z, v_z = target[1] / tc, (target[2] / tc - (target[1] / tc).square()).clamp_min(0)
    gamma = torch.where(v_n > 1e-12, (v_z / v_n.clamp_min(1e-12)).sqrt(), torch.zeros_like(v_z))
    return gamma, m_z - gamma * m_n


def _channel_moments(x: torch.Tensor, z: torch.Tensor,
                     sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel (mean, variance, Σ(x − mean)·z) of x and z reshaped (N, C, L), float64, by plain
    sums (``sz``: z's per-sample, per-channel Σz).

    ``var_mean`` is ~40x slower than a sum on CPU here, so the variance is Σx²/L − mean²
    (float32 sums, float64 arithmetic); where that loses digits (mean² > 1e3 · variance)
    all three are recomputed in float64 for just those channels.
    """
    size = x.shape[2]
    mean = x.sum(2).double() / size
    var = (torch.linalg.vector_norm(x, dim=2).double().square() / size - mean.square()).clamp_min(0)
    cxz = (x * z).sum(2).double() - mean * sz
    bad = mean.square() > 1e3 * var
    if bad.any():
        xb = x[bad].double()
        mean[bad], var[bad] = xb.mean(1), xb.var(dim=1, correction=0)
        cxz[bad] = ((xb - mean[bad].unsqueeze(1)) * z[bad].double()).sum(1)
    return mean, var, cxz


def _group_sums(x: torch.Tensor, z: torch.Tensor, counts: list[int], eps: float,
                z_sums: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """[K, 6, C]: for each group count, the rows ``_sums`` gives for GroupNorm(count)(x) (no affine) against z.

    From per-sample, per-channel moments of x and sums of z and x·z, taken once:
    a group's mean and variance follow from its channels' (the variance as the
    mean within-channel variance plus the spread of the channel means), so each
    candidate count costs O(N·C), not another pass over the layer's output.
    ``z_sums``: z's per-sample, per-channel (Σz, Σz²), when already taken.
    """
    b, c = x.shape[:2]
    x, z = x.reshape(b, c, -1), z.reshape(b, c, -1)
    if x.dtype in (torch.float16, torch.bfloat16):  # sums of squares overflow float16
        x, z = x.float(), z.float()
    size = x.shape[2]
    sz, szz = z_sums if z_sums is not None else _z_sums(z)
    mean, var, cxz = _channel_moments(x, z, sz)
    count = torch.full((c,), float(b * size), dtype=torch.float64, device=x.device)
    rows = []
    for g in counts:
        m = mean.view(b, g, c // g)
        mu = m.mean(2, keepdim=True)
        inv = ((var.view(b, g, c // g) + (m - mu).square()).mean(2, keepdim=True) + eps).rsqrt()
        dm, inv = (m - mu).reshape(b, c), inv.expand_as(m).reshape(b, c)
        rows.append(torch.stack([count, (size * dm * inv).sum(0), (size * (var + dm.square()) * inv.square()).sum(0),
                                 sz.sum(0), szz.sum(0), ((cxz + dm * sz) * inv).sum(0)]))
    return torch.stack(rows)


def _z_sums(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel (Σz, Σz²) of z, float64 (z: (N, C, ...))."""
    z = z.reshape(z.shape[0], z.shape[1], -1)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return z.sum(2).double(), torch.linalg.vector_norm(z, dim=2).double().square()


def _error(s: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> float:
    """‖γ·n + β − z‖ / ‖z‖ over all channels, from the paired sums (z: the original network's BN output)."""
    count, sn, snn, sz, szz, snz = s
    err = gamma.square() * snn + 2 * gamma * beta * sn + beta.square() * count - 2 * gamma * snz - 2 * beta * sz + szz
    return (err.clamp_min(0).sum() / szz.sum().clamp_min(1e-300)).sqrt().item()


def _outputs(model: nn.Module, batches: list[tuple]) -> list[torch.Tensor]:
    """The first output tensor for each batch, in float64 (what the fidelity figures compare)."""
    from ..verify.check import _leaves

    with torch.no_grad():
        return [_leaves(model(*b))[0][0].detach().double() for b in batches]


def _fidelity(reference: list[torch.Tensor], before: list[torch.Tensor], after: list[torch.Tensor],
              group) -> dict:
    """Cosine (the lowest of any held-back batch) and top-1 agreement (hits over samples, for logits) before and
    after, over every process's held-back batches: what one process holding them all back would report."""
    logits = all(looks_like_logits(r) for r in reference)
    mine = [len(reference), float(logits)]
    for candidate in (before, after):  # per process: [lowest cosine, top-1 hits, samples compared]
        hits = [top1_matches(r, c) for r, c in zip(reference, candidate)] if logits else []
        mine += [min((cosine(r, c) for r, c in zip(reference, candidate)), default=math.inf),
                 sum(h for h, _ in hits), sum(n for _, n in hits)]
    rows = torch.stack(gathered(torch.tensor(mine, dtype=torch.float64), group))
    rows = rows[rows[:, 0] > 0]  # the processes that held some back (at least one did, or this is not called)
    top1 = bool((rows[:, 1] > 0).all())
    return {"cosine_before": rows[:, 2].min().item(), "cosine_after": rows[:, 5].min().item(),
            "top1_before": rows[:, 3].sum().item() / rows[:, 4].sum().item() if top1 else None,
            "top1_after": rows[:, 6].sum().item() / rows[:, 7].sum().item() if top1 else None}


def swaps_to_calibrate(plan, have_data: bool) -> dict[str, nn.Module]:
    """path -> original layer for each change a calibration covers: rules with ``calibrate: true``, or every
    BatchNorm swap when data is given (``calibrate: false`` opts a rule out)."""
    swaps, asking = {}, []
    for ch in plan.changes:
        wanted = ch.rule.calibrate if ch.rule.calibrate is not None else have_data
        if ch.rule.calibrate:
            asking.append(ch.rule.label())
        if wanted and family_of(ch.old) in ("batchnorm", "frozen_batchnorm"):
            swaps[ch.path] = ch.old
    if asking and not have_data:
        raise InputSpecError(f"recipe '{plan.recipe.name}' {asking[0]} asks for calibration, but no calibration "
                             "data was given", fix="pass calibration=batches (CLI: --calibrate-data DIR or "
                                                   "--calibrate-tensors FILE)")
    return swaps


def group_candidates(plan, swaps: dict[str, nn.Module], mode: str | float = "keep") -> tuple[dict[str, list[int]], float]:
    """(path -> the group counts calibration may choose from, most groups first; the tolerance).

    ``mode``: ``"keep"``: no choice, each layer keeps the count the rule built.
    ``"auto"`` or a number (the tolerance; ``"auto"`` is ``GROUP_TOLERANCE``):
    every count that divides the channels, keeps the rule's ``min_group_size``
    and is at most the count the rule built; a count set by ``groups_by_path``
    is kept. The most groups whose own fitted error is within the tolerance of
    the best count's is taken (``_choose_groups``).
    """
    from ..catalog.grouping import valid_group_counts
    from ..match import glob_match
    from ..registry import normalise

    if mode == "keep":  # every count is still measured (same pass), to say when "auto" would keep clearly more
        tolerance = None
    elif mode == "auto":
        tolerance = GROUP_TOLERANCE
    elif isinstance(mode, (int, float)) and not isinstance(mode, bool) and math.isfinite(mode) and mode >= 0:
        tolerance = float(mode)
    else:
        raise InputSpecError(f"unknown calibration group mode {mode!r}",
                             fix="use 'keep', 'auto' or a tolerance >= 0 (e.g. 0.005)")
    options = plan.recipe.resolved_options()
    out = {}
    for ch in plan.changes:
        if ch.path not in swaps or normalise(ch.rule.replace) != normalise("group_norm"):
            continue
        opts = options[next(i for i, r in enumerate(plan.recipe.rules) if r is ch.rule)]
        built, channels = ch.new.num_groups, ch.new.num_channels
        if any(glob_match(g, p) for g in opts.get("groups_by_path") or {} for p in [ch.path, *ch.aliases]):
            out[ch.path] = [built]
            continue
        out[ch.path] = sorted((g for g in valid_group_counts(channels, opts["min_group_size"]) if g <= built),
                              reverse=True) or [built]
    return out, tolerance


def _advice(report: CalibrationReport) -> None:
    """With the recipe's counts kept: say so when the counts ``auto`` would take fit clearly better."""
    rows = [r for r in report.layers if "auto_groups" in r]
    if not rows or not any(r["auto_groups"] < r["groups"] for r in rows):
        return
    kept = statistics.median_high(r["error_after"] for r in rows)
    auto = statistics.median_high(r["auto_error"] for r in rows)
    if auto <= 0.5 * kept and kept - auto > 0.01:
        fewer = sum(1 for r in rows if r["auto_groups"] < r["groups"])
        report.notes.append(f"calibration_groups='auto' (CLI: --calibrate-groups auto) would keep clearly more of "
                            f"the function: median layer error {kept:.3g} -> {auto:.3g}, with {fewer} of {len(rows)} "
                            "GroupNorm layer(s) taking fewer groups")


def with_chosen_groups(recipe_data: dict, plan, calibration: dict | None) -> dict:
    """The recipe as data with each group count calibration chose written into its rule's ``groups_by_path``,
    so replaying it (a .safetensors sidecar) rebuilds the layers calibration left."""
    chosen = {r["path"]: r["groups"] for r in (calibration or {}).get("layers", [])
              if "groups_built" in r and r["groups"] != r["groups_built"]}
    if not chosen:
        return recipe_data
    data = copy.deepcopy(recipe_data)
    for ch in plan.changes:
        if ch.path in chosen:  # rule.index is the rule's place in the recipe as written, inactive rules included
            opts = data["rules"][ch.rule.index].setdefault("with", {})
            given = opts.get("groups_by_path")
            opts["groups_by_path"] = {**(given if isinstance(given, dict) else {}), ch.path: chosen[ch.path]}
    return data


def calibrate(original: nn.Module, candidate: nn.Module, swaps: dict[str, nn.Module], batches: list[Any], *,
              fit: str = "least_squares", groups: dict[str, list[int]] | None = None,
              tolerance: float | None = GROUP_TOLERANCE, group=None) -> CalibrationReport:
    """Fit the affine of each new layer of ``candidate`` in place (see the module docstring).

    ``swaps``: path -> the original layer it replaced. ``original`` is only read.
    The last eighth of the batches is held back (``hold_back``) to measure how
    much of the original function survived. Under torch.distributed (``group``,
    or the default group) each process passes its own shard and gets the same
    fit; every process must call this, with at least one batch.
    """
    from ..calls import as_args

    if fit not in FITS:
        raise InputSpecError(f"unknown calibration fit {fit!r}", fix=f"use one of {', '.join(FITS)}")
    data = [to_device(as_args(b), model_dtype_device(candidate)[1]) for b in batches]  # to where the model is
    fit_on, held_back = hold_back(data)
    shards = _shards(data, len(held_back), group)
    batches_in_all, held_in_all, samples = (int(v) for v in shards[:, :3].sum(0))
    report = CalibrationReport(fit, batches_in_all, held_in_all, samples, len(shards),
                               group_tolerance=tolerance if groups and tolerance is not None else None)
    targets: dict[nn.Module, dict] = {}
    for path, old in swaps.items():
        new = candidate.get_submodule(path)
        norm, bn = normalizer(new), _bn_function(old)
        if norm is None or bn is None:
            why = ("the original layer has no running statistics" if bn is None else
                   f"{type(new).__name__} has no per-channel affine to fit")
            report.skipped.append({"path": path, "reason": why})
            continue
        counts = None
        if family_of(new) == "groupnorm":
            counts = (groups or {}).get(path) or [new.num_groups]
            if new.num_groups not in counts:
                counts = [new.num_groups]
        targets[new] = {"path": path, "old": old, "norm": norm[0], "axis": norm[1], "bn": bn, "counts": counts,
                        "tolerance": tolerance}
    if not targets:
        report.notes.append("no swapped layer can be calibrated")
        return report
    try:
        _run(original, candidate, targets, fit_on, held_back, fit, group, report)
    except NormswapError:
        raise
    except Exception as e:
        raise NormswapError(f"calibration failed in the model's forward: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}",
                            fix="check that the calibration batches are inputs this model takes") from None
    return report


def hold_back(batches: list) -> tuple[list, list]:
    """(the batches to fit on, the last eighth held back: at least one when there are two or more).

    Under torch.distributed each process splits its own shard: 5 batches over 2
    processes (3 and 2) hold back one each, 2 in all; one process with all 5 holds back 1.
    """
    held = max(1, math.ceil(len(batches) / 8)) if len(batches) >= 2 else 0
    return batches[: len(batches) - held], batches[len(batches) - held:]


def _shards(data: list[tuple], held: int, group) -> torch.Tensor:
    """Each process's [batches, held back, samples, all input tensors] (rows in rank order), checked alike on
    every process, so a bad shard anywhere stops them all before the fit's first collective."""
    tensors = all(b and isinstance(b[0], torch.Tensor) for b in data)
    samples = sum(len(b[0]) if b[0].ndim else 1 for b in data) if tensors else 0
    shards = torch.stack(gathered(torch.tensor([len(data), held, samples, int(tensors)], dtype=torch.int64), group))
    processes = len(shards)
    empty = (shards[:, 0] == 0).nonzero().flatten().tolist()
    if processes > 1 and empty:
        raise InputSpecError(f"calibration: process {empty[0]} of {processes} has no batch "
                             f"({int(shards[:, 0].sum())} batch(es) over {processes} processes)",
                             fix=f"give at least one batch to every process ({processes} or more in all; "
                                 "CLI: more data or a smaller --calibrate-batch-size)")
    not_tensors = (shards[:, 3] == 0).nonzero().flatten().tolist()
    if empty or not_tensors:
        where = f" (process {not_tensors[0]} of {processes})" if processes > 1 else ""
        raise InputSpecError(f"calibration needs at least one batch of input tensors{where}",
                             fix="pass calibration=[x1, x2, ...] (or --calibrate-data / --calibrate-tensors)")
    return shards


def _run(original, candidate, targets, fit_on, held_back, fit, group, report) -> None:
    """Fit, then the held-back figures; every process takes every collective in the same order (the fidelity's
    whenever any process held batches back, its own held-back list empty or not)."""
    from ..verify.check import eval_mode

    with torch.no_grad(), eval_mode(original, candidate):
        before = _outputs(candidate, held_back)
        reference = _outputs(original, held_back)
        _fit_in_lockstep(original, candidate, targets, fit_on, fit, group, report)
        _advice(report)
        if report.held_back:
            report.fidelity = _fidelity(reference, before, _outputs(candidate, held_back), group)
            _explain(report, targets)


def _fit_in_lockstep(original, candidate, targets, data, fit, group, report) -> None:
    """Both networks, every batch, in lockstep: at each swapped layer the original network's BN output z and
    the candidate's normalized input n are paired sample by sample, the layer is fitted, and all go on.

    A GroupNorm sends its raw input instead, and is fitted from per-sample channel moments for each of its
    candidate group counts (``_group_sums``); the count kept is ``_choose_groups``'s.
    """
    by_old = {t["old"]: t for t in targets.values()}
    calls = [functools.partial(original, *b) for b in data] + [functools.partial(candidate, *b) for b in data]
    step = Lockstep(calls)

    def at_original(module, args):
        t = by_old.get(module)
        if t is not None:
            z = t["bn"](args[0])
            step.wait_at(t["path"], (z, args[0]) if len(t["counts"] or ()) > 1 else (z, None))

    def at_candidate(module, args):
        t = targets.get(module)
        if t is not None:
            step.wait_at(t["path"], args[0] if t["counts"] else t["norm"](args[0]))

    by_path = {t["path"]: m for m, t in targets.items()}
    handles = [m.register_forward_pre_hook(at_original) for m in by_old]
    handles += [m.register_forward_pre_hook(at_candidate) for m in targets]
    half = len(data)
    try:
        for path, parts in step.rounds():
            if len(parts) != 2 * half:
                raise NormswapError(f"the original and the swapped model reach {path} a different number of times",
                                    fix="exclude that layer from the rule")
            module = by_path[path]
            t = targets[module]
            pairs = [(z, n) for (z, _), n in zip(parts[:half], parts[half:])]
            carried_w, carried_b = module.weight.detach().double(), module.bias.detach().double()
            row = {"path": path, "class": type(module).__name__}
            if t["counts"]:
                gamma, beta, groups = _fit_group_norm(module, t, parts, half, fit, group, row)
            else:
                s = summed(sum(_sums(n, z, t["axis"]) for z, n in pairs), group)
                gamma, beta = _fit(s, s[[0, 3, 4]], fit)
                row["error_before"], row["error_after"] = _error(s, carried_w, carried_b), _error(s, gamma, beta)
                groups = getattr(module, "num_groups", None)
            if groups:
                row["groups"] = groups
                row["group_size"] = module.num_channels // groups
                if row["group_size"] <= SMALL_GROUP:
                    row["warning"] = (f"{row['group_size']} channel(s) per group is close to InstanceNorm: calibration "
                                      "keeps less of the function (on a digits net 97% of predictions with 3, 89% "
                                      "with 2, against 99.7% with 4-6); prefer min_group_size >= 4")
            report.layers.append(row)
            with torch.no_grad():
                module.weight.copy_(gamma.to(module.weight.dtype))
                module.bias.copy_(beta.to(module.bias.dtype))
    finally:
        for h in handles:
            h.remove()


def _fit_group_norm(module: nn.Module, t: dict, parts: list, half: int, fit: str, group, row: dict):
    """(γ, β, group count) for a GroupNorm: every candidate count fitted from the same moments; the count kept
    is the recipe's, or the one ``_choose_groups`` picks on the layer's own error (on the original's input)."""
    counts, eps = t["counts"], float(module.eps)
    pairs = [(z, n) for (z, _), n in zip(parts[:half], parts[half:])]
    z_sums = [_z_sums(z) for z, _ in pairs]
    s_all = summed(sum(_group_sums(n, z, counts, eps, zs) for (z, n), zs in zip(pairs, z_sums)), group)
    fits = [_fit(s, s[[0, 3, 4]], fit) for s in s_all]
    errors = [_error(s, g, b) for s, (g, b) in zip(s_all, fits)]
    built = k = counts.index(module.num_groups)
    if len(counts) > 1:
        own_s = summed(sum(_group_sums(x, z, counts, eps, zs) for (z, x), zs in zip(parts[:half], z_sums)), group)
        own = [_error(s, *_fit(s, s[[0, 3, 4]], fit)) for s in own_s]
        auto = _choose_groups(own, GROUP_TOLERANCE if t["tolerance"] is None else t["tolerance"])
        if t["tolerance"] is None:  # keeping the recipe's count: what auto would take, for the advice
            row["auto_groups"], row["auto_error"] = counts[auto], errors[auto]
        else:
            k = auto
            row["own_error_by_groups"] = {str(g): e for g, e in zip(counts, own)}  # what the choice read
            row["groups_built"] = module.num_groups
    row["error_before"] = _error(s_all[built], module.weight.detach().double(), module.bias.detach().double())
    row["error_after"] = errors[k]
    module.num_groups = counts[k]
    return fits[k][0], fits[k][1], counts[k]


def _choose_groups(errors: list[float], tolerance: float) -> int:
    """Index of the most groups (``errors`` is ordered from most groups to fewest) whose fitted error is within
    ``tolerance`` of the best one's: ``error <= best + tolerance``."""
    best = min(errors)
    return next(i for i, e in enumerate(errors) if e <= best + tolerance)


def _explain(report: CalibrationReport, targets: dict) -> None:
    f = report.fidelity
    kept = f["top1_after"] if f.get("top1_after") is not None else f["cosine_after"]
    if kept >= 0.9:
        return
    instance = [t["path"] for m, t in targets.items() if family_of(m) == "instancenorm"]
    if instance:
        report.notes.append(
            f"calibration cannot recover this swap ({'top-1 agreement' if f.get('top1_after') is not None else 'cosine'} "
            f"{kept:.2f} on held-back data): InstanceNorm removes each sample's channel means, which the original "
            f"network used (e.g. before a global pool); no affine brings them back ({', '.join(instance[:3])})")
    else:
        report.notes.append(f"calibration recovered only part of the original function ({kept:.2f} on held-back "
                            "data): the new normalization discards information the original used; fine-tune")
