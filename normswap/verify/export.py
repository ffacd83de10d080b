"""Deployment formats: ONNX and torch.export programs, encoded in memory and verified by running them.

The exported bytes are run (onnxruntime, or the reloaded ExportedProgram) on the
same input as the PyTorch model before anything is written, so a file that
would compute something else is never produced.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import NormswapError
from ..inputs import as_args
from ..model_io import EXPORT_SUFFIX

FORMATS = EXPORT_SUFFIX

# float32 kernels of two runtimes differ in summation order; this is far above that and far below a wrong model.
EXPORT_RTOL = 1e-4


class ExportError(NormswapError):
    code = "export_failed"


@dataclass
class ExportedFile:
    format: str
    data: bytes
    max_abs: float
    max_rel: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= EXPORT_RTOL

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "bytes": len(self.data), "max_abs": self.max_abs, "max_rel": self.max_rel,
                "rtol": EXPORT_RTOL, "ok": self.ok}


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


def encode(model: nn.Module, inputs: Any, fmt: str) -> bytes:
    """The model as ONNX or .pt2 bytes, traced on ``inputs``."""
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
                program = torch.onnx.export(model, args, dynamo=True, verbose=False, optimize=True)
                return program.model_proto.SerializeToString()
            buf = io.BytesIO()
            torch.export.save(torch.export.export(model, args), buf)
            return buf.getvalue()
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter's own failure, reported with its first line
        raise ExportError(
            f"torch could not export {type(model).__name__} to {fmt}: {_first_line(e)}",
            fix="write a .safetensors or .pt file instead, or export the folded model yourself",
        ) from None


def run(fmt: str, data: bytes, inputs: Any) -> list[torch.Tensor]:
    """Run exported bytes on ``inputs``: onnxruntime for ONNX, the reloaded program for .pt2."""
    args = as_args(inputs)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]
    program = torch.export.load(io.BytesIO(data))
    with torch.no_grad():
        out = program.module()(*args)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def export_verified(model: nn.Module, inputs: Any, fmt: str) -> ExportedFile:
    """Encode ``model`` and compare the encoded model's outputs with PyTorch's on ``inputs``."""
    data = encode(model, inputs, fmt)
    with torch.no_grad():
        ref = [t for t in torch.utils._pytree.tree_leaves(model(*as_args(inputs))) if isinstance(t, torch.Tensor)]
    got = run(fmt, data, inputs)
    if len(got) != len(ref):
        raise ExportError(f"the exported {fmt} model returns {len(got)} outputs, PyTorch {len(ref)}",
                          fix="export the folded model yourself")
    max_abs, max_rel = 0.0, 0.0
    for r, g in zip(ref, got):
        diff = (r.detach().double().cpu() - g.double()).abs().max().item() if r.numel() else 0.0
        scale = r.detach().double().abs().max().item() if r.numel() else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else diff)
    return ExportedFile(fmt, data, max_abs, max_rel)
