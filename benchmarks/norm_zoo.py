"""LayerNorm/RMSNorm affine folding across the timm zoo: normswap's fold_norm_affine against an independent count.

    nice -n 10 .venv/bin/python benchmarks/norm_zoo.py [--limit N | --models a,b | --every K] [--side 64]
        [--out benchmarks/results/norm_zoo.json]

Sweeps every timm architecture (pretrained=False) holding a LayerNorm or RMSNorm (a module that
normswap.families.family_of places in "layernorm" or "rmsnorm": nn.LayerNorm, nn.RMSNorm, timm's LayerNorm,
LayerNorm2d, RmsNorm, ..., their Fp32 forms) with at most 60M parameters (counted on the meta device; the list
is cached under benchmarks/.cache/). Each model gets random weights, a random affine on every norm
(normswap.testing.randomize_norms), realistic BN state where it also has BatchNorm (randomize_bn), eval mode,
and a small input (--side, or the model's configured size when it needs one). For each it records
- runs: normswap.apply(model, "fold_norm_affine", input_size=..., check=True) on the float32 model returns a
  model (no exception; a failed check raises and counts as not running) and its wall time, check included;
- exact: the same fold of a float64 copy, compared with that copy: max abs error / max |output| < 1e-9; where a
  model computes in float32 inside (LayerNormFp32, casts in the forward) and the error is above 1e-9, the
  figure normswap's own check allows for the float32 arithmetic (check threshold) is the bar;
- folded: the norms whose affine normswap folded, against an independent count of the norms whose every
  reader is a linear or conv layer. That count does not use normswap's graph: a forward hook marks each norm's
  output tensor and a TorchDispatchMode follows it through the aten ops that only move elements (view,
  reshape, permute, transpose, expand, slice/select/index, split, roll, clone, dtype casts, their in-place
  forms) to the ops that
  read it; a norm counts when every read is mm/addmm/linear/convolution with a parameter as the other operand
  and the norm's channels as the contracted dim (an activation inside a norm-act module, a norm output left in
  the model output, or any other op reading it, make it not count). A second count also follows averages (mean,
  average pooling) and zero padding, which normswap also folds through (β does not survive a zero pad, so it
  stays on the norm as β/γ there).
Norms left by normswap are grouped by the report's reason; a model where normswap folds fewer norms than the
independent count is listed with the norms in question and normswap's reason for each.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import statistics
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn as nn
from _common import error_text, relative_error, tensors_of, time_limit  # also sets the thread count and import path
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import normswap
from normswap.families import family_of
from normswap.testing import randomize_bn, randomize_norms

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "timm_norm_models.json"
MAX_PARAMS = 60_000_000
EXACT = 1e-9
SLOW_FORWARD_S = 5.0
TIME_LIMIT_S = 300

# aten ops the independent counter follows a norm's output through (they only move or copy elements) ...
MOVE_OPS = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "squeeze", "unsqueeze",
            "contiguous", "clone", "alias", "detach", "slice", "select", "index", "split", "split_with_sizes",
            "unbind", "chunk", "narrow", "flatten", "unflatten", "movedim", "roll", "_to_copy", "to", "lift_fresh",
            "unsafe_split", "_reshape_alias", "as_strided", "unfold",
            # in-place forms that change only the view
            "as_strided_", "squeeze_", "unsqueeze_", "transpose_", "t_", "swapdims_", "swapaxes_"}
# ... and, for the second count, averages and zero padding.
AVERAGE_OPS = {"mean", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
               "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "constant_pad_nd", "pad"}
# Ops that read only a tensor's shape, dtype or device.
SHAPE_OPS = {"empty_like", "zeros_like", "ones_like", "full_like", "new_empty", "new_zeros", "new_ones", "new_full",
             "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_shape_as_tensor", "is_same_size"}
LINEAR_OPS = {"mm", "addmm", "linear", "convolution", "_convolution", "conv1d", "conv2d", "conv3d"}

warnings.filterwarnings("ignore")


# ------------------------------------------------------------------ which models


def norm_classes() -> tuple[type, ...]:
    from normswap.families import family_classes

    return family_classes()["layernorm"] + family_classes()["rmsnorm"]


def scan_zoo() -> dict:
    """Parameter count and norm presence of every timm model, built on the meta device; cached. Norms are told by
    exact class here (no probe runs on meta tensors); a model with only a norm-like class no list names is kept as
    a candidate and decided on the real model."""
    import timm

    from normswap.families import _ALL_BASES, family_classes
    from normswap.norm_probe import is_norm_like

    stamp = {"timm": timm.__version__, "torch": torch.__version__, "normswap": normswap.__version__}
    if CACHE.exists():
        cached = json.loads(CACHE.read_text())
        if cached.get("versions") == stamp:
            return cached
    models, failed = {}, {}
    t0 = time.perf_counter()
    names = timm.list_models()
    exact = norm_classes()
    listed = {c for classes in family_classes().values() for c in classes}
    bases = (nn.LayerNorm, nn.RMSNorm)

    def unlisted(m: nn.Module) -> bool:  # what family_of would probe, or a LayerNorm/RMSNorm subclass
        return type(m) not in listed and (isinstance(m, bases) or (is_norm_like(m) and not isinstance(m, _ALL_BASES)))
    for i, name in enumerate(names):
        model = None
        try:
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False)
            except Exception:  # noqa: BLE001 - a model that cannot be built on meta is built for real
                model = timm.create_model(name, pretrained=False)
            mods = list(model.modules())
            models[name] = {
                "params": sum(p.numel() for p in model.parameters()),
                "norms": sum(type(m) in exact for m in mods),
                "norm_like_unlisted": sorted({type(m).__name__ for m in mods if unlisted(m)}),
                "has_bn": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods),
            }
        except Exception as e:  # noqa: BLE001
            failed[name] = error_text(e)
        del model
        if i % 100 == 99:
            gc.collect()
            print(f"  scanned {i + 1}/{len(names)} models in {time.perf_counter() - t0:.0f} s", flush=True)
    data = {"versions": stamp, "models": models, "build_failed": failed, "scan_s": time.perf_counter() - t0}
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps(data, indent=1))
    return data


def select_models(scan: dict) -> tuple[list[str], dict]:
    models = scan["models"]
    with_norm = [n for n, m in models.items() if m["norms"] or m["norm_like_unlisted"]]
    small = [n for n in with_norm if models[n]["params"] <= MAX_PARAMS]
    counts = {
        "timm_models": len(models) + len(scan["build_failed"]),
        "meta_scan_failed": len(scan["build_failed"]),
        "with_listed_norm": sum(1 for n in with_norm if models[n]["norms"]),
        "only_unlisted_norm_like": sum(1 for n in with_norm if not models[n]["norms"]),
        "skipped_over_60M": len(with_norm) - len(small),
        "qualifying": len(small),
    }
    return small, counts


# ------------------------------------------------------------------ helpers


def op_name(func) -> str:
    return func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func).split(".")[-2]


# ------------------------------------------------------------------ the independent count


class NormReads(TorchDispatchMode):
    """Follows each norm's output (marked by a forward hook) through element-moving aten ops to what reads it."""

    def __init__(self, param_storages: set[int]):
        super().__init__()
        self.params = param_storages
        self.tags: dict[int, tuple[str, int, bool, torch.Tensor]] = {}  # id -> (norm, channels, averaged, tensor)
        self.reads: dict[str, list[tuple[str, bool]]] = defaultdict(list)  # norm -> [(what read it, averaged)]

    def tag(self, t: torch.Tensor, norm: str, channels: int, averaged: bool) -> None:
        self.tags[id(t)] = (norm, channels, averaged, t)  # the tensor is kept alive: its id stays unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        marked = [(i, self.tags[id(a)]) for i, a in enumerate(flat)
                  if isinstance(a, torch.Tensor) and id(a) in self.tags]
        if not marked:
            return out
        name = op_name(func)
        if name in SHAPE_OPS:
            return out
        for i, (norm, channels, averaged, _) in marked:
            if name in MOVE_OPS or name in AVERAGE_OPS:
                for o in tensors_of(out):
                    self.tag(o, norm, channels, averaged or name in AVERAGE_OPS)
            elif name in LINEAR_OPS and self.linear_read(name, flat, i, channels):
                self.reads[norm].append(("linear", averaged))
            else:
                self.reads[norm].append((name, averaged))
        return out

    def linear_read(self, name: str, flat: list, i: int, channels: int) -> bool:
        """The marked tensor is the activation of a linear/conv op whose weight is a parameter (or a view of
        one) and whose contracted dim is the norm's channels."""
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        x = flat[i]
        if name in ("mm", "addmm"):
            act, weight = (tensors[0], tensors[1]) if name == "mm" else (tensors[1], tensors[2])
            ok_shape = act.shape[-1] == channels
        elif name == "linear":
            act, weight = tensors[0], tensors[1]
            ok_shape = act.shape[-1] == channels
        else:  # convolution: (input, weight, bias, ...)
            act, weight = tensors[0], tensors[1]
            ok_shape = act.ndim > 1 and act.shape[1] == channels
        return act is x and ok_shape and weight.untyped_storage().data_ptr() in self.params


