"""BatchNorm folding across the timm zoo: normswap.fold beside torch.fx's two conv+BN fusers.

    nice -n 10 .venv/bin/python benchmarks/fold_zoo.py [--limit N | --models a,b | --every K]
        [--side 64] [--skip-latency | --latency-only] [--out benchmarks/results/fold_zoo.json]

Sweeps every timm architecture (pretrained=False) that holds a BatchNorm and has at most
60M parameters (counted on the meta device; the list is cached under benchmarks/.cache/).
Each model gets random weights and realistic BN state (normswap.testing.randomize_bn), in
eval mode, at a small input (--side, or the model's configured size when it needs one).
In the same run, on deep copies of the same model, it applies
- normswap: normswap.fold(..., check=False) (analysis and copy included, check excluded)
- fx.fuse: torch.fx.experimental.optimization.fuse
- fuse_fx: torch.ao.quantization.quantize_fx.fuse_fx
and records for each: whether it raised, whether its output still matches the original
(max abs error / max abs output <= 1e-3, float32; a miss is redone in float64 to tell a wrong
model from float32 rounding that the model amplifies), its wall time, and the BN ops that still
execute in one forward. BN ops are counted at run time by a TorchDispatchMode (aten ops whose
name contains "batch_norm") plus forward hooks on FrozenBatchNorm modules, which compute with
plain mul/add. Each op is identified by the running_mean buffer it reads.

Foldable BN ops are counted independently of normswap, on a torch.export graph of the
original model: an eval-mode batch_norm node whose input is a conv/linear/addmm/mm output,
possibly through view/reshape/flatten/permute-type ops, that nothing else reads. A tool
eliminates a foldable op when that op (same running_mean buffer) no longer executes in the
tool's output. A tool that raises or returns a wrong model eliminates nothing.

The sweep runs on 1 thread (--sweep-threads): with 2, one core busy elsewhere slows torch's
thread pool by an order of magnitude and would distort the times.

Latency: a fixed list of CNNs at 1x3x224x224, 2 threads, inference_mode; the median per
forward of the unfolded model, the normswap-folded model, and "BN deleted" (the BNs normswap
folded replaced by what normswap put there, conv weights untouched: the best folding can do),
measured round-robin over several rounds.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from _common import error_text, relative_error, tensors_of, time_limit  # also sets the thread count and import path
from torch.utils._python_dispatch import TorchDispatchMode

import normswap
from normswap.testing import randomize_bn

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "timm_bn_models.json"
MAX_PARAMS = 60_000_000
RTOL = 1e-3
RTOL_F64 = 1e-6
SLOW_FORWARD_S = 5.0
TOOL_TIME_LIMIT_S = 300
TOOLS = ("normswap", "fx.fuse", "fuse_fx")
LATENCY_MODELS = (
    "resnet18", "resnet50", "mobilenetv3_large_100", "efficientnet_b0", "regnetx_016", "densenet121",
    "mobilenetv2_100", "resnext26ts", "rexnet_100", "ghostnet_100", "dla34", "tf_efficientnet_b0",
)
# Ops the foldable counter looks through between a producer and its BN, and the producers.
VIEW_OPS = {"view", "_unsafe_view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
            "unsqueeze", "contiguous", "movedim", "swapaxes", "swapdims", "alias"}
PRODUCER_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
                "conv_transpose2d", "conv_transpose3d", "linear", "addmm", "mm"}

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------ which models


def bn_classes() -> tuple[type, ...]:
    from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    return nn.modules.batchnorm._BatchNorm, BatchNormAct2d, FrozenBatchNormAct2d, FrozenBatchNorm2d


def frozen_classes() -> tuple[type, ...]:
    from timm.layers.norm_act import FrozenBatchNormAct2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    return FrozenBatchNormAct2d, FrozenBatchNorm2d


def scan_zoo() -> dict:
    """Parameter count and BN presence of every timm model, built on the meta device; cached."""
    import timm

    stamp = {"timm": timm.__version__, "torch": torch.__version__}
    if CACHE.exists():
        cached = json.loads(CACHE.read_text())
        if cached.get("versions") == stamp:
            return cached
    models, failed = {}, {}
    t0 = time.perf_counter()
    names = timm.list_models()
    for i, name in enumerate(names):
        model = None
        try:
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False)
            except Exception:  # noqa: BLE001 - a model that cannot be built on meta is built for real
                model = timm.create_model(name, pretrained=False)
            models[name] = {
                "params": sum(p.numel() for p in model.parameters()),
                "has_bn": any(isinstance(m, bn_classes()) for m in model.modules()),
            }
        except Exception as e:  # noqa: BLE001
            failed[name] = error_text(e)
        del model
        if i % 100 == 99:
            gc.collect()
            print(f"  scanned {i + 1}/{len(names)} models in {time.perf_counter() - t0:.0f} s", flush=True)
    data = {"versions": stamp, "models": models, "build_failed": failed}
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps(data, indent=1))
    return data


def select_models(scan: dict) -> tuple[list[str], dict]:
    models = scan["models"]
    with_bn = [n for n, m in models.items() if m["has_bn"]]
    small = [n for n in with_bn if models[n]["params"] <= MAX_PARAMS]
    counts = {
        "timm_models": len(models) + len(scan["build_failed"]),
        "meta_scan_failed": len(scan["build_failed"]),
        "without_bn": len(models) - len(with_bn),
        "with_bn": len(with_bn),
        "skipped_over_60M": len(with_bn) - len(small),
        "qualifying": len(small),
    }
    return small, counts


# ------------------------------------------------------------------ measuring one model


class BNOpCounter(TorchDispatchMode):
    """Counts aten batch_norm ops run, keyed by the running_mean buffer (or weight) each reads."""

    seen_ops: Counter = Counter()  # every op name counted, over the whole run

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.keys: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "batch_norm" in name:
            BNOpCounter.seen_ops[name] += 1
            self.keys[self.key(args)] += 1
        return func(*args, **(kwargs or {}))

    def key(self, args) -> str:
        for i in (3, 1):  # running_mean, then weight
            t = args[i] if len(args) > i else None
            if isinstance(t, torch.Tensor) and t.data_ptr() in self.names:
                return self.names[t.data_ptr()]
        return "<unnamed>"


def bn_ops_run(model: nn.Module, x: torch.Tensor) -> tuple[Counter, object]:
    """BN ops executed by one forward, as {running_mean name: count}, and the output."""
    names = {}
    for n, t in list(model.named_buffers(remove_duplicate=False)) + list(model.named_parameters()):
        names.setdefault(t.data_ptr(), n)
    handles = []
    frozen = Counter()
    for path, m in model.named_modules():
        if isinstance(m, frozen_classes()):
            key = f"{path}.running_mean"
            handles.append(m.register_forward_hook(lambda *_, k=key: frozen.update([k])))
    try:
        with torch.no_grad(), BNOpCounter(names) as counter:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return counter.keys + frozen, out


def _op(node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0] if hasattr(target, "_schema") else str(target).split(".")[-1]


def foldable_bn_ops(model: nn.Module, x: torch.Tensor) -> tuple[Counter, int]:
    """Foldable BN nodes of torch.export's graph, as {running_mean name: count}, and all BN nodes."""
    ep = torch.export.export(model, (x,))
    buffers = dict(ep.graph_signature.inputs_to_buffers)
    foldable, total = Counter(), 0
    for node in ep.graph_module.graph.nodes:
        if node.op != "call_function" or "batch_norm" not in _op(node):
            continue
        total += 1
        args = node.args
        training = "no_training" not in _op(node) and len(args) > 5 and args[5] is True
        mean = args[3] if len(args) > 3 else None
        if training or not isinstance(mean, torch.fx.Node) or mean.name not in buffers:
            continue
        src = args[0]
        while (isinstance(src, torch.fx.Node) and src.op == "call_function" and _op(src) in VIEW_OPS
               and len(src.users) == 1):
            src = src.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "call_function" and _op(src) in PRODUCER_OPS \
                and len(src.users) == 1:
            foldable[buffers[mean.name]] += 1
    return foldable, total


