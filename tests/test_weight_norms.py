"""Spectral, weight and cosine norm by recipe; baking; checkpoint keys between torch's two formats."""
import copy
import io
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils import spectral_norm as legacy_spectral_norm

import normswap
from normswap.cli import main
from normswap.errors import NormswapError, RecipeError
from normswap.families import family_of
from normswap.layers.cosine import CosineConv, CosineLinear
from normswap.testing import randomize_bn


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from sn_discriminator import GAN, Discriminator  # noqa: E402  (the example's DCGAN: z of 16, 8x8 images)

Z = 16


def legacy_discriminator():
    """The same discriminator written with torch's old hook-based spectral norm."""
    d = Discriminator()
    for name in ("conv1", "conv2", "fc"):
        setattr(d, name, legacy_spectral_norm(getattr(d, name)))
    return d


def sigma(weight, dim):
    return torch.linalg.matrix_norm(weight.detach().movedim(dim, 0).flatten(1).double(), ord=2).item()


def parametrized_paths(model):
    return sorted(n for n, m in model.named_modules() if parametrize.is_parametrized(m))


def gan():
    torch.manual_seed(0)
    model = GAN()
    randomize_bn(model, (4, Z))
    return model


# ------------------------------------------------------------------ spectral norm


def test_spectral_norm_selects_exactly_the_discriminator():
    model = gan()
    sn, report = normswap.apply(model, "spectral_norm", paths="discriminator.**", return_report=True)
    assert parametrized_paths(sn) == ["discriminator.conv1", "discriminator.conv2", "discriminator.fc"]
    for name, module in sn.generator.named_modules():  # the generator is untouched, layer by layer
        orig = model.generator.get_submodule(name)
        assert type(module) is type(orig)
        assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), orig.state_dict().values()))
    assert type(sn.discriminator.bn2) is nn.BatchNorm2d  # drop_batchnorm defaults to false
    assert isinstance(sn.discriminator.conv1, nn.Conv2d) and family_of(sn.discriminator.conv1) == "conv"
    assert any("must copy them, not average them" in n for n in report.notes)
    assert report.param_map["discriminator.conv1.weight"] == "discriminator.conv1.parametrizations.weight.original"
    assert not parametrized_paths(model)  # the caller's model is unchanged


def test_spectral_norm_drop_batchnorm_only_under_the_paths():
    model = gan()
    sn = normswap.apply(model, "spectral_norm", paths="discriminator.**", drop_batchnorm=True)
    assert type(sn.discriminator.bn2) is nn.Identity
    assert type(sn.generator.bn1) is nn.BatchNorm2d


def test_spectral_norm_exclude_and_required():
    model = gan()
    sn = normswap.apply(model, "spectral_norm", paths="discriminator.**", exclude="discriminator.fc")
    assert parametrized_paths(sn) == ["discriminator.conv1", "discriminator.conv2"]
    with pytest.raises(NormswapError, match="required but matched no layer"):
        normswap.apply(model, "spectral_norm", paths="critic.**")


def test_spectral_norm_bounds_every_largest_singular_value_near_one():
    model = gan()
    sn = normswap.apply(model, "spectral_norm")  # every conv, transposed conv and linear
    paths = parametrized_paths(sn)
    assert paths == ["discriminator.conv1", "discriminator.conv2", "discriminator.fc",
                     "generator.fc", "generator.up1", "generator.up2"]
    before = {p: sigma(model.get_submodule(p).weight, 1 if "up" in p else 0) for p in paths}
    assert max(abs(s - 1) for s in before.values()) > 0.3  # the raw weights are far from 1
    sn.train()
    with torch.no_grad():
        for _ in range(5):
            sn(torch.randn(4, Z))
    for p in paths:
        m = sn.get_submodule(p)
        dim = 1 if isinstance(m, nn.ConvTranspose2d) else 0  # output channels sit in dim 1 of a transposed conv
        assert abs(sigma(m.weight, dim) - 1) < 0.05, (p, sigma(m.weight, dim))


