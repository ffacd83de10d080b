"""Plan/apply semantics: nothing touched by plan, all-or-nothing apply, aliases, modes, group policy."""
import pytest
import torch
import torch.nn as nn
from timm.layers.norm_act import BatchNormAct2d, GroupNormAct

import normswap
from normswap.errors import PlanError
from normswap.catalog.grouping import choose_num_groups
from normswap.testing import randomize_bn


def snapshot(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
    )


def same(model, snap):
    mods, sd, modes = snap
    now = model.state_dict()
    return (
        [(n, type(m)) for n, m in model.named_modules()] == mods
        and set(now) == set(sd)
        and all(torch.equal(now[k], sd[k]) for k in sd)
        and {n: m.training for n, m in model.named_modules()} == modes
    )


def test_plan_changes_nothing_and_matches_apply(convbn):
    snap = snapshot(convbn)
    report = normswap.plan(convbn, "bn_to_gn")
    assert same(convbn, snap)
    out, applied = normswap.apply(convbn, "bn_to_gn", return_report=True)
    assert same(convbn, snap)  # a copy by default
    assert [(c["path"], c["summary"]) for c in report.changes] == [(c["path"], c["summary"]) for c in applied.changes]
    assert [c["path"] for c in report.changes] == ["bn1", "bn2"]
    assert isinstance(out.bn1, nn.GroupNorm) and out.bn1.num_groups == 4  # 16 channels, >= 4 per group


def test_affine_carried_and_grad_flags(convbn):
    convbn.bn2.bias.requires_grad_(False)
    out = normswap.apply(convbn, "bn_to_gn")
    for name in ("bn1", "bn2"):
        old, new = getattr(convbn, name), getattr(out, name)
        assert torch.equal(old.weight, new.weight) and torch.equal(old.bias, new.bias)
        assert new.weight.data_ptr() != old.weight.data_ptr()  # no shared storage with the caller's model
        assert new.eps == old.eps
    assert not out.bn2.bias.requires_grad and out.bn2.weight.requires_grad


def test_inplace_edits_the_model_itself(convbn):
    out = normswap.apply(convbn, "bn_to_gn", inplace=True)
    assert out is convbn and isinstance(convbn.bn1, nn.GroupNorm)


def test_mode_dtype_device_preserved(convbn):
    convbn.double().eval()
    convbn.bn2.train()
    out = normswap.apply(convbn, "bn_to_gn")
    assert out.bn1.weight.dtype == torch.float64 and not out.bn1.training and out.bn2.training
    assert not out.training


def test_alias_replaced_at_every_path():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.again = self.bn

        def forward(self, x):
            return self.again(self.bn(self.conv(x)))

    m = M()
    out, rep = normswap.apply(m, "bn_to_gn", return_report=True)
    assert out.bn is out.again and isinstance(out.bn, nn.GroupNorm)
    assert len(rep.changes) == 1 and rep.changes[0]["aliases"] == ["again"]
    out(torch.randn(1, 3, 8, 8))


def test_norm_act_keeps_activation():
    m = nn.Sequential(nn.Conv2d(3, 32, 3), BatchNormAct2d(32, act_layer=nn.SiLU))
    randomize_bn(m, (2, 3, 8, 8))
    out = normswap.apply(m, "bn_to_gn")
    assert isinstance(out[1], GroupNormAct) and isinstance(out[1].act, nn.SiLU)
    assert torch.equal(out[1].weight, m[1].weight)


@pytest.mark.parametrize("channels, target, min_size, expected", [
    (64, 32, 4, 16), (48, 32, 4, 12), (19, 32, 4, 1), (53, 32, 4, 1), (32, 32, 4, 8),
    (4, 32, 4, 1), (3, 32, 4, 1), (256, 32, 4, 32), (48, 16, 1, 16), (24, 32, 2, 12),
])
def test_group_policy(channels, target, min_size, expected):
    g = choose_num_groups(channels, target, min_size)
    assert g == expected and channels % g == 0


def test_group_policy_is_reported():
    m = nn.Sequential(nn.Conv2d(3, 19, 1), nn.BatchNorm2d(19))
    rep = normswap.plan(m, "bn_to_gn")
    notes = " ".join(rep.changes[0]["notes"])
    assert "1 groups of 19 instead of 32" in notes and "LayerNorm" in notes


