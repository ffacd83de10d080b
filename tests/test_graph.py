"""The recorded data-flow graph on hand-built traps and on untraceable timm models."""
import pytest
import timm
import torch
import torch.nn as nn

from normswap.graph import describe, record, users_of


class Traps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_skip = nn.Conv2d(4, 4, 1)  # output feeds bn AND the residual add
        self.bn_skip = nn.BatchNorm2d(4)
        self.twice = nn.Conv2d(4, 4, 3, padding=1)  # called twice
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)
        self.shared = nn.BatchNorm2d(4)
        self.alias = self.shared  # the same module at two paths
        self.lin = nn.Linear(4, 4)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.conv_skip(x)
        x = self.bn_skip(y) + y
        a = self.bn_a(self.twice(x))
        b = self.bn_b(self.twice(a))
        s = self.shared(b)
        if s.mean() > 1e9:  # data-dependent branch: symbolic tracing cannot follow it
            s = s * 2
        t = s.mean((2, 3))  # (N, C)
        z = self.lin(t)
        out = self.bn1d(z.flatten(0, 0)).reshape_as(z)  # z read for its shape only
        return out + torch.zeros_like(z)  # zeros_like reads z's shape only


@pytest.fixture(scope="module")
def flow():
    return record(Traps(), torch.randn(2, 4, 8, 8))


def test_skip_connection_gives_two_users(flow):
    src = flow.input_node("bn_skip")
    assert describe(src) == "conv_skip (Conv2d)"
    names = sorted(describe(u) for u in users_of(src))
    assert len(names) == 2 and "bn_skip (BatchNorm2d)" in names and any("add" in n for n in names)


def test_module_called_twice_has_two_calls(flow):
    assert flow.call_count("twice") == 2
    assert describe(flow.input_node("bn_a")) == "twice (Conv2d)"
    assert describe(flow.input_node("bn_b")) == "twice (Conv2d) call 2"
    # the second call reads bn_a's output
    second = flow.calls("twice")[1]
    assert describe(second.args[0]) == "bn_a (BatchNorm2d)"


def test_alias_paths(flow):
    assert flow.canonical("alias") == "shared"
    assert flow.modules["shared"].aliases == ["shared", "alias"]
    assert flow.call_count("alias") == 1


def test_shape_only_uses_are_not_users(flow):
    src = flow.input_node("bn1d")  # flatten of the linear output
    assert "flatten" in describe(src)
    lin = flow.calls("lin")[0]
    # reshape_as(z) and zeros_like(z) read z for its shape only: the flatten is its only user
    assert [describe(u) for u in users_of(lin)] == [describe(src)]


def test_data_dependent_branch_recorded(flow):
    assert flow.call_count("shared") == 1
    assert flow.input_shape("bn1d") == (2, 4)


def test_model_left_as_it_was():
    m = Traps().train()
    m.bn_a.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    record(m, torch.randn(2, 4, 8, 8))
    assert m.training and not m.bn_a.training and m.bn_b.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


def test_bad_input_is_a_clear_error():
    from normswap.errors import InputSpecError

    with pytest.raises(InputSpecError) as e:
        record(Traps(), torch.randn(2, 3, 8, 8))
    assert "(2, 3, 8, 8)" in str(e.value) and "--input-size" in str(e.value)


@pytest.mark.parametrize("name, size", [
    ("tf_efficientnet_b0", 64),   # TF "same" padding: symbolic tracing fails
    ("efficientvit_b0", 64),      # data-dependent control flow
    ("levit_128s", 224),          # linear -> flatten -> BatchNorm1d
])
def test_untraceable_and_view_models(name, size):
    m = timm.create_model(name, pretrained=False)
    flow = record(m, torch.randn(1, 3, size, size))
    bns = [p for p, mc in flow.modules.items() if isinstance(mc.module, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert all(flow.call_count(p) == 1 for p in bns)
    producers = [flow.input_node(p) for p in bns]
    assert all(p is not None for p in producers)
    if name == "levit_128s":
        inner = next(p for p in bns if p.endswith("mlp.ln2.bn"))
        src = flow.input_node(inner)
        assert "flatten" in describe(src) and describe(src.args[0]).endswith("(Linear)")
        assert len(users_of(src.args[0])) == 1  # the reshape_as(x) is shape-only
    else:
        assert sum(p.op == "call_module" for p in producers) >= 0.9 * len(bns)


def test_recording_frees_intermediates_as_a_plain_forward_does():
    """The recorder holds no intermediate: peak memory is a forward's, not the sum of every activation."""
    import weakref

    alive_at_end = []

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(6))

        def forward(self, x):
            refs = []
            for conv in self.convs:
                x = torch.relu(conv(x)) + 1  # the conv and relu outputs die at once; each sum when x moves on
                refs.append(weakref.ref(x))
            alive_at_end.append(sum(r() is not None for r in refs))
            return x

    flow = record(Chain().eval(), torch.randn(1, 4, 8, 8))
    assert alive_at_end == [1]  # only the current x
    convs = [n for n in flow.graph.nodes if n.op == "call_module"]
    assert len(convs) == 6 and all(len(users_of(n)) == 1 for n in convs)  # the data flow is still complete
    assert describe(users_of(convs[2])[0]).endswith("relu")


def test_generated_torch_wrappers_are_named_by_their_function():
    """F.max_pool2d is a generated dispatch wrapper; reasons name it, not boolean_dispatch.<locals>.fn."""
    import torch.nn.functional as F

    from normswap.graph import func_name

    assert func_name(F.max_pool2d) == "F.max_pool2d" and func_name(F.relu) == "F.relu"