def build(name: str, side: int):
    """The model with realistic BN state in eval mode, an input it runs on, and the sizes tried."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    candidates = [] if cfg.get("fixed_input_size") else [(3, side, side)]
    for key in ("input_size", "test_input_size"):
        if cfg.get(key) and tuple(cfg[key]) not in candidates:
            candidates.append(tuple(cfg[key]))
    errors = []
    for size in candidates:
        x = torch.randn((1, *size), generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model(x)
        except Exception as e:  # noqa: BLE001 - try the next size
            errors.append(f"{size[1]}x{size[2]}: {error_text(e)}")
            continue
        randomize_bn(model, (2, *size), seed=0)
        return model.eval(), x, errors
    raise RuntimeError("; ".join(errors))


def run_tools(model: nn.Module, x: torch.Tensor):
    from torch.ao.quantization.quantize_fx import fuse_fx
    from torch.fx.experimental.optimization import fuse

    size = tuple(x.shape)
    yield "normswap", lambda m: normswap.fold(m, input_size=size, check=False, return_report=True)
    yield "fx.fuse", lambda m: (fuse(m), None)
    yield "fuse_fx", lambda m: (fuse_fx(m), None)


def measure_model(name: str, side: int) -> dict:
    rec: dict = {"model": name}
    try:
        with time_limit(TOOL_TIME_LIMIT_S):
            model, x, size_errors = build(name, side)
    except Exception as e:  # noqa: BLE001
        rec.update(status="build_failed", error=error_text(e))
        return rec
    rec["input"] = list(x.shape[1:])
    if size_errors:
        rec["smaller_sizes_failed"] = size_errors
    t = time.perf_counter()
    with torch.no_grad():
        ref = model(x)
    rec["forward_s"] = time.perf_counter() - t
    if rec["forward_s"] > SLOW_FORWARD_S:
        rec["status"] = "too_slow"
        return rec
    if not all(torch.isfinite(t).all() for t in tensors_of(ref)):
        rec["status"] = "non_finite_output"
        return rec
    ran, _ = bn_ops_run(model, x)
    rec["bn_ops"] = sum(ran.values())
    rec["frozen_bn_modules"] = sum(isinstance(m, frozen_classes()) for m in model.modules())
    try:
        with time_limit(TOOL_TIME_LIMIT_S):
            foldable, exported = foldable_bn_ops(model, x)
        rec["export_bn_nodes"] = exported
        rec["export"] = "ok"
    except Exception as e:  # noqa: BLE001 - no graph: nothing counts as foldable
        foldable = Counter()
        rec["export"] = error_text(e)
    rec["foldable"] = sum(foldable.values())
    rec["tools"] = {}
    for tool, fn in run_tools(model, x):
        rec["tools"][tool] = measure_tool(fn, model, x, ref, foldable)
        gc.collect()
    rec["status"] = "ok"
    return rec


def measure_tool(fn, model: nn.Module, x: torch.Tensor, ref, foldable: Counter) -> dict:
    res: dict = {}
    work = copy.deepcopy(model)
    gc.collect()  # every tool starts with the collector clear, not with the garbage of what ran before it
    try:
        with time_limit(TOOL_TIME_LIMIT_S):
            t = time.perf_counter()
            out_model, report = fn(work)
            res["time_s"] = time.perf_counter() - t
            left, out = bn_ops_run(out_model, x)
    except Exception as e:  # noqa: BLE001 - a failure is a result
        res.update(status="error", error=error_text(e), eliminated=0, eliminated_f64=0)
        return res
    res["rel_err"] = relative_error(ref, out)
    res["status"] = "ok" if res["rel_err"] <= RTOL else "wrong"
    if res["status"] == "wrong":
        res.update(recheck_float64(fn, model, x))
    res["bn_left"] = sum(left.values())
    foldable_left = {k: min(n, left[k]) for k, n in foldable.items() if left[k]}
    res["foldable_left"] = sum(foldable_left.values())
    removed = sum(foldable.values()) - res["foldable_left"]
    res["eliminated"] = removed if res["status"] == "ok" else 0
    res["eliminated_f64"] = removed if res["status"] in ("ok", "rounding") else 0
    if report is not None:
        res["changed"] = len(bn_changes(model, report))
        res["skipped"] = len(report.skipped)
        reasons = {s["path"]: s["reason"] for s in report.skipped}
        res["missed"] = [{"path": k.removesuffix(".running_mean"),
                          "reason": reasons.get(k.removesuffix(".running_mean"), "not in report.skipped")}
                         for k in foldable_left]
    return res


def recheck_float64(fn, model: nn.Module, x: torch.Tensor) -> dict:
    """A float32 mismatch, redone in float64: "rounding" if the tool is exact there (the model amplifies
    float32 rounding), else "wrong". Also the model's own float32 error against float64."""
    try:
        m64 = copy.deepcopy(model).double()
        with time_limit(TOOL_TIME_LIMIT_S), torch.no_grad():
            ref64 = m64(x.double())
            out64 = fn(copy.deepcopy(m64))[0](x.double())
            ref32 = model(x)
        rel64 = relative_error(ref64, out64)
        return {"rel_err_f64": rel64, "model_f32_noise": relative_error(ref64, ref32),
                "status": "rounding" if rel64 <= RTOL_F64 else "wrong"}
    except Exception as e:  # noqa: BLE001
        return {"recheck_error": error_text(e)}