def test_spectral_norm_options_and_already_parametrized_layers():
    model = gan()
    sn = normswap.apply(model, "spectral_norm", n_power_iterations=3, eps=1e-6)
    p = sn.discriminator.conv1.parametrizations.weight[0]
    assert p.n_power_iterations == 3 and p.eps == 1e-6
    with pytest.raises(RecipeError, match="'n_power_iterations' must be at least 1"):
        normswap.apply(model, "spectral_norm", n_power_iterations=0)
    again, report = normswap.apply(sn, "spectral_norm", return_report=True, paths="discriminator.**")
    assert report.changes == []
    assert {s["path"] for s in report.skipped} == {"discriminator.conv1", "discriminator.conv2", "discriminator.fc"}
    assert "already parametrized (SpectralNorm)" in report.skipped[0]["reason"]


# ------------------------------------------------------------------ weight norm


def test_weight_norm_leaves_outputs_unchanged():
    model = gan().eval()
    wn = normswap.apply(model, "weight_norm", check=True)  # the recipe's numeric check passes
    assert parametrized_paths(wn) == parametrized_paths(normswap.apply(model, "spectral_norm"))
    z = torch.randn(6, Z)
    with torch.no_grad():
        ref, out = model(z), wn(z)
    assert ((ref - out).abs().max() / ref.abs().max()).item() <= 1e-5
    up = wn.generator.up1.parametrizations.weight
    assert tuple(up.original0.shape) == (1, 16, 1, 1)  # g per output channel, weight dim 1 for ConvTranspose
    assert tuple(wn.discriminator.conv1.parametrizations.weight.original0.shape) == (32, 1, 1, 1)


# ------------------------------------------------------------------ cosine norm


def test_cosine_linear_matches_the_formula():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    cos = normswap.apply(nn.Sequential(lin), "cosine_norm", scale=3.0)[0]
    assert isinstance(cos, CosineLinear) and isinstance(cos.scale, nn.Parameter)
    x = torch.randn(5, 6)
    by_hand = 3.0 * (x @ lin.weight.T) / (x.norm(dim=1, keepdim=True) * lin.weight.norm(dim=1))
    assert torch.allclose(cos(x), by_hand, atol=1e-6)
    assert cos(x).abs().max() <= 3.0 + 1e-5


