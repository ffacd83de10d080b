"""The normswap command line. The only module that prints or exits.

Exit codes: 0 success, 1 a check failed (nothing written), 2 bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from ._version import __version__
from .devices import device_named, torch_device_name
from .errors import CheckFailedError, InputSpecError, NormswapError, OutputError
from .inputs import cli_input_size
from .model_io import EXPORT_SUFFIX, Loaded, load_inputs, resolve_output, save_model, sidecar_path
from .recipe import list_recipes, load_recipe, schema_text
from .report import Report
from .rewrite import Rewrite, load_input, rewrite
from .text import wrapped
from .verify.artifact import open_exported, refuse_exported_reference
from .verify.check import check as run_check
from .verify.export import format_for


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: exit 2 with usage, no traceback
        self.print_usage(sys.stderr)
        raise _UsageError(self.prog, message)


class _UsageError(Exception):
    def __init__(self, prog: str, message: str):
        self.prog, self.message = prog, message
        super().__init__(f"{prog}: {message}")


def _model_args(p: argparse.ArgumentParser, name: str = "model") -> None:
    p.add_argument(name, metavar=name.upper(), help="timm:NAME, torchvision:NAME, package.module:factory, or a file")
    p.add_argument("--arch", help="architecture spec for a state-dict file (e.g. timm:resnet50)")
    p.add_argument("--weights", help="state dict to load into a spec-built model")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a whole module (runs code from the file)")
    p.add_argument("--ema", action="store_true", help="prefer the EMA weights of a training checkpoint")
    p.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="WEIGHTS",
                   help="load a spec's pretrained weights through timm / torchvision and their caches (the first "
                        "run downloads them); WEIGHTS: a torchvision weights name, e.g. IMAGENET1K_V2")
    _device_arg(p)


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                   help="where the model runs: analysis, fold arithmetic, calibration and the check (default cpu); "
                        "files are written from the CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normswap", description="Model surgery for normalization layers.")
    parser.add_argument("--version", action="version", version=f"normswap {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _add_apply(sub)
    _add_fold(sub)
    _add_bake(sub)
    _add_recalibrate(sub)
    _add_migrate(sub)
    _add_inspect(sub)
    _add_check(sub)
    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.add_argument("--json", action="store_true")
    sub.add_parser("schema", help="print the JSON Schema for recipe files")
    return parser


def _add_apply(sub) -> None:
    p = sub.add_parser("apply", help="rewrite a model by a recipe")
    p.add_argument("recipe", metavar="RECIPE", help="built-in recipe name or YAML file")
    _model_args(p)
    _rewrite_args(p, "output file (.safetensors or .pt)", "the plan", "the recipe's check")
    p.add_argument("--check", choices=("numeric", "interface", "none"),
                   help="how to check the result (default: the recipe's check: numeric when every rule keeps the "
                        "eval-mode function, else interface)")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="set a recipe parameter")
    cal = p.add_mutually_exclusive_group()
    cal.add_argument("--calibrate-data", metavar="DIR", help="fit the new layers' affine on a folder of images")
    cal.add_argument("--calibrate-tensors", metavar="FILE", help="fit the new layers' affine on saved batches")
    p.add_argument("--calibrate-batch-size", type=int, default=32, help="images per batch for --calibrate-data")
    p.add_argument("--calibrate-limit", type=int, help="use at most this many images from --calibrate-data")
    p.add_argument("--calibrate-fit", choices=("least_squares", "moments"), default="least_squares",
                   help="how each layer is fitted (default least_squares; see docs/calibration.md)")
    p.add_argument("--calibrate-groups", type=_group_mode, default="keep", metavar="keep|auto|TOL",
                   help="GroupNorm group counts: keep the recipe's (default), or per layer the most groups whose "
                        "fitted error is within TOL (auto: 0.005) of the best count's (see docs/calibration.md)")


def _add_fold(sub) -> None:
    p = sub.add_parser("fold", help="fold BatchNorm into the conv/linear layers next to it, for deployment")
    _model_args(p)
    _rewrite_args(p, "output file (.safetensors, .pt, or with --export .onnx / .pt2)", "what would fold",
                  "the numeric check")
    p.add_argument("--export", choices=("onnx", "pt2"), help="write an ONNX or torch.export file, verified by running it")
    p.add_argument("--dynamic", choices=("batch", "spatial", "none"), default="batch",
                   help="input dimensions the exported file leaves free (default batch; spatial: batch, height, "
                        "width), each verified at two sizes; a model that cannot gets a fixed-shape file and a note")
    p.add_argument("--set", action="append", default=[], metavar="K=V",
                   help="fold_bn parameter: bake_parametrizations, unfoldable, into_next")


def _add_bake(sub) -> None:
    p = sub.add_parser("bake", help="replace spectral/weight-norm parametrizations by plain weights, for deployment")
    _model_args(p)
    _rewrite_args(p, "output file (.safetensors or .pt: a baked model pickles)", "what would be baked",
                  "the numeric check")


def _rewrite_args(p: argparse.ArgumentParser, output: str, dry_run: str, check: str) -> None:
    """The options apply, fold and bake share: where to write, a dry run, the example input, the check, JSON."""
    p.add_argument("-o", "--output", help=output + "; default: INPUT.RECIPE beside the input (here for a spec)")
    p.add_argument("--dry-run", action="store_true", help=f"print {dry_run}; change and write nothing")
    p.add_argument("--input-size", help="example input shape for analysis and the check, e.g. 1,3,224,224")
    p.add_argument("--no-check", action="store_true", help=f"skip {check}")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_recalibrate(sub) -> None:
    p = sub.add_parser("recalibrate", help="re-estimate BatchNorm statistics on new data (AdaBN), exactly")
    _model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="a folder of images (class subfolders fine), transformed as the "
                                                  "model's pretrained_cfg says")
    src.add_argument("--tensors", metavar="FILE", help="a tensor file: one batch, or a list of batches")
    src.add_argument("--random", type=int, metavar="N", help="N batches of random inputs (a smoke run)")
    p.add_argument("-o", "--output", required=True, help="output file (.safetensors or .pt)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch for --data / --random (default 32)")
    p.add_argument("--limit", type=int, help="use at most this many images from --data")
    p.add_argument("--max-samples", type=int, default=256,
                   help="samples in flight at once (default 256); more data runs one partial pass per BN")
    p.add_argument("--input-size", help="input shape, e.g. 1,3,224,224 (default: the model's pretrained_cfg)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_migrate(sub) -> None:
    p = sub.add_parser("migrate", help="rename spectral/weight-norm state-dict keys between torch's old hooks "
                                      "and its parametrizations")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a state dict or training checkpoint (.pt/.pth/.safetensors)")
    p.add_argument("-o", "--output", required=True, help="output state dict (.pt or .safetensors)")
    p.add_argument("--to", choices=("parametrized", "legacy"),
                   help="target format (default: the other one from what the file holds)")
    p.add_argument("--json", action="store_true", help="print what was renamed as JSON")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list the normalization layers with their producers and users")
    _model_args(p)
    p.add_argument("--input-size", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--json", action="store_true")


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="compare two models on the same inputs; name the first layer where they part",
                       description="Exit 0: equivalent; 1: not; 2: bad input.")
    p.add_argument("reference", metavar="REFERENCE", help="the original model (spec or file)")
    p.add_argument("candidate", metavar="CANDIDATE", help="the rewritten model (spec or file), or an exported "
                   ".onnx / .pt2 file, run in onnxruntime / torch.export")
    p.add_argument("--arch", help="architecture spec for state-dict files")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling whole modules (runs code from the files)")
    p.add_argument("--input-size", help="example input shape, e.g. 2,3,224,224 (default: the model's pretrained_cfg)")
    p.add_argument("--inputs", metavar="FILE", help="tensor file of inputs: a tensor, a tuple of arguments, or a list")
    p.add_argument("--n-inputs", type=int, default=2, help="how many seeded random inputs (default 2)")
    p.add_argument("--mode", choices=("numeric", "interface"), default="numeric",
                   help="numeric: same outputs; interface: same structure, finite, trainable (for BN -> GN)")
    p.add_argument("--rtol", type=float, help="relative tolerance (default by dtype: float32 1e-5, float16 1e-2)")
    p.add_argument("--atol", type=float, help="absolute tolerance (default 0)")
    p.add_argument("--float64", action="store_true", help="compare float64 copies of both models")
    _device_arg(p)
    p.add_argument("--layers", action="store_true", help="record every layer even when the outputs agree")
    p.add_argument("--plot", metavar="FILE.png", help="draw the per-layer error along the network (needs matplotlib)")
    p.add_argument("--json", action="store_true")


def _width() -> int:
    """The terminal's width, or 80 when the output is piped or redirected."""
    return shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else 80