# ------------------------------------------------------------------ latency


def bn_changes(model: nn.Module, report) -> list[dict]:
    """The report's changes that replaced a BN (the others are the convs/linears it was folded into)."""
    return [ch for ch in report.changes if isinstance(model.get_submodule(ch["path"]), bn_classes())]


def cpu_jiffies() -> tuple[int, int, int]:
    """(busy, total) jiffies of the whole machine and this process's own, from /proc."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    total = sum(fields[:8])
    busy = total - fields[3] - fields[4]
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy, total, int(own[11]) + int(own[12])


def other_cores_busy(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Cores kept busy by other processes between two cpu_jiffies() readings."""
    busy, total, own = (a - b for a, b in zip(after, before))
    return max(busy - own, 0) / max(total, 1) * os.cpu_count()


def bn_deleted(model: nn.Module, folded: nn.Module, report) -> nn.Module:
    """``model`` with each BN normswap folded replaced by what normswap put there; weights untouched."""
    out = copy.deepcopy(model)
    for ch in bn_changes(model, report):
        for path in [ch["path"], *ch.get("aliases", [])]:
            out.set_submodule(path, copy.deepcopy(folded.get_submodule(ch["path"])))
    return out


def measure_latency(name: str, rounds: int, per_round: int) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    randomize_bn(model, (2, 3, 224, 224), seed=0)
    model.eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    folded, report = normswap.fold(model, input_size=(1, 3, 224, 224), check=False, return_report=True)
    variants = {"unfolded": model, "folded": folded, "deleted": bn_deleted(model, folded, report)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    paired: dict[str, list[float]] = {"folded_over_deleted": [], "speedup": []}
    with torch.inference_mode():
        rel = relative_error(model(x), folded(x))
        for m in variants.values():
            for _ in range(3):
                m(x)
        order = list(variants)
        for r in range(rounds):
            this_round = {}
            for k in order[r % 3:] + order[:r % 3]:
                run = []
                for _ in range(per_round):
                    t = time.perf_counter()
                    variants[k](x)
                    run.append(time.perf_counter() - t)
                times[k] += run
                this_round[k] = statistics.median(run)
            paired["folded_over_deleted"].append(this_round["folded"] / this_round["deleted"])
            paired["speedup"].append(this_round["unfolded"] / this_round["folded"])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "folded_changes": len(bn_changes(model, report)), "folded_skipped": len(report.skipped),
            "rel_err": rel, **{f"{k}_ms": v * 1000 for k, v in med.items()},
            "folded_over_deleted": med["folded"] / med["deleted"], "speedup": med["unfolded"] / med["folded"],
            **{f"{k}_paired": statistics.median(v) for k, v in paired.items()}}