@pytest.mark.parametrize("kw", [
    {},
    {"stride": 2, "padding": 1},
    {"padding": 2, "dilation": 2, "groups": 2},
    {"padding": 1, "padding_mode": "reflect"},
])
def test_cosine_conv_matches_the_formula_on_unfolded_patches(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **kw)
    cos = normswap.apply(nn.Sequential(conv), "cosine_norm", learn_scale=False)[0]
    assert isinstance(cos, CosineConv) and not isinstance(cos.scale, nn.Parameter)
    x = torch.randn(2, 4, 9, 9)
    groups = conv.groups
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode) if conv.padding_mode != "zeros" \
        else F.pad(x, [conv.padding[1]] * 2 + [conv.padding[0]] * 2)
    patches = F.unfold(xp, 3, dilation=conv.dilation, stride=conv.stride)  # (N, C*9, L)
    out_h = (xp.shape[2] - conv.dilation[0] * 2 - 1) // conv.stride[0] + 1
    per_group = patches.reshape(2, groups, 4 // groups * 9, -1)
    w = conv.weight.reshape(groups, 6 // groups, -1)
    dot = torch.einsum("ngkl,gok->ngol", per_group, w)
    norms = per_group.norm(dim=2, keepdim=True) * w.norm(dim=2)[None, :, :, None]
    by_hand = (dot / norms).reshape(2, 6, out_h, -1)
    assert torch.allclose(cos(x), by_hand, atol=1e-5)


def test_cosine_norm_skips_transposed_convs_and_drops_bias():
    model = gan()
    cos, report = normswap.apply(model, "cosine_norm", return_report=True)
    skipped = {s["path"]: s["reason"] for s in report.skipped}
    assert set(skipped) == {"generator.up1", "generator.up2"} and "no input patch" in skipped["generator.up1"]
    assert report.param_map["discriminator.conv1.bias"] is None
    assert "bias dropped" in " ".join(next(c for c in report.changes if c["path"] == "discriminator.fc")["notes"])
    assert report.new_params.count("discriminator.fc.scale") == 1


# ------------------------------------------------------------------ persistence, baking, export


@pytest.mark.parametrize("recipe", ["spectral_norm", "weight_norm", "cosine_norm"])
def test_each_recipe_saves_reloads_copies_bakes_pickles_and_exports(recipe, tmp_path):
    model = gan()
    out = normswap.apply(model, recipe)
    out.train()
    with torch.no_grad():  # a few train steps' worth of power iteration and a changed weight
        out(torch.randn(4, Z))
        for p in out.parameters():
            p.add_(0.01)
    out.eval()
    z = torch.randn(3, Z)
    with torch.no_grad():
        want = out(z)
    fresh = normswap.apply(gan(), recipe)
    fresh.load_state_dict(out.state_dict())
    copied = copy.deepcopy(out)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(z), want)
        assert torch.equal(copied(z), want)
    baked = normswap.bake(out, input_size=(3, Z))
    assert parametrized_paths(baked) == []
    assert bool(parametrized_paths(out)) == (recipe != "cosine_norm")  # baking worked on a copy
    buf = io.BytesIO()
    torch.save(baked, buf)
    buf.seek(0)
    reloaded = torch.load(buf, weights_only=False)
    exported = torch.export.export(baked, (z,))
    with torch.no_grad():
        assert torch.allclose(reloaded(z), want, rtol=1e-5, atol=1e-6)
        assert torch.allclose(exported.module()(z), want, rtol=1e-5, atol=1e-6)


def test_parametrized_model_does_not_pickle_but_says_what_to_do(tmp_path):
    gan_sn = tmp_path / "gan.safetensors"
    assert main(["apply", "spectral_norm", "test_weight_norms:GAN", "-o", str(gan_sn), "--input-size", "2,16"]) == 0
    out = tmp_path / "gan.pt"
    assert main(["apply", "spectral_norm", "test_weight_norms:GAN", "-o", str(out), "--input-size", "2,16"]) == 2
    assert not out.exists()
    baked = tmp_path / "baked.pt"
    assert main(["bake", str(gan_sn), "-o", str(baked), "--input-size", "2,16"]) == 0
    model = torch.load(baked, weights_only=False)
    assert parametrized_paths(model) == [] and type(model).__name__ == "GAN"
    replayed = normswap.load(gan_sn).eval()
    z = torch.randn(2, Z)
    with torch.no_grad():
        assert torch.allclose(model.eval()(z), replayed(z), rtol=1e-5, atol=1e-6)


def test_bake_then_fold():
    model = gan().eval()
    sn = normswap.apply(model, "spectral_norm", paths="discriminator.**")
    folded, report = normswap.fold(normswap.bake(sn.eval()), input_size=(2, Z), return_report=True)
    assert type(folded.discriminator.bn2) is nn.Identity and type(folded.generator.bn1) is nn.Identity
    assert report.check["ok"]


# ------------------------------------------------------------------ checkpoint keys between torch's formats


def test_legacy_spectral_norm_checkpoint_loads_into_the_parametrized_model_and_back():
    torch.manual_seed(0)
    old = legacy_discriminator()
    old.train()
    with torch.no_grad():
        for _ in range(3):
            old(torch.randn(4, 1, 8, 8))  # power iterations move u and v
    old.eval()
    old_sd = old.state_dict()
    assert {"conv1.weight_orig", "conv1.weight_u", "conv1.weight_v"} <= set(old_sd)
    new = normswap.apply(Discriminator(), "spectral_norm").eval()
    new.load_state_dict(normswap.migrate(old_sd))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(new(x), old(x))
    back = legacy_discriminator().eval()
    back.load_state_dict(normswap.migrate(new.state_dict(), to="legacy"))
    with torch.no_grad():
        assert torch.equal(back(x), old(x))


def test_parametrized_weight_norm_written_in_the_legacy_form():
    torch.manual_seed(0)
    new = normswap.apply(gan(), "weight_norm").eval()
    with torch.no_grad():
        for p in new.parameters():
            p.mul_(1.1)  # g no longer equals ‖v‖
    legacy_sd = normswap.migrate(new.state_dict())
    assert "generator.up1.weight_g" in legacy_sd and "generator.up1.weight_v" in legacy_sd
    old = gan().eval()
    for path in parametrized_paths(new):
        parent, _, name = path.rpartition(".")
        layer = old.get_submodule(path)
        with pytest.warns(FutureWarning):
            setattr(old.get_submodule(parent), name,
                    torch.nn.utils.weight_norm(layer, dim=1 if isinstance(layer, nn.ConvTranspose2d) else 0))
    old.load_state_dict(legacy_sd)
    z = torch.randn(4, Z)
    with torch.no_grad():
        assert torch.allclose(old(z), new(z), rtol=1e-6, atol=1e-7)


def test_load_renames_keys_to_the_models_format(tmp_path):
    torch.manual_seed(0)
    old = legacy_discriminator().eval()
    path = tmp_path / "old.pth"
    torch.save(old.state_dict(), path)
    loaded = normswap.model_io.load_model(path, arch="test_weight_norms:sn_discriminator")
    assert any("renamed the legacy spectral/weight-norm keys" in n for n in loaded.notes)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), old(x))


