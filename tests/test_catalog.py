"""The activation-norm catalog: every built-in swap on timm families and hand-built models."""
import copy
import statistics

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import EvoNorm2dS0, FilterResponseNormAct2d, FilterResponseNormTlu2d, LayerNorm2d, StdConv2d, StdConv2dSame
from timm.layers.norm_act import (BatchNormAct2d, FrozenBatchNorm2d, FrozenBatchNormAct2d, GroupNorm1Act, GroupNormAct,
                                  LayerNormAct2d, SyncBatchNormAct)

import normswap
from normswap.families import family_of
from normswap.layers import (IBN, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, ConditionalBatchNorm2d,
                             ConditionalInstanceNorm2d, conditioned)
from normswap.layers.norm_act import (BatchRenormAct2d, ConditionalBatchNormAct2d, ConditionalInstanceNormAct2d,
                                      InstanceNormAct2d)
from normswap.testing import randomize_bn

ARCHS = {  # name -> side; chosen for variety: plain BN, norm-act BN, 1x1 SE BNs, BN1d on (N, C), TF padding
    "resnet18": 64,
    "mobilenetv3_small_050": 64,
    "rexnet_100": 64,
    "regnetx_002": 64,
    "tf_efficientnet_b0": 64,
    "levit_128s": 224,
}

NEW_TYPES = {
    "bn_to_gn": (nn.GroupNorm, GroupNormAct),
    "bn_to_in": (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, InstanceNormAct2d),
    "bn_to_ln": (nn.GroupNorm, GroupNorm1Act, nn.LayerNorm),
    "bn_to_frozen": (FrozenBatchNorm2d, FrozenBatchNormAct2d),
    "sync_bn": (nn.SyncBatchNorm, SyncBatchNormAct),
    "bn_to_evonorm": (EvoNorm2dS0,),
    "bn_to_frn": (FilterResponseNormTlu2d, FilterResponseNormAct2d),
    "bn_to_gn_ws": (nn.GroupNorm, GroupNormAct),
    "bn_to_renorm": (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormAct2d),
    "bn_to_cin": (ConditionalInstanceNorm2d, ConditionalInstanceNormAct2d),
    "bn_to_cbn": (ConditionalBatchNorm2d, ConditionalBatchNormAct2d),
}
PARAMS = {"bn_to_cin": {"num_styles": 3}, "bn_to_cbn": {"num_classes": 4}}
BATCH_FREE = {"bn_to_gn", "bn_to_in", "bn_to_ln", "bn_to_frozen", "bn_to_evonorm", "bn_to_frn", "bn_to_gn_ws"}
# why a layer may legitimately be left, per recipe
SKIP_REASONS = {
    "bn_to_in": ("no spatial axis", "1x1 per channel"),
    "bn_to_frozen": ("takes 4-d input",),
    "bn_to_evonorm": ("takes 4-d input",),
    "bn_to_frn": ("no spatial axis", "1x1 per channel", "takes 4-d input"),
    "bn_to_cin": ("no spatial axis", "1x1 per channel", "takes 4-d input"),
    "bn_to_cbn": ("takes 4-d input",),
}


def bn_layers(model):
    return {n: m for n, m in model.named_modules() if family_of(m) in ("batchnorm", "frozen_batchnorm")}


