"""Loading models from specs and files, and saving results atomically.

Files are recognised by content, not extension. Unpickling runs code from the
file, so a pickled module is loaded only when the caller says it trusts it;
everything else goes through ``torch.load(weights_only=True)`` or safetensors.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ._version import __version__
from .errors import InputSpecError, ModelLoadError, OutputError, UnsafePickleError

SIDECAR_SUFFIX = ".json"
EXPORT_SUFFIX = {"onnx": ".onnx", "pt2": ".pt2"}  # deployment formats (verify/export.py) -> file suffix
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict")
_PLAIN_KEYS = ("state_dict", "model", "module", "net", "model_state_dict", "network")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Loaded:
    """A model and how it came to be: enough to rebuild the architecture and to say what was done."""

    model: nn.Module
    kind: str  # spec | state_dict | pickle | normswap
    spec: str | None  # how to rebuild the architecture (None for a pickled module)
    path: Path | None  # the input file, never written to
    notes: list[str] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # recipes already applied (normswap outputs)
    input_size: list[int] | None = None
    arch_args: dict | None = None  # timm model_args / pretrained_cfg an hf-hub config.json resolved to
    given: str | None = None  # the spec as the user gave it (hf-hub:ORG/NAME), for naming outputs


PRETRAINED_FIX = ("run it once where the hub is reachable (the weights are then cached, and HF_HUB_OFFLINE=1 "
                  "uses the cache), or build without --pretrained and load a file with --weights FILE")


# ---------------------------------------------------------------- specs


def is_spec(text: str) -> bool:
    if os.path.exists(text):
        return False
    head, sep, tail = text.partition(":")
    return bool(sep and tail and head and (head in ("timm", "torchvision", "hf-hub") or "." in head
                                           or head.isidentifier()))


def build_spec(spec: str, *, pretrained: bool | str = False, arch_args: dict | None = None) -> nn.Module:
    """``timm:NAME[.TAG]``, ``hf-hub:ORG/NAME``, ``torchvision:NAME`` or ``package.module:factory``.

    ``pretrained``: True for the library's pretrained weights (timm's for the name and tag, torchvision's
    DEFAULT), or a torchvision weights name (IMAGENET1K_V2). The libraries' own loaders and caches do the
    work (HF_HOME, HF_HUB_OFFLINE, TORCH_HOME). ``arch_args``: the model_args and pretrained_cfg an hf-hub
    config resolved to, so a saved model is rebuilt without the hub.
    """
    head, _, name = spec.partition(":")
    if head in ("timm", "hf-hub"):
        return _build_timm(spec, head, name, pretrained, arch_args)
    if pretrained and head != "torchvision":
        raise InputSpecError(f"--pretrained works with timm:, hf-hub: and torchvision: specs, not {spec}",
                             fix="build the model with its own code and load its weights with --weights FILE")
    if head == "torchvision":
        import torchvision

        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError:
            close = _close(name, torchvision.models.list_models())
            raise ModelLoadError(f"unknown torchvision model '{name}' in spec '{spec}'", fix=close) from None
        # segmentation and detection builders default to an ImageNet backbone, which would be downloaded
        no_backbone = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
        if not pretrained:
            return builder(weights=None, **no_backbone)
        weights = "DEFAULT" if pretrained is True else str(pretrained)
        valid = list(torchvision.models.get_model_weights(name).__members__)
        if weights != "DEFAULT" and weights.rpartition(".")[2] not in valid:
            raise InputSpecError(f"torchvision has no weights {weights!r} for {name}",
                                 fix=f"use --pretrained alone (DEFAULT) or one of {', '.join(valid)}")
        return _pretrained(spec, lambda: builder(weights=weights, **no_backbone), "torch")
    try:
        module = _import_from_cwd(head)
    except ImportError as e:
        raise ModelLoadError(
            f"cannot import module '{head}' named in spec '{spec}': {e}",
            fix="check the spec (package.module:factory) and that the package is installed",
        ) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelLoadError(f"'{head}' has no callable '{name}' (spec '{spec}')", fix="name a function or class that builds the model")
    try:
        model = factory()
    except Exception as e:
        raise ModelLoadError(f"{spec}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_timm(spec: str, head: str, name: str, pretrained: bool | str, arch_args: dict | None) -> nn.Module:
    import timm

    if isinstance(pretrained, str):
        raise InputSpecError(f"timm takes --pretrained alone, not {pretrained!r}",
                             fix="put the weights tag in the name: timm:resnet50.a1_in1k --pretrained")
    model_id = spec if head == "hf-hub" else name
    if arch_args is not None:  # the architecture an hf-hub config resolved to: no hub needed
        return timm.create_model(name, pretrained=False, pretrained_cfg=arch_args.get("pretrained_cfg"),
                                 **arch_args.get("model_args", {}))
    try:
        if pretrained or head == "hf-hub":  # an hf-hub config.json says what to build, weights or not
            return _pretrained(spec, lambda: timm.create_model(model_id, pretrained=bool(pretrained)), "hf")
        return timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = _close(name.split(".")[0], timm.list_models())
            raise ModelLoadError(f"unknown timm model '{name}' in spec '{spec}'", fix=close) from None
        raise ModelLoadError(f"timm could not build '{name}': {e}") from None


def _pretrained(spec: str, build: Callable[[], nn.Module], where: str) -> nn.Module:
    """Build with downloaded weights; weights neither cached nor reachable are exit 2 saying where it looked."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build()
    except RuntimeError as e:
        if "Unknown model" in str(e):  # a misspelled name, reported by the caller with the nearest ones
            raise
        raise _not_reachable(spec, where, e) from None
    except Exception as e:  # noqa: BLE001 - the hub client's offline / not-found errors are many classes
        raise _not_reachable(spec, where, e) from None


