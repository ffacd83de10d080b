"""What a rewrite changed, skipped and checked: as data, JSON and a readable table.

The report holds the result objects (CheckResult, CalibrationReport,
ExportedFile) and turns them into JSON only in ``to_json``; ``check``,
``calibration`` and ``export`` give their JSON form.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .engine import Plan
from .passes.calibration import CalibrationReport
from .text import wrapped
from .verify.check import CheckResult
from .verify.export import ExportedFile


@dataclass
class Report:
    recipe: str
    source: str
    params: dict[str, Any]
    model_type: str
    changes: list[dict]
    skipped: list[dict]
    rules: list[dict]
    param_map: dict[str, str | None] = field(default_factory=dict)  # only names that changed or vanished
    new_params: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    applied: bool = False
    check_result: CheckResult | None = None
    calibration_result: CalibrationReport | None = None  # what calibration fitted, how much function survived
    export_result: ExportedFile | None = None  # the verified deployment file, when one was asked for

    @property
    def check(self) -> dict | None:
        r = self.check_result
        return None if r is None else {"mode": r.mode, **r.to_json()}

    @property
    def calibration(self) -> dict | None:
        return None if self.calibration_result is None else self.calibration_result.to_json()

    @property
    def export(self) -> dict | None:
        return None if self.export_result is None else self.export_result.to_json()

    @classmethod
    def from_plan(cls, plan: Plan, model: nn.Module, applied: bool) -> "Report":
        pmap = plan.param_map(model)
        return cls(
            recipe=plan.recipe.name,
            source=plan.recipe.source,
            params=dict(plan.recipe.params),
            model_type=plan.model_type,
            changes=[
                {
                    "path": ch.path,
                    "aliases": ch.aliases[1:],
                    "old": ch.old_type,
                    "new": ch.new_type,
                    "rule": ch.rule.label(),
                    "notes": list(ch.notes),
                    "carried": dict(ch.carried),
                    "summary": summarize(ch.new),
                    **({"edited": True} if ch.edited else {}),
                }
                for ch in plan.changes
            ],
            skipped=[{"path": s.path, "type": s.type, "reason": s.reason, "rule": s.rule} for s in plan.skipped],
            rules=[
                {"rule": r.label(), "replace": r.replace, "matched": n, "required": r.required}
                for r, n in plan.rule_matches
            ],
            param_map={k: v for k, v in pmap.items() if k != v},
            new_params=plan.new_params(),
            notes=list(plan.notes),
            applied=applied,
        )

    def to_json(self) -> dict:
        return {
            "recipe": self.recipe,
            "source": self.source,
            "params": self.params,
            "model_type": self.model_type,
            "applied": self.applied,
            "summary": self.summary,
            "changed": len(self.changes),
            "changes": self.changes,
            "skipped": self.skipped,
            "rules": self.rules,
            "param_map": self.param_map,
            "new_params": self.new_params,
            "notes": self.notes,
            "check": self.check,
            "export": self.export,
            "calibration": self.calibration,
        }

    @property
    def summary(self) -> str:
        """One line in the units users count: "folded 20 of 20 BatchNorm, 0 left", "swapped 20 BatchNorm2d →
        GroupNorm"."""
        primary = [c for c in self.changes if not c.get("edited")]
        if any(r["replace"] == "fold" for r in self.rules):
            folded = sum(1 for c in primary if c["notes"] and c["notes"][0].startswith("folded into"))
            left = len(primary) - folded + len(self.skipped)
            text = f"{'folded' if self.applied else 'would fold'} {folded} of {folded + left} BatchNorm, {left} left"
        elif any(r["replace"] == "fold_affine" for r in self.rules):
            classes = sorted({c["old"] for c in primary} | {s["type"] for s in self.skipped}) or ["norm"]
            text = (f"{'folded' if self.applied else 'would fold'} the affine of {len(primary)} of "
                    f"{len(primary) + len(self.skipped)} {'/'.join(classes)}, {len(self.skipped)} left")
        else:
            kinds = Counter((c["old"], c["new"]) for c in primary)
            parts = [f"{n} {old} → {new}" if old != new else f"{n} {old}" for (old, new), n in kinds.items()]
            swapped = any(old != new for old, new in kinds)
            verb = ("swapped" if swapped else "rewrote") if self.applied else ("would swap" if swapped else "would rewrite")
            text = f"{verb} {', '.join(parts)}" if parts else ("changed nothing" if self.applied else "would change nothing")
            if self.skipped:
                text += f"; skipped {len(self.skipped)}"
        return f"{self.recipe} on {self.model_type}: {text}"

    def text(self, width: int = 80) -> str:
        """The report as plain text lines of at most ``width`` columns (wrapped, never padded)."""
        return "\n".join(_report_lines(self, max(width, 40)))

    def __str__(self) -> str:
        return self.text()

    def render(self, console=None) -> None:
        """Print the report: to a rich ``console`` (its width), or to standard output at 80 columns."""
        if console is None:
            print(self.text())
        else:
            console.print(self.text(console.width), markup=False, highlight=False, soft_wrap=True)


def _report_lines(report: Report, width: int) -> list[str]:
    out = wrapped(report.summary, width, "  ")
    primary = [c for c in report.changes if not c.get("edited")]
    if primary:
        paths = [c["path"] + (f" (= {', '.join(c['aliases'])})" if c["aliases"] else "") for c in primary]
        col = min(max(len(p) for p in paths), width // 3)
        for path, c in zip(paths, primary):
            out += wrapped(f"{path:<{col}}  {c['old']} → {c['summary']}", width, " " * (col + 4), "  ")
            if c["notes"]:
                out += wrapped("; ".join(c["notes"]), width, " " * (col + 4), " " * (col + 4))
    if report.skipped:
        out.append(f"skipped {len(report.skipped)}:")
        for s in report.skipped:
            out += wrapped(f"{s['path']} ({s['type']}): {s['reason']}", width, "    ", "  ")
    for r in report.rules:
        if r["matched"] == 0:
            out += wrapped(f"note: {r['rule']} ({r['replace']}) matched no layer", width, "  ")
    for note in report.notes:
        out += wrapped(f"note: {note}", width, "  ")
    if report.calibration_result is not None:
        for line in report.calibration_result.lines():
            lead = line[: len(line) - len(line.lstrip())]
            out += wrapped(line.strip(), width, lead + "  ", lead)
    if report.check_result is not None:
        out += wrapped(f"check ({report.check_result.mode}): {report.check_result.summary}", width, "  ")
    if report.export_result is not None:
        e = report.export_result.to_json()
        verdict = "matches" if e["ok"] else "DIFFERS from"
        free = {"batch": "dynamic batch", "spatial": "dynamic batch and spatial size"}.get(e["dynamic"], "fixed shape")
        out += wrapped(f"export ({e['format']}, {e['bytes'] / 1e6:.1f} MB, {free}): {verdict} PyTorch on "
                       f"{', '.join('x'.join(map(str, s)) for s in e['verified_on'])}, max abs {e['max_abs']:.2e}, "
                       f"max rel {e['max_rel']:.2e} (tolerance {e['rtol']:.0e})", width, "  ")
        out += [line for n in e["notes"] for line in wrapped(f"note: {n}", width, "  ")]
    return out


def summarize(module: nn.Module) -> str:
    """``GroupNorm(8 groups x 8)``-style one-liner for the report table."""
    name = type(module).__name__
    groups = getattr(module, "num_groups", None)
    channels = getattr(module, "num_channels", None)
    if groups and channels:
        return f"{name}({groups} groups of {channels // groups})"
    return name