def independent_count(model: nn.Module, x: torch.Tensor, norms: dict[str, nn.Module]) -> dict:
    """Per norm path: whether every read of its output is a linear/conv layer, without (strict) and with
    (averages) following averages and zero pads, and what else read it."""
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    mode = NormReads(storages)
    calls: Counter = Counter()
    act_inside: set[str] = set()

    def hook(path, module):
        def fn(mod, args, output):
            calls[path] += 1
            channels = module.weight.numel() if getattr(module, "weight", None) is not None else \
                int(tuple(getattr(module, "normalized_shape", (0,)))[-1])
            act = getattr(module, "act", None)
            if act is not None and not isinstance(act, nn.Identity):
                act_inside.add(path)
            if isinstance(output, torch.Tensor):
                mode.tag(output, path, channels, False)
        return fn

    handles = [m.register_forward_hook(hook(p, m)) for p, m in norms.items()]
    try:
        with torch.no_grad(), mode:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    in_output = {mode.tags[id(t)][0] for t in tensors_of(out) if id(t) in mode.tags}
    res = {}
    for path in norms:
        reads = mode.reads.get(path, [])
        problem = ("never called" if not calls[path] else "activation inside" if path in act_inside
                   else "model output" if path in in_output else "no reader" if not reads else None)
        strict = problem is None and all(what == "linear" and not averaged for what, averaged in reads)
        lenient = problem is None and all(what == "linear" for what, _ in reads)
        others = sorted({what for what, _ in reads if what != "linear"})
        res[path] = {"strict": strict, "lenient": lenient, "calls": calls[path],
                     "other_reads": ([problem] if problem else []) + others}
    return res


