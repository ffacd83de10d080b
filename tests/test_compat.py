"""Files written by earlier releases still load: a pickled model of normswap.layers classes from 0.1.0.

The fixture is made by fixtures/make_layers_fixture.py (run once with that release); do not regenerate it
with the current code, or the test no longer says anything about old files.
"""
from pathlib import Path

import torch
import torch.nn as nn

import normswap.layers

FIXTURE = Path(__file__).parent / "fixtures" / "layers_0.1.0.pt"

# the classes the 0.1.0 pickle names, by the module path it stored
PICKLED = {
    "normswap.layers.renorm.BatchRenorm2d",
    "normswap.layers.ibn.IBN",
    "normswap.layers.conditional.ConditionalBatchNorm2d",
    "normswap.layers.affine.ChannelAffine",
    "normswap.layers.cosine.CosineConv",
    "normswap.layers.norm_act.InstanceNormAct2d",
}


def test_layers_pickled_by_0_1_0_load_and_give_the_same_output():
    data = torch.load(FIXTURE, weights_only=False)
    assert set(data) == {"model", "input", "condition", "output"}
    model = data["model"]
    assert isinstance(model, nn.Sequential)
    ours = {f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()
            if not type(m).__module__.startswith("torch.")}
    assert ours == PICKLED
    assert all(path.startswith("normswap.layers.") for path in ours)

    normswap.layers.set_condition(model, data["condition"])
    model.eval()
    with torch.no_grad():
        out = model(data["input"])
    torch.testing.assert_close(out, data["output"], rtol=0, atol=1e-6)
