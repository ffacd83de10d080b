"""ln_to_rmsnorm: LayerNorm -> RMSNorm, exactly, by centring every write into the residual stream."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import normswap
from normswap.testing import randomize_norms

from transformer_models import build, tokens


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def out(model, inputs):
    with torch.no_grad():
        y = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return y.logits if hasattr(y, "logits") else y


def skipped(report):
    return {s["path"]: s["reason"] for s in report.skipped}


def layer_norms(model):
    return [p for p, m in model.named_modules() if type(m).__name__ == "LayerNorm"]


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_every_layer_norm_of_a_language_model_becomes_an_rms_norm_in_float64_exactly(name):
    model, ids = build(name, tied=True).double(), tokens()
    rms, report = normswap.apply(model, "ln_to_rmsnorm", return_report=True, example_inputs=ids, check=True,
                                 untie=True, add_bias=True)
    assert skipped(report) == {} and layer_norms(rms) == []
    assert sum(isinstance(m, nn.RMSNorm) for m in rms.modules()) == len(layer_norms(model)) == 5
    assert rel(out(rms, ids), out(model, ids)) < 1e-9
    embedding = rms.get_input_embeddings().weight
    assert embedding.mean(-1).abs().max() < 1e-12  # every write into the stream has zero mean
    assert rms.lm_head.weight is not embedding and model.lm_head.weight is model.get_input_embeddings().weight


def test_a_tied_embedding_is_refused_without_untie_and_beta_without_a_bias_keeps_its_layer_norm():
    model, ids = build("gpt2", tied=True), tokens()
    rms, report = normswap.apply(model, "ln_to_rmsnorm", return_report=True, example_inputs=ids, check=True)
    assert len(skipped(report)) == 5 and all("tied to lm_head.weight" in r and "untie: true" in r
                                             for r in skipped(report).values())
    untied = build("gpt2", tied=False)
    rms, report = normswap.apply(untied, "ln_to_rmsnorm", return_report=True, example_inputs=ids, check=True)
    assert list(skipped(report)) == ["transformer.ln_f"]
    assert "stays a LayerNorm (exact on the centred stream)" in skipped(report)["transformer.ln_f"]
    assert report.check_result.ok and layer_norms(rms) == ["transformer.ln_f"]


@pytest.mark.parametrize("name, kw", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8)),   # class token and position embedding centred
    ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, depth=3)),   # LayerScale folded first
])
def test_vision_transformers_with_class_token_and_layer_scale(name, kw):
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, **kw)).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "LayerScale":
                m.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rms, report = normswap.apply(model, "ln_to_rmsnorm", return_report=True, example_inputs=x, check=True)
    assert skipped(report) == {} and layer_norms(rms) == []
    assert rel(out(rms, x), out(model, x)) < 1e-9
    assert rms.cls_token.mean(-1).abs().max() < 1e-12 and not torch.equal(rms.cls_token, model.cls_token)
    assert any("cls_token: centred over the channels" in n for n in report.notes)
    if name.startswith("deit3"):
        assert torch.all(rms.blocks[0].ls1.gamma == 1)


def test_convnext_is_refused_where_a_depthwise_conv_reads_the_stream():
    model = randomize_norms(timm.create_model("convnext_tiny", depths=(1, 1, 1, 1))).eval()
    rms, report = normswap.apply(model, "ln_to_rmsnorm", return_report=True, input_size=(2, 3, 32, 32))
    reasons = skipped(report)
    norms = [p for p, m in model.named_modules() if "LayerNorm" in type(m).__name__]
    assert report.changes == [] and sorted(reasons) == sorted(norms)
    assert "grouped conv" in reasons["stages.0.blocks.0.norm"]
    assert "normalizes channels-first maps" in reasons["stem.1"]


class ReadsTheStream(nn.Module):
    """A residual block whose stream is also read by a linear layer directly: centring would change it."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.fc, self.side = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc(self.norm(h))
        return self.side(h)


def test_a_stream_read_by_anything_else_is_refused_with_the_reason():
    model = randomize_norms(ReadsTheStream()).eval()
    x = torch.randn(3, 4)
    before = copy.deepcopy(model.state_dict())
    rms, report = normswap.apply(model, "ln_to_rmsnorm", return_report=True, example_inputs=x, check=True)
    assert "the stream is also read by side (Linear), which sees its mean" in skipped(report)["norm"]
    assert all(torch.equal(before[k], v) for k, v in rms.state_dict().items())


def test_a_failed_check_leaves_the_callers_model_untouched_in_place(monkeypatch):
    """All or nothing, parameter edits included: a plan whose check fails is rolled back."""
    from normswap.catalog import ln_to_rms
    from normswap.errors import CheckFailedError

    monkeypatch.setattr(ln_to_rms, "_centred", lambda v: v.double() + 1.0)  # a wrong centring
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    token = model.cls_token
    with pytest.raises(CheckFailedError):
        normswap.apply(model, "ln_to_rmsnorm", inplace=True, input_size=(2, 3, 32, 32), check=True)
    assert model.cls_token is token
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
