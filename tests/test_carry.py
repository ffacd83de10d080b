"""carry: every replacement honours a rule's ``carry:``, tensor by tensor, and says exactly what it carried.

For each registered replacement and each subset of the state it declares it can carry (plus ``none`` and the
default), a one-rule recipe runs on a small model whose BN has non-trivial state: what was asked for must hold
the old values, what was not must hold the fresh layer's defaults, and the report's ``carried`` map must name
exactly the tensors that were filled. A replacement that declares nothing to choose (``carries=()``) must be
refused any ``carry:`` key.
"""
import itertools

import pytest
import torch
import torch.nn as nn
import torchvision
from timm.layers import LayerNorm2d
from timm.layers.norm_act import (BatchNormAct2d, FrozenBatchNorm2d, FrozenBatchNormAct2d, GroupNorm1Act, GroupNormAct,
                                  LayerNormAct, LayerNormAct2d, SyncBatchNormAct)

import normswap
from normswap import carry, registry
from normswap.errors import RecipeError
from normswap.recipe import load_recipe
from normswap.layers import IBN, BatchRenorm2d, ConditionalBatchNorm2d, ConditionalInstanceNorm2d
from normswap.layers.norm_act import (BatchRenormAct1d, BatchRenormAct2d, ConditionalBatchNormAct2d,
                                      ConditionalInstanceNormAct2d, IBNAct, InstanceNormAct2d)
from normswap.testing import randomize_bn

SHAPE = (2, 3, 6, 6)
OPTIONS = {  # what a replacement needs to run here; running statistics only exist in InstanceNorm when tracked
    "conditional_instance_norm": {"num_conditions": 3},
    "conditional_batch_norm": {"num_conditions": 3},
    "instance_norm": {"track_running_stats": True},
}
FRESH = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}
KIND = {"weight": "affine", "bias": "affine", "running_mean": "running_stats", "running_var": "running_stats",
        "num_batches_tracked": "running_stats"}


class ConvNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.conv(x))


def model(norm: nn.Module | None = None) -> nn.Module:
    """conv -> BatchNormAct2d (ReLU) with random γ/β, measured and perturbed statistics, 7 batches tracked."""
    torch.manual_seed(0)
    m = randomize_bn(ConvNorm(norm if norm is not None else BatchNormAct2d(8)), SHAPE).eval()
    m.norm.num_batches_tracked.fill_(7)
    return m


def recipe(name: str, carry_value=None, **extra) -> dict:
    rule = {"match": {"path": "norm"}, "replace": name, **extra}
    if name in OPTIONS:
        rule["with"] = OPTIONS[name]
    if carry_value is not None:
        rule["carry"] = carry_value
    return {"version": 1, "check": "none", "rules": [rule]}


