"""deepcopy_module gives what copy.deepcopy gives: independent tensors, shared things still shared,
custom copy hooks respected."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, weight_norm

from normswap.module_copy import deepcopy_module
from normswap.testing import randomize_bn


class Odd(nn.Module):
    """Attributes of every kind a user module might hold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.same_conv = self.conv  # one module at two paths
        self.head = nn.Linear(4, 4)
        self.tail = nn.Linear(4, 4)
        self.tail.weight = self.head.weight  # a tied parameter
        self.table = {"scale": torch.ones(4), "name": "odd"}
        self.history = [torch.zeros(2)]
        self.sizes = (3, (4, 5))
        self.register_buffer("mask", torch.ones(4), persistent=False)
        self.mask_view = self.mask[:2]  # a view of a buffer


class Custom(nn.Module):
    copies = 0

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def __deepcopy__(self, memo):
        type(self).copies += 1
        new = Custom()
        new.lin = copy.deepcopy(self.lin, memo)
        return new


class WithSetstate(nn.Conv2d):
    def __setstate__(self, state):
        super().__setstate__(state)
        self.restored = True


def test_odd_attributes_copy_like_deepcopy():
    model = Odd()
    new = deepcopy_module(model)
    assert new.same_conv is new.conv and new.conv is not model.conv
    assert new.tail.weight is new.head.weight and new.head.weight is not model.head.weight
    assert new.table is not model.table and new.table["name"] == "odd"
    assert torch.equal(new.table["scale"], model.table["scale"]) and new.table["scale"] is not model.table["scale"]
    assert new.history[0] is not model.history[0]
    assert new.sizes == (3, (4, 5))
    assert "mask" in new._non_persistent_buffers_set and new._non_persistent_buffers_set is not \
        model._non_persistent_buffers_set
    new.mask.fill_(7)
    assert model.mask.eq(1).all() and new.mask_view.eq(7).all()  # the view follows its own copy's storage
    assert [type(m) for m in new.modules()] == [type(m) for m in model.modules()]
    for n_old, n_new in zip(model.named_modules(remove_duplicate=False), new.named_modules(remove_duplicate=False)):
        assert n_old[0] == n_new[0] and sorted(vars(n_old[1])) == sorted(vars(n_new[1]))


def test_custom_copy_hooks_are_respected():
    Custom.copies = 0
    model = nn.Sequential(Custom(), WithSetstate(2, 2, 1))
    new = deepcopy_module(model)
    assert Custom.copies == 1 and isinstance(new[0], Custom)
    assert new[1].restored is True


def test_memo_entries_replace_modules():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    stand_in = nn.Identity()
    new = deepcopy_module(model, {id(model[1]): stand_in})
    assert new[1] is stand_in and new[0] is not model[0]


def test_parametrized_layers_copy_and_still_work():
    model = nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(3, 4, 3)),
                          parametrizations.weight_norm(nn.Conv2d(4, 4, 3))).eval()
    x = torch.randn(1, 3, 8, 8)
    new = deepcopy_module(model)
    with torch.no_grad():
        assert torch.equal(model(x), new(x))
    assert new[0].parametrizations.weight.original is not model[0].parametrizations.weight.original
    assert type(new[0]) is type(model[0])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_what_deepcopy_refuses_is_refused_the_same_way():
    legacy = weight_norm(nn.Conv2d(3, 4, 3))  # its computed weight is not a graph leaf
    with pytest.raises(RuntimeError, match="graph leaves") as theirs:
        copy.deepcopy(legacy)
    with pytest.raises(RuntimeError, match="graph leaves") as ours:
        deepcopy_module(legacy)
    assert str(ours.value) == str(theirs.value)


def test_a_timm_model_copies_to_the_same_outputs_and_state():
    model = timm.create_model("efficientnet_b0", pretrained=False)
    randomize_bn(model, (2, 3, 64, 64), seed=0)
    model.eval()
    new = deepcopy_module(model)
    ref = copy.deepcopy(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(new(x), ref(x))
    a, b = new.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(new.parameters(), model.parameters()))
    assert new.pretrained_cfg == model.pretrained_cfg and new.pretrained_cfg is not model.pretrained_cfg