def sn_discriminator():
    """A model whose own code applies the parametrized spectral norm (the common case in GAN code)."""
    d = Discriminator()
    for name in ("conv1", "conv2", "fc"):
        setattr(d, name, torch.nn.utils.parametrizations.spectral_norm(getattr(d, name)))
    return d


def test_migrate_command(tmp_path, capsys):
    torch.manual_seed(0)
    old = legacy_discriminator().eval()
    src, dst = tmp_path / "old.pth", tmp_path / "new.safetensors"
    torch.save({"state_dict": old.state_dict(), "epoch": 3}, src)
    before = src.read_bytes()
    assert main(["migrate", str(src), "-o", str(dst), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["from"] == "legacy" and res["to"] == "parametrized"
    assert res["renamed"] == ["spectral norm: 3 layer(s) (conv1.weight, conv2.weight, fc.weight)"]
    from safetensors.torch import load_file

    new = sn_discriminator().eval()
    new.load_state_dict(load_file(dst))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(new(x), old(x))
    assert src.read_bytes() == before
    assert main(["migrate", str(dst), "-o", str(tmp_path / "again.pt"), "--to", "parametrized"]) == 2
    assert "already in the parametrized format" in capsys.readouterr().err
    plain = tmp_path / "plain.pth"
    torch.save(Discriminator().state_dict(), plain)
    assert main(["migrate", str(plain), "-o", str(tmp_path / "x.pt")]) == 2
    assert "no spectral-norm or weight-norm keys" in capsys.readouterr().err
    assert main(["migrate", str(src), "-o", str(src)]) == 2
    assert src.read_bytes() == before and not (tmp_path / "x.pt").exists()


def test_power_iteration_buffers_names_what_an_ema_must_copy():
    sn = normswap.apply(gan(), "spectral_norm", paths="discriminator.**")
    keys = normswap.power_iteration_buffers(sn)
    assert keys == [f"discriminator.{n}.parametrizations.weight.0._{b}" for n in ("conv1", "conv2", "fc") for b in "uv"]
    assert set(keys) <= set(sn.state_dict())


# ------------------------------------------------------------------ recipe `when:`


@pytest.mark.parametrize("when, needle", [
    ("maybe", "'when' must be true, false or a parameter"),
    ("${nope}", "'${nope}' refers to an undeclared parameter"),
])
def test_rule_when_is_validated(when, needle):
    recipe = {"version": 1, "rules": [{"match": {"family": "batchnorm"}, "replace": "identity", "when": when}]}
    with pytest.raises(RecipeError, match=needle.replace("$", r"\$").replace("{", r"\{")):
        normswap.recipe(recipe)


def test_rule_when_parameter_must_be_boolean():
    with pytest.raises(RecipeError, match="'drop_batchnorm' is used as the rule's 'when', so it must be true or false"):
        normswap.recipe("spectral_norm", drop_batchnorm="yes")


def test_bake_removes_legacy_hooks_and_spectral_norm_refuses_them():
    torch.manual_seed(0)
    old = legacy_discriminator().eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        want = old(x)
    baked, report = normswap.bake(old, input_size=(2, 1, 8, 8), return_report=True)
    assert all(not m._forward_pre_hooks for m in baked.modules())
    assert "legacy spectral norm hook" in report.changes[0]["notes"][0]
    with torch.no_grad():
        assert torch.allclose(baked(x), want, rtol=1e-6, atol=1e-7)
    again, rep = normswap.apply(old, {"version": 1, "rules": [{"match": {"family": ["conv", "linear"]},
                                                                "replace": "spectral_norm"}]}, return_report=True)
    assert rep.changes == [] and "legacy spectral norm hook" in rep.skipped[0]["reason"]
