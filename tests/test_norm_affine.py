"""fold_norm_affine: a LayerNorm/RMSNorm's γ and β folded into the layers reading its output, on timm models and
Hugging Face models built from configs, judged against float64 truth."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import normswap
from normswap.catalog import norm_affine
from normswap.errors import CheckFailedError
from normswap.families import family_of
from normswap.inspection import inspect_model
from normswap.norm_probe import probe
from normswap.rewrite import rewrite
from normswap.testing import randomize_norms

from transformer_models import build, tokens

TIMM = {
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=8), 25, {}),
    "deit_tiny_patch16_224": (dict(img_size=32, patch_size=8), 25, {}),
    # window attention pads by zero-size pads, and rolls the windows
    "swin_tiny_patch4_window7_224": (dict(img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 2)), 6,
                                     {"patch_embed.norm": "residual stream"}),
    # LayerNorm2d; the stem's norm feeds the residual stream and must be left
    "convnext_atto": ({}, 16, {"stem.1": "residual stream"}),
}
SIZE = {"swin_tiny_patch4_window7_224": (2, 3, 56, 56)}


def timm_model(name):
    torch.manual_seed(0)
    return randomize_norms(timm.create_model(name, **TIMM[name][0])).eval()


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def skipped(report):
    return {s["path"]: s["reason"] for s in report.skipped}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_models_fold_and_leave_only_what_a_reason_covers(name):
    model = timm_model(name)
    size = SIZE.get(name, (2, 3, 32, 32))
    folded, report = normswap.apply(model, "fold_norm_affine", return_report=True, input_size=size, check=True)
    norms = [p for p, m in model.named_modules() if family_of(m) in ("layernorm", "rmsnorm")]
    _, count, left = TIMM[name]
    assert set(skipped(report)) == set(left)
    for path, why in left.items():
        assert why in skipped(report)[path]
    assert len(norms) == count + len(left)
    assert report.check_result.ok
    notes = {c["path"]: " ".join(c["notes"]) for c in report.changes}
    for path in set(norms) - set(left):  # no affine left, but a β that a reader without bias could not take
        m = folded.get_submodule(path)
        kept = "β stays on the norm (as β/γ)" in notes[path]
        assert m.weight is None and (m.bias is not None) == kept, path
    model64 = copy.deepcopy(model).double()  # float64 truth: the same fold on a float64 model
    fold64 = normswap.apply(model64, "fold_norm_affine", input_size=size)
    x = torch.randn(*size, dtype=torch.float64)
    assert rel(logits(fold64, x), logits(model64, x)) < 1e-9


CASES = [(name, tied) for name in ("gpt2", "llama", "opt", "gemma") for tied in (True, False)]


@pytest.mark.parametrize("name, tied", CASES)
def test_hugging_face_models_fold_within_their_own_float32_error(name, tied):
    model, ids = build(name, tied=tied), tokens()
    folded, report = normswap.apply(model, "fold_norm_affine", return_report=True, example_inputs=ids, check=True)
    norms = [p for p, m in model.named_modules() if family_of(m) in ("layernorm", "rmsnorm")]
    assert len(norms) == 5
    final = norms[-1] if name != "opt" else "model.decoder.final_layer_norm"
    if tied:  # the final norm feeds the tied lm_head: left with the reason, and nothing else left
        assert list(skipped(report)) == [final]
        assert "tied to" in skipped(report)[final] and "untie: true" in skipped(report)[final]
        assert report.summary.endswith(", 1 left") and "folded the affine of 4 of 5 " in report.summary
    else:
        assert skipped(report) == {}
    truth = logits(copy.deepcopy(model).double(), ids)
    own_error = rel(logits(model, ids), truth)
    assert rel(logits(folded, ids), truth) <= 2 * own_error + 1e-12
    assert report.check_result.ok


@pytest.mark.parametrize("name", ["gpt2", "llama", "opt", "gemma"])
def test_untie_folds_into_the_head_and_leaves_the_embedding_alone(name):
    model, ids = build(name, tied=True), tokens()
    embedding = model.get_input_embeddings().weight.detach().clone()
    folded, report = normswap.apply(model, "fold_norm_affine", return_report=True, example_inputs=ids, check=True,
                                    untie=True)
    assert skipped(report) == {}
    assert folded.lm_head.weight is not folded.get_input_embeddings().weight
    assert torch.equal(folded.get_input_embeddings().weight, embedding)
    assert any("now has its own copy (untie: true)" in n for c in report.changes for n in c["notes"])
    assert model.lm_head.weight is model.get_input_embeddings().weight  # the caller's model is as it was


@pytest.mark.parametrize("name", ["gpt2", "llama", "opt", "gemma"])
def test_float64_models_fold_to_float64_truth(name):
    model, ids = build(name, tied=False).double(), tokens()
    folded, report = normswap.apply(model, "fold_norm_affine", return_report=True, example_inputs=ids, check=True)
    result = report.check_result
    error = rel(logits(folded, ids), logits(model, ids))
    if name == "gemma":  # its float32 n·(1 + w) moved into float64: judged against 4x the float32 rounding floor
        assert 1e-9 < error < result.threshold and result.threshold < 1e-6
    else:
        assert error < 1e-9 and result.threshold == pytest.approx(1e-9)


@pytest.mark.parametrize("name", ["gpt2", "gemma"])
def test_bfloat16_models_pass_the_tools_own_check(name):
    model, ids = build(name, tied=False).to(torch.bfloat16), tokens()
    folded, report = normswap.apply(model, "fold_norm_affine", return_report=True, example_inputs=ids, check=True)
    assert report.check_result.ok and report.check_result.rtol == pytest.approx(2e-2)
    assert folded.lm_head.weight.dtype == torch.bfloat16


def test_a_fold_that_drops_beta_fails_and_only_random_norms_show_it(monkeypatch):
    """The reason norms are randomized: with identity norms (as Hugging Face initializes them) a broken fold
    passes; with random ones it fails."""
    real = norm_affine.norm_affine
    monkeypatch.setattr(norm_affine, "norm_affine", lambda *a: (real(*a)[0], None))  # β silently dropped
    identity = build("opt", tied=False)
    for m in identity.modules():
        if family_of(m) == "layernorm":
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    normswap.apply(identity, "fold_norm_affine", example_inputs=tokens(), check=True)
    with pytest.raises(CheckFailedError) as failed:
        normswap.apply(build("opt", tied=False), "fold_norm_affine", example_inputs=tokens(), check=True)
    assert failed.value.result.max_rel > 1e-3


def test_gemma_is_recognised_as_one_plus_weight_and_folding_it_as_llama_fails(monkeypatch):
    gemma, llama = build("gemma", tied=False), build("llama", tied=False)
    assert probe(gemma.model.norm).offset == 1.0 and probe(llama.model.norm).offset == 0.0
    assert probe(gemma.model.norm).float32_inside
    form = probe(gemma.model.norm)
    monkeypatch.setattr(norm_affine, "probe", lambda m: type(form)("rmsnorm", 0.0, False, True))
    with pytest.raises(CheckFailedError):
        normswap.apply(gemma, "fold_norm_affine", example_inputs=tokens(), check=True)


class OddNorm(nn.Module):
    """Named like a norm, computes something else: tanh(x) * weight."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return torch.tanh(x) * self.weight


