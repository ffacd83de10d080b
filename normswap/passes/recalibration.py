"""Recalibration (AdaBN): every BatchNorm's running statistics set to the pooled statistics of its inference input.

Exact means: BN k's mean and unbiased variance are those of *all* the data as BN
k sees it at inference, i.e. after every BN upstream of it has been
recalibrated and normalizes with its new running statistics (eval mode). A
single train-mode pass (``torch.optim.swa_utils.update_bn``) measures BN k's
input while upstream BNs normalize with batch statistics instead, and
per-batch averages drop the variance between batches (``moments.py``).

How it costs one forward pass: every batch runs its own eval-mode forward, in
lockstep (``lockstep.Lockstep``): a pre-hook on each BN stops each batch there until all
batches have arrived, then pools the statistics of the BN's whole input (per
batch, then Chan's formula; across processes with ``all_gather`` when
torch.distributed is initialized), writes them into the BN, and lets the
batches go on. Each BN therefore normalizes with statistics that already
include every sample. All batches' activations are in memory at once, so when
the data exceeds ``max_samples`` it degrades to one partial pass per BN: each
pass runs every batch up to the first BN not yet done, pools, and sets it.
Same numbers, more passes.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..calls import as_args
from ..devices import to_device
from ..errors import InputSpecError, NormswapError
from ..families import family_of
from ..inputs import model_dtype_device
from .lockstep import Lockstep, Stop
from .moments import Moments, chunk_moments, combine_all
from .processes import all_reduce_int, gathered, world

MAX_FIXED_POINT_PASSES = 10


@dataclass
class RecalibrationReport:
    mode: str  # "one pass" | "per layer"
    passes: int
    samples: int  # over every process
    world_size: int
    layers: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"mode": self.mode, "passes": self.passes, "samples": self.samples, "world_size": self.world_size,
                "recalibrated": len(self.layers), "layers": self.layers, "skipped": self.skipped, "notes": self.notes}

    def lines(self) -> list[str]:
        out = [f"recalibrated {len(self.layers)} BatchNorm layer(s) on {self.samples} sample(s) "
               f"({self.mode}, {self.passes} pass(es){f', {self.world_size} processes' if self.world_size > 1 else ''})"]
        if self.layers:
            worst = max(self.layers, key=lambda r: r["mean_shift"])
            out.append(f"  largest mean shift: {worst['path']} ({worst['mean_shift']:.3g} old standard deviations)")
        out += [f"  skipped {s['path']}: {s['reason']}" for s in self.skipped]
        out += [f"  note: {n}" for n in self.notes]
        return out


def _targets(model: nn.Module) -> tuple[dict[nn.Module, str], list[dict]]:
    targets, skipped = {}, []
    for path, m in model.named_modules():
        fam = family_of(m)
        if fam == "frozen_batchnorm":
            skipped.append({"path": path, "reason": "a frozen BatchNorm: its statistics are fixed by design"})
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is None:
                skipped.append({"path": path, "reason": "no running statistics (track_running_stats=False)"})
            elif m not in targets:
                targets[m] = path
    return targets, skipped


def _batches(batches: Iterable[Any]) -> list[tuple]:
    if isinstance(batches, torch.Tensor):
        raise InputSpecError("batches must be a list (or iterable) of batches, got a single tensor",
                             fix="pass [x] for one batch, or list(x.split(32)) for several")
    try:
        out = [as_args(b) for b in batches]
    except TypeError:
        raise InputSpecError(f"batches must be an iterable of tensors or argument tuples, got {type(batches).__name__}",
                             fix="pass a list of input tensors") from None
    for i, b in enumerate(out):
        if not b or not isinstance(b[0], torch.Tensor):
            raise InputSpecError(f"batch {i} is a {type(b[0] if b else None).__name__}, not a tensor",
                                 fix="pass a list of input tensors (or tuples whose first item is the input)")
    return out


def _pool(parts: list[Moments], group) -> Moments:
    """This process's chunks combined, then every process's, in rank order (the same result on every rank)."""
    local = combine_all(parts)
    if world(group)[1] == 1:
        return local
    return combine_all([Moments.from_tensor(g) for g in gathered(local.to_tensor(), group)])


@torch.no_grad()
def _set(bn: nn.Module, pooled: Moments) -> None:
    bn.running_mean.copy_(pooled.mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(pooled.variance.to(bn.running_var.dtype))


@contextlib.contextmanager
def _hooks(targets: dict[nn.Module, str], hook):
    handles = [m.register_forward_pre_hook(hook) for m in targets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _progress(enabled: bool, total: int, what: str):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True)

    @contextlib.contextmanager
    def run():
        with progress:
            yield progress, progress.add_task(what, total=total)

    return run()


def _one_pass(model, targets, data: list[tuple], group, show: bool, notes: list[str]) -> tuple[int, dict, set]:
    """Every batch in flight, in lockstep: each BN is set from all of its input right before it normalizes."""
    calls: dict[nn.Module, int] = {}
    per_call: dict[nn.Module, list[Moments]] = {}
    fixed: set[nn.Module] = set()  # shared BNs held at the previous pass's statistics
    unconverged = notes

    def run_pass(bar) -> None:
        counts: dict[tuple[int, nn.Module], int] = {}
        step = Lockstep([functools.partial(model, *b) for b in data])

        def hook(module, args):
            me = (step.local.index, module)
            counts[me] = counts.get(me, 0) + 1
            step.wait_at((module, counts[me]), chunk_moments(args[0], 1))

        with _hooks(targets, hook):
            for (module, call), parts in step.rounds():
                pooled = _pool(parts, group)
                calls[module] = max(calls.get(module, 0), call)
                per_call.setdefault(module, []).append(pooled)
                if module not in fixed:
                    _set(module, combine_all(per_call[module]))
                if bar is not None:
                    bar[0].advance(bar[1])

    converged = False
    with _progress(show, len(targets), "recalibrating BatchNorm") as bar:
        run_pass(bar)
        passes = 1
        shared = {m for m, n in calls.items() if n > 1}
        # A BN called more than once sees, in later calls, data it normalized itself: a fixed point.
        while shared and passes < MAX_FIXED_POINT_PASSES:
            before = {m: m.running_mean.clone() for m in shared}
            before_var = {m: m.running_var.clone() for m in shared}
            scale = {m: m.running_var.sqrt().clamp_min(1e-12) for m in shared}
            for m in shared:
                _set(m, combine_all(per_call[m]))
            fixed = shared
            per_call.clear()
            run_pass(None)
            passes += 1
            for m in shared:
                _set(m, combine_all(per_call[m]))
            if max(((m.running_mean - before[m]).abs() / scale[m]).max().item() +
                   ((m.running_var - before_var[m]).abs() / before_var[m].clamp_min(1e-12)).max().item()
                   for m in shared) < 1e-6:
                converged = True
                break
    if shared and not converged:
        unconverged.append(f"did not settle within {MAX_FIXED_POINT_PASSES} passes")
    return passes, calls, shared


def _per_layer(model, targets, data: list[tuple], group, show: bool, notes: list[str]) -> tuple[int, dict, set]:
    """One partial pass per BN: every batch runs up to the first BN not yet done, which is then set."""
    done: set[nn.Module] = set()
    calls: dict[nn.Module, int] = {}
    passes = 0
    with _progress(show, len(targets), "recalibrating BatchNorm (one pass per layer)") as bar:
        while True:
            current: list[nn.Module] = []
            parts: list[Moments] = []

            seen: dict[nn.Module, int] = {}

            def hook(module, args):
                seen[module] = seen.get(module, 0) + 1
                if module in done:
                    if seen[module] > 1:
                        raise NormswapError(f"BatchNorm '{targets[module]}' is called more than once per forward, "
                                            "which one partial pass per BN cannot pool exactly",
                                            fix="raise max_samples to at least the number of samples, so it "
                                                "runs in one pass (which iterates such a BN to a fixed point)")
                    return
                if current and module is not current[0]:
                    raise NormswapError("batches take different paths through the model: they reach different "
                                        "BatchNorms first", fix="recalibrate with batches the model treats alike")
                current[:1] = [module]
                parts.append(chunk_moments(args[0], 1))
                raise Stop

            with _hooks(targets, hook), torch.no_grad():
                for batch in data:
                    seen.clear()
                    try:
                        model(*batch)
                    except Stop:
                        pass
            reached = all_reduce_int(1 if current else 0, group, "min")
            if not reached:
                break
            passes += 1
            _set(current[0], _pool(parts, group))
            done.add(current[0])
            calls[current[0]] = 1
            if bar is not None:
                bar[0].advance(bar[1])
    return passes, calls, set()


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    inplace: bool = False,
    max_samples: int = 256,
    progress: bool = False,
    return_report: bool = False,
    group=None,
):
    """Set every BatchNorm's running statistics to the exact pooled statistics of its inference input.

    ``batches``: input tensors (or argument tuples) from the new domain. Returns a
    recalibrated copy in eval mode (``inplace=True``: ``model`` itself); with
    ``return_report=True`` a ``(model, RecalibrationReport)`` pair. Under
    torch.distributed each process passes its own shard and all get the same
    statistics. Only BN running_mean / running_var change; an error leaves
    ``model`` as it was. See the module docstring for how and what it costs.
    """
    if not isinstance(model, nn.Module):
        raise InputSpecError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(max_samples, int) or max_samples < 1:
        raise InputSpecError(f"max_samples must be a positive integer, got {max_samples!r}")
    data = to_device(_batches(batches), model_dtype_device(model)[1])  # the data goes where the model is
    rank, processes = world(group)
    if all_reduce_int(sum(int(b[0].shape[0]) for b in data), group, "min") == 0:
        raise InputSpecError("no data to recalibrate on" + (" (a process has an empty shard)" if processes > 1 else ""),
                             fix="give at least one batch to every process")
    from ..engine import copy_model

    work = copy_model(model)
    targets, skipped = _targets(work)
    local = sum(int(b[0].shape[0]) for b in data)
    samples = all_reduce_int(local, group)
    one_pass = local <= max_samples
    one_pass = bool(all_reduce_int(int(one_pass), group, "min"))
    work.eval()
    try:
        run = _one_pass if one_pass else _per_layer
        run_notes: list[str] = []
        passes, calls, shared = run(work, targets, data, group, progress and rank == 0, run_notes)
    except NormswapError:
        raise
    except Exception as e:
        raise NormswapError(f"recalibration failed in the model's forward: {type(e).__name__}: {e}",
                            fix="check that the batches are inputs this model takes") from None
    report = RecalibrationReport("one pass" if one_pass else "per layer", passes, samples, processes)
    before = dict(model.named_buffers())
    for m, path in targets.items():
        if m not in calls:
            skipped.append({"path": path, "reason": "never called in the forward pass: statistics left as they were"})
            continue
        old_mean, old_var = before[f"{path}.running_mean"], before[f"{path}.running_var"]
        shift = ((m.running_mean.double() - old_mean.double()).abs() / old_var.double().clamp_min(1e-12).sqrt())
        report.layers.append({"path": path, "class": type(m).__name__, "calls": calls[m],
                              "mean_shift": shift.max().item(),
                              "var_ratio": [(m.running_var.double() / old_var.double().clamp_min(1e-12)).min().item(),
                                            (m.running_var.double() / old_var.double().clamp_min(1e-12)).max().item()]})
    report.skipped = skipped
    if shared:
        settled = f"iterated to a fixed point ({passes} passes)" if not run_notes else (
            f"iterated for {passes} passes but {run_notes[0]}: approximate")
        report.notes.append(f"{len(shared)} BatchNorm(s) are called more than once per forward; their statistics "
                            f"pool every call and were {settled}")
    if not one_pass:
        report.notes.append(f"one partial pass per BatchNorm ({local} samples in this process exceed "
                            f"max_samples={max_samples}): exact, but slower than one pass")
    if any(bool(getattr(m, "num_batches_tracked", None) is not None) for m in targets):
        report.notes.append("num_batches_tracked left as it was (it only matters to momentum=None training)")
    if inplace:
        with torch.no_grad():
            mine = dict(work.named_buffers())
            for m, path in targets.items():
                for name in ("running_mean", "running_var"):
                    before[f"{path}.{name}"].copy_(mine[f"{path}.{name}"])
        model.eval()
        work = model
    return (work, report) if return_report else work
