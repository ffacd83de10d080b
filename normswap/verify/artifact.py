"""An exported file as the candidate of a check: the deployed ONNX or .pt2 model itself against PyTorch.

The file runs as it will run deployed, through export.py's runners: ONNX in
onnxruntime on the CPU, a .pt2 through ``ExportedProgram.module()``, each in the
dtype it was exported in. A file's dtype cannot change, so casting the adapter
is a no-op and a copy of it is the same object: the check's float64 copies then
compare the float64 reference with the file's own float32 arithmetic.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputSpecError, ModelLoadError
from ..model_io import check_readable, is_spec, sniff
from .export import load_program, onnx_session, run_onnx, run_program

FORMAT_NAMES = {"onnx": "an ONNX model", "pt2": "a torch.export (.pt2) program"}
ONNX_DTYPES = {"tensor(float)": torch.float32, "tensor(double)": torch.float64, "tensor(float16)": torch.float16,
               "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
               "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool}
REEXPORT = "export it again (normswap fold MODEL -o FILE.onnx or FILE.pt2)"


@dataclass(frozen=True)
class DeclaredInput:
    """One input the file declares. ``shape``: each dimension's size, None where the file leaves it free
    (``bounds`` then holds a .pt2 program's range for it); None as a whole for a non-tensor input."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: torch.dtype | None
    bounds: tuple[tuple[int, int | None] | None, ...] = ()

    def text(self) -> str:
        if self.shape is None:
            return f"{self.name}: not a tensor"
        dims = [str(d) if d is not None else _free_dim(self.bounds[i] if i < len(self.bounds) else None)
                for i, d in enumerate(self.shape)]
        dtype = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        return f"{self.name} ({', '.join(dims)}) {dtype}"

    def fits(self, shape: tuple[int, ...]) -> bool:
        return self.shape is None or (len(shape) == len(self.shape) and
                                       all(want is None or want == got for want, got in zip(self.shape, shape)))


def _free_dim(bounds: tuple[int, int | None] | None) -> str:
    """A free dimension: "any", or its range where the program bounds it more than torch's default [2, inf]."""
    if bounds is None or (bounds[0] <= 2 and bounds[1] is None):
        return "any"
    return f"{bounds[0]}..{bounds[1] if bounds[1] is not None else 'inf'}"


class ExportedModule(nn.Module):
    """An exported file behind nn.Module's call, so a check runs it like any candidate.

    ``forward`` takes tensors, casts floating ones to the dtype the file declares, and returns the file's
    outputs as tensors in the file's own dtype (one tensor, or a tuple of several: ONNX flattens nested
    outputs). An input the file cannot take is an InputSpecError naming the shape it expects.
    """

    def __init__(self, path: Path, fmt: str, run: Callable[[tuple], list[torch.Tensor]],
                 declared: list[DeclaredInput], runtime: str):
        super().__init__()
        self.path, self.format, self.runtime, self.declared = path, fmt, runtime, declared
        self._run = run

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the file computes in (its first floating input's); float32 if none says."""
        return next((d.dtype for d in self.declared if d.dtype is not None and d.dtype.is_floating_point),
                    torch.float32)

    def forward(self, *args: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        self._check_shapes(args)
        floating = [isinstance(a, torch.Tensor) and a.is_floating_point() and d.dtype is not None
                    and d.dtype.is_floating_point for a, d in zip(args, self.declared)]
        cast = tuple(a.to("cpu", d.dtype) if f else a.cpu() if isinstance(a, torch.Tensor) else a
                     for a, d, f in zip(args, self.declared, floating))
        try:
            outputs = self._run(cast)
        except Exception as e:  # noqa: BLE001 - the runtime's refusal of this input, said with the file's name
            raise InputSpecError(
                f"{self.path} ({FORMAT_NAMES[self.format]}) failed in {self.runtime} on inputs of shape "
                f"{_shapes(args)}: {_first_line(e)}",
                fix=f"it declares {self.expects()}; give inputs it takes (--input-size or --inputs)") from None
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is not None:  # the runtime ran on the CPU; the comparison is where the reference is
            outputs = [o.to(device) if isinstance(o, torch.Tensor) else o for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _check_shapes(self, args: tuple) -> None:
        """Refuse, before the runtime does in its own words, inputs the file's declared shapes rule out."""
        if len(args) != len(self.declared):
            raise InputSpecError(f"{self.path} takes {len(self.declared)} input(s), {self.expects()}; the check "
                                 f"gives {len(args)}", fix="give inputs with --inputs FILE (a tuple of tensors)")
        for a, d in zip(args, self.declared):
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else ()
            if d.fits(shape):
                continue
            fixed = all(s is not None for s in d.shape)
            what = "a fixed input shape" if fixed else "fixed input dimensions"
            if len(shape) == len(d.shape):  # the given size where the file leaves a dimension free
                size = [given if want is None else want for want, given in zip(d.shape, shape)]
            else:
                size = [1 if want is None else want for want in d.shape]
            raise InputSpecError(
                f"{self.path} is {FORMAT_NAMES[self.format]} with {what}: it expects {d.text()}, and the check "
                f"gives {tuple(shape)}",
                fix=f"check it on inputs of that shape (--input-size {','.join(map(str, size))}), or export it with "
                    "the dimension left free (normswap fold --dynamic batch, or spatial for height and width)")

    def expects(self) -> str:
        return "; ".join(d.text() for d in self.declared) or "no inputs"

    def default_input_size(self, reference_size: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """The input shape a check uses when none is given: the file's own where it fixes a dimension, the
        reference's (``reference_size``, batch included) where the file leaves one free."""
        if len(self.declared) != 1 or self.declared[0].shape is None:
            return reference_size
        declared = self.declared[0].shape
        if all(d is not None for d in declared):
            return declared
        if reference_size is not None and len(reference_size) == len(declared):
            return tuple(r if d is None else d for d, r in zip(declared, reference_size))
        return reference_size

    def describe(self) -> dict[str, Any]:
        """What the check's report says about the candidate (JSON-ready)."""
        return {"path": str(self.path), "format": self.format, "runtime": self.runtime,
                "dtype": str(self.dtype).replace("torch.", ""), "inputs": [d.text() for d in self.declared]}

    def _apply(self, fn: Callable, recurse: bool = True) -> ExportedModule:
        return self  # .to(), .double(), .cuda(): the file's dtype and device are fixed by the file

    def __deepcopy__(self, memo: dict) -> ExportedModule:
        return self  # running the file changes nothing in it; a copy would only load it again


def _shapes(args: tuple) -> str:
    return ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def exported_kind(source: str | os.PathLike) -> str | None:
    """"onnx" or "pt2" when ``source`` is an exported file, by its bytes; None for a spec or any other file.
    A file named .onnx or .pt2 whose bytes are no known format at all is refused here, by the name it has."""
    text = os.fspath(source)
    if is_spec(text) and not os.path.exists(text):
        return None
    path = Path(text)
    check_readable(path)
    kind = sniff(path)
    if kind in FORMAT_NAMES:
        return kind
    suffix = path.suffix.lower()
    if kind == "other" and suffix in (".onnx", ".pt2"):
        fmt = suffix[1:]
        size = path.stat().st_size
        why = "it is empty" if size == 0 else f"its {size} bytes do not begin as one"
        raise ModelLoadError(f"{path} is named {suffix} but is not {FORMAT_NAMES[fmt]}: {why}",
                             fix=f"give the exported file itself; if it was cut short, {REEXPORT}")
    return None


def open_exported(source: str | os.PathLike) -> ExportedModule | None:
    """The exported file at ``source`` as a module a check can run, or None when it is not one."""
    kind = exported_kind(source)
    if kind is None:
        return None
    path = Path(os.fspath(source))
    return _open_onnx(path) if kind == "onnx" else _open_pt2(path)


def _open_onnx(path: Path) -> ExportedModule:
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputSpecError(f"{path} is an ONNX model; running it needs onnxruntime, which is not installed",
                             fix="pip install 'normswap[onnx]'") from None
    try:
        session = onnx_session(str(path))
    except Exception as e:  # noqa: BLE001 - a file onnxruntime cannot load: truncated, or ops it lacks
        raise ModelLoadError(f"onnxruntime {ort.__version__} cannot load {path}: {_first_line(e)}",
                             fix=f"the file may be cut short or use operators this onnxruntime lacks; {REEXPORT}"
                             ) from None
    declared = [DeclaredInput(i.name, tuple(d if isinstance(d, int) else None for d in i.shape),
                              ONNX_DTYPES.get(i.type)) for i in session.get_inputs()]
    return ExportedModule(path, "onnx", lambda args: run_onnx(session, args), declared,
                          f"onnxruntime {ort.__version__} (CPU)")


def _open_pt2(path: Path) -> ExportedModule:
    try:
        program = load_program(str(path))
        module = program.module()
    except Exception as e:  # noqa: BLE001 - a program this torch cannot load
        raise ModelLoadError(f"torch {torch.__version__} cannot load {path} as a torch.export program: "
                             f"{_first_line(e)}", fix=f"load it with the torch version that wrote it, or {REEXPORT}"
                             ) from None
    return ExportedModule(path, "pt2", lambda args: run_program(module, args), _program_inputs(program),
                          f"torch.export (ExportedProgram.module(), torch {torch.__version__.split('+')[0]})")


def _program_inputs(program: torch.export.ExportedProgram) -> list[DeclaredInput]:
    """The program's user inputs with their traced shapes; a symbolic size is free, within its range."""
    users = set(program.graph_signature.user_inputs)
    out = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in users:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            out.append(DeclaredInput(node.name, None, None))
            continue
        shape = tuple(d if isinstance(d, int) else None for d in val.shape)
        bounds = tuple(None if isinstance(d, int) else _range(program, d) for d in val.shape)
        out.append(DeclaredInput(node.name, shape, val.dtype, bounds))
    return out


def _range(program: torch.export.ExportedProgram, size: Any) -> tuple[int, int | None] | None:
    found = program.range_constraints.get(getattr(getattr(size, "node", None), "expr", None))
    if found is None:
        return None
    try:
        upper = int(found.upper)
    except (TypeError, ValueError, AttributeError):  # torch's integer infinity has no int()
        upper = None
    return int(found.lower), upper


def refuse_exported_reference(source: str | os.PathLike) -> None:
    """An exported file as the REFERENCE: refused, since the reference is what float64 copies, the rounding
    floor and per-layer rows are made from, and an exported file has none of them."""
    kind = exported_kind(source)
    if kind is not None:
        path = os.fspath(source)
        raise InputSpecError(f"the reference {path} is {FORMAT_NAMES[kind]}, an exported file; the reference must "
                             "be a PyTorch model", fix=f"give the PyTorch model first and the exported file second: "
                             f"normswap check MODEL {path}")