# ------------------------------------------------------------------ measuring one model


def build(name: str, side: int):
    """The model with random norm affines (and realistic BN state) in eval mode, an input it runs on."""
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
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            randomize_bn(model, (2, *size), seed=0)
        randomize_norms(model, seed=0)
        return model.eval(), x, errors
    raise RuntimeError("; ".join(errors))


def folded_norms(report, norms: dict) -> set[str]:
    """Norm paths the report changed (not skipped)."""
    skipped = {s["path"] for s in report.skipped}
    return {c["path"] for c in report.changes if c["path"] in norms and c["path"] not in skipped}


def measure_model(name: str, side: int) -> dict:
    rec: dict = {"model": name}
    try:
        with time_limit(TIME_LIMIT_S):
            model, x, size_errors = build(name, side)
    except Exception as e:  # noqa: BLE001
        rec.update(status="build_failed", error=error_text(e))
        return rec
    rec["input"] = list(x.shape[1:])
    if size_errors:
        rec["smaller_sizes_failed"] = size_errors
    norms = {p: m for p, m in model.named_modules() if family_of(m) in ("layernorm", "rmsnorm")}
    rec["norms"] = len(norms)
    rec["norm_classes"] = dict(Counter(type(m).__name__ for m in norms.values()))
    if not norms:
        rec["status"] = "no_norm"
        return rec
    t = time.perf_counter()
    with torch.no_grad():
        ref = model(x)
    rec["forward_s"] = time.perf_counter() - t
    if rec["forward_s"] > SLOW_FORWARD_S:
        rec["status"] = "too_slow"
        return rec
    if not all(torch.isfinite(o).all() for o in tensors_of(ref)):
        rec["status"] = "non_finite_output"
        return rec
    try:
        with time_limit(TIME_LIMIT_S):
            indep = independent_count(model, x, norms)
        rec["independent"] = "ok"
    except Exception as e:  # noqa: BLE001 - no count: nothing counts as foldable
        indep = {}
        rec["independent"] = error_text(e)
    rec["indep_strict"] = sorted(p for p, v in indep.items() if v["strict"])
    rec["indep_lenient"] = sorted(p for p, v in indep.items() if v["lenient"])
    rec["indep_other_reads"] = {p: v["other_reads"] for p, v in indep.items() if not v["lenient"]}
    rec["normswap"] = run_normswap(model, x, norms)
    if rec["normswap"]["status"] != "error":
        rec["float64"] = run_float64(model, x, norms)
    rec["status"] = "ok"
    return rec


