"""Shape-only stand-ins in the recorded pass: the same shapes as the real ops, and a real pass whenever
placeholder values could mislead the recording or leak into the model."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from normswap import shape_only
from normswap.errors import InputSpecError
from normswap.graph import record

CASES = [
    (torch.conv2d, lambda: (torch.randn(2, 8, 17, 19), torch.randn(16, 8, 3, 3), torch.randn(16), 2, 1)),
    (torch.conv2d, lambda: (torch.randn(8, 9, 9), torch.randn(16, 2, 3, 3), None, 1, "same", 2, 4)),
    (torch.conv2d, lambda: (torch.randn(1, 8, 9, 9), torch.randn(4, 8, 3, 1), None, (2, 1), "valid")),
    (torch.conv2d, lambda: (torch.randn(2, 8, 10, 10).to(memory_format=torch.channels_last),
                            torch.randn(8, 1, 3, 3), None, 1, 1, 1, 8)),
    (torch.conv1d, lambda: (torch.randn(2, 8, 30), torch.randn(16, 8, 5), None, 3, 0, 2)),
    (torch.conv3d, lambda: (torch.randn(1, 8, 4, 9, 9), torch.randn(8, 1, 1, 3, 3), None, 1, (0, 1, 1), 1, 8)),
    (F.linear, lambda: (torch.randn(2, 5, 7), torch.randn(3, 7), torch.randn(3))),
    (F.linear, lambda: (torch.randn(7), torch.randn(3, 7))),
    (F.linear, lambda: (torch.randn(4, 7).t().contiguous().t(), torch.randn(3, 7))),
    (torch.matmul, lambda: (torch.randn(2, 1, 4, 5), torch.randn(3, 5, 6))),
    (torch.Tensor.__matmul__, lambda: (torch.randn(4, 5), torch.randn(5, 6))),
    (torch.bmm, lambda: (torch.randn(3, 4, 5), torch.randn(3, 5, 2))),
    (F.scaled_dot_product_attention, lambda: (torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8),
                                              torch.randn(2, 3, 6, 5), torch.zeros(4, 6))),
]


@pytest.mark.parametrize("func,make", CASES, ids=[f"{i}-{getattr(c[0], '__name__', c[0])}" for i, c in enumerate(CASES)])
def test_stand_in_has_the_real_shape_dtype_and_layout(func, make):
    args = make()
    real = func(*args)
    stand_in = shape_only.STAND_INS[func](*args)
    assert stand_in is not None
    assert stand_in.shape == real.shape and stand_in.dtype == real.dtype and stand_in.stride() == real.stride()
    assert not stand_in.any()


@pytest.mark.parametrize("func,args", [
    (torch.conv2d, (torch.randn(1, 6, 8, 8), torch.randn(4, 8, 3, 3))),  # channels do not match
    (torch.conv2d, (torch.randn(1, 8, 2, 2), torch.randn(4, 8, 3, 3))),  # kernel larger than the input
    (torch.conv2d, (torch.randn(1, 8, 8, 8).double(), torch.randn(4, 8, 3, 3))),  # dtypes differ
    (torch.conv2d, (torch.randn(1, 8, 8, 8), torch.randn(4, 8, 3, 3), None, 2, "same")),  # same with stride
    (F.linear, (torch.randn(2, 6), torch.randn(3, 7))),
    (torch.matmul, (torch.randn(4, 5), torch.randn(4, 6))),
    (torch.matmul, (torch.randn(5), torch.randn(5, 6))),  # 1-d operand: left to the real op
    (torch.bmm, (torch.randn(3, 4, 5), torch.randn(2, 5, 2))),
    (torch.conv2d, (torch.randint(0, 3, (1, 8, 8, 8)), torch.randint(0, 3, (4, 8, 3, 3)))),  # integer
])
def test_stand_in_declines_what_it_cannot_be_sure_of(func, args):
    assert shape_only.STAND_INS[func](*args) is None


def _signature(flow):
    return [(n.op, str(n.target), n.meta.get("shape"), len(n.users)) for n in flow.graph.nodes]


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("mobilenetv3_small_050", 64), ("cspdarknet53", 64),
                                       ("vit_tiny_patch16_224", 224)])
def test_shape_only_pass_records_the_graph_a_real_pass_records(name, size, monkeypatch):
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        before = model(x)
    fast = record(model, x)
    assert fast.real_pass_because is None
    monkeypatch.setattr(shape_only, "STAND_INS", {})
    monkeypatch.setattr("normswap.graph.STAND_INS", {})
    slow = record(model, x)
    assert _signature(fast) == _signature(slow)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # nothing of the placeholder pass stayed in the model


class Branchy(nn.Module):
    """Takes a branch on a value: placeholders (zeros) would take the other one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.big = nn.Linear(4, 2)
        self.small = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(4))
            self.fc.bias.fill_(1.0)

    def forward(self, x):
        h = self.fc(x.abs())
        return self.big(h) if h.min() > 0.5 else self.small(h)


