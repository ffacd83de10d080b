"""BatchNorm folding: every pattern, every leave-alone case, outputs unchanged, precision."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from timm.layers import CondConv2d, StdConv2d
from timm.layers.norm_act import BatchNormAct2d
from torch.nn.utils.parametrizations import weight_norm

import normswap
from normswap.families import family_of

from models import INTO_NEXT, PATTERNS, BNThen, CondConvBN, InitOnlyConv3d, SharedBN, SharedWeightsOwnBNs, prepared, seq


def bns(model):
    return [n for n, m in model.named_modules() if family_of(m) in ("batchnorm", "frozen_batchnorm")]


def fold64(model, shape, **kw):
    """Fold a float64 copy and return (folded, report, max relative output error)."""
    m64 = copy.deepcopy(model).double()
    folded, rep = normswap.fold(m64, return_report=True, input_size=shape, check=False, **kw)
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        ref, out = m64(x), folded(x)
    err = ((ref - out).abs().max() / ref.abs().max()).item()
    return folded, rep, err


@pytest.mark.parametrize("name", list(PATTERNS))
def test_fold_patterns(name):
    make, shape = PATTERNS[name]
    model = prepared(make(), shape)
    folded, rep, err = fold64(model, shape)
    assert err <= 1e-12, err
    assert bns(folded) == [], rep.skipped
    # float32: the folded model is no further from the exact answer than 2x float32's own rounding
    f32 = normswap.fold(model, input_size=shape)
    x = torch.randn(*shape)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        orig_err = ((model(x).double() - exact).abs().max() / exact.abs().max()).item()
        fold_err = ((f32(x).double() - exact).abs().max() / exact.abs().max()).item()
    assert fold_err <= max(1e-5, 2 * orig_err)


def test_condconv_takes_the_shift_in_its_own_convolution(tmp_path):
    """The scale goes into every expert, the shift into ShiftedCondConv2d's shift; no BN op is left."""
    from normswap.layers import ShiftedCondConv2d

    shape = (3, 3, 9, 9)
    model = prepared(CondConvBN(bias=True), shape)
    folded, rep = normswap.fold(model, input_size=shape, return_report=True)
    assert type(folded.conv) is ShiftedCondConv2d and isinstance(folded.conv, CondConv2d)
    assert isinstance(folded.bn, nn.SiLU) and not rep.skipped
    assert set(folded.state_dict()) == {"route.weight", "route.bias", "conv.weight", "conv.bias", "conv.shift"}
    assert type(model.conv) is CondConv2d  # the caller's model is untouched
    bn = model.bn
    s = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
    assert torch.allclose(folded.conv.shift.double(), bn.bias.double() - bn.running_mean.double() * s, atol=1e-6)
    x = torch.randn(*shape)
    with torch.no_grad():
        want = model(x)
        assert torch.allclose(folded(x), want, rtol=1e-5, atol=1e-5)
        exported = torch.export.export(folded, (x,)).module()
        assert torch.allclose(exported(x), want, rtol=1e-5, atol=1e-5)
    torch.save(folded, tmp_path / "f.pt")
    again = torch.load(tmp_path / "f.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(x), folded(x))


def test_activation_kept():
    model = prepared(PATTERNS["bn-act keeps activation"][0](), (2, 3, 10, 10))
    folded = normswap.fold(model, input_size=(2, 3, 10, 10))
    assert isinstance(folded[1], nn.SiLU)


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class BNBeforeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(x))


def pruned():
    m = seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    prune.l1_unstructured(m[0], "weight", amount=0.4)
    return m


class ClampedWeightConv(nn.Conv2d):
    """Its forward transforms the weight: a folded scale would be clamped away."""

    def forward(self, x):
        return self._conv_forward(x, self.weight.clamp(-0.1, 0.1), self.bias)


def legacy_weight_norm():
    m = seq(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8))
    torch.nn.utils.weight_norm(m[0])
    return m


def legacy_spectral_norm():
    m = seq(nn.Linear(5, 7), nn.BatchNorm1d(7))
    torch.nn.utils.spectral_norm(m[0])
    return m


def clamp_output(module, args, out):
    return out.clamp(max=0.1)


