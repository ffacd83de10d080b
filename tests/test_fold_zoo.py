"""fold_bn across timm families: no foldable BN left, outputs unchanged (float64), fp32 within rounding."""
import copy
import statistics

import pytest
import torch
import torch.nn as nn

import normswap
from normswap.families import family_of
from normswap.graph import record, users_of
from normswap.testing import randomize_bn

from models import bn_layers
from zoo import ZOO, params


def foldable_left(model, x):
    """BNs still fed directly by a conv/linear output nothing else reads: what fold should have taken."""
    flow = record(model, x)
    left = []
    for path, mc in flow.modules.items():
        if family_of(mc.module) in ("batchnorm", "frozen_batchnorm") and mc.call_count == 1:
            src = flow.input_node(path)
            if src is not None and src.op == "call_module" and len(users_of(src)) == 1 \
                    and isinstance(flow.modules[src.target].module, (nn.modules.conv._ConvNd, nn.Linear)) \
                    and flow.call_count(src.target) == 1:
                left.append(path)
    return left


# folding-specific families beyond the shared zoo: CondConv2d mixes expert kernels per sample
# (slow only: the CondConv patterns in test_fold.py cover it in the default suite)
FOLD_ONLY = {"efficientnet_cc_b0_4e": 64}


@pytest.mark.parametrize("name", params([*ZOO, *FOLD_ONLY]))
def test_fold_timm(name):
    side = {**ZOO, **FOLD_ONLY}[name]
    torch.manual_seed(0)
    import timm

    model = timm.create_model(name, pretrained=False)
    randomize_bn(model, (2, 3, side, side))
    model.eval()
    n_before = len(bn_layers(model))
    m64 = copy.deepcopy(model).double()
    folded64, report = normswap.fold(m64, input_size=(1, 3, side, side), check=False, return_report=True)
    assert type(folded64) is type(model)
    x = torch.randn(1, 3, side, side, dtype=torch.float64)
    assert foldable_left(folded64, x) == []
    assert len(bn_layers(folded64)) == len(report.skipped) < n_before
    if name in FOLD_ONLY:
        assert report.skipped == [], report.skipped
    folded32 = normswap.fold(model, input_size=(1, 3, side, side))  # float32, with the automatic check
    # the yardstick: error = max abs diff / max abs exact output, median over 4 seeded inputs
    fold64_err, orig32_err, fold32_err = [], [], []
    with torch.no_grad():
        for seed in range(4):
            x = torch.randn(1, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            exact = m64(x)
            scale = exact.abs().max()
            fold64_err.append(((folded64(x) - exact).abs().max() / scale).item())
            orig32_err.append(((model(x.float()).double() - exact).abs().max() / scale).item())
            fold32_err.append(((folded32(x.float()).double() - exact).abs().max() / scale).item())
    assert statistics.median(fold64_err) <= 1e-9
    assert statistics.median(fold32_err) <= max(1e-5, 2 * statistics.median(orig32_err)), (fold32_err, orig32_err)