def _not_reachable(spec: str, where: str, e: BaseException) -> ModelLoadError:
    if where == "hf":
        from huggingface_hub import constants

        place = f"the Hugging Face cache {constants.HF_HUB_CACHE}" + (
            " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "")
    else:
        import torch.hub

        place = f"the torch hub cache {Path(torch.hub.get_dir()) / 'checkpoints'}"
    return ModelLoadError(f"the pretrained weights of {spec} are not in {place} and could not be downloaded "
                          f"({type(e).__name__}: {_first_line(e)})", fix=PRETRAINED_FIX)


def _import_from_cwd(name: str):
    """Import ``name`` as ``python -m`` would: the current folder first on the path (my_gan.py beside you)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(cwd)


def _close(name: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else "list names with timm.list_models() / torchvision.models.list_models()"


# ---------------------------------------------------------------- files


# ModelProto's fields as their protobuf tags (field number << 3 | wire type): the one that can follow ir_version
_ONNX_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA}


def sniff(path: Path) -> str:
    """zip-torch | torchscript | pt2 | safetensors | onnx | other, from the file's bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "other"
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("archive_format") or "serialized_exported_program" in n for n in names):
            return "pt2"
        return "zip-torch"
    if len(head) > 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n < (1 << 30) and head[8:9] == b"{":
            return "safetensors"
    if _looks_like_onnx(head):
        return "onnx"
    return "other"


def _looks_like_onnx(head: bytes) -> bool:
    """An ONNX ModelProto as every protobuf writer lays it out: field 1 (ir_version, a small varint) first,
    then another of ModelProto's fields. No torch, pickle or safetensors file starts with byte 0x08."""
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] < 0x80 and head[2] in _ONNX_TAGS


def check_readable(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist", fix="check the path, or give a spec like timm:resnet50")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a model file", fix="name the checkpoint file inside it")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"cannot read {path}: permission denied", fix="check the file's permissions")


def load_inputs(path: str | os.PathLike) -> list[tuple]:
    """Example inputs from a tensor file: a tensor (one input), a tuple (the arguments of one call),
    or a list of those (several inputs). Read with ``weights_only=True``: tensors, never code."""
    path = Path(path)
    fix = "save it with torch.save(x, path): a tensor, a tuple of call arguments, or a list of those"
    if not path.exists() or path.is_dir() or not os.access(path, os.R_OK):
        why = "does not exist" if not path.exists() else "is a directory" if path.is_dir() else "is not readable"
        raise InputSpecError(f"input file {path} {why}", fix=fix)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputSpecError(f"cannot read input file {path}: {_first_line(e)}", fix=fix) from None
    items = obj if isinstance(obj, list) else [obj]
    out = []
    for i, item in enumerate(items):
        args = item if isinstance(item, tuple) else (item,)
        if not args or not any(isinstance(a, torch.Tensor) for a in args):
            where = f"item {i} of " if isinstance(obj, list) else ""
            raise InputSpecError(f"{where}input file {path} holds a {type(item).__name__}, not tensors", fix=fix)
        out.append(args)
    if not out:
        raise InputSpecError(f"input file {path} holds an empty list", fix=fix)
    return out