def run_latency(models: list[str], rounds: int, per_round: int) -> list[dict]:
    print(f"\nlatency: 1x3x224x224, batch 1, {torch.get_num_threads()} threads, inference_mode, median of "
          f"{rounds} round-robin rounds x {per_round} forwards; 'others': cores kept busy by other processes "
          f"meanwhile (of {os.cpu_count()}), which makes {torch.get_num_threads()}-thread times unreliable")
    print(f"{'model':24} {'unfolded':>9} {'folded':>9} {'deleted':>9} {'fold/del':>9} {'speedup':>8} "
          f"{'| per-round: fold/del':>21} {'speedup':>8} {'BN folded':>10} {'others':>5}")
    rows = []
    for name in models:
        try:
            before = cpu_jiffies()
            row = measure_latency(name, rounds, per_round)
            row["other_cores_busy"] = other_cores_busy(before, cpu_jiffies())
        except Exception as e:  # noqa: BLE001
            print(f"{name:24} failed: {error_text(e)}")
            continue
        rows.append(row)
        print(f"{name:24} {row['unfolded_ms']:7.1f}ms {row['folded_ms']:7.1f}ms {row['deleted_ms']:7.1f}ms "
              f"{row['folded_over_deleted']:9.3f} {row['speedup']:7.2f}x {row['folded_over_deleted_paired']:21.3f} "
              f"{row['speedup_paired']:7.2f}x {row['folded_changes']:5d}/{row['folded_changes'] + row['folded_skipped']}"
              f" {row['other_cores_busy']:5.2f}",
              flush=True)
        gc.collect()
    if rows:
        med = {k: statistics.median(r[k] for r in rows)
               for k in ("folded_over_deleted", "speedup", "folded_over_deleted_paired", "speedup_paired")}
        print(f"{'median over models':24} {'':29} {med['folded_over_deleted']:9.3f} {med['speedup']:7.2f}x "
              f"{med['folded_over_deleted_paired']:21.3f} {med['speedup_paired']:7.2f}x")
    return rows


