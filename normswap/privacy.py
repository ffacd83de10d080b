"""Make a batch-free model trainable with Opacus's per-sample-gradient hooks, without editing its code.

Opacus wraps the output of every module that owns trainable parameters in a
full-backward-hook function, and autograd refuses an in-place change of that
output ("Output 0 of BackwardHookFunction is a view and is being modified
inplace"). Two patterns trigger it in common models: an in-place activation
module after a norm (``nn.ReLU(inplace=True)``), and an in-place op in a
block's forward on a norm's output (ResNet's ``x += shortcut``). The first is
turned off (``inplace = False``); for the second, the recorded forward names the
modules whose output is changed in place, and each is wrapped so callers get a
copy. The wrapper keeps the module's state-dict keys.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .graph import _short, record
from .inputs import make_inputs


class OutputCopy(nn.Module):
    """Runs ``module`` and returns a copy of its output, so the caller may change it in place.

    State-dict keys stay those of the wrapped module (``bn2.weight``, not ``bn2.module.weight``).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self._register_state_dict_hook(_strip_prefix)
        self._register_load_state_dict_pre_hook(_add_prefix, with_module=True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


def _strip_prefix(module, state_dict, prefix, local_metadata):
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    return state_dict


def _add_prefix(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "module.")]:
        state_dict[prefix + "module." + key[len(prefix):]] = state_dict.pop(key)


def _is_inplace(node: fx.Node) -> bool:
    name = _short(node.meta.get("func_name", ""))
    if name.startswith("__i") and name.endswith("__"):  # __iadd__, __imul__, ...
        return True
    if name.endswith("_") and not name.endswith("__"):  # add_, relu_, mul_ ...
        return True
    return node.kwargs.get("inplace") is True


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def modules_changed_in_place(model: nn.Module, inputs: Any) -> list[str]:
    """Paths of parameter-owning modules whose output some later op changes in place.

    Walks back from each in-place op through parameterless modules (Identity, DropPath),
    which may hand their input on unchanged.
    """
    flow = record(model, inputs)
    found: list[str] = []
    for node in flow.graph.nodes:
        if node.op != "call_function" or not _is_inplace(node) or not node.args:
            continue
        src = node.args[0]
        while isinstance(src, fx.Node) and src.op == "call_module":
            module = flow.modules[src.target].module
            if _owns_trainable(module):
                path = flow.canonical(src.target)
                if path not in found:
                    found.append(path)
                break
            ins = src.all_input_nodes
            src = ins[0] if len(ins) == 1 else None
    return found


def prepare_for_opacus(model: nn.Module, example_inputs: Any = None, *,
                       input_size: tuple[int, ...] | None = None) -> tuple[nn.Module, list[str]]:
    """Turn off in-place activations and wrap modules whose output is changed in place, in place.

    Returns the model and what was done. Run it after the norm swap (Opacus forbids
    BatchNorm) and before ``GradSampleModule`` / ``PrivacyEngine.make_private``.
    """
    notes: list[str] = []
    flipped = [n for n, m in model.named_modules() if isinstance(getattr(m, "inplace", None), bool) and m.inplace]
    for name in flipped:
        model.get_submodule(name).inplace = False
    if flipped:
        notes.append(f"turned off inplace on {len(flipped)} activation module(s)")
    inputs = example_inputs if example_inputs is not None else make_inputs(model, input_size, batch=2)
    was = model.training
    model.eval()
    try:
        paths = modules_changed_in_place(model, inputs)
    finally:
        model.train(was)
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        parent._modules[attr] = OutputCopy(parent._modules[attr])
    if paths:
        notes.append(f"{len(paths)} module(s) whose output is changed in place now hand on a copy: "
                     f"{', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''}")
    return model, notes
