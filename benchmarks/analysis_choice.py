"""How normswap analyses data flow: recording one forward pass vs torch.fx symbolic tracing.

    .venv/bin/python benchmarks/analysis_choice.py

For each model of the test zoo, in the same run: does the analysis succeed, how
long it takes, and how many BatchNorm layers it sees fed directly by a conv or
linear output that nothing else uses (the pairs folding needs). Three options:
- record: normswap.graph.record (hooks + TorchFunctionMode over a real forward)
- fx: torch.fx.symbolic_trace
- fx+timm: an fx.Tracer with timm's registered leaf modules and autowrap functions
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from _common import timm_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from zoo import ZOO  # noqa: E402

from normswap.graph import record, users_of  # noqa: E402

BN = nn.modules.batchnorm._BatchNorm
PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)


def pairs_recorded(model, x):
    flow = record(model, x)
    n = 0
    for path, mc in flow.modules.items():
        if isinstance(mc.module, BN) and mc.nodes:
            src = flow.input_node(path)
            if src is not None and src.op == "call_module" and isinstance(flow.modules[src.target].module, PRODUCERS) \
                    and len(users_of(src)) == 1:
                n += 1
    return n


def pairs_fx(model, tracer_cls):
    tracer = tracer_cls()
    graph = tracer.trace(model)
    mods = dict(model.named_modules())
    n = 0
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), BN):
            src = node.args[0] if node.args else None
            if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), PRODUCERS) \
                    and len(src.users) == 1:
                n += 1
    return n


class TimmTracer(fx.Tracer):
    def __init__(self):
        from timm.layers._fx import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def measure(fn):
    t = time.perf_counter()
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - a failed trace is a result here
        return None, time.perf_counter() - t, type(e).__name__
    return value, time.perf_counter() - t, ""


def main() -> None:
    rows = []
    print(f"{'model':24} {'BN':>4} | {'record':>14} | {'fx':>14} | {'fx+timm':>14}")
    for name, side in ZOO.items():
        model = timm_model(name, side)
        x = torch.randn(1, 3, side, side)
        n_bn = sum(isinstance(m, BN) for m in model.modules())
        rec = measure(lambda: pairs_recorded(model, x))
        plain = measure(lambda: pairs_fx(model, fx.Tracer))
        tt = measure(lambda: pairs_fx(model, TimmTracer))
        rows.append((name, n_bn, rec, plain, tt))

        def cell(r):
            v, t, err = r
            return f"{v:4d} {t * 1000:6.0f}ms" if v is not None else f"fail {err[:9]}"
        print(f"{name:24} {n_bn:4d} | {cell(rec):>14} | {cell(plain):>14} | {cell(tt):>14}")
    for i, label in ((2, "record"), (3, "fx"), (4, "fx+timm")):
        ok = [r for r in rows if r[i][0] is not None]
        pairs = sum(r[i][0] for r in ok)
        med = statistics.median(r[i][1] for r in ok) * 1000 if ok else float("nan")
        print(f"{label:8}: succeeded on {len(ok)}/{len(rows)} models, {pairs} direct conv/linear->BN pairs seen "
              f"in total, median {med:.0f} ms per model")


if __name__ == "__main__":
    main()