# ------------------------------------------------------------------ printing


def cell(res: dict) -> str:
    if res["status"] == "error":
        return f"{'ERR ' + res['error'].split(':')[0][:19]:>24}"
    tag = {"ok": "ok", "rounding": "f32~", "wrong": "WRONG"}[res["status"]]
    return f"{tag:>5} {res['bn_left']:4d} {res['foldable_left']:4d} {res['time_s'] * 1000:7.0f}ms"


def print_row(rec: dict) -> None:
    name = rec["model"][:30]
    if rec["status"] != "ok":
        detail = rec.get("error", "")[:120] or f"plain forward took {rec.get('forward_s', 0):.1f} s"
        print(f"{name:30} -- {rec['status']}: {detail}", flush=True)
        return
    size = f"{rec['input'][1]}x{rec['input'][2]}"
    exp = "" if rec["export"] == "ok" else " (export failed)"
    tools = " | ".join(cell(rec["tools"][t]) for t in TOOLS)
    print(f"{name:30} {size:>7} {rec['bn_ops']:4d} {rec['foldable']:4d} | {tools}{exp}", flush=True)


def header() -> None:
    sub = f"{'':>5} {'left':>4} {'fold':>4} {'time':>9}"
    print(f"{'':30} {'':>7} {'BN':>4} {'fold':>4} | " + " | ".join(f"{t:^24}" for t in TOOLS))
    print(f"{'model':30} {'input':>7} {'ops':>4} {'able':>4} | " + " | ".join(sub for _ in TOOLS))


