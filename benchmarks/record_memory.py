"""Peak memory and time of the analysis pass (graph.record) beside a plain no-grad forward of the same model.

    .venv/bin/python benchmarks/record_memory.py [--models deeplabv3_resnet50@768,timm:resnet50@512,...]

Each measurement runs in a fresh process, since peak RSS (VmHWM) only grows: the figure is the
peak during the pass minus the RSS before it (model built, input made). Recording holds no
intermediate tensor, so its peak should be a forward's working set, not the sum of every
activation (which it was while it kept them all alive to keep tensor ids unique).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = "torchvision:deeplabv3_resnet50@768,timm:resnet50@512,timm:xcit_small_24_p8_384@384"


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(spec: str, side: int, mode: str, threads: int) -> dict:
    """One pass in this process: its time and its peak RSS above the RSS before it."""
    warnings.filterwarnings("ignore")
    import torch

    from normswap.graph import record
    from normswap.model_io import build_spec

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_spec(spec).eval()
    x = torch.randn(1, 3, side, side)
    reset_peak()
    before = vm_hwm_mb()
    t = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            model(x)
    else:
        record(model, x)
    return {"seconds": time.perf_counter() - t, "peak_mb": vm_hwm_mb() - before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=DEFAULT, help="comma-separated SOURCE:NAME@SIDE (timm or torchvision)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # SPEC@SIDE:MODE, run in a child process
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    if args.one:
        target, mode = args.one.rsplit(":", 1)
        spec, side = target.rsplit("@", 1)
        print(json.dumps(measure(spec, int(side), mode, args.threads)))
        return
    print(f"{'model':40} {'side':>5} | {'forward':>18} | {'record':>18} | record/forward: time, memory")
    for target in args.models.split(","):
        res = {}
        for mode in ("forward", "record"):
            out = subprocess.run([sys.executable, __file__, "--one", f"{target}:{mode}", "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        spec, side = target.rsplit("@", 1)
        f, r = res["forward"], res["record"]
        print(f"{spec:40} {side:>5} | {f['seconds']:6.2f} s {f['peak_mb']:7.0f} MB | {r['seconds']:6.2f} s "
              f"{r['peak_mb']:7.0f} MB | {r['seconds'] / f['seconds']:.2f}x, {r['peak_mb'] / max(f['peak_mb'], 1):.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