def _console(stream=None):
    from rich.console import Console

    return Console(file=stream or sys.stdout, width=_width(), soft_wrap=False, highlight=False)


def _params(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputSpecError(f"--set {item!r} is not KEY=VALUE", fix="write it like --set num_groups=16")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _load(args, source: str | None = None) -> Loaded:
    device = device_named(args.device)  # before loading: a missing GPU should not cost a download
    loaded = load_input(
        source or args.model, arch=args.arch, weights=getattr(args, "weights", None),
        trust_pickle=args.trust_pickle, ema=getattr(args, "ema", False), pretrained=getattr(args, "pretrained", False),
    )
    if device.type != "cpu":
        loaded.model.to(device)
        loaded.notes.append(f"ran on {device} ({torch_device_name(device)}); files are written from the CPU")
    if getattr(args, "input_size", None):
        loaded.input_size = list(cli_input_size(args.input_size, loaded.model))
    return loaded


def cmd_apply(args) -> int:
    recipe = load_recipe(args.recipe, _params(args.set))
    if args.output and Path(args.output).suffix in (".onnx", ".pt2"):
        raise OutputError(f"apply writes a model to rewrite or load again (.safetensors or .pt), not {args.output}: "
                          "it has no export", fix="fold it for deployment (normswap fold OUT.safetensors -o "
                                                  f"{Path(args.output).name}), or write .safetensors and export it")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run or not (args.calibrate_data or args.calibrate_tensors):
        if launched > 1 and int(os.environ.get("RANK", "0")) != 0:
            return 0  # only calibration is shared: process 0 does the rest alone, and writes
        loaded = _load(args)
        if launched > 1:
            loaded.notes.append(f"only calibration is shared between processes: without calibration data process 0 "
                                f"did the whole rewrite, and the other {launched - 1} returned at once")
        return _rewrite(args, recipe, loaded)
    with _processes() as shard:
        return _rewrite(args, recipe, _load(args), shard=shard)


@contextlib.contextmanager
def _processes():
    """Yields (rank, number of processes). Under torchrun (WORLD_SIZE > 1, no group yet) a gloo group on the CPU
    for the command's duration, destroyed when it ends, error or not."""
    import torch.distributed as dist

    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        started = True
    try:
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    finally:
        if started:
            dist.destroy_process_group()


def cmd_fold(args) -> int:
    recipe = load_recipe("fold_bn", _params(args.set))
    loaded = _load(args)
    training = [name for name, m in loaded.model.named_modules() if m.training]
    if training:
        loaded.model.eval()
        loaded.notes.append(f"the model was in train mode ({len(training)} module(s)); switched it to eval mode, "
                            "where BatchNorm uses its running statistics")
    export = format_for(Path(args.output).suffix if args.output else "", args.export)
    return _rewrite(args, recipe, loaded, export=export, eval_mode=True)


def _rewrite(args, recipe, loaded: Loaded, export: str | None = None, eval_mode: bool = False,
             shard: tuple[int, int] = (0, 1)) -> int:
    """Plan, apply to a copy, check, and write atomically; nothing is written unless the check passes.

    ``shard``: (rank, processes): each process calibrates on every processes-th batch from its rank on; all
    get the same model, and only rank 0 writes and prints.
    """
    rank, processes = shard
    out = None
    if not args.dry_run:
        out = resolve_output(args.output or _default_output(loaded, recipe.name, export), loaded, export=export)
        if not args.output and (out.exists() or sidecar_path(out).exists()):
            raise OutputError(f"{out} exists (the default output name for this input and recipe); nothing was "
                              "overwritten", fix="name the output with -o OUT, or move the old file away")
    input_size = tuple(loaded.input_size) if loaded.input_size else None
    batches = None if args.dry_run else _calibration_batches(args, loaded, input_size)
    if batches and input_size is None:
        input_size = tuple(batches[0].shape)  # the data says what the model takes; the sidecar keeps it for replay
        loaded.input_size = list(input_size)
    if batches is not None:
        batches = batches[rank::processes]  # an empty shard is calibration's error, on every process alike
    try:
        done = rewrite(loaded.model, recipe, check=not args.no_check, check_mode=getattr(args, "check", None),
                       dry_run=args.dry_run, input_size=input_size,
                       calibration=batches, calibration_fit=getattr(args, "calibrate_fit", "least_squares"),
                       calibration_groups=getattr(args, "calibrate_groups", "keep"))
    except CheckFailedError as failed:
        if rank == 0:
            failed.report.notes[:0] = loaded.notes
            _emit(args, failed.report)
            _check_failed(args, failed.result)
        return 1
    if rank != 0:
        return 0
    report = done.report
    report.notes[:0] = loaded.notes
    failure = None if args.dry_run else _write(done, out, loaded, export, eval_mode, getattr(args, "dynamic", "batch"))
    _emit(args, report)
    if failure and not args.json:
        print(f"normswap: nothing was written: {failure}", file=sys.stderr)
    return 1 if failure else 0


def _default_output(loaded: Loaded, recipe_name: str, export: str | None) -> Path:
    """``<input stem>.<recipe>.<ext>`` beside the input file, or ``<model name>.<recipe>.<ext>`` here for a
    spec; the extension as for an OUT without one: the export's, .pt for a pickled module, else .safetensors."""
    ext = EXPORT_SUFFIX[export] if export else (".pt" if loaded.spec is None else ".safetensors")
    if loaded.path is not None:
        return loaded.path.with_name(f"{loaded.path.stem}.{recipe_name}{ext}")
    name = (loaded.given or loaded.spec or "model").rpartition(":")[2].rpartition("/")[2] or "model"
    return Path.cwd() / f"{name}.{recipe_name}{ext}"


def _check_failed(args, result) -> None:
    """Say on stderr that nothing was written, why, and what to do."""
    if args.json:
        return  # the report on stdout carries the check; its "check" entry says ok: false
    print(f"normswap: nothing was written: the rewritten model failed the {result.mode} check", file=sys.stderr)
    hint = (result.first_divergence or {}).get("hint")
    changed = result.first_divergence and result.first_divergence.get("candidate") not in (
        None, result.first_divergence.get("reference"))
    if changed and hint:
        print(f"  fix: {hint}", file=sys.stderr)
    elif args.command == "apply":
        print("  fix: if the recipe changes the function on purpose, use --check interface (or `check: interface` "
              "in the recipe); else the layer named above is where the outputs part", file=sys.stderr)


def _write(done: Rewrite, out: Path, loaded: Loaded, export: str | None, eval_mode: bool,
           dynamic: str = "batch") -> str | None:
    """Export (verified) if asked, then save the model and its sidecar; what went wrong, if the export differs."""
    data = None
    report = done.report
    done.model.to("cpu")  # a file that loads on any machine; the export is traced and verified there too
    if export is not None:
        from .inputs import make_inputs
        from .verify.export import export_verified

        input_size = tuple(loaded.input_size) if loaded.input_size else None
        exported = export_verified(done.model, make_inputs(done.model, input_size), export,
                                   dynamic=dynamic)
        report.export_result = exported
        if not exported.ok:
            return f"the exported {export} model differs from PyTorch's output (max rel {exported.max_rel:.2e})"
        data = exported.data
    save_model(done.model, out, loaded, [done.replay_step(eval_mode=eval_mode)], report.to_json(), data=data)
    report.notes.append(f"wrote {out} and {out.name}.json")
    return None


def _group_mode(text: str) -> str | float:
    if text in ("keep", "auto"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not keep, auto or a tolerance") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"tolerance {text!r} must be a number >= 0")
    return value


def _calibration_batches(args, loaded: Loaded, input_size) -> list | None:
    from .passes import data as sources

    if getattr(args, "calibrate_data", None):
        for name in ("calibrate_batch_size", "calibrate_limit"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise InputSpecError(f"--{name.replace('_', '-')} {value} must be at least 1")
        return sources.image_folder_batches(loaded.model, args.calibrate_data, args.calibrate_batch_size,
                                            limit=args.calibrate_limit, input_size=input_size)
    if getattr(args, "calibrate_tensors", None):
        return sources.tensor_file_batches(args.calibrate_tensors)
    return None


def cmd_bake(args) -> int:
    recipe = load_recipe("bake")
    return _rewrite(args, recipe, _load(args))


def cmd_recalibrate(args) -> int:
    from .passes import data as sources
    from .passes.recalibration import recalibrate

    for name in ("batch_size", "limit", "max_samples", "random"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputSpecError(f"--{name.replace('_', '-')} {value} must be at least 1")
    with _processes() as (rank, world):  # under torchrun: every process takes a shard
        loaded = _load(args)
        out = resolve_output(args.output, loaded)
        size = tuple(loaded.input_size) if loaded.input_size else None
        if args.data:
            batches = sources.image_folder_batches(loaded.model, args.data, args.batch_size, limit=args.limit,
                                                   input_size=size)
        elif args.tensors:
            batches = sources.tensor_file_batches(args.tensors)
        else:
            batches = sources.random_batches(loaded.model, args.random, args.batch_size, input_size=size)
        shard = batches[rank::world]
        model, report = recalibrate(loaded.model, shard, max_samples=args.max_samples, return_report=True,
                                    progress=not args.no_progress and not args.json and sys.stderr.isatty())
        if rank == 0:
            model.to("cpu")
            report.notes[:0] = loaded.notes
            step = {"recalibrate": {"samples": report.samples, "mode": report.mode,
                                    "source": args.data or args.tensors or f"random x {args.random}"}}
            save_model(model, out, loaded, [step], report.to_json())
            if args.json:
                print(json.dumps({**report.to_json(), "output": str(out)}, indent=2))
            else:
                print("\n".join(report.lines() + [f"wrote {out}"]))
    return 0


def cmd_migrate(args) -> int:
    from .model_io import read_object, save_state_dict, unwrap_checkpoint
    from .norm_keys import convert, detect

    src = Path(args.checkpoint)
    out = Path(args.output)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise OutputError(f"-o {out} would overwrite the input", fix="write to another file")
    sd, notes = unwrap_checkpoint(read_object(src, trust_pickle=False), source=str(src))
    found = detect(sd)
    if found is None:
        raise InputSpecError(f"{src} has no spectral-norm or weight-norm keys to migrate "
                            "(weight_orig/_u/_v, weight_g/_v, or parametrizations.*)",
                            fix="check that the checkpoint comes from a spectral- or weight-normalized model")
    to = args.to or ("parametrized" if found == "legacy" else "legacy")
    if to == found:
        raise InputSpecError(f"{src} is already in the {to} format", fix=f"use --to {'legacy' if to == 'parametrized' else 'parametrized'}")
    converted, renamed = convert(sd, to)
    save_state_dict(converted, out)
    result = {"input": str(src), "output": str(out), "from": found, "to": to, "renamed": renamed, "notes": notes}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for note in notes:
            print(f"note: {note}")
        print(f"{src} ({found}) -> {out} ({to}): " + "; ".join(renamed))
    return 0


def cmd_inspect(args) -> int:
    from .inspection import inspect_model

    loaded = _load(args)
    table = inspect_model(loaded.model, input_size=tuple(loaded.input_size) if loaded.input_size else None)
    if args.json:
        print(json.dumps(table.to_json(), indent=2))
    else:
        print(table.text(_width()))
    return 0


def cmd_check(args) -> int:
    if args.n_inputs < 1:
        raise InputSpecError(f"--n-inputs {args.n_inputs} must be at least 1", fix="use --n-inputs 2")
    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise InputSpecError(f"--{name} {value} must be a non-negative number", fix=f"e.g. --{name} 1e-5")
    if args.plot and args.mode != "numeric":
        raise InputSpecError("--plot draws the per-layer errors of a numeric check", fix="drop --mode interface")
    if args.plot and not Path(args.plot).parent.is_dir():
        raise OutputError(f"cannot write the plot {args.plot}: {Path(args.plot).parent} is not a directory",
                            fix="give a path in an existing directory")
    device = device_named(args.device)
    inputs = load_inputs(args.inputs) if args.inputs else None
    refuse_exported_reference(args.reference)
    ref = load_input(args.reference, arch=args.arch, trust_pickle=args.trust_pickle)
    exported = open_exported(args.candidate)  # an .onnx or .pt2 file: the deployed model itself is the candidate
    candidate = exported if exported is not None else load_input(args.candidate, arch=args.arch,
                                                                 trust_pickle=args.trust_pickle).model
    ref.model.to(device)
    if exported is None:  # an exported file runs on the CPU; its outputs come back to the device
        candidate.to(device)
    import torch

    input_size = cli_input_size(args.input_size, ref.model) if args.input_size else None
    if input_size is None and inputs is None and ref.input_size:
        input_size = tuple(ref.input_size)
    result = run_check(
        ref.model, candidate, inputs, mode=args.mode, rtol=args.rtol, atol=args.atol, input_size=input_size,
        dtype=torch.float64 if args.float64 else None, n_inputs=args.n_inputs,
        layers=True if (args.layers or args.plot) else None,
    )
    if device.type != "cpu":
        result.notes.append(f"ran on {device} ({torch_device_name(device)})")
    if args.plot:
        from .verify.plot import plot_layers

        plot_layers(result, args.plot)
        result.notes.append(f"wrote {args.plot}")
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print("\n".join(result.lines()))
    return 0 if result.ok else 1


def cmd_recipes(args) -> int:
    rows = []
    for name in list_recipes():
        r = load_recipe(name)
        rows.append({"name": name, "description": " ".join(r.description.split()), "check": r.check,
                     "params": dict(r.params)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = _width()
    lines = []
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        lines.append(f"{row['name']}" + (f"  ({params})" if params else "") + f"  [check: {row['check']}]")
        lines += wrapped(row["description"], width, "    ", "    ")
    print("\n".join(lines))
    return 0


def _emit(args, report: Report) -> None:
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(report.text(_width()))


COMMANDS = {"apply": cmd_apply, "fold": cmd_fold, "bake": cmd_bake, "recalibrate": cmd_recalibrate,
            "migrate": cmd_migrate, "inspect": cmd_inspect,
            "check": cmd_check, "recipes": cmd_recipes}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "schema":
            sys.stdout.write(schema_text())
            return 0
        return COMMANDS[args.command](args)
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    except _UsageError as e:
        _fail(want_json, "usage", str(e), None, prefix=f"{e.prog}: error: {e.message}")
        return 2
    except (NormswapError, InputSpecError) as e:
        _fail(want_json, e.code, e.message, e.fix, extra=e.to_json())
        return 2


def _fail(want_json: bool, code: str, message: str, fix: str | None, extra: dict | None = None,
          prefix: str | None = None) -> None:
    if want_json:
        print(json.dumps({"error": extra or {"code": code, "message": message, "fix": fix}}, indent=2))
    else:
        print(prefix or f"normswap: error: {message}", file=sys.stderr)
        if fix:
            print(f"  fix: {fix}", file=sys.stderr)


def main_entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`normswap ... | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe
    sys.exit(code)