def built(name, side, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    return randomize_bn(model, (2, 3, side, side), seed=seed)


def grads_reach(reference, out, batch, side):
    """A train-mode step at ``batch``: every parameter that learns in the original gets a finite gradient."""
    out.train()
    x = torch.randn(batch, 3, side, side)
    if any(isinstance(m, (ConditionalInstanceNorm2d, ConditionalBatchNorm2d)) for m in out.modules()):
        with conditioned(out, torch.arange(batch) % 3):
            out(x).square().mean().backward()
    else:
        out(x).square().mean().backward()
    learning = {n for n, p in reference.named_parameters() if p.requires_grad}
    for n, p in out.named_parameters():
        if n in learning:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = built(name, ARCHS[name])
        return cache[name]

    return get


@pytest.mark.parametrize("recipe", list(NEW_TYPES))
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "levit_128s"])  # LeViT: its BN1d cases below
def test_recipe_on_timm(models, recipe, arch):
    side = ARCHS[arch]
    model = models(arch)
    before = bn_layers(model)
    out, rep = normswap.apply(model, recipe, input_size=(1, 3, side, side), return_report=True,
                              **PARAMS.get(recipe, {}))
    assert type(out) is type(model)
    after = dict(out.named_modules())
    skipped = {s["path"] for s in rep.skipped}
    allowed = SKIP_REASONS.get(recipe, ())
    for s in rep.skipped:
        assert any(r in s["reason"] for r in allowed), s
    for path, old in before.items():
        new = after[path]
        if path in skipped:
            assert new is not old and type(new) is type(old)  # a copy, unchanged
            continue
        assert isinstance(new, NEW_TYPES[recipe]), (path, type(new))
        if getattr(old, "weight", None) is not None and getattr(new, "weight", None) is not None:
            if new.weight.ndim == 2:  # conditional: one row per condition, each starting as the BN's
                assert all(torch.equal(row, old.weight.detach()) for row in new.weight.detach()), path
                assert all(torch.equal(row, old.bias.detach()) for row in new.bias.detach()), path
            else:
                assert torch.equal(old.weight.detach().flatten(), new.weight.detach().flatten()), path
                assert torch.equal(old.bias.detach().flatten(), new.bias.detach().flatten()), path
        if recipe in ("bn_to_frozen", "sync_bn", "bn_to_renorm", "bn_to_cbn"):
            assert torch.equal(old.running_mean, new.running_mean) and torch.equal(old.running_var, new.running_var)
    assert {p for p, m in before.items() if type(after[p]) is type(m)} == skipped
    if recipe == "bn_to_gn_ws":
        std = [m for m in out.modules() if isinstance(m, (StdConv2d, StdConv2dSame))]
        plain = [m for m in out.modules() if type(m) is nn.Conv2d and m.weight[0].numel() > 1]
        assert std and not plain
    grads_reach(model, out, 2, side)
    if recipe in BATCH_FREE and not skipped:
        out.zero_grad()
        grads_reach(model, out, 1, side)


def test_levit_bn1d_on_tokens(models):
    """LeViT's BatchNorm1d sees (B*N, C) tokens: no spatial axis for InstanceNorm; LayerNorm over C fits."""
    model = models("levit_128s")
    rep = normswap.plan(model, "bn_to_in", input_size=(1, 3, 224, 224))
    assert rep.skipped and all("no spatial axis" in s["reason"] for s in rep.skipped)
    out = normswap.apply(model, "bn_to_ln", input_size=(1, 3, 224, 224))
    assert not bn_layers(out) and sum(isinstance(m, nn.LayerNorm) for m in out.modules()) >= 40
    grads_reach(model, out, 2, 224)


def test_rexnet_se_bns_on_1x1_maps_are_skipped(models):
    rep = normswap.plan(models("rexnet_100"), "bn_to_in", input_size=(1, 3, 64, 64))
    assert len(rep.skipped) == 13 and all("1x1 per channel" in s["reason"] for s in rep.skipped)


# ------------------------------------------------------------------ hand-built models


