"""What a rewrite changed, skipped and checked: as data, JSON and a readable table.

The report holds the result objects (CheckResult, CalibrationReport,
ExportedFile) and turns them into JSON only in ``to_json``; ``check``,
``calibration`` and ``export`` give their JSON form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .engine import Plan
from .passes.calibration import CalibrationReport
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

    def render(self, console) -> None:
        """Print the report with rich: a table of changes, then skips, rule lines and notes."""
        from rich.table import Table

        verb = "changed" if self.applied else "would change"
        console.print(f"[bold]{self.recipe}[/] on {self.model_type}: {verb} {len(self.changes)} layer(s), "
                      f"skipped {len(self.skipped)}")
        if self.changes:
            table = Table(show_edge=False, header_style="bold")
            for col in ("layer", "from", "to", "notes"):
                table.add_column(col, overflow="fold")
            for ch in self.changes:
                path = ch["path"] + (f" (= {', '.join(ch['aliases'])})" if ch["aliases"] else "")
                table.add_row(path, ch["old"], ch["summary"], "; ".join(ch["notes"]))
            console.print(table)
        if self.skipped:
            table = Table(title="skipped", show_edge=False, header_style="bold")
            for col in ("layer", "type", "why"):
                table.add_column(col, overflow="fold")
            for s in self.skipped:
                table.add_row(s["path"], s["type"], s["reason"])
            console.print(table)
        for r in self.rules:
            if r["matched"] == 0:
                console.print(f"note: {r['rule']} ({r['replace']}) matched no layer")
        for note in self.notes:
            console.print(f"note: {note}")
        if self.calibration_result is not None:
            console.print("\n".join(self.calibration_result.lines()), markup=False)
        if self.check_result is not None:
            console.print(f"check ({self.check_result.mode}): {self.check_result.summary}")
        if self.export_result is not None:
            e = self.export_result.to_json()
            verdict = "matches" if e["ok"] else "DIFFERS from"
            console.print(f"export ({e['format']}, {e['bytes'] / 1e6:.1f} MB): {verdict} PyTorch, "
                          f"max abs {e['max_abs']:.2e}, max rel {e['max_rel']:.2e} (tolerance {e['rtol']:.0e})")


def summarize(module: nn.Module) -> str:
    """``GroupNorm(8 groups x 8)``-style one-liner for the report table."""
    name = type(module).__name__
    groups = getattr(module, "num_groups", None)
    channels = getattr(module, "num_channels", None)
    if groups and channels:
        return f"{name}({groups} groups of {channels // groups})"
    return name