def conv_with_output_hook():
    m = seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    m[0].register_forward_hook(clamp_output)
    return m


def bn_with_output_hook():
    m = seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    m[1].register_forward_hook(clamp_output)
    return m


LEAVE = {
    "conv called twice": (Reused, (2, 4, 6, 6), 2, "called 2 times"),
    "bn called twice": (SharedBN, (2, 4, 6, 6), 1, "called 2 times"),
    "conv output has two users": (TwoUsers, (2, 4, 6, 6), 1, "also feeds"),
    "bn before a zero-padded conv": (BNBeforeConv, (2, 4, 6, 6), 1, "input comes from input"),
    "StdConv2d": (lambda: seq(StdConv2d(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 8, 8), 1, "standardizes its weight"),
    "parametrized conv": (lambda: seq(weight_norm(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8)), (2, 3, 8, 8), 1, "parametrized"),
    "no running stats": (lambda: seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)), (2, 3, 8, 8), 1, "no running statistics"),
    "conv subclass transforming its weight": (lambda: seq(ClampedWeightConv(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 8, 8), 1,
                                              "ClampedWeightConv is not a conv/linear class whose forward uses its weight"),
    "legacy weight_norm hook": (legacy_weight_norm, (2, 3, 8), 1, "torch's legacy weight norm hook"),
    "legacy spectral_norm hook": (legacy_spectral_norm, (4, 5), 1, "torch's legacy spectral norm hook"),
    "conv with a forward hook": (conv_with_output_hook, (2, 3, 8, 8), 1, "Conv2d has forward hooks (clamp_output)"),
    "bn with a forward hook": (bn_with_output_hook, (2, 3, 8, 8), 1, "it has forward hooks (clamp_output)"),
    "conv weight read by the forward": (lambda: SharedWeightsOwnBNs(read_weight=True), (2, 3, 8, 8), 2,
                                        "the forward also reads c"),
    "bn statistics read by the forward": (lambda: SharedWeightsOwnBNs(read_stats=True), (2, 3, 8, 8), 1,
                                          "the forward also reads its running_var outside it"),
}


@pytest.mark.parametrize("name", list(LEAVE))
def test_leave_alone(name):
    make, shape, left, reason = LEAVE[name]
    model = prepared(make(), shape)
    folded, rep, err = fold64(model, shape)
    assert err <= 1e-12
    assert len(bns(folded)) == left
    assert len(rep.skipped) == left and all(reason in s["reason"] for s in rep.skipped), rep.skipped


def test_train_mode_bn_is_left():
    model = prepared(seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 8, 8)).train()
    rep = normswap.plan(model, "fold_bn", input_size=(2, 3, 8, 8))
    assert not rep.changes and "train mode" in rep.skipped[0]["reason"]


def test_reused_conv_folds_only_the_safe_bn():
    """torch.fx's fuse gets this wrong; here bn1 (after the first call) is left and the output is exact."""
    model = prepared(Reused(), (2, 4, 6, 6))
    folded, rep, err = fold64(model, (2, 4, 6, 6))
    assert err < 1e-12 and isinstance(folded.bn1, nn.BatchNorm2d) and isinstance(folded.bn2, nn.BatchNorm2d)


def test_pruned_conv_folds_through_weight_orig():
    model = prepared(pruned(), (2, 3, 8, 8))
    folded, rep, err = fold64(model, (2, 3, 8, 8))
    assert err <= 1e-12 and bns(folded) == []
    conv = folded[0]
    assert hasattr(conv, "weight_orig") and torch.equal(conv.weight_mask, model[0].weight_mask.double())
    assert (conv.weight == 0).sum() == (model[0].weight == 0).sum()  # the mask still applies


def test_bake_parametrizations_then_fold():
    model = prepared(LEAVE["parametrized conv"][0](), (2, 3, 8, 8))
    folded, rep, err = fold64(model, (2, 3, 8, 8), bake_parametrizations=True)
    assert err <= 1e-12 and bns(folded) == []
    assert not hasattr(folded[0], "parametrizations")


