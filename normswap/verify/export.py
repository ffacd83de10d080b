"""Deployment formats: ONNX and torch.export programs, encoded in memory and verified by running them.

The exported bytes are run (onnxruntime, or the reloaded ExportedProgram) on the
same input as the PyTorch model before anything is written, so a file that
would compute something else is never produced.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..calls import as_args
from ..errors import NormswapError
from ..model_io import EXPORT_SUFFIX

FORMATS = EXPORT_SUFFIX

# float32 kernels of two runtimes differ in summation order; this is far above that and far below a wrong model.
EXPORT_RTOL = 1e-4


class ExportError(NormswapError):
    code = "export_failed"


DYNAMIC = ("batch", "spatial", "none")  # which input dimensions the exported model leaves free


@dataclass
class ExportedFile:
    format: str
    data: bytes
    max_abs: float
    max_rel: float
    dynamic: str = "none"  # what the file leaves free: batch, spatial (and batch), or none
    verified_on: list = field(default_factory=list)  # the input shapes it was run on
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.max_rel <= EXPORT_RTOL

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "bytes": len(self.data), "max_abs": self.max_abs, "max_rel": self.max_rel,
                "rtol": EXPORT_RTOL, "ok": self.ok, "dynamic": self.dynamic, "verified_on": self.verified_on,
                "notes": self.notes}


def format_for(path_suffix: str, requested: str | None) -> str | None:
    """The export format an output path asks for (``--export`` wins; else the suffix), or None."""
    if requested is not None:
        if requested not in FORMATS:
            raise ExportError(f"unknown export format {requested!r}", fix=f"use one of {', '.join(FORMATS)}")
        return requested
    return next((fmt for fmt, suffix in FORMATS.items() if suffix == path_suffix), None)


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def encode(model: nn.Module, inputs: Any, fmt: str, dynamic_shapes: Any = None) -> bytes:
    """The model as ONNX or .pt2 bytes, traced on ``inputs`` (``dynamic_shapes`` as torch.export takes them)."""
    args = as_args(inputs)
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                try:
                    import onnxscript  # noqa: F401  (the exporter needs it)
                except ImportError:
                    raise ExportError("ONNX export needs the onnx extra",
                                      fix="pip install 'normswap[onnx]'") from None
                program = torch.onnx.export(model, args, dynamo=True, verbose=False, optimize=True,
                                            dynamic_shapes=dynamic_shapes)
                return program.model_proto.SerializeToString()
            buf = io.BytesIO()
            torch.export.save(torch.export.export(model, args, dynamic_shapes=dynamic_shapes), buf)
            return buf.getvalue()
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter's own failure, reported with its first line
        raise ExportError(
            f"torch could not export {type(model).__name__} to {fmt}: {_first_line(e)}",
            fix="write a .safetensors or .pt file instead, or export the folded model yourself",
        ) from None


def onnx_session(source: bytes | str) -> Any:
    """An onnxruntime session on the CPU provider: the arithmetic a deployment without an accelerator gets,
    and the same on every machine the check runs on. ``source``: the model's bytes, or a path (a path also
    finds the external-data files beside it)."""
    import onnxruntime as ort

    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, args: tuple) -> list[torch.Tensor]:
    """The session's outputs on ``args`` (one array per declared input, in order), as tensors."""
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def load_program(source: bytes | str) -> torch.export.ExportedProgram:
    """A .pt2 program from its bytes or its path."""
    return torch.export.load(io.BytesIO(source) if isinstance(source, bytes) else source)


def run_program(module: nn.Module, args: tuple) -> list[torch.Tensor]:
    """An ExportedProgram's ``module()`` on ``args``; its output's tensors, flattened."""
    with torch.no_grad():
        out = module(*args)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def run(fmt: str, data: bytes, inputs: Any) -> list[torch.Tensor]:
    """Run exported bytes on ``inputs``: onnxruntime for ONNX, the reloaded program for .pt2."""
    args = as_args(inputs)
    if fmt == "onnx":
        return run_onnx(onnx_session(data), args)
    return run_program(load_program(data).module(), args)


