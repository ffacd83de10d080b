"""``normswap check --plot``: the per-layer error along the network as a PNG (matplotlib, optional)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import InputSpecError, OutputError
from ..model_io import atomic_write
from .check import CheckResult

_FLOOR = 1e-18  # where exact zeros are drawn on the log axis


def plot_layers(result: CheckResult, path: str | Path) -> Path:
    """Draw local and propagated relative error per layer call, the tolerance, and the first divergence."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputSpecError("--plot needs matplotlib, which is not installed",
                            fix="pip install 'normswap[plot]'") from None
    if not result.layers:
        raise InputSpecError("there are no per-layer figures to plot (the check did not record the layers)",
                            fix="run the numeric check with layers=True")
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"cannot write the plot {path}: {path.parent} is not a directory",
                            fix="give a path in an existing directory")
    rows = result.layers
    xs = list(range(len(rows)))

    def ys(key: str) -> list[float]:
        out = []
        for r in rows:
            v = r[key]
            v = math.inf if isinstance(v, str) else v
            out.append(math.nan if v is None else max(min(v, 1e6), _FLOOR))
        return out

    fig = Figure(figsize=(max(8.0, min(24.0, len(rows) / 12)), 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys("propagated_rel"), color="tab:blue", lw=1.2, label="propagated (candidate's own output)")
    ax.scatter(xs, ys("local_rel"), color="tab:orange", s=10, zorder=3, label="local (candidate layer on reference input)")
    ax.axhline(result.rtol, color="tab:red", ls="--", lw=1, label=f"tolerance {result.rtol:.0e}")
    ax.set_yscale("log")
    ax.set_xlabel("layer call, in execution order")
    ax.set_ylabel(f"max |error| / max |reference|  (exact: {_FLOOR:.0e})")
    verdict = "passed" if result.ok else "FAILED"
    ax.set_title(f"per-layer error, compared in {result.dtype}: check {verdict}", fontsize=11)
    d = result.first_divergence
    if d:
        ax.axvline(d["order"], color="tab:red", lw=1)
        ax.annotate(f"first divergence: {d['path']}", xy=(d["order"], 0.45), xycoords=("data", "axes fraction"),
                    xytext=(5, 0), textcoords="offset points", color="tab:red", fontsize=9,
                    bbox={"boxstyle": "round", "fc": "white", "ec": "tab:red", "alpha": 0.9})
    step = max(1, len(rows) // 24)
    ax.set_xticks(xs[::step])
    ax.set_xticklabels([rows[i]["path"] for i in xs[::step]], rotation=70, ha="right", fontsize=6)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    tmp = atomic_write(path, lambda name: fig.savefig(name, format="png"))
    os.replace(tmp, path)
    return path
