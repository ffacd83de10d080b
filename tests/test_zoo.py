"""bn_to_gn and the analysis across timm families (random weights, realistic BN state)."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers.norm_act import BatchNormAct2d

import normswap
from normswap.graph import describe, record
from normswap.testing import randomize_bn

from models import bn_layers
from zoo import SAMPLE, ZOO, params


def test_sample_keeps_bn_act_and_concat():
    """The default suite's share of the zoo still has timm's BatchNormAct2d and a BN fed by torch.cat."""
    bn_act, concat = [], []
    for name in SAMPLE:
        side = ZOO[name]
        model = timm.create_model(name, pretrained=False)
        if any(isinstance(m, BatchNormAct2d) for m in model.modules()):
            bn_act.append(name)
        flow = record(model, torch.randn(1, 3, side, side))
        if any(describe(flow.input_node(p)) == "torch.cat" for p in bn_layers(model) if p in flow.modules):
            concat.append(name)
    assert bn_act and concat, (bn_act, concat)


@pytest.mark.parametrize("name", params(ZOO))
def test_bn_to_gn_on_timm(name):
    side = ZOO[name]
    size = (2, 3, side, side)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    randomize_bn(model, size)
    bns = bn_layers(model)
    assert bns, name

    flow = record(model, torch.randn(1, 3, side, side))
    called = [p for p in bns if p in flow.modules and flow.call_count(p) > 0]
    assert len(called) >= 0.9 * len(bns)
    assert all(flow.input_node(p) is not None for p in called)

    out, report = normswap.apply(model, "bn_to_gn", return_report=True)
    assert type(out) is type(model)
    assert not bn_layers(out)
    gns = {n: m for n, m in out.named_modules() if isinstance(m, nn.GroupNorm)}
    assert set(bns) <= set(gns) and len(report.changes) == len({id(m) for m in bns.values()})
    for n, old in bns.items():
        assert torch.equal(old.weight, gns[n].weight) and torch.equal(old.bias, gns[n].bias)
        assert type(getattr(old, "act", None)) is type(getattr(gns[n], "act", None))

    out.train()
    x = torch.randn(*size)
    assert out.forward_features(x).shape[0] == 2
    y = out(x)
    y.square().mean().backward()
    for n, p in out.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {n}"