def test_a_value_read_after_a_stand_in_redoes_the_pass_for_real():
    flow = record(Branchy(), torch.randn(3, 4))
    assert flow.real_pass_because is not None and "__bool__" in flow.real_pass_because
    assert flow.call_count("big") == 1 and flow.call_count("small") == 0


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h[h > 0].sum()  # a boolean mask: the shape depends on the values


def test_a_boolean_mask_redoes_the_pass_for_real():
    flow = record(Masked(), torch.randn(3, 4))
    assert flow.real_pass_because is not None and "ValuesRead" in flow.real_pass_because


class Caching(nn.Module):
    """Caches a linear layer's output on first use, in a dict attribute and in a buffer, as some attention
    layers cache their biases."""

    def __init__(self):
        super().__init__()
        self.table = nn.Linear(3, 4)
        self.cache = {}
        self.register_buffer("last", torch.zeros(2, 4))

    def forward(self, x):
        if "bias" not in self.cache:
            self.cache["bias"] = self.table(torch.ones(2, 3))
        self.last.copy_(self.table(x[:, :3]))
        return x + self.cache["bias"]


def test_a_forward_that_writes_to_the_model_is_redone_for_real_and_leaves_real_values():
    torch.manual_seed(0)
    model = Caching().eval()
    x = torch.randn(2, 4)
    expected_bias = model.table(torch.ones(2, 3)).detach()
    flow = record(model, x)
    assert flow.real_pass_because is not None and "StateChanged" in flow.real_pass_because
    assert flow.call_count("table") == 2
    assert torch.allclose(model.cache["bias"], expected_bias)  # the real pass's value, not a placeholder
    assert torch.allclose(model.last, model.table(x[:, :3]).detach())


class Attribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        self.seen = self.fc(x)  # a new attribute holding a placeholder
        return self.seen * 2


def test_a_new_attribute_from_the_placeholder_pass_is_replaced_by_the_real_one():
    model = Attribute().eval()
    x = torch.randn(2, 4)
    record(model, x)
    assert torch.allclose(model.seen, model.fc(x).detach())


def test_a_model_that_rejects_the_input_still_gets_its_own_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(InputSpecError, match=r"expected input\[1, 4, 16, 16\] to have 3 channels"):
        record(model, torch.randn(1, 4, 16, 16))


class SubclassCache(nn.Module):
    """A cache in a dict subclass (defaultdict), filled by the forward."""

    def __init__(self):
        super().__init__()
        import collections

        self.fc = nn.Linear(4, 4)
        self.cache = collections.defaultdict(list)

    def forward(self, x):
        self.cache["seen"].append(self.fc(x).sum())  # the new key changes the defaultdict
        return self.fc(x)


def test_a_cache_in_a_dict_subclass_redoes_the_pass_for_real():
    model = SubclassCache().eval()
    x = torch.randn(2, 4)
    flow = record(model, x)
    assert flow.real_pass_because is not None and "StateChanged" in flow.real_pass_because
    assert list(model.cache) == ["seen"] and len(model.cache["seen"]) == 1  # only the real pass's entry
    assert torch.allclose(model.cache["seen"][0], model.fc(x).sum().detach())


class TrainRefuses(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if self.training:
            raise RuntimeError("called in train mode")
        return self.bn(self.conv(x))


def test_a_train_mode_model_is_recorded_in_eval_mode_and_left_in_train_mode():
    model = TrainRefuses().train()
    model.conv.eval()
    flow = record(model, torch.randn(1, 3, 8, 8))
    assert flow.real_pass_because is None and flow.call_count("bn") == 1
    assert [m.training for m in (model, model.conv, model.bn)] == [True, False, True]


def test_recorded_graph_is_a_valid_fx_graph_with_consistent_users():
    model = timm.create_model("resnet18", pretrained=False).eval()
    flow = record(model, torch.randn(1, 3, 32, 32))
    flow.graph.lint()
    for node in flow.graph.nodes:
        for src in node.all_input_nodes:
            assert node in src.users
        for user in node.users:
            assert node in user.all_input_nodes


def test_tensor_names_are_those_of_named_parameters_and_buffers():
    from normswap.graph import _tensor_names

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    model[2].weight = model[0].weight  # tied: both names reach one tensor
    model.add_module("again", model[1])  # one module at two paths
    expected = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
    expected.update({id(t): n for n, t in model.named_buffers(remove_duplicate=False)})
    assert _tensor_names(list(model.named_modules(remove_duplicate=False))) == expected