def run_normswap(model: nn.Module, x: torch.Tensor, norms: dict) -> dict:
    res: dict = {}
    size = tuple(x.shape)
    gc.collect()
    try:
        with time_limit(TIME_LIMIT_S):
            t = time.perf_counter()
            _, report = normswap.apply(model, "fold_norm_affine", input_size=size, check=True, return_report=True)
            res["time_s"] = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - a failure is a result
        res.update(status="error", error=error_text(e))
        result = getattr(e, "result", None)
        if result is not None:
            res["check_max_rel"], res["check_threshold"] = result.max_rel, result.threshold
        return res
    res["status"] = "ok"
    res["folded"] = sorted(folded_norms(report, norms))
    res["skipped"] = {s["path"]: s["reason"] for s in report.skipped if s["path"] in norms}
    res["beta_kept"] = sorted(c["path"] for c in report.changes if c["path"] in norms
                              and any("β stays on the norm" in n for n in c["notes"]))
    res["check_max_rel"] = report.check_result.max_rel
    res["check_threshold"] = report.check_result.threshold
    return res


def run_float64(model: nn.Module, x: torch.Tensor, norms: dict) -> dict:
    res: dict = {}
    try:
        with time_limit(TIME_LIMIT_S):
            m64, x64 = copy.deepcopy(model).double(), x.double()
            with torch.no_grad():
                ref = m64(x64)
            f64 = normswap.apply(m64, "fold_norm_affine", input_size=tuple(x.shape))
            with torch.no_grad():
                out = f64(x64)
            res["rel_err"] = relative_error(ref, out)
            res["exact"] = res["rel_err"] < EXACT
            if not res["exact"]:
                check = normswap.check(m64, f64, [x64])
                res["check_ok"], res["check_threshold"] = check.ok, check.threshold
                res["within_check"] = bool(check.ok)
            res["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        res.update(status="error", error=error_text(e))
    return res


# ------------------------------------------------------------------ reasons


REASON_GROUPS = [
    ("residual stream (added to another branch)", "added to another branch"),
    ("read by a functional F.linear with a layer's weight (not the layer)", "reaches linear, which"),
    ("its reader is a layer called more than once (shared by other inputs)", ", which is called"),
    ("its reader is a layer called more than once (shared by other inputs)", "as an argument other than its input"),
    ("tied weight", "tied to"),
    ("model output", "the model output"),
    ("activation inside the norm-act layer", "its activation"),
    ("called more than once", "times: one folded copy"),
    ("never called", "never called"),
    ("channels do not line up with the reader", "do not line up"),
    ("reader's tensors read elsewhere", "outside it, and would read"),
    ("unidentified norm class", "never guessed"),
    ("normalizes over several dims", "several dims"),
    ("near-zero γ with β left on the norm", "near-)zero"),
    ("no affine", "no affine"),
    ("output reaches no layer", "reaches no layer"),
    ("pads with a nonzero value", "pads with values other than zero"),
    ("cannot follow channels through an op", "cannot be followed"),
]


def reason_group(reason: str) -> str:
    for group, needle in REASON_GROUPS:
        if needle in reason:
            return group
    m = re.search(r"reaches \S+ \((\w+)\), which cannot absorb it", reason)
    if m:
        return f"read by a layer that cannot absorb it: {m.group(1)}"
    m = re.search(r"reaches (\S+)[^,]*, which is not a linear", reason)
    if m:
        op = re.sub(r"\(.*", "", m.group(1))
        return f"non-linear reader: {op}"
    return "other: " + reason[:80]


# ------------------------------------------------------------------ printing and totals


def print_row(rec: dict) -> None:
    name = rec["model"][:34]
    if rec["status"] != "ok":
        detail = rec.get("error", "")[:110] or (f"plain forward took {rec['forward_s']:.1f} s"
                                                if "forward_s" in rec else "")
        print(f"{name:34} -- {rec['status']}: {detail}", flush=True)
        return
    ns, f64 = rec["normswap"], rec.get("float64", {})
    size = f"{rec['input'][1]}x{rec['input'][2]}"
    if ns["status"] == "error":
        print(f"{name:34} {size:>7} {rec['norms']:5d} {len(rec['indep_strict']):6d} {len(rec['indep_lenient']):6d} | "
              f"ERROR {ns['error'][:80]}", flush=True)
        return
    exact = ("exact" if f64.get("exact") else "f32-in" if f64.get("within_check") else "MISS"
             if f64.get("status") == "ok" else "f64 n/a")
    err = f"{f64['rel_err']:.1e}" if "rel_err" in f64 else ""
    print(f"{name:34} {size:>7} {rec['norms']:5d} {len(rec['indep_strict']):6d} {len(rec['indep_lenient']):6d} | "
          f"{len(ns['folded']):6d} {len(ns['beta_kept']):4d} {exact:>7} {err:>8} {ns['time_s'] * 1000:7.0f}ms",
          flush=True)


def header() -> None:
    print(f"{'':34} {'':>7} {'':>5} {'indep':>6} {'+avg':>6} | {'normswap':^40}")
    print(f"{'model':34} {'input':>7} {'norms':>5} {'linear':>6} {'linear':>6} | {'folded':>6} {'β/γ':>4} "
          f"{'float64':>7} {'rel err':>8} {'time':>9}")


def totals(records: list[dict], counts: dict) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    ran = [r for r in ok if r["normswap"]["status"] == "ok"]
    f64 = [r for r in ran if r.get("float64", {}).get("status") == "ok"]
    groups: Counter = Counter()
    group_models: dict[str, list[str]] = defaultdict(list)
    for r in ran:
        for why in r["normswap"]["skipped"].values():
            g = reason_group(why)
            groups[g] += 1
            if r["model"] not in group_models[g]:
                group_models[g].append(r["model"])
    below, below_lenient, above = [], [], []
    for r in ran:
        folded = set(r["normswap"]["folded"])
        for count, out in (("indep_strict", below), ("indep_lenient", below_lenient)):
            missing = [p for p in r[count] if p not in folded]
            if missing:
                out.append({"model": r["model"], "independent": len(r[count]), "normswap": len(folded),
                            "norms": {p: r["normswap"]["skipped"].get(p, "(folded? not in the report)")
                                      for p in missing}})
        extra = sorted(folded - set(r["indep_strict"]))
        if extra:
            above.append({"model": r["model"], "norms": {p: r["indep_other_reads"].get(p, ["(through averages)"])
                                                         for p in extra}})
    tot = {
        **counts,
        "attempted": len(records),
        **{f"excluded_{s}": sum(r["status"] == s for r in records)
           for s in ("build_failed", "no_norm", "too_slow", "non_finite_output", "crashed")},
        "measured": len(ok),
        "runs": len(ran),
        "runs_pct": 100 * len(ran) / max(len(ok), 1),
        "errors": {r["model"]: r["normswap"]["error"] for r in ok if r["normswap"]["status"] == "error"},
        "float64_measured": len(f64),
        "float64_not_runnable": {r["model"]: r["float64"].get("error") for r in ran
                                 if r.get("float64", {}).get("status") != "ok"},
        "exact": sum(r["float64"]["exact"] for r in f64),
        "within_check_only": sum(not r["float64"]["exact"] and r["float64"].get("within_check", False) for r in f64),
        "float64_miss": {r["model"]: r["float64"]["rel_err"] for r in f64
                         if not r["float64"]["exact"] and not r["float64"].get("within_check")},
        "norms": sum(r["norms"] for r in ok),
        "norms_in_runs": sum(r["norms"] for r in ran),
        "indep_strict": sum(len(r["indep_strict"]) for r in ran),
        "indep_lenient": sum(len(r["indep_lenient"]) for r in ran),
        "independent_count_failed": sum(r["independent"] != "ok" for r in ok),
        "normswap_folded": sum(len(r["normswap"]["folded"]) for r in ran),
        "normswap_folded_of_strict": sum(len(set(r["normswap"]["folded"]) & set(r["indep_strict"])) for r in ran),
        "normswap_folded_of_lenient": sum(len(set(r["normswap"]["folded"]) & set(r["indep_lenient"])) for r in ran),
        "beta_kept_on_norm": sum(len(r["normswap"]["beta_kept"]) for r in ran),
        "median_time_s": statistics.median(r["normswap"]["time_s"] for r in ran) if ran else None,
        "skipped_by_reason": dict(groups.most_common()),
        "skipped_reason_models": {g: ms[:8] for g, ms in group_models.items()},
        "below_independent": below,
        "below_independent_with_averages": below_lenient,
        "above_independent": above,
    }
    return tot


def print_totals(tot: dict) -> None:
    print("\n=== totals ===")
    print(f"timm models: {tot['timm_models']}; with a LayerNorm/RMSNorm class normswap lists: "
          f"{tot['with_listed_norm']} (+{tot['only_unlisted_norm_like']} with only an unlisted norm-like class, "
          f"decided on the real model); skipped for > 60M params: {tot['skipped_over_60M']}; qualifying: "
          f"{tot['qualifying']}")
    print(f"swept: {tot['attempted']}; excluded: {tot['excluded_build_failed']} failed to build or run, "
          f"{tot['excluded_no_norm']} without a LayerNorm/RMSNorm after all, {tot['excluded_too_slow']} forward > "
          f"{SLOW_FORWARD_S:.0f} s, {tot['excluded_non_finite_output']} non-finite output, {tot['excluded_crashed']} "
          f"crashed in this script; measured: {tot['measured']}")
    print(f"runs (fold_norm_affine with check=True returns a model): {tot['runs']}/{tot['measured']} "
          f"({tot['runs_pct']:.1f}%)")
    for m, e in tot["errors"].items():
        print(f"  raised: {m}: {e}")
    n64 = max(tot["float64_measured"], 1)
    print(f"float64 fold: exact (rel err < {EXACT:g}) {tot['exact']}/{tot['float64_measured']} "
          f"({100 * tot['exact'] / n64:.1f}%); within the check's threshold for float32 arithmetic inside "
          f"{tot['within_check_only']} more ({100 * (tot['exact'] + tot['within_check_only']) / n64:.1f}%); "
          f"misses {len(tot['float64_miss'])}; float64 not runnable on {len(tot['float64_not_runnable'])}")
    for m, e in tot["float64_miss"].items():
        print(f"  float64 miss: {m}: rel err {e:.2e}")
    for m, e in tot["float64_not_runnable"].items():
        print(f"  float64 not runnable: {m}: {e}")
    s, l_ = max(tot["indep_strict"], 1), max(tot["indep_lenient"], 1)
    print(f"norms in the models that ran: {tot['norms_in_runs']}; independent count, every reader linear/conv: "
          f"{tot['indep_strict']} through element moves only, {tot['indep_lenient']} also through averages and zero "
          f"pads (count failed on {tot['independent_count_failed']} model(s))")
    print(f"normswap folded {tot['normswap_folded']} norms: {tot['normswap_folded_of_strict']}/{tot['indep_strict']} "
          f"({100 * tot['normswap_folded_of_strict'] / s:.1f}%) of the first count, "
          f"{tot['normswap_folded_of_lenient']}/{tot['indep_lenient']} "
          f"({100 * tot['normswap_folded_of_lenient'] / l_:.1f}%) of the second; β left on the norm as β/γ on "
          f"{tot['beta_kept_on_norm']}; median time "
          f"{tot['median_time_s'] * 1000 if tot['median_time_s'] else float('nan'):.0f} ms (float32, check included)")
    print("norms left by normswap, by reason:")
    for g, n in tot["skipped_by_reason"].items():
        print(f"  {n:5d}  {g}  (e.g. {', '.join(tot['skipped_reason_models'][g][:4])})")
    for key, what in (("below_independent", "the first count"), ("below_independent_with_averages",
                                                                      "the second count")):
        print(f"models where normswap leaves norms {what} takes: {len(tot[key])}")
        for b in tot[key]:
            why = Counter(reason_group(w) for w in b["norms"].values())
            print(f"  {b['model']}: {len(b['norms'])} norm(s) (independent {b['independent']}, normswap folded "
                  f"{b['normswap']}): " + "; ".join(f"{g} x{n}" for g, n in why.items()))
            p, w = next(iter(b["norms"].items()))
            print(f"    e.g. {p}: {w[:150]}")
    print(f"models where normswap folds norms the first count does not take: {len(tot['above_independent'])}")
    for a in tot["above_independent"][:20]:
        reads = Counter(w for v in a["norms"].values() for w in v)
        print(f"  {a['model']}: {len(a['norms'])} norm(s), read by {', '.join(f'{k} x{v}' for k, v in reads.items())}")


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, help="only the first N qualifying models")
    ap.add_argument("--every", type=int, default=1, help="only every K-th qualifying model (a deterministic sample)")
    ap.add_argument("--models", help="comma-separated model names instead of the zoo")
    ap.add_argument("--side", type=int, default=64, help="input side (default 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "norm_zoo.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scan = scan_zoo()
    names, counts = select_models(scan)
    if args.models:
        names = args.models.split(",")
    names = names[::args.every][:args.limit]
    print(f"{counts['qualifying']} timm models with a LayerNorm/RMSNorm and <= 60M parameters; sweeping {len(names)} "
          f"at {args.side}x{args.side} (or the model's configured size), batch 1, {args.threads} thread(s)"
          + (f", every {args.every}-th" if args.every > 1 else ""))
    measure_model("vit_tiny_patch16_224", 32)  # first calls pay for imports and lazy setup: not part of any figure
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
                     "threads": args.threads, "wall_s": time.perf_counter() - t0}
    print_totals(tot)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {"torch": torch.__version__, "normswap": normswap.__version__,
                                            "exact": EXACT}, "models": records, "totals": tot}, indent=1,
                              default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