def test_explicit_impossible_group_count_is_an_error(convbn):
    recipe = {"version": 1, "name": "x", "rules": [{
        "match": {"family": "batchnorm"}, "replace": "group_norm",
        "with": {"groups_by_path": {"bn2": 5}}}]}
    snap = snapshot(convbn)
    with pytest.raises(PlanError) as e:
        normswap.apply(convbn, recipe, inplace=True)
    msg = str(e.value)
    assert "layer 'bn2'" in msg and "5 groups on 16 channels" in msg and "valid counts: 1, 2, 4, 8, 16" in msg
    assert same(convbn, snap)
    recipe["rules"][0]["with"]["groups_by_path"] = {"bn2": 0}
    with pytest.raises(PlanError, match="positive integer"):
        normswap.apply(convbn, recipe)


def test_required_rule_matching_nothing():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(PlanError) as e:
        normswap.apply(m, "bn_to_gn")
    assert "required but matched no layer of Sequential" in str(e.value)
    recipe = {"version": 1, "rules": [{"match": {"family": "batchnorm"}, "replace": "group_norm"}]}
    rep = normswap.plan(m, recipe)
    assert rep.rules[0]["matched"] == 0


def test_unknown_subclass_is_reported_not_taken():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Sequential(nn.Conv2d(3, 8, 3), MyBN(8), nn.BatchNorm2d(8))
    rep = normswap.plan(m, "bn_to_gn")
    assert [c["path"] for c in rep.changes] == ["2"]
    assert rep.skipped[0]["path"] == "1" and "include_subclasses: true" in rep.skipped[0]["reason"]
    recipe = {"version": 1, "rules": [{"match": {"family": "batchnorm", "include_subclasses": True},
                                       "replace": "group_norm"}]}
    assert len(normswap.plan(m, recipe).changes) == 2


def test_path_globs_exclude_and_first_rule_wins(convbn):
    recipe = {"version": 1, "rules": [
        {"match": {"path": "bn1", "family": "batchnorm"}, "replace": "group_norm", "with": {"num_groups": 2}},
        {"match": {"family": "batchnorm", "exclude": ["bn1"]}, "replace": "identity"},
    ]}
    out = normswap.apply(convbn, recipe)
    assert isinstance(out.bn1, nn.GroupNorm) and out.bn1.num_groups == 2
    assert isinstance(out.bn2, nn.Identity)


def test_param_map_for_optimizers(convbn):
    _, rep = normswap.apply(convbn, {"version": 1, "rules": [
        {"match": {"path": "bn2"}, "replace": "identity"}]}, return_report=True)
    assert rep.param_map == {"bn2.weight": None, "bn2.bias": None}


def test_hooks_on_replaced_layer_are_reported(convbn):
    convbn.bn1.register_forward_hook(lambda *a: None)
    rep = normswap.plan(convbn, "bn_to_gn")
    assert any("forward hook" in n for n in rep.changes[0]["notes"])


def test_commit_failure_leaves_model_untouched(convbn, monkeypatch):
    """A failure while building any replacement leaves the caller's model as it was, inplace too."""
    import normswap.catalog.norm_swaps as R

    calls = {"n": 0}
    real = R.carry.carry_affine

    def flaky(old, new):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return real(old, new)

    monkeypatch.setattr(R.carry, "carry_affine", flaky)
    snap = snapshot(convbn)
    with pytest.raises(PlanError, match="injected"):
        normswap.apply(convbn, "bn_to_gn", inplace=True)
    assert same(convbn, snap)


def test_check_failure_rolls_back_inplace(convbn):
    recipe = {"version": 1, "check": "numeric", "rules": [
        {"match": {"family": "batchnorm"}, "replace": "group_norm"}]}
    snap = snapshot(convbn)
    with pytest.raises(normswap.CheckFailedError) as e:
        normswap.apply(convbn, recipe, inplace=True, check=True, input_size=(2, 3, 16, 16))
    assert "numeric check" in str(e.value)
    assert same(convbn, snap)


def test_batchnorm1d_and_3d():
    m = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Unflatten(1, (8, 1, 1, 1)),
                      nn.Conv3d(8, 8, 1), nn.BatchNorm3d(8))
    randomize_bn(m, (4, 5))
    out = normswap.apply(m, "bn_to_gn")
    assert isinstance(out[1], nn.GroupNorm) and isinstance(out[4], nn.GroupNorm)
    out(torch.randn(2, 5)).sum().backward()