def expected_targets(old: nn.Module, new: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """new tensor name -> (old tensor it should hold when carried, that tensor's value there), from each layout."""
    if isinstance(new, IBN):
        k = new.half
        out = {f"IN.{n}": (n, getattr(old, n)[:k]) for n in ("weight", "bias")}
        out.update({f"BN.{n}": (n, getattr(old, n)[k:]) for n in ("weight", "bias", "running_mean", "running_var")})
        out["BN.num_batches_tracked"] = ("num_batches_tracked", old.num_batches_tracked)
        return out
    out = {}
    for n in KIND:
        dst = getattr(new, n, None)
        if isinstance(dst, torch.Tensor):
            src = getattr(old, n)
            out[n] = (n, src.expand_as(dst) if n in ("weight", "bias") and dst.ndim == 2 else src)  # conditional
    return out


def carry_cases():
    for name in registry.names():
        repl = registry.get(name)
        if not repl.carries:
            continue
        subsets = [list(c) for r in range(1, len(repl.carries) + 1) for c in itertools.combinations(repl.carries, r)]
        for value in [None, "none", *subsets]:
            yield pytest.param(name, value, id=f"{name}-{value if value is not None else 'default'}")


@pytest.mark.parametrize("name,value", list(carry_cases()))
def test_every_replacement_honours_every_carry(name, value):
    repl = registry.get(name)
    old = model()
    snapshot = {n: t.clone() for n, t in old.norm.state_dict().items()}
    new_model, report = normswap.apply(old, recipe(name, value), input_size=SHAPE, return_report=True)
    asked = set(repl.default_carry if value is None else [] if value == "none" else value)
    assert [c["path"] for c in report.changes] == ["norm"], report.skipped
    new = new_model.norm
    carried = report.changes[0]["carried"]

    filled = set()
    for dst_name, (src_name, old_value) in expected_targets(old.norm, new).items():
        got = new.get_parameter(dst_name) if dst_name in dict(new.named_parameters()) else new.get_buffer(dst_name)
        if KIND[src_name] in asked:
            assert torch.equal(got, old_value.to(got.dtype)), (dst_name, "should hold the old values")
            filled.add(dst_name)
        else:
            fresh = torch.full_like(got, FRESH[src_name])
            assert torch.equal(got, fresh), (dst_name, f"should be fresh ({FRESH[src_name]}), nothing carried")
            assert not torch.equal(old_value.to(got.dtype), fresh), (src_name, "the old state must be non-trivial")
    assert {v.removesuffix("[:]") for v in carried.values()} == filled, carried
    assert all(k.split("[")[0] in snapshot for k in carried), carried
    assert all(torch.equal(t, snapshot[n]) for n, t in old.norm.state_dict().items())  # the caller's model


def test_fixed_replacements_refuse_any_carry_key(tmp_path):
    fixed = [n for n in registry.names() if not registry.get(n).carries]
    assert {"identity", "fold", "bake", "spectral_norm", "weight_norm"} <= set(fixed)
    for name in fixed:
        for value in ("none", "[none]", "[weights]", "affine"):
            path = tmp_path / f"{name}.yaml"
            path.write_text(f"version: 1\nrules:\n  - match: {{path: norm}}\n    replace: {name}\n"
                            f"    carry: {value}\n")
            with pytest.raises(RecipeError) as e:
                load_recipe(str(path))
            problems = [p for p in e.value.problems if "carry" in p.message]
            assert len(problems) == 1, e.value.problems
            assert problems[0].line == 5 and name in problems[0].message, problems[0]
            assert "remove the 'carry' key" in problems[0].message


def test_carry_none_with_frozen_batch_norm_carries_nothing():
    """Regression: `carry: none` validated, then frozen_batch_norm carried all of every layer (20 of 20)."""
    torch.manual_seed(0)
    net = randomize_bn(torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)).eval()
    new, report = normswap.apply(net, recipe("frozen_batch_norm", "none", match={"family": "batchnorm"}),
                                 input_size=(2, 3, 32, 32), return_report=True)
    assert len(report.changes) == 20
    assert all(c["carried"] == {} for c in report.changes)
    frozen = [m for m in new.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 20
    for m in frozen:
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
        assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))
    _, default = normswap.apply(net, recipe("frozen_batch_norm", match={"family": "batchnorm"}),
                                input_size=(2, 3, 32, 32), return_report=True)
    assert all(len(c["carried"]) == 4 for c in default.changes)


def test_carried_map_names_split_and_broadcast_copies_as_assignments():
    """A copy that is not a rename reads as the slice assignment it is, and moves no optimizer state."""
    net = model(nn.BatchNorm2d(8))
    _, rep = normswap.apply(net, recipe("ibn"), input_size=SHAPE, return_report=True)
    assert rep.changes[0]["carried"] == {
        "weight[:4]": "IN.weight[:]", "bias[:4]": "IN.bias[:]", "weight[4:]": "BN.weight[:]", "bias[4:]": "BN.bias[:]",
        "running_mean[4:]": "BN.running_mean[:]", "running_var[4:]": "BN.running_var[:]",
        "num_batches_tracked": "BN.num_batches_tracked"}
    assert rep.param_map == {"norm.weight": None, "norm.bias": None}
    assert sorted(rep.new_params) == ["norm.BN.bias", "norm.BN.weight", "norm.IN.bias", "norm.IN.weight"]
    _, rep = normswap.apply(net, recipe("conditional_batch_norm"), input_size=SHAPE, return_report=True)
    assert rep.changes[0]["carried"]["weight"] == "weight[:]" and rep.param_map["norm.weight"] is None


# ---------------------------------------------------------------- activations: one path, the same classes


def bnact(**kw) -> nn.Module:
    return model(BatchNormAct2d(8, **kw))


