"""Differential privacy with Opacus: batch-free swaps give correct per-sample gradients on timm models."""
import copy
import warnings

import pytest
import timm
import torch
import torch.nn as nn

import normswap
from normswap.testing import randomize_bn

opacus = pytest.importorskip("opacus")
from opacus import GradSampleModule  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

SIDE = 64


def trained(arch):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=5)
    return randomize_bn(model, (2, 3, SIDE, SIDE))


def close(a, b, rel=1e-4):
    """Equal up to float32 summation order, relative to the tensor's scale."""
    return (a - b).abs().max() <= rel * b.abs().max() + 1e-7


def per_sample_step(model):
    """One Opacus hooks step; returns (GradSampleModule, inputs, targets)."""
    gs = GradSampleModule(model, loss_reduction="sum")
    x, y = torch.randn(3, 3, SIDE, SIDE), torch.tensor([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(gs(x), y, reduction="sum").backward()
    return gs, x, y


@pytest.mark.parametrize("arch, recipe", [
    ("resnet18", "bn_to_gn"), ("mobilenetv3_small_050", "bn_to_gn"), ("regnetx_002", "bn_to_gn"),
    ("resnet18", "bn_to_frozen"),
])
def test_per_sample_gradients_after_swap(arch, recipe):
    model = trained(arch)
    swapped = normswap.apply(model, recipe, input_size=(1, 3, SIDE, SIDE)).train()
    # Opacus's validator matches exact types: it sees nothing wrong with timm's BatchNormAct2d,
    # so the proof is that no _BatchNorm subclass is left at all
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in swapped.modules())
    assert ModuleValidator.validate(swapped, strict=False) == []
    keys = list(swapped.state_dict())
    prepared, notes = normswap.prepare_for_opacus(swapped, input_size=(2, 3, SIDE, SIDE))
    assert list(prepared.state_dict()) == keys and notes
    reference = copy.deepcopy(prepared)
    gs, x, y = per_sample_step(prepared)
    trainable = [(n, p) for n, p in gs.named_parameters() if p.requires_grad]
    assert trainable and all(getattr(p, "grad_sample", None) is not None for _, p in trainable)
    for n, p in trainable:  # the per-sample gradients add up to the batch gradient
        assert close(p.grad_sample.sum(0), p.grad), n
    # and sample 0's equals the gradient of sample 0 alone (batch-free: nothing crosses the batch)
    nn.functional.cross_entropy(reference(x[:1]), y[:1], reduction="sum").backward()
    ref = dict(reference.named_parameters())
    for n, p in trainable:
        assert close(p.grad_sample[0], ref[n.removeprefix("_module.")].grad), n


def test_unprepared_model_shows_why_prepare_exists():
    swapped = normswap.apply(trained("resnet18"), "bn_to_gn", input_size=(1, 3, SIDE, SIDE)).train()
    with pytest.raises(RuntimeError, match="modified inplace"):
        per_sample_step(swapped)


def test_output_copy_round_trips_state_dict():
    model = trained("resnet18")
    swapped = normswap.apply(model, "bn_to_gn", input_size=(1, 3, SIDE, SIDE))
    prepared, _ = normswap.prepare_for_opacus(copy.deepcopy(swapped), input_size=(2, 3, SIDE, SIDE))
    assert type(prepared.layer1[0].bn2).__name__ == "OutputCopy"
    prepared.load_state_dict(swapped.state_dict())
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.equal(prepared.eval()(x), swapped.eval()(x))