def totals(records: list[dict], counts: dict) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    tot: dict = {**counts, "attempted": len(records),
                 **{f"excluded_{s}": sum(r["status"] == s for r in records)
                    for s in ("build_failed", "too_slow", "non_finite_output", "crashed")},
                 "measured": len(ok),
                 "bn_ops": sum(r["bn_ops"] for r in ok),
                 "foldable": sum(r["foldable"] for r in ok),
                 "export_failed": sum(r["export"] != "ok" for r in ok),
                 "models_with_frozen_bn": sum(r["frozen_bn_modules"] > 0 for r in ok),
                 "bn_op_names_counted": sorted(BNOpCounter.seen_ops), "tools": {}}
    for tool in TOOLS:
        res = [r["tools"][tool] for r in ok]
        good = [r for r in res if r["status"] == "ok"]
        ran = [r["time_s"] for r in res if r["status"] != "error"]
        n = max(len(res), 1)
        tot["tools"][tool] = {
            **{k: sum(r["status"] == k for r in res) for k in ("ok", "rounding", "wrong", "error")},
            "success_pct": 100 * len(good) / n,
            "success_pct_with_rounding": 100 * sum(r["status"] in ("ok", "rounding") for r in res) / n,
            "bn_left_when_ok": sum(r["bn_left"] for r in good),
            "eliminated": sum(r["eliminated"] for r in res),
            "eliminated_pct": 100 * sum(r["eliminated"] for r in res) / max(tot["foldable"], 1),
            "eliminated_pct_with_rounding": 100 * sum(r["eliminated_f64"] for r in res) / max(tot["foldable"], 1),
            "median_time_s": statistics.median(ran) if ran else None,
        }
    for peer in ("fx.fuse", "fuse_fx"):
        both = [r["tools"] for r in ok if r["tools"]["normswap"]["status"] != "error"
                and r["tools"][peer]["status"] != "error"]
        tot[f"time_ratio_normswap_over_{peer}"] = {
            "median_per_model_ratio": statistics.median(
                t["normswap"]["time_s"] / t[peer]["time_s"] for t in both) if both else None,
            "ratio_of_medians_same_models": statistics.median(t["normswap"]["time_s"] for t in both)
            / statistics.median(t[peer]["time_s"] for t in both) if both else None,
            "models": len(both),
        }
    return tot


def print_totals(tot: dict) -> None:
    print("\n=== totals ===")
    print(f"timm models: {tot['timm_models']}, with BatchNorm: {tot['with_bn']}, skipped for > 60M params: "
          f"{tot['skipped_over_60M']}, qualifying: {tot['qualifying']}")
    print(f"swept: {tot['attempted']}; excluded: {tot['excluded_build_failed']} failed to build or run a plain "
          f"forward, {tot['excluded_too_slow']} forward > {SLOW_FORWARD_S:.0f} s, {tot['excluded_non_finite_output']} "
          f"non-finite output, {tot['excluded_crashed']} crashed in this script; measured: {tot['measured']}")
    print(f"BN ops executed: {tot['bn_ops']}; foldable (torch.export counter): {tot['foldable']}; "
          f"export failed (nothing counted foldable) on {tot['export_failed']} model(s); "
          f"models with FrozenBatchNorm modules: {tot['models_with_frozen_bn']}")
    print(f"BN ops counted: {', '.join(tot['bn_op_names_counted'])} (+ FrozenBatchNorm forward calls)")
    print("ok: output within 1e-3 (float32); f32~: not in float32 but within 1e-6 when redone in float64 "
          "(the model amplifies rounding); wrong: off in float64 too; error: raised")
    print(f"{'tool':9} {'ok':>4} {'f32~':>4} {'wrong':>5} {'error':>5} {'success':>8} {'(+f32~)':>8} "
          f"{'foldable eliminated':>20} {'(+f32~)':>8} {'BN left (ok)':>12} {'median time':>12}")
    for tool, t in tot["tools"].items():
        med = f"{t['median_time_s'] * 1000:.0f} ms" if t["median_time_s"] is not None else "n/a"
        print(f"{tool:9} {t['ok']:4d} {t['rounding']:4d} {t['wrong']:5d} {t['error']:5d} {t['success_pct']:7.1f}% "
              f"{t['success_pct_with_rounding']:7.1f}% {t['eliminated']:11d} ({t['eliminated_pct']:5.1f}%) "
              f"{t['eliminated_pct_with_rounding']:7.1f}% {t['bn_left_when_ok']:12d} {med:>12}")
    for peer in ("fx.fuse", "fuse_fx"):
        r = tot[f"time_ratio_normswap_over_{peer}"]
        if r["models"]:
            print(f"fold time normswap / {peer}: median per-model ratio {r['median_per_model_ratio']:.2f}, "
                  f"ratio of medians {r['ratio_of_medians_same_models']:.2f} (over the {r['models']} models "
                  f"where neither raised)")