class Small(nn.Module):
    """A BN1d on (N, C), BN2d with and without a timm activation, a BN3d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bnact = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.conv3 = nn.Conv3d(1, 2, 1)
        self.bn3 = nn.BatchNorm3d(2)
        self.fc = nn.Linear(8, 6)
        self.bn1 = nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.bnact(self.conv2(torch.relu(self.bn(self.conv(x)))))
        v = self.bn3(self.conv3(x.unsqueeze(1))).mean(1)
        return self.bn1(self.fc(v.mean((2, 3))))


HAND_TYPES = {
    "bn_to_in": {"bn": nn.InstanceNorm2d, "bnact": InstanceNormAct2d, "bn3": nn.InstanceNorm3d, "bn1": None},
    "bn_to_ln": {"bn": nn.GroupNorm, "bnact": GroupNorm1Act, "bn3": nn.GroupNorm, "bn1": nn.LayerNorm},
    "bn_to_frozen": {"bn": FrozenBatchNorm2d, "bnact": FrozenBatchNormAct2d, "bn3": None, "bn1": None},
    "sync_bn": {"bn": nn.SyncBatchNorm, "bnact": SyncBatchNormAct, "bn3": nn.SyncBatchNorm, "bn1": nn.SyncBatchNorm},
    "bn_to_evonorm": {"bn": EvoNorm2dS0, "bnact": EvoNorm2dS0, "bn3": None, "bn1": None},
    "bn_to_frn": {"bn": FilterResponseNormTlu2d, "bnact": FilterResponseNormAct2d, "bn3": None, "bn1": None},
}


@pytest.mark.parametrize("recipe", list(HAND_TYPES))
def test_recipe_on_hand_built(recipe):
    torch.manual_seed(0)
    model = randomize_bn(Small(), (4, 3, 8, 8))
    out, rep = normswap.apply(model, recipe, input_size=(2, 3, 8, 8), return_report=True)
    for path, want in HAND_TYPES[recipe].items():
        got = getattr(out, path)
        if want is None:
            assert type(got) is type(getattr(model, path)) and path in {s["path"] for s in rep.skipped}
        else:
            assert type(got) is want, (path, type(got))
    if isinstance(out.bnact, (InstanceNormAct2d, GroupNorm1Act, FrozenBatchNormAct2d, SyncBatchNormAct)):
        assert isinstance(out.bnact.act, nn.SiLU)  # the activation survives the swap
    if isinstance(out.bnact, FilterResponseNormAct2d):
        assert isinstance(out.bnact.act, nn.SiLU)
    out.train()
    out(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in out.parameters())


def test_frn_turns_relu_into_tlu():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)), (2, 3, 8, 8))
    out, rep = normswap.apply(model, "bn_to_frn", return_report=True, input_size=(1, 3, 8, 8))
    assert type(out[1]) is FilterResponseNormTlu2d and out[1].apply_act
    assert "TLU" in rep.changes[0]["notes"][0]


def test_bn_to_ln_channels_only():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), BatchNormAct2d(4)),
                         (2, 3, 8, 8))
    out = normswap.apply(model, "bn_to_ln", over="c", input_size=(1, 3, 8, 8))
    assert type(out[1]) is LayerNorm2d and type(out[3]) is LayerNormAct2d
    x = torch.randn(2, 4, 5, 5)
    mu, var = x.mean(1, keepdim=True), x.var(1, keepdim=True, unbiased=False)
    want = (x - mu) / torch.sqrt(var + out[1].eps) * out[1].weight[:, None, None] + out[1].bias[:, None, None]
    assert torch.allclose(out[1](x), want, atol=1e-6)


def test_gn_ws_standardizes_and_carries():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1, groups=8)),
                         (2, 3, 8, 8))
    out, rep = normswap.apply(model, "bn_to_gn_ws", return_report=True, input_size=(1, 3, 8, 8))
    assert type(out[0]) is StdConv2d and torch.equal(out[0].weight, model[0].weight)
    assert type(out[2]) is nn.Conv2d and "single weight" in rep.skipped[0]["reason"]
    w = model[0].weight
    ws = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-6)
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(out[0](x), nn.functional.conv2d(x, ws, model[0].bias, padding=1), atol=1e-5)


# ------------------------------------------------------------------ eval-mode equivalence


@pytest.mark.parametrize("recipe", ["bn_to_frozen", "sync_bn", "bn_to_renorm"])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv3_small_050", "tf_efficientnet_b0"])
def test_same_function_in_eval(models, recipe, arch):
    side = ARCHS[arch]
    model = copy.deepcopy(models(arch)).eval()
    m64 = copy.deepcopy(model).double()
    out64 = normswap.apply(m64, recipe, input_size=(1, 3, side, side)).eval()
    out32 = normswap.apply(model, recipe, input_size=(1, 3, side, side)).eval()
    swap64, own32, swap32 = [], [], []  # relative to the exact output; median over 4 seeded inputs
    with torch.no_grad():
        for seed in range(4):
            x = torch.randn(1, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            exact = m64(x)
            scale = exact.abs().max()
            swap64.append(((out64(x) - exact).abs().max() / scale).item())
            own32.append(((model(x.float()).double() - exact).abs().max() / scale).item())
            swap32.append(((out32(x.float()).double() - exact).abs().max() / scale).item())
    assert statistics.median(swap64) <= 1e-10
    assert statistics.median(swap32) <= max(2 * statistics.median(own32), 1e-6), (swap32, own32)


# ------------------------------------------------------------------ what batch-free norms buy


@pytest.mark.parametrize("recipe", ["bn_to_gn", "bn_to_in", "bn_to_ln", "bn_to_evonorm", "bn_to_frn"])
def test_batch_free_sample_output_ignores_its_batch(recipe):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                       nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)), (2, 3, 8, 8))
    out = normswap.apply(model, recipe, input_size=(1, 3, 8, 8)).train()
    model.train()
    a = torch.randn(1, 3, 8, 8)
    batch1, batch2 = torch.cat([a, torch.randn(3, 3, 8, 8)]), torch.cat([a, 5 * torch.randn(3, 3, 8, 8)])
    with torch.no_grad():
        assert torch.equal(out(batch1)[0], out(batch2)[0])  # bit-identical: nothing crosses the batch
        assert not torch.allclose(model(batch1)[0], model(batch2)[0], atol=1e-3)  # BN's does not hold


def test_batch_free_trains_at_batch_one_on_1x1_maps_where_bn_raises():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1),
                                       nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2)), (2, 3, 8, 8))
    model.train()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(x)
    out = normswap.apply(model, "bn_to_gn", input_size=(1, 3, 8, 8)).train()
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    target = torch.tensor([1])
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(out(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ IBN-a


IBN_PATHS = {  # arch -> (side, paths for ibn_a or None for the default ResNet paths, expected count)
    "resnet18": (64, None, 6),
    "resnet50": (64, None, 13),
    "seresnext26d_32x4d": (64, None, 6),
    "regnetx_002": (64, ["s1.*.conv1.bn", "s2.*.conv1.bn"], 2),
    "mobilenetv3_small_050": (64, ["blocks.1.*.bn1", "blocks.2.*.bn1"], 5),
}


@pytest.mark.parametrize("arch", list(IBN_PATHS))
def test_ibn_a(arch):
    side, paths, count = IBN_PATHS[arch]
    model = built(arch, side)
    kw = {"paths": paths} if paths else {}
    out, rep = normswap.apply(model, "ibn_a", input_size=(1, 3, side, side), return_report=True, **kw)
    assert type(out) is type(model)
    ibns = {n: m for n, m in out.named_modules() if isinstance(m, IBN)}
    assert len(ibns) == count and not rep.skipped
    for path, new in ibns.items():
        old = model.get_submodule(path)
        k = new.half
        assert k == old.num_features // 2
        assert torch.equal(new.IN.weight, old.weight[:k]) and torch.equal(new.BN.weight, old.weight[k:])
        assert torch.equal(new.BN.running_var, old.running_var[k:])
        if getattr(old, "act", None) is not None and not isinstance(old.act, nn.Identity):
            assert type(new.act) is type(old.act)
    grads_reach(model, out, 2, side)


def test_ibn_a_default_paths_on_a_non_resnet_is_an_error():
    with pytest.raises(normswap.NormswapError, match="required but matched no layer"):
        normswap.apply(built("regnetx_002", 64), "ibn_a", input_size=(1, 3, 64, 64))


# ------------------------------------------------------------------ conditional norms


def test_conditional_in_renders_per_sample_styles():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 3, 3, padding=1)), (2, 3, 16, 16))
    out = normswap.apply(model, "bn_to_cin", num_styles=4, input_size=(1, 3, 16, 16))
    cin = out[1]
    with torch.no_grad():
        cin.weight[2].mul_(3.0)
    x = torch.randn(2, 3, 16, 16)
    with conditioned(out, torch.tensor([0, 2])):
        y = out(x)
    with conditioned(out, torch.tensor([0, 0])):
        y0 = out(x)
    assert torch.equal(y[0], y0[0]) and not torch.allclose(y[1], y0[1])
    # style 0 still computes what the BN's affine did on instance-normalized features
    ref = nn.functional.instance_norm(out[0](x), eps=model[1].eps) * model[1].weight[:, None, None] + model[1].bias[:, None, None]
    assert torch.allclose(y0, out[3](torch.relu(ref)), atol=1e-5)
    with pytest.raises(RuntimeError, match="conditioned"):
        out(x)


def test_conditional_recipes_need_their_count():
    with pytest.raises(normswap.NormswapError, match="num_classes' has no default and must be set"):
        normswap.apply(built("resnet18", 64), "bn_to_cbn", input_size=(1, 3, 64, 64))


class SharedBNShrinking(nn.Module):
    """One BN after each of three stride-2 convs: its last call sees a 1x1 map (found by the recipe fuzz)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1, stride=2)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        for _ in range(3):
            x = self.bn(self.conv(x))
        return x


def test_per_sample_norms_check_every_call_of_a_shared_layer():
    model = SharedBNShrinking().eval()
    out, report = normswap.apply(model, "bn_to_in", input_size=(3, 4, 5), return_report=True)
    assert report.changes == [] and "(call 3 of 3) is 1x1 per channel" in report.skipped[0]["reason"]
    out(torch.randn(3, 4, 5))