def test_a_norm_the_probe_cannot_identify_is_left_with_the_reason():
    model = nn.Sequential(nn.Linear(8, 16), OddNorm(16), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    before = logits(model, x)
    folded, report = normswap.apply(model, "fold_norm_affine", return_report=True, example_inputs=x, check=True)
    assert "never guessed" in skipped(report)["1"]
    assert torch.equal(logits(folded, x), before) and torch.equal(folded[1].weight, model[1].weight)
    table = inspect_model(model, example_inputs=x)
    assert table.rows[0]["family"] == "unidentified_norm" and "never guessed" in table.rows[0]["fold_reason"]


def test_untie_on_a_model_without_ties_is_a_note():
    _, report = normswap.apply(build("llama", tied=False), "fold_norm_affine", return_report=True,
                               example_inputs=tokens(), untie=True)
    assert any("nothing was untied" in n for n in report.notes)


def test_beta_stays_on_the_norm_unless_add_bias_gives_the_reader_one():
    model, ids = build("gpt2", tied=False), tokens()  # ln_f -> lm_head, which has no bias
    folded, report = normswap.apply(model, "fold_norm_affine", return_report=True, example_inputs=ids, check=True)
    notes = " ".join(n for c in report.changes if c["path"] == "transformer.ln_f" for n in c["notes"])
    assert "β stays on the norm (as β/γ): lm_head has no bias; add_bias: true creates one" in notes
    assert folded.lm_head.bias is None and folded.transformer.ln_f.weight is None
    assert torch.allclose(folded.transformer.ln_f.bias * model.transformer.ln_f.weight,
                          model.transformer.ln_f.bias, atol=1e-6)
    added, report = normswap.apply(model, "fold_norm_affine", return_report=True, example_inputs=ids, check=True,
                                   add_bias=True)
    assert added.lm_head.bias is not None and added.transformer.ln_f.bias is None
    assert any("save_pretrained/from_pretrained" in n for c in report.changes for n in c["notes"])


def test_inspect_shows_where_each_layer_norm_folds():
    table = inspect_model(timm_model("convnext_atto"), input_size=(1, 3, 32, 32))
    rows = {r["path"]: r for r in table.rows}
    assert rows["stages.0.blocks.0.norm"]["fold_into"] == ["stages.0.blocks.0.mlp.fc1"]
    assert not rows["stem.1"]["foldable"] and "residual stream" in rows["stem.1"]["fold_reason"]
    assert rows["head.norm"]["fold_into"] == ["head.fc"]
    text = table.text(80)
    assert "fold_norm_affine would fold the affine of 16 of 17 LayerNorm/RMSNorm layer(s)" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_the_check_compares_model_outputs_leaf_by_leaf_on_keyword_inputs():
    model, ids = build("gpt2", tied=False), tokens()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.transformer.h[1].mlp.c_fc.bias += 0.05
    result = normswap.check(model, other, ids)
    assert not result.ok and result.first_divergence["path"] == "transformer.h.1.mlp.c_fc"
    assert any(leaf["name"] == "output['logits']" for leaf in result.leaves)
    assert normswap.check(model, copy.deepcopy(model), [ids, tokens(1)]).ok


@pytest.mark.parametrize("make", [lambda c: nn.RMSNorm(c), lambda c: timm.layers.RmsNorm(c),
                                  lambda c: nn.LayerNorm(c, bias=False)])
def test_torch_and_timm_norm_classes_fold_and_keep_no_affine(make):
    model = randomize_norms(nn.Sequential(nn.Linear(8, 16), make(16), nn.Linear(16, 4))).eval().double()
    x = torch.randn(3, 8, dtype=torch.float64)
    folded, report = normswap.apply(model, "fold_norm_affine", return_report=True, example_inputs=x, check=True)
    assert skipped(report) == {} and folded[1].weight is None
    assert rel(folded(x), model(x)) < 1e-12


def test_per_layer_check_lines_the_folded_layers_up_through_the_norms_affine():
    """With the fold's own map, every layer of a correct fold agrees locally (the norms without affine and the
    layers holding it); a wrong reader is named, not the norm before it."""
    model, ids = build("opt", tied=False).double(), tokens()
    done = rewrite(model, "fold_norm_affine", example_inputs=ids)
    result = normswap.check(model, done.model, ids, layers=True, fold_map=done.plan.fold_map)
    assert result.ok and max(row["local_rel"] for row in result.layers) < 1e-9
    linked = {row["path"] for row in result.layers if row["compared"]}
    assert "model.decoder.layers.0.self_attn_layer_norm" in linked and "model.decoder.layers.0.self_attn.q_proj" in linked
    broken = copy.deepcopy(done.model)
    with torch.no_grad():
        broken.model.decoder.layers[1].fc1.weight[:, 0] += 0.1
    result = normswap.check(model, broken, ids, fold_map=done.plan.fold_map)
    assert not result.ok and result.first_divergence["path"] == "model.decoder.layers.1.fc1"


class PaddedWindows(nn.Module):
    """A norm whose output is zero-padded (window attention at a size the window does not divide), then
    average-pooled by a strided AvgPool2d, then read by linear layers."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 4)
        self.norm2, self.pool, self.head = nn.LayerNorm(8), nn.AvgPool2d(2), nn.Linear(8, 3)

    def forward(self, x):  # x: (B, H, W, C)
        y = self.fc(nn.functional.pad(self.norm(x), (0, 0, 0, 1, 0, 1)))
        z = self.pool(self.norm2(x).permute(0, 3, 1, 2)).flatten(2).mean(-1)
        return y.sum((1, 2)), self.head(z)


def test_zero_padding_keeps_gamma_foldable_and_beta_on_the_norm_and_average_pooling_keeps_both():
    model = randomize_norms(PaddedWindows()).eval().double()
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    folded, report = normswap.apply(model, "fold_norm_affine", return_report=True, example_inputs=x, check=True)
    notes = {c["path"]: " ".join(c["notes"]) for c in report.changes}
    assert skipped(report) == {}
    assert "fc sees zero padding, where a folded β would be missing" in notes["norm"]
    assert folded.norm.weight is None and folded.norm.bias is not None
    assert folded.norm2.weight is None and folded.norm2.bias is None
    assert all(rel(a, b) < 1e-12 for a, b in zip(folded(x), model(x)))


def test_metaformer_no_bias_layer_norms_are_layer_norms():
    model = randomize_norms(timm.create_model("caformer_s18")).eval()
    folded, report = normswap.apply(model, "fold_norm_affine", return_report=True, input_size=(1, 3, 64, 64),
                                    check=True)
    assert report.check_result.ok and len(report.skipped) == 1
    assert "residual stream" in report.skipped[0]["reason"]
