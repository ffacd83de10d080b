"""normswap.verify.check: numeric and interface verdicts, error figures, and the first layer where two models part."""
import copy
import json
import math

import pytest
import timm
import torch
import torch.nn as nn

import normswap
from normswap import engine
from normswap.verify.check import check
from normswap.errors import NormswapError
from normswap.testing import randomize_bn

from models import INTO_NEXT, PATTERNS, ConvBN, branches, prepared

SHAPE = (2, 3, 16, 16)


class Deep(nn.Module):
    """A plain conv/BN/ReLU stack; ``offset`` adds a large conv bias that each BN subtracts again."""

    def __init__(self, depth=12, c=16, offset=0.0):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()) for _ in range(depth)])
        self.head = nn.Linear(c, 10)
        with torch.no_grad():
            for block in self.blocks:
                block[0].bias.add_(offset)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def ready(model, shape=SHAPE, **kw):
    torch.manual_seed(0)
    return randomize_bn(model, shape, **kw).eval()


def strict_json(result):
    return json.loads(json.dumps(result.to_json(), allow_nan=False))


def test_identical_models_pass_with_exact_figures():
    m = ready(ConvBN())
    r = check(m, copy.deepcopy(m), input_size=SHAPE, layers=True)
    assert r.ok and r.max_abs == 0 and r.max_rel == 0 and r.first_divergence is None
    assert r.cosine == pytest.approx(1.0, abs=1e-12) and r.top1 == (4, 4)  # 2 inputs x batch 2
    assert r.abs_error == {"mean": 0.0, "median": 0.0, "p99": 0.0}
    assert r.dtype == "float64" and r.inputs == [list(SHAPE)] * 2
    assert [row["local_rel"] for row in r.layers] == [0.0] * len(r.layers)
    strict_json(r)


def test_error_distribution_is_ordered_and_relative_to_the_scale():
    m = ready(ConvBN())
    other = copy.deepcopy(m)
    other.fc.bias.data += 0.01
    r = check(m, other, input_size=SHAPE)
    assert not r.ok
    a, rel = r.abs_error, r.rel_error
    assert a["median"] <= a["p99"] <= r.max_abs + 1e-15
    assert a["mean"] == pytest.approx(0.01, rel=1e-6)  # every logit moved by exactly the bias change
    scale = max(leaf["scale"] for leaf in r.leaves)
    assert rel["p99"] <= r.max_rel + 1e-15 and rel["mean"] >= a["mean"] / scale - 1e-12
    assert 0.99 < r.cosine < 1.0


def test_shared_module_has_one_row_per_call():
    m = ready(ConvBN())
    r = check(m, copy.deepcopy(m), input_size=SHAPE, layers=True)
    act = [(row["path"], row["call"]) for row in r.layers if row["path"] == "act"]
    assert act == [("act", 0), ("act", 1)]
    assert [row["path"] for row in r.layers] == ["conv1", "bn1", "act", "conv2", "bn2", "act", "pool", "fc"]


def test_divergence_in_the_second_call_of_a_shared_module_is_named_per_call():
    m = ready(ConvBN())
    with torch.no_grad():  # the second call sees values above 6, the first does not
        m.conv1.weight.mul_(0.01)
        m.bn1.weight.fill_(0.1)
        m.bn1.bias.zero_()
        m.bn2.bias.fill_(8.0)
    cand = copy.deepcopy(m)
    cand.act = nn.ReLU6()  # equal to ReLU below 6
    r = check(m, cand, input_size=SHAPE)
    d = r.first_divergence
    assert not r.ok and (d["path"], d["call"], d["calls"]) == ("act", 1, 2)
    assert "act (ReLU -> ReLU6 call 2 of 2)" in r.summary


@pytest.mark.parametrize("name", list(PATTERNS) + [f"into_next: {n}" for n in INTO_NEXT])
def test_folded_model_passes_layer_by_layer(name):
    make, shape = INTO_NEXT[name.removeprefix("into_next: ")] if name.startswith("into_next") else PATTERNS[name]
    kw = {"into_next": True} if name.startswith("into_next") else {}
    model = prepared(make(), shape)
    plan = engine.plan(model, "fold_bn", input_size=shape, **kw)
    folded = normswap.fold(model, input_size=shape, check=False, **kw)
    for fold_map in (plan.fold_map, None):  # the fold's own map, and the map inferred from the two models
        r = check(model, folded, input_size=shape, layers=True, fold_map=fold_map)
        assert r.ok and r.first_divergence is None, r.summary
        assert max(row["local_rel"] for row in r.layers) < 1e-6
        assert any(row["compared"] and "folded" in row["compared"] for row in r.layers)