ACT_CLASSES = [  # (replacement, options, class from a BatchNormAct2d with ReLU, class when its act is Identity)
    ("group_norm", {"num_groups": 2}, GroupNormAct, GroupNormAct),
    ("group_norm", {"num_groups": 1}, GroupNormAct, GroupNormAct),
    ("layer_norm", {}, GroupNorm1Act, GroupNorm1Act),
    ("layer_norm", {"over": "c"}, LayerNormAct2d, LayerNormAct2d),
    ("frozen_batch_norm", {}, FrozenBatchNormAct2d, FrozenBatchNormAct2d),
    ("sync_batch_norm", {}, SyncBatchNormAct, SyncBatchNormAct),
    ("instance_norm", {}, InstanceNormAct2d, nn.InstanceNorm2d),
    ("batch_renorm", {}, BatchRenormAct2d, BatchRenorm2d),
    ("ibn", {}, IBNAct, IBN),
    ("conditional_instance_norm", {"num_conditions": 2}, ConditionalInstanceNormAct2d, ConditionalInstanceNorm2d),
    ("conditional_batch_norm", {"num_conditions": 2}, ConditionalBatchNormAct2d, ConditionalBatchNorm2d),
]


@pytest.mark.parametrize("name,opts,with_act,without_act", ACT_CLASSES, ids=lambda v: str(v))
def test_norm_act_layers_keep_their_classes(name, opts, with_act, without_act):
    """Saved sidecars record layer classes and are replayed against them: these must not move."""
    rule = {"version": 1, "check": "none", "rules": [{"match": {"path": "norm"}, "replace": name, "with": opts}]}
    keys = []
    for net, want in ((bnact(), with_act), (bnact(apply_act=False), without_act)):
        new, rep = normswap.apply(net, rule, input_size=SHAPE, return_report=True)
        assert type(new.norm) is want, (type(new.norm), want)
        keys.append(sorted(new.norm.state_dict()))
        if want is with_act and not keys[1:]:
            assert isinstance(new.norm.act, nn.ReLU) and "kept act ReLU" in rep.changes[0]["notes"]
    assert keys[0] == keys[1]  # the activation adds no state-dict keys


def test_one_norm_to_norm_act_table():
    assert carry.norm_act_class("groupnorm") is GroupNormAct
    assert carry.norm_act_class("GroupNorm1") is GroupNorm1Act
    assert carry.norm_act_class("layernorm2d") is LayerNormAct2d
    assert carry.norm_act_class("frozenbatchnorm2d") is FrozenBatchNormAct2d
    assert carry.norm_act_class("sync_batch_norm") is SyncBatchNormAct
    assert carry.norm_act_class("instancenorm2d") is None


def test_with_activation_rebuilds_the_timm_class_with_the_norms_state():
    old = BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=nn.Dropout).eval()
    plain = LayerNorm2d(8, eps=1e-3).to(torch.float64)
    with torch.no_grad():
        plain.weight.uniform_()
    plain.bias.requires_grad_(False)
    notes = []
    new = carry.with_activation(old, plain.eval(), notes)
    assert type(new) is LayerNormAct2d and new.eps == 1e-3 and new.weight.dtype == torch.float64
    assert torch.equal(new.weight, plain.weight) and not new.bias.requires_grad and not new.training
    assert isinstance(new.drop, nn.Dropout) and isinstance(new.act, nn.SiLU) and new.act is not old.act
    assert notes == ["kept drop Dropout", "kept act SiLU"]
    assert carry.with_activation(nn.BatchNorm2d(8), plain, []) is plain


def test_activation_of_a_1d_norm_act_layer_is_kept():
    """A SyncBatchNormAct on (N, C): LayerNorm keeps its activation (as timm's LayerNormAct), Batch Renorm too."""
    sync = nn.SyncBatchNorm(8)
    sync.__class__ = SyncBatchNormAct
    sync.drop, sync.act = nn.Identity(), nn.SiLU()

    class LinearNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(6, 8), sync

        def forward(self, x):
            return self.norm(self.fc(x))

    net = randomize_bn(LinearNorm(), (4, 6)).eval()
    x = torch.randn(4, 6)
    for name, cls in (("layer_norm", LayerNormAct), ("batch_renorm", BatchRenormAct1d)):
        new = normswap.apply(net, recipe(name), input_size=(4, 6))
        assert type(new.norm) is cls and isinstance(new.norm.act, nn.SiLU)
        assert (new(x) >= -0.2785).all()  # SiLU's minimum: the activation runs


def test_channel_affine_keeps_the_activation_as_the_identity_replacement_does():
    from normswap.layers import ChannelAffine

    for kw in ({}, {"apply_act": False}, {"act_layer": nn.SiLU, "drop_layer": nn.Dropout}):
        bn = bnact(**kw).norm
        kept, _ = carry.activation_or_identity(bn)
        affine = ChannelAffine.from_bn(bn)
        assert repr(affine.act) == repr(kept)
        x = torch.randn(2, 8, 4, 4)
        torch.testing.assert_close(affine(x), bn(x), rtol=1e-5, atol=1e-6)

