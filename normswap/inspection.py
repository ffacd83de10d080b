"""``normswap inspect``: every normalization layer and where its input comes from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .catalog.folding import fold_site, next_layer_site
from .catalog.norm_affine import affine_site
from .families import channels_of, family_of, is_norm_layer, near_family_of
from .graph import DataFlow, describe, record, users_of
from .inputs import make_inputs
from .text import wrapped

_BN = ("batchnorm", "frozen_batchnorm")
_LN = ("layernorm", "rmsnorm", "unidentified_norm")


@dataclass
class InspectTable:
    model_type: str
    input_shape: list[int]
    rows: list[dict]

    def to_json(self) -> dict:
        return {"model_type": self.model_type, "input_shape": self.input_shape, "layers": self.rows,
                "summary": self.summary()}

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["family"]] = out.get(r["family"], 0) + 1
        return out

    def foldable_count(self, families: tuple[str, ...] = _BN) -> tuple[int, int]:
        """(layers of ``families`` their fold folds with default options, layers of ``families``): fold_bn for
        BatchNorms, fold_norm_affine for LayerNorm/RMSNorm."""
        rows = [r for r in self.rows if r["foldable"] is not None and r["family"] in families]
        return sum(1 for r in rows if r["foldable"] and not r["fold_into_next"]), len(rows)

    def text(self, width: int = 80) -> str:
        """One entry per layer, wrapped at ``width``, then the counts."""
        width = max(width, 40)
        out = []
        col = min(max((len(r["path"]) for r in self.rows), default=0), width // 3)
        for r in self.rows:
            path = r["path"] + (f" (= {', '.join(r['aliases'])})" if r["aliases"] else "")
            stats = "running stats" if r["running_stats"] else "computed stats"  # kept from training, or per input
            facts = (f"{r['class']}, {r['channels']} ch, {r['mode']}, {'affine' if r['affine'] else 'no affine'}, "
                     f"{stats}, {r['calls']} call(s)")
            out += wrapped(f"{path:<{col}}  {facts}", width, " " * (col + 4), "  ")
            out += wrapped(f"input from {r['producer'] or '-'}; fold: {_fold_cell(r)}", width, " " * (col + 4),
                           " " * (col + 4))
        counts = ", ".join(f"{n} {fam}" for fam, n in self.summary().items()) or "none"
        out += wrapped(f"{self.model_type}: {len(self.rows)} normalization layer(s): {counts} "
                       f"(input {tuple(self.input_shape)})", width, "  ")
        folds, norms = self.foldable_count(_LN)
        if norms:
            out.append(f"fold_norm_affine would fold the affine of {folds} of {norms} LayerNorm/RMSNorm layer(s)")
        folds, bns = self.foldable_count()
        if bns:
            out.append(f"fold_bn would fold {folds} of {bns} BatchNorm layer(s)")
            training = sum(1 for r in self.rows if r["foldable"] is not None and r["mode"] == "train")
            if training:
                out += wrapped(f"note: {training} of them are in train mode; the fold column assumes eval mode, "
                               "which `normswap fold` sets first (models built from a spec or a state dict start "
                               "in train mode; normswap.fold asks for model.eval())", width, "  ")
        return "\n".join(out)

    def render(self, console=None) -> None:
        """Print the table: to a rich ``console`` (its width), or to standard output at 80 columns."""
        if console is None:
            print(self.text())
        else:
            console.print(self.text(console.width), markup=False, highlight=False, soft_wrap=True)


def _fold_columns(flow: DataFlow, path: str, module: nn.Module) -> dict[str, Any]:
    """Whether ``fold_bn`` (a BatchNorm) or ``fold_norm_affine`` (a LayerNorm/RMSNorm's affine) would fold this
    layer, into what, or why not (the analysis the fold itself uses)."""
    if family_of(module) in ("layernorm", "rmsnorm") or near_family_of(module) == "unidentified_norm":
        affine = affine_site(flow, path, untie=False)
        return {"foldable": affine.foldable, "fold_into": [c.path for c in affine.consumers], "fold_into_next": False,
                "fold_reason": affine.reason}
    if family_of(module) not in ("batchnorm", "frozen_batchnorm"):
        return {"foldable": None, "fold_into": [], "fold_reason": None}
    site = fold_site(flow, path, assume_eval=True)
    if not site.foldable:
        forward = next_layer_site(flow, path, assume_eval=True)
        if forward.foldable:
            site = forward
    return {"foldable": site.foldable, "fold_into": [t for t, _ in site.targets], "fold_into_next": site.into_next,
            "fold_reason": site.reason}


def _fold_cell(row: dict) -> str:
    if row["foldable"] is None:
        return "-"
    if row["foldable"]:
        into = ", ".join(row["fold_into"])
        return f"into {into} (needs into_next)" if row["fold_into_next"] else f"into {into}"
    return f"no: {row['fold_reason']}"


def inspect_model(model: nn.Module, *, input_size: tuple[int, ...] | None = None,
                  example_inputs: Any = None, flow: DataFlow | None = None) -> InspectTable:
    if example_inputs is None:
        example_inputs = make_inputs(model, input_size)
    if flow is None:
        flow = record(model, example_inputs)
    rows = []
    for path, mc in flow.modules.items():
        mod = mc.module
        if not is_norm_layer(mod):
            continue
        src = flow.input_node(path) if mc.nodes else None
        producer_users = [describe(u).split(" (")[0] for u in users_of(src)] if src is not None else []
        rows.append({
            "path": path,
            "aliases": mc.aliases[1:],
            "class": type(mod).__name__,
            "family": family_of(mod) or (near_family_of(mod) if near_family_of(mod) == "unidentified_norm"
                                         else f"{near_family_of(mod)} (subclass)"),
            "channels": channels_of(mod),
            "mode": "train" if mod.training else "eval",
            "affine": getattr(mod, "weight", None) is not None,
            "running_stats": getattr(mod, "running_mean", None) is not None,
            "calls": mc.call_count,
            "input_shape": list(flow.input_shape(path) or []) if mc.nodes else None,
            "producer": describe(src) if src is not None else None,
            "producer_users": producer_users,
            **_fold_columns(flow, path, mod),
        })
    shape = [tuple(example_inputs.shape)] if hasattr(example_inputs, "shape") else []
    return InspectTable(type(model).__name__, list(shape[0]) if shape else [], rows)