def export_verified(model: nn.Module, inputs: Any, fmt: str, dynamic: str = "batch") -> ExportedFile:
    """Encode ``model`` and compare the encoded model's outputs with PyTorch's.

    ``dynamic``: "batch" leaves the batch dimension free (traced at batch 2: torch.export will not make a
    dimension dynamic from a size-1 example), "spatial" the batch and every dimension after the channels,
    "none" nothing. A dynamic file is run at two sizes of each free dimension before it is accepted; a model
    that does not export or run that way gets the static export, with a note saying why.
    """
    if dynamic not in DYNAMIC:
        raise ExportError(f"unknown dynamic mode {dynamic!r}", fix=f"use one of {', '.join(DYNAMIC)}")
    args = as_args(inputs)
    x = args[0]
    if dynamic != "none" and len(args) == 1 and isinstance(x, torch.Tensor) and x.ndim >= 1:
        free = [0] + (list(range(2, x.ndim)) if dynamic == "spatial" else [])
        try:
            return _verified_dynamic(model, x, fmt, dynamic, free)
        except ExportError as e:
            static = _verified(model, args, fmt, encode(model, args, fmt), [tuple(x.shape)])
            static.notes.append(f"exported with fixed input shape {tuple(x.shape)}: a {dynamic}-dynamic export "
                                f"failed ({e.message})")
            return static
    return _verified(model, args, fmt, encode(model, args, fmt), [tuple(a.shape) for a in args
                                                                   if isinstance(a, torch.Tensor)])


def _resized(x: torch.Tensor, sizes: dict[int, int], seed: int) -> torch.Tensor:
    shape = [sizes.get(d, s) for d, s in enumerate(x.shape)]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=x.dtype, device=x.device)


def _verified_dynamic(model: nn.Module, x: torch.Tensor, fmt: str, dynamic: str, free: list[int]) -> ExportedFile:
    trace = _resized(x, {0: 2}, 1)
    spec = ({d: torch.export.Dim.AUTO for d in free},)
    data = encode(model, (trace,), fmt, dynamic_shapes=spec)
    grow = {d: x.shape[d] + (1 if d == 0 else 32) for d in free if d != 0}
    checks = [_resized(x, {0: 1}, 2), _resized(x, {0: 3, **grow}, 3)]
    result = _verified(model, None, fmt, data, [tuple(c.shape) for c in checks], runs=checks)
    if not result.ok:
        raise ExportError(f"at other input sizes it differs from PyTorch by {result.max_rel:.2e}")
    result.dynamic = dynamic
    return result


def _verified(model: nn.Module, args: tuple | None, fmt: str, data: bytes, shapes: list,
              runs: list | None = None) -> ExportedFile:
    """Run the encoded model on each input (``runs``, else ``args``) against PyTorch; the worst error."""
    max_abs, max_rel = 0.0, 0.0
    for run_args in ([(r,) for r in runs] if runs is not None else [args]):
        try:
            with torch.no_grad():
                ref = [t for t in torch.utils._pytree.tree_leaves(model(*run_args)) if isinstance(t, torch.Tensor)]
        except Exception as e:  # noqa: BLE001 - the model itself takes only some sizes
            raise ExportError(f"the model itself does not run on {[tuple(a.shape) for a in run_args]}: "
                              f"{_first_line(e)}") from None
        try:
            got = run(fmt, data, run_args)
        except Exception as e:  # noqa: BLE001 - a file that cannot run at this size is not dynamic there
            raise ExportError(f"the exported {fmt} model does not run on {[tuple(a.shape) for a in run_args]}: "
                              f"{_first_line(e)}") from None
        if len(got) != len(ref):
            raise ExportError(f"the exported {fmt} model returns {len(got)} outputs, PyTorch {len(ref)}",
                              fix="export the folded model yourself")
        for r, g in zip(ref, got):
            if tuple(r.shape) != tuple(g.shape):
                raise ExportError(f"the exported {fmt} model gives shape {tuple(g.shape)}, PyTorch {tuple(r.shape)}")
            diff = (r.detach().double().cpu() - g.double()).abs().max().item() if r.numel() else 0.0
            scale = r.detach().double().abs().max().item() if r.numel() else 0.0
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / scale if scale > 0 else diff)
    return ExportedFile(fmt, data, max_abs, max_rel, verified_on=[list(s) for s in shapes])
