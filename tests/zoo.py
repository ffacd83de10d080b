"""timm architectures the zoo tests sweep: one or two per family, small inputs."""

# name -> input side (most take any multiple of 32; LeViT's attention biases fix 224)
ZOO = {
    "resnet18": 64,
    "tf_efficientnet_b0": 64,      # TF "same" padding: not symbolically traceable
    "mobilenetv3_small_100": 64,
    "regnetx_002": 64,
    "densenet121": 64,             # BN after concat
    "dla34": 64,
    "ese_vovnet19b_dw": 64,
    "cs3darknet_s": 64,            # cspnet family
    "rexnet_100": 64,              # prime channel counts (19, 53)
    "ghostnet_100": 64,
    "levit_128s": 224,             # linear -> flatten -> BatchNorm1d
    "efficientvit_b0": 64,         # data-dependent control flow
    "hrnet_w18_small": 64,
    "selecsls42b": 64,
    "mixnet_s": 64,
    "lcnet_050": 64,
    "resnest14d": 64,
    "repvgg_a0": 64,
    "mobileone_s0": 64,
    "gernet_s": 64,
    "dpn48b": 64,
    "spnasnet_100": 64,
}

# The default suite runs every 4th model, spread over the families (densenet121 and dpn48b bring BNs fed by a
# concat and timm's BatchNormAct2d; test_zoo.py checks the sample keeps both); `make test-all` runs the rest.
SAMPLE = list(ZOO)[::4]


def params(names):
    """pytest params for ``names``: those in SAMPLE as they are, the others marked slow (each runs once under -m '')."""
    import pytest

    return [name if name in SAMPLE else pytest.param(name, marks=pytest.mark.slow) for name in names]