def test_fold_map_and_inferred_map_agree_on_a_timm_model():
    model = ready(timm.create_model("mobilenetv3_small_050", pretrained=False), (2, 3, 64, 64))
    shape = (1, 3, 64, 64)
    plan = engine.plan(model, "fold_bn", input_size=shape)
    folded = normswap.fold(model, input_size=shape, check=False)
    given = check(model, folded, input_size=shape, layers=True, fold_map=plan.fold_map, n_inputs=1)
    inferred = check(model, folded, input_size=shape, layers=True, n_inputs=1)
    assert given.ok and inferred.ok
    assert [r["compared"] for r in given.layers] == [r["compared"] for r in inferred.layers]
    assert sum(1 for r in given.layers if r["compared"]) == len(plan.fold_map) > 20


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv3_small_050", "hand-built"])
def test_perturbed_deep_bn_fails_and_is_named(arch):
    shape = (1, 3, 64, 64)
    model = Deep() if arch == "hand-built" else timm.create_model(arch, pretrained=False)
    model = ready(model, (2, 3, 64, 64))
    bn_paths = [n for n, m in model.named_modules() if "BatchNorm" in type(m).__name__]
    deep = bn_paths[len(bn_paths) * 3 // 4]
    bad = copy.deepcopy(model)
    bad.get_submodule(deep).running_var.mul_(1.5)
    r = check(model, bad, input_size=shape)
    assert not r.ok
    assert r.first_divergence["path"] == deep and r.first_divergence["kind"] == "local"
    assert r.first_divergence["local_rel"] > 0.05
    assert f"first divergence at {deep} (" in r.summary


def test_wrong_fold_is_named_at_the_conv_it_went_into():
    model = ready(timm.create_model("resnet18", pretrained=False), (2, 3, 64, 64))
    folded = normswap.fold(model, input_size=(1, 3, 64, 64), check=False)
    folded.layer3[1].conv2.bias.data[3] += 0.05
    r = check(model, folded, input_size=(1, 3, 64, 64))
    d = r.first_divergence
    assert not r.ok and d["path"] == "layer3.1.conv2" and "layer3.1.bn2 folded in" in d["hint"]


def test_nan_is_reported_and_located():
    m = ready(ConvBN())
    bad = copy.deepcopy(m)
    bad.conv2.weight.data[0, 0, 0, 0] = float("nan")
    r = check(m, bad, input_size=SHAPE)
    assert not r.ok and any("NaN/Inf" in p for p in r.problems)
    assert r.first_divergence["path"] == "conv2"
    assert "non-finite" in r.summary
    assert strict_json(r)["max_rel"] == "inf"


def test_ill_conditioned_model_correct_fold_passes_perturbed_bn_fails():
    model = ready(Deep(offset=16000.0), (4, 3, 16, 16), perturb=0.0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y32, y64 = model(x).double(), copy.deepcopy(model).double()(x.double())
    assert ((y32 - y64).abs().max() / y64.abs().max()).item() > 1e-3  # float32 itself is this far off
    folded = normswap.fold(model, input_size=(2, 3, 16, 16))  # the automatic check passes
    r = check(model, folded, input_size=(2, 3, 16, 16), layers=True)
    assert r.ok and r.noise_floor > 1e-3 and r.first_divergence is None
    bad = copy.deepcopy(model)
    bn = bad.blocks[9][1]
    bn.running_mean.add_(0.5 * bn.running_var.sqrt())
    r = check(model, bad, input_size=(2, 3, 16, 16))
    assert not r.ok and r.first_divergence["path"] == "blocks.9.1"


def test_bn_to_gn_passes_interface_fails_numeric_with_a_clear_message():
    m = ready(ConvBN())
    gn = normswap.apply(m, "bn_to_gn")
    r = check(m, gn, input_size=SHAPE, mode="interface")
    assert r.ok and r.state_dict["kept"] == 9
    assert sorted(r.state_dict["dropped"]) == ["bn1.num_batches_tracked", "bn1.running_mean", "bn1.running_var",
                                               "bn2.num_batches_tracked", "bn2.running_mean", "bn2.running_var"]
    assert r.state_dict["params_before"] == r.state_dict["params_after"]
    r = check(m, gn, input_size=SHAPE)
    assert not r.ok and r.first_divergence["path"] == "bn1"
    assert "BatchNorm2d was replaced by GroupNorm" in r.first_divergence["hint"]
    assert "mode='interface'" in "\n".join(r.lines())


def test_interface_mode_reports_a_parameter_no_gradient_reaches():
    m = ready(ConvBN())
    cand = copy.deepcopy(m)
    cand.extra = nn.Linear(3, 3)  # never called
    r = check(m, cand, input_size=SHAPE, mode="interface")
    assert not r.ok and r.problems == ["no gradient reaches extra.weight", "no gradient reaches extra.bias"]
    assert r.state_dict["new"] == ["extra.bias", "extra.weight"]


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.a(x), "aux": (self.b(x), x.sum())}


def test_nested_outputs_are_compared_leaf_by_leaf():
    torch.manual_seed(0)
    m = Nested()
    cand = copy.deepcopy(m)
    cand.b.bias.data += 1
    r = check(m, cand, torch.randn(5, 4))
    assert not r.ok and len(r.problems) == 1 and r.problems[0].startswith("output['aux'][0]:")
    assert [leaf["name"] for leaf in r.leaves] == ["output['logits']", "output['aux'][0]", "output['aux'][1]"]
    assert r.top1 == (5, 5)  # read from the first output, the logits
    assert r.first_divergence["path"] == "b"


def test_output_structure_mismatch_is_a_failure():
    m = Nested()

    class Other(Nested):
        def forward(self, x):
            return self.a(x)

    r = check(m, Other(), torch.randn(5, 4))
    assert not r.ok and "output structure differs" in r.problems[0]


def test_top1_agreement_counts_flipped_predictions():
    torch.manual_seed(0)
    m = nn.Linear(8, 4)
    cand = copy.deepcopy(m)
    cand.bias.data[0] += 100.0  # class 0 wins everywhere
    x = torch.randn(64, 8)
    r = check(m, cand, x)
    expected = int((m(x).argmax(1) == 0).sum())
    assert r.top1 == (expected, 64)


def test_user_tolerance_and_dtype_defaults():
    m = ready(ConvBN())
    other = copy.deepcopy(m)
    other.fc.bias.data += 1e-4
    assert not check(m, other, input_size=SHAPE).ok  # float32 default rtol 1e-5
    assert check(m, other, input_size=SHAPE, rtol=1e-2).ok
    assert check(m, other, input_size=SHAPE, atol=1e-3).ok
    half = check(copy.deepcopy(m).half(), copy.deepcopy(other).half(), input_size=SHAPE)
    assert half.rtol == 1e-2


def test_bad_mode_is_a_normswap_error():
    m = ConvBN()
    with pytest.raises(NormswapError, match="unknown check mode 'numerc'"):
        check(m, m, mode="numerc")


def test_apply_check_failure_carries_the_first_divergence(monkeypatch):
    import normswap.catalog.folding as folding

    def wrong(module, s, t, source=None):
        real(module, s * 1.01, t, source=source)

    real = folding.write_folded
    monkeypatch.setattr(folding, "write_folded", wrong)
    m = ready(ConvBN())
    with pytest.raises(normswap.CheckFailedError) as e:
        normswap.fold(m, input_size=SHAPE)
    d = e.value.result.first_divergence
    assert d["path"] == "conv1" and "bn1 folded in" in d["hint"]
    assert math.isfinite(d["local_rel"]) and d["local_rel"] > 1e-3


@pytest.mark.parametrize("arch", ["resnet50", "efficientnet_b0", "concat"])
def test_inspect_and_fold_agree(arch):
    from normswap.inspection import inspect_model

    if arch == "concat":
        model, shape = branches(), (2, 3, 8, 8)
    else:
        model, shape = ready(timm.create_model(arch, pretrained=False), (2, 3, 64, 64)), (1, 3, 64, 64)
    table = inspect_model(model, input_size=shape)
    _, report = normswap.fold(model, input_size=shape, return_report=True)
    folded = {ch["path"]: ch for ch in report.changes if ch["old"] != ch["new"] and "folded into" in " ".join(ch["notes"])}
    skipped = {s["path"]: s["reason"] for s in report.skipped}
    bn_rows = [r for r in table.rows if r["foldable"] is not None]
    assert bn_rows and table.foldable_count() == (len(folded), len(bn_rows))
    for row in bn_rows:
        if row["foldable"]:
            notes = folded[row["path"]]["notes"][0]
            assert notes.startswith(f"folded into {', '.join(row['fold_into'])}")
        else:
            assert skipped[row["path"]] == row["fold_reason"]
    if arch == "concat":
        assert folded["cat_bn"]["notes"][0] == "folded into a, b through torch.cat"
        assert sorted(skipped) == ["batch_stats", "shared_bn"]