def read_object(path: Path, *, trust_pickle: bool) -> Any:
    """The object stored in a torch file; a pickled module only with ``trust_pickle``."""
    kind = sniff(path)
    if kind == "torchscript":
        raise ModelLoadError(
            f"{path} is a TorchScript archive; normswap rewrites nn.Module trees",
            fix="load the original model code and its state dict instead (--arch SPEC)",
        )
    if kind in ("pt2", "onnx"):
        what = "a torch.export (.pt2) program" if kind == "pt2" else "an ONNX model"
        raise ModelLoadError(
            f"{path} is {what}, which has no module tree to rewrite",
            fix="use the model's state dict with --arch SPEC (`normswap check MODEL FILE` compares an exported "
                "file with the PyTorch model)",
        )
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"cannot read {path} as safetensors: {e}") from None
    _refuse_text(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e) and "Unsupported global" not in str(e) and not _plain_pickle_with_objects(path):
            raise ModelLoadError(
                f"cannot read {path}: not a PyTorch checkpoint", fix="the file may be truncated or of another format"
            ) from None
        if not trust_pickle:
            raise UnsafePickleError(
                f"{path} holds pickled Python objects (a whole module, not just tensors); "
                "loading it would run code from the file",
                fix="pass --trust-pickle (trust_pickle=True) if you trust where it came from, "
                "or save a state dict and load it with --arch SPEC",
            ) from None
    except Exception as e:  # noqa: BLE001 - torch's unpickler fails on garbage in many ways (KeyError, ...)
        raise ModelLoadError(
            f"cannot read {path}: {type(e).__name__}: {_first_line(e)}",
            fix="the file may be truncated or not a PyTorch checkpoint",
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # the caller trusts this file
    except (AttributeError, ModuleNotFoundError) as e:
        where = "__main__ (the script that saved it)" if "__main__" in str(e) else "a module that cannot be imported"
        raise ModelLoadError(
            f"cannot unpickle {path}: it refers to a class in {where}: {_first_line(e)}",
            fix="run from the folder holding the model's code (its module must be importable), or save "
                "model.state_dict() and load it with --arch package.module:factory",
        ) from None
    except Exception as e:
        raise ModelLoadError(f"cannot unpickle {path}: {type(e).__name__}: {_first_line(e)}") from None


def _refuse_text(path: Path) -> None:
    """A Git LFS pointer or any other text file given as a checkpoint: say what it is."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        raise ModelLoadError(f"{path} is a Git LFS pointer file ({len(head)} bytes of text), not the weights",
                             fix="fetch the real file (git lfs pull, or download it from where the repository "
                                 "stores it)")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return
    if head and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.splitlines()[0][:60] if text.strip() else ""
        raise ModelLoadError(f"{path} is a text file ({first!r}...), not a PyTorch checkpoint",
                             fix="give the checkpoint itself (.pt, .pth, .bin or .safetensors)")


def _plain_pickle_with_objects(path: Path) -> bool:
    """A plain (non-zip) pickle that names Python classes or functions: read opcodes, never execute them."""
    import pickletools

    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":
                return False
            f.seek(0)
            return any(op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ") for op, _, _ in pickletools.genops(f))
    except Exception:  # noqa: BLE001 - not a well-formed pickle: garbage
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def unwrap_checkpoint(obj: Any, *, ema: bool = False, source: str = "the file") -> tuple[dict[str, torch.Tensor], list[str]]:
    """A training checkpoint or state dict -> a plain state dict, with notes on what was done."""
    notes: list[str] = []
    if not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            raise ModelLoadError(f"{source} holds a {type(obj).__name__}, not a model or a state dict")
        keys = (_EMA_KEYS + _PLAIN_KEYS) if ema else (_PLAIN_KEYS + _EMA_KEYS)
        chosen = next((k for k in keys if k in obj and _is_state_dict(obj[k])), None)
        if chosen is None:
            raise ModelLoadError(
                f"{source} holds a dict that is neither a state dict nor a checkpoint with one "
                f"(keys: {', '.join(map(str, list(obj)[:8]))})",
                fix="save model.state_dict(), or a dict with it under 'state_dict'",
            )
        others = [k for k in obj if k != chosen]
        notes.append(f"used checkpoint['{chosen}']" + (f" (also in the file: {', '.join(map(str, others[:6]))})" if others else ""))
        obj = obj[chosen]
    sd = dict(obj)
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                notes.append(f"stripped the '{prefix}' prefix from every key")
                changed = True
    return sd, notes


def load_state_dict_into(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str, arch: str) -> list[str]:
    """Strict load with an error that says what did not fit; returns notes on what was adapted.

    Spectral/weight-norm keys in torch's other format (old hooks vs parametrizations)
    are renamed to the model's (``norm_keys.py``).
    """
    from .norm_keys import convert, detect

    notes = []
    have, want = detect(sd), detect(model.state_dict())
    if have is not None and want is not None and have != want:
        sd, renamed = convert(sd, want)
        notes.append(f"renamed the {have} spectral/weight-norm keys of {what} to the model's {want} format: "
                     + "; ".join(renamed))
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln][:3]
        raise ModelLoadError(
            f"{what} does not fit {arch}: " + ("; ".join(lines) or _first_line(e)),
            fix="is --arch the architecture this state dict was saved from?",
        ) from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
        raise ModelLoadError(
            f"{what} does not fit {arch}: " + "; ".join(parts),
            fix="is --arch the architecture this state dict was saved from?",
        )
    return notes


def load_model(
    source: str | os.PathLike,
    *,
    arch: str | None = None,
    weights: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    ema: bool = False,
    pretrained: bool | str = False,
) -> Loaded:
    """A spec, a checkpoint or a trusted pickle -> Loaded (see the README's "model inputs").

    A normswap ``.safetensors`` output is replayed by ``rewrite.load_input``, which calls this for the rest.
    """
    text = os.fspath(source)
    if is_spec(text) and not os.path.exists(text):
        model = build_spec(text, pretrained=pretrained)
        loaded = _loaded_spec(text, model, pretrained)
        if weights is not None:
            wpath = Path(weights)
            check_readable(wpath)
            sd, notes = unwrap_checkpoint(read_object(wpath, trust_pickle=False), ema=ema, source=str(wpath))
            notes += load_state_dict_into(model, sd, f"weights {wpath}", text)
            loaded.notes = [f"built {text} and loaded weights from {wpath}"] + notes
        return loaded
    path = Path(text)
    check_readable(path)
    obj = read_object(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        return Loaded(obj, "pickle", None, path, [f"unpickled a {type(obj).__name__} from {path} (--trust-pickle)"])
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in ("model", "module", "net") if isinstance(obj.get(k), nn.Module)), None)
        if inner is not None:
            return Loaded(inner, "pickle", None, path, [f"unpickled the module stored under a key in {path}"])
    sd, notes = unwrap_checkpoint(obj, ema=ema, source=str(path))
    if arch is None:
        raise ModelLoadError(
            f"{path} is a state dict ({len(sd)} tensors) without the architecture",
            fix="say which model it belongs to with --arch SPEC (e.g. --arch timm:resnet50)",
        )
    model = build_spec(arch)
    notes += load_state_dict_into(model, sd, f"the state dict in {path}", arch)
    return Loaded(model, "state_dict", arch, path, [f"loaded the state dict in {path} into {arch}"] + notes)


# ---------------------------------------------------------------- normswap outputs (safetensors + sidecar)


def _loaded_spec(spec: str, model: nn.Module, pretrained: bool | str) -> Loaded:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    where = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("tag") or (pretrained if isinstance(pretrained, str)
                                                                           else "DEFAULT")
    note = (f"built {spec} with its pretrained weights ({where})" if pretrained
            else f"built {spec} with random weights (pretrained=False)")
    loaded = Loaded(model, "spec", spec, None, [note], given=spec)
    if spec.startswith("hf-hub:"):  # rebuild from what its config.json resolved to, without the hub
        loaded.spec = f"timm:{cfg.get('architecture') or spec}"
        loaded.arch_args = {"model_args": dict(getattr(model, "_model_args", {}) or {}),
                            "pretrained_cfg": {k: v for k, v in cfg.items() if _json_plain(v)}}
    return loaded


def _json_plain(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + SIDECAR_SUFFIX)


def sidecar_of(path: Path) -> dict | None:
    side = sidecar_path(path)
    if path.suffix != ".safetensors" or not side.exists():
        return None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {side}: {e}", fix="the sidecar JSON beside the weights is damaged") from None
    if not isinstance(data, dict) or "normswap" not in data:
        return None
    return data


def is_tied_alias(model: nn.Module, key: str, sd: Mapping) -> bool:
    tensors = dict(model.state_dict(keep_vars=True))
    t = tensors.get(key)
    return t is not None and any(other is t and name in sd for name, other in tensors.items() if name != key)


# ---------------------------------------------------------------- saving


def resolve_output(out: str | os.PathLike, loaded: Loaded, *, export: str | None = None) -> Path:
    """Where to write: OUT with its extension, or the default one; never over an input.

    ``export`` ("onnx" or "pt2") asks for a deployment file; its suffix must match.
    """
    path = Path(out)
    if export is not None:
        want = EXPORT_SUFFIX[export]
        if path.suffix == "":
            path = path.with_suffix(want)
        if path.suffix != want:
            raise OutputError(f"--export {export} writes a {want} file, not {path}", fix=f"name the output {path.stem}{want}")
    elif path.suffix == "":
        path = path.with_suffix(".pt" if loaded.spec is None else ".safetensors")
    if export is None and path.suffix not in (".safetensors", ".pt", ".pth"):
        hint = " (or pass --export)" if path.suffix in EXPORT_SUFFIX.values() else ""
        raise OutputError(f"cannot write '{path.suffix}' files ({path})",
                          fix=f"name the output .safetensors or .pt{hint}")
    if not path.parent.exists():
        raise OutputError(f"output directory {path.parent} does not exist", fix="create it first")
    if path.is_dir():
        raise OutputError(f"output {path} is a directory", fix="name a file")
    if loaded.path is not None:
        source = loaded.path.resolve()
        for written in (path, sidecar_path(path)):
            if written.resolve() == source or (written.exists() and os.path.samefile(written, loaded.path)):
                raise OutputError(
                    f"output {written} would overwrite the input {loaded.path}", fix="write the result to a new file"
                )
    if path.suffix == ".safetensors" and loaded.spec is None:
        raise OutputError(
            f"{path}: a .safetensors output needs the model's architecture spec to be reloaded, "
            "and a pickled module has none",
            fix="write a .pt file instead",
        )
    return path


def atomic_write(path: Path, write: Callable[[str], None]) -> str:
    """Run ``write(tmp)`` on a synced temp file next to ``path``; the caller renames it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp makes 0600, and some writers (safetensors) replace the file: give the result the
        # permissions open() would, after the write
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def save_state_dict(sd: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Write a plain state dict atomically: safetensors for ``.safetensors``, else ``torch.save``."""
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: {path.parent} is not a directory", fix="create it first")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in sd.items()}
        tmp = atomic_write(path, lambda t: save_file(tensors, t))
    else:
        tmp = atomic_write(path, lambda t: torch.save(dict(sd), t))
    os.replace(tmp, path)
    return path


def save_model(model: nn.Module, path: Path, loaded: Loaded, steps: list[dict], report: dict,
               *, data: bytes | None = None) -> Path:
    """Write the model (and its JSON sidecar) atomically: temp files in the same directory, then rename.

    ``data``: already-encoded bytes to write instead (an exported ONNX or .pt2 model).
    """
    if data is not None:
        def write(tmp: str) -> None:
            Path(tmp).write_bytes(data)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_model as st_save

        def write(tmp: str) -> None:
            st_save(model, tmp)
    else:
        def write(tmp: str) -> None:
            try:
                torch.save(model, tmp)
            except Exception as e:
                raise OutputError(
                    f"torch cannot pickle this model to {path}: {_first_line(e)}",
                    fix="write .safetensors instead (the recipe is replayed on load), or run `normswap bake` first",
                ) from None

    sidecar = {
        "normswap": __version__,
        "format": path.suffix.lstrip("."),
        "arch": loaded.spec,
        **({"arch_args": loaded.arch_args} if loaded.arch_args else {}),
        "input_size": loaded.input_size,
        "steps": list(loaded.steps) + list(steps),
        "report": report,
    }
    tmp_model = atomic_write(path, write)
    try:
        tmp_side = atomic_write(sidecar_path(path), lambda t: Path(t).write_text(json.dumps(sidecar, indent=2, default=str)))
    except BaseException:
        os.unlink(tmp_model)
        raise
    os.replace(tmp_side, sidecar_path(path))
    os.replace(tmp_model, path)
    return path