@pytest.mark.parametrize("make,shape", [(legacy_weight_norm, (2, 3, 8)), (legacy_spectral_norm, (4, 5))])
def test_bake_legacy_hooks_then_fold(make, shape):
    """torch.nn.utils.weight_norm/spectral_norm recompute the weight in a pre-hook: baked on the copy, then folded."""
    model = prepared(make(), shape)
    folded, rep, err = fold64(model, shape, bake_parametrizations=True)
    assert err <= 1e-12 and bns(folded) == [], rep.skipped
    assert not folded[0]._forward_pre_hooks and isinstance(folded[0].weight, nn.Parameter)
    assert any("legacy" in n for ch in rep.changes for n in ch["notes"]), rep.changes
    assert len(model[0]._forward_pre_hooks) == 1  # the caller's layer keeps its hook


def test_fold_base_takes_subclasses_only_with_the_base_forward():
    from timm.layers.cond_conv2d import CondConv2d
    from torchvision.models.video.resnet import Conv3DSimple

    from normswap.catalog.folding import fold_base

    class PlainCond(CondConv2d):
        pass

    assert fold_base(Conv3DSimple) is nn.Conv3d and fold_base(InitOnlyConv3d) is nn.Conv3d
    assert fold_base(nn.modules.linear.NonDynamicallyQuantizableLinear) is not None
    for cls in (ClampedWeightConv, StdConv2d, torch.ao.nn.qat.Conv2d, PlainCond, nn.Module):
        assert fold_base(cls) is None, cls


def test_unfoldable_becomes_affine():
    model = prepared(BNBeforeConv(), (2, 4, 6, 6))
    folded, rep, err = fold64(model, (2, 4, 6, 6), unfoldable="affine")
    assert err <= 1e-12 and type(folded.bn).__name__ == "ChannelAffine"


def test_low_precision_weights_no_worse_than_fp32_fold_then_cast():
    """fp16/bf16: folding in float64 and casting once is at least as close to the exact fold."""
    base = prepared(seq(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16)), (2, 8, 8, 8))
    exact = normswap.fold(copy.deepcopy(base).double(), input_size=(2, 8, 8, 8), check=False)[0].weight
    for dtype in (torch.float16, torch.bfloat16):
        low = copy.deepcopy(base).to(dtype)
        ours = normswap.fold(low, input_size=(2, 8, 8, 8), check=False)[0].weight
        # the usual way: fold in float32, cast
        via32 = normswap.fold(copy.deepcopy(low).float(), input_size=(2, 8, 8, 8), check=False)[0].weight.to(dtype)
        assert (ours.double() - exact).abs().max() <= (via32.double() - exact).abs().max()


def test_fold_check_catches_a_wrong_fold(monkeypatch):
    import normswap.catalog.folding as F

    real = F.fold_output_channels

    def wrong(weight, bias, s, t, **kw):
        w, b = real(weight, bias, s, t, **kw)
        return w, b + 0.1

    monkeypatch.setattr(F, "fold_output_channels", wrong)
    model = prepared(seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 8, 8))
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(normswap.CheckFailedError, match="numeric check"):
        normswap.fold(model, input_size=(2, 3, 8, 8), inplace=True)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ into_next: BN -> the layer after it


@pytest.mark.parametrize("name", list(INTO_NEXT))
def test_into_next_folds_exactly(name):
    make, shape = INTO_NEXT[name]
    model = prepared(make(), shape)
    folded, rep, err = fold64(model, shape, into_next=True)
    assert err <= 1e-12 and bns(folded) == [], rep.skipped
    assert "folded into the next layer, layer" in rep.changes[0]["notes"][0] + rep.changes[1]["notes"][0]
    _, rep_default, _ = fold64(model, shape)  # off by default: the BN is listed, not folded
    assert [s["path"] for s in rep_default.skipped] == ["bn"]