def print_normswap_misses(records: list[dict]) -> None:
    rows = []
    for r in records:
        if r["status"] != "ok":
            continue
        ns = r["tools"]["normswap"]
        if ns["status"] == "error":
            rows.append(f"{r['model']}: raised {ns['error']}")
        elif ns["status"] != "ok":
            rows.append(f"{r['model']}: output differs, relative error {ns['rel_err']:.2e} in float32, "
                        f"{ns.get('rel_err_f64', float('nan')):.2e} in float64 (model's own float32 error "
                        f"{ns.get('model_f32_noise', float('nan')):.2e}) [{ns['status']}]")
        for m in ns.get("missed", []):
            rows.append(f"{r['model']}: {m['path']} not folded: {m['reason']}")
    print(f"\nnormswap: {len(rows)} foldable BN op(s) left, failures or mismatches:")
    for row in rows:
        print("  " + row)


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, help="only the first N qualifying models")
    ap.add_argument("--every", type=int, default=1, help="only every K-th qualifying model (a deterministic sample)")
    ap.add_argument("--models", help="comma-separated model names instead of the zoo")
    ap.add_argument("--side", type=int, default=64, help="input side for the sweep (default 64)")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--latency-only", action="store_true")
    ap.add_argument("--latency-models", help="comma-separated models for the latency part")
    ap.add_argument("--sweep-threads", type=int, default=1,
                    help="threads for the sweep (1: a second core busy elsewhere does not distort fold times)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results" / "fold_zoo.json"))
    args = ap.parse_args()
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results["settings"] = {"torch": torch.__version__, "rtol": RTOL, "rtol_float64": RTOL_F64}

    if not args.latency_only:
        torch.set_num_threads(args.sweep_threads)
        scan = scan_zoo()
        names, counts = select_models(scan)
        if args.models:
            names = args.models.split(",")
        names = names[::args.every][:args.limit]
        print(f"{counts['qualifying']} timm models with BatchNorm and <= 60M parameters; {counts['skipped_over_60M']} "
              f"with BatchNorm skipped for size; sweeping {len(names)} at {args.side}x{args.side} (or the model's "
              f"configured size), batch 1, {args.sweep_threads} thread(s)" + (f", every {args.every}-th" if args.every > 1 else ""))
        measure_model("resnet10t", 32)  # first calls pay for imports and lazy setup: not part of any figure
        header()
        records = []
        t0 = time.perf_counter()
        for i, name in enumerate(names):
            try:
                rec = measure_model(name, args.side)
            except Exception as e:  # noqa: BLE001 - one crash must not end the sweep
                rec = {"model": name, "status": "crashed", "error": error_text(e)}
            records.append(rec)
            print_row(rec)
            gc.collect()
            if i % 25 == 24:
                print(f"  [{i + 1}/{len(names)} in {time.perf_counter() - t0:.0f} s]", flush=True)
        tot = totals(records, counts)
        tot["sample"] = {"every": args.every, "limit": args.limit, "models_arg": bool(args.models), "side": args.side,
                         "threads": args.sweep_threads}
        print_totals(tot)
        print_normswap_misses(records)
        results.update(models=records, totals=tot)

    if not args.skip_latency:
        torch.set_num_threads(2)
        lat = run_latency(args.latency_models.split(",") if args.latency_models else list(LATENCY_MODELS),
                          args.rounds, args.per_round)
        results["latency"] = {
            "input": [1, 3, 224, 224], "threads": torch.get_num_threads(), "rounds": args.rounds,
            "per_round": args.per_round, "models": lat,
            "median_folded_over_deleted": statistics.median(r["folded_over_deleted"] for r in lat) if lat else None,
            "median_speedup": statistics.median(r["speedup"] for r in lat) if lat else None,
            "median_folded_over_deleted_paired": statistics.median(r["folded_over_deleted_paired"] for r in lat)
            if lat else None,
            "median_speedup_paired": statistics.median(r["speedup_paired"] for r in lat) if lat else None,
        }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
