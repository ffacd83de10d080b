"""All or nothing: a failure at any step of apply (any rule's replacement, any carry, any fold, any calibration
step) leaves the caller's model exactly as it was, tensor for tensor and module for module, inplace=True too."""
import dataclasses

import pytest
import torch
import torch.nn as nn
from timm.layers.norm_act import BatchNormAct2d

import normswap
from normswap import carry, registry
from normswap.catalog import folding
from normswap.errors import NormswapError
from normswap.testing import randomize_bn


class Mixed(nn.Module):
    """BN2d, timm BN-act, BN1d after a linear, and a second rule's worth of layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), BatchNormAct2d(8)
        self.fc, self.bn3 = nn.Linear(8, 6), nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(self.bn3(self.fc(x.mean((2, 3)))))


SHAPE = (4, 3, 8, 8)


def mixed():
    torch.manual_seed(0)
    return randomize_bn(Mixed(), SHAPE).eval()


def snapshot(model):
    return ([(name, id(m), type(m)) for name, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def assert_unchanged(model, snap):
    modules, tensors, modes = snap
    assert [(name, id(m), type(m)) for name, m in model.named_modules()] == modules
    state = model.state_dict()
    assert state.keys() == tensors.keys()
    assert all(torch.equal(state[k], v) for k, v in tensors.items())
    assert [m.training for m in model.modules()] == modes


class Injected(RuntimeError):
    pass


def failing_on(nth: int, fn, counter: list):
    def wrapper(*args, **kwargs):
        counter[0] += 1
        if counter[0] == nth:
            raise Injected(f"injected failure at call {nth}")
        return fn(*args, **kwargs)
    return wrapper


TWO_RULES = {"version": 1, "check": "interface", "rules": [
    {"match": {"family": "batchnorm", "path": "bn1"}, "replace": "frozen_batch_norm"},
    {"match": {"family": "batchnorm"}, "replace": "group_norm", "with": {"num_groups": 2}},
]}
CASES = {  # recipe, keyword arguments, what to break
    "replacement of each rule": (TWO_RULES, {}, "build"),
    "each carry": (TWO_RULES, {}, "carry"),
    "each fold": ("fold_bn", {}, "fold"),
    "each spectral-norm replacement": ("spectral_norm", {}, "build"),
    "each calibration step": ("bn_to_gn", {"calibration": [torch.randn(*SHAPE) for _ in range(3)]}, "calibrate"),
}


def _break(monkeypatch, what: str, nth: int, counter: list) -> None:
    if what == "build":
        for name in registry.names():
            repl = registry.get(name)
            key = registry.normalise(name)
            monkeypatch.setitem(registry._REGISTRY, key,
                                dataclasses.replace(repl, build=failing_on(nth, repl.build, counter)))
    elif what == "carry":
        monkeypatch.setattr(carry, "carry_tensors", failing_on(nth, carry.carry_tensors, counter))
    elif what == "fold":
        monkeypatch.setattr(folding, "write_folded", failing_on(nth, folding.write_folded, counter))
    elif what == "calibrate":
        import normswap.passes.calibration as calibration

        monkeypatch.setattr(calibration, "_fit", failing_on(nth, calibration._fit, counter))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("inplace", [False, True])
def test_a_failure_anywhere_leaves_the_model_untouched(monkeypatch, case, inplace):
    recipe, kwargs, what = CASES[case]
    with monkeypatch.context() as m:  # how many times the step runs on a good apply
        counter = [0]
        _break(m, what, 10**9, counter)
        normswap.apply(mixed(), recipe, input_size=SHAPE, **kwargs)
        calls = counter[0]
    assert calls >= 2, (case, calls)
    for nth in range(1, calls + 1):
        model = mixed()
        snap = snapshot(model)
        with monkeypatch.context() as m:
            _break(m, what, nth, [0])
            with pytest.raises((NormswapError, Injected)) as e:
                normswap.apply(model, recipe, inplace=inplace, input_size=SHAPE, **kwargs)
        assert "injected failure" in str(e.value), e.value
        assert_unchanged(model, snap)


def test_failures_inside_replacements_surface_as_normswap_errors(monkeypatch):
    repl = registry.get("group_norm")
    monkeypatch.setitem(registry._REGISTRY, registry.normalise("group_norm"),
                        dataclasses.replace(repl, build=failing_on(1, repl.build, [0])))
    with pytest.raises(NormswapError, match="group_norm failed on layer 'bn1'.*injected failure at call 1"):
        normswap.apply(mixed(), "bn_to_gn")