INTO_NEXT_LEFT = {
    "zero-padded conv": (lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)), (2, 4, 6, 6), "pads its input with zeros"),
    "activation in between": (lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), act=nn.ReLU()), (2, 4, 6, 6),
                              "not to a conv or linear layer"),
    "bn-act carries an activation": (lambda: BNThen(BatchNormAct2d(4), nn.Conv2d(4, 4, 1)), (2, 4, 6, 6), "sits between it"),
    "transposed conv": (lambda: BNThen(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3)), (2, 4, 6, 6), "transposed"),
    "linear over the last dim of 3-d input": (lambda: BNThen(nn.BatchNorm1d(4), nn.Linear(7, 3)), (2, 4, 7), "features"),
}


@pytest.mark.parametrize("name", list(INTO_NEXT_LEFT))
def test_into_next_leave_alone(name):
    make, shape, reason = INTO_NEXT_LEFT[name]
    model = prepared(make(), shape)
    folded, rep, err = fold64(model, shape, into_next=True)
    assert err <= 1e-12 and len(bns(folded)) == 1
    assert len(rep.skipped) == 1 and reason in rep.skipped[0]["reason"], rep.skipped


def test_into_next_and_backward_fold_share_one_conv():
    """bn0 folds into conv's input channels and bn1 into its outputs: both edits land on the same copy."""
    model = prepared(seq(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 8, 8))
    folded, rep, err = fold64(model, (2, 3, 8, 8), into_next=True)
    assert err <= 1e-12 and bns(folded) == [] and isinstance(folded[1], nn.Conv2d)


# ------------------------------------------------------------------ precision against the stock fuse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_folded_weights_no_further_from_exact_than_torch_fuse(dtype):
    from torch.fx.experimental.optimization import fuse

    base = prepared(seq(nn.Conv2d(16, 32, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3), nn.BatchNorm2d(32)), (2, 16, 10, 10))
    exact = normswap.fold(copy.deepcopy(base).double(), input_size=(2, 16, 10, 10), check=False)
    low = copy.deepcopy(base).to(dtype)
    ours = normswap.fold(low, input_size=(2, 16, 10, 10), check=False)
    peer = fuse(copy.deepcopy(low))
    peer_convs = [m for m in peer.modules() if isinstance(m, nn.Conv2d)]
    for i, (ref_conv, theirs) in enumerate(zip([exact[0], exact[3]], peer_convs)):
        mine = ours[3 * i]
        for name in ("weight", "bias"):
            e_ours = (getattr(mine, name).double() - getattr(ref_conv, name)).abs().max()
            e_peer = (getattr(theirs, name).double() - getattr(ref_conv, name)).abs().max()
            assert getattr(mine, name).dtype == dtype
            assert e_ours <= e_peer, (i, name, e_ours.item(), e_peer.item())


@pytest.mark.parametrize("name", ["conv2d no bias", "bn after concat of convs", "linear -> flatten -> bn1d"])
def test_low_memory_in_place_fold_writes_the_same_weights(name):
    make, shape = PATTERNS[name]
    model = prepared(make(), shape)
    expected = normswap.fold(model, input_size=shape, check=False)
    ids = [id(m) for m in model.modules() if not isinstance(m, nn.modules.batchnorm._BatchNorm)]
    out = normswap.fold(model, input_size=shape, check=False, inplace=True, low_memory=True)
    assert out is model and bns(model) == []
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in model.state_dict().items())
    assert ids == [id(m) for m in model.modules() if not isinstance(m, nn.Identity)]  # convs edited, not replaced


def test_low_memory_needs_in_place_without_check():
    with pytest.raises(normswap.NormswapError, match="low_memory=True edits the model in place"):
        normswap.fold(prepared(seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 8, 8)), low_memory=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 3, 3), (40, 8192), (2, 300000)])  # one chunk; rows across chunks; rows larger
def test_weight_products_are_the_float64_product_rounded_once(shape, dtype):
    """The chunked float64 product equals the whole-tensor float64 product rounded once, also in place."""
    from normswap.fold_math import _CHUNK, scale_into

    assert shape[0] * shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) != _CHUNK
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).to(dtype)
    s = (torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5).reshape(-1, *[1] * (len(shape) - 1))
    expected = (w.double() * s).to(dtype)
    out = torch.empty_like(w)
    assert torch.equal(scale_into(out, w, s), expected)
    assert torch.equal(scale_into(w, w, s), expected)  # in place, the weight read before each chunk is written
