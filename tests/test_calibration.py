"""Calibrated swaps: the new layers' affine fitted so the swapped model keeps the original's function."""
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import normswap
import normswap.passes.calibration
from normswap.cli import main
from normswap.errors import NormswapError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from digits import DigitsNet, load_split, train  # noqa: E402  (a small BN conv net for 8x8 digits)


@pytest.fixture(scope="module")
def digits():
    """A BN conv net trained on scikit-learn's digits (a second or two), with its data."""
    torch.manual_seed(0)
    x_train, x_test, y_train, y_test = load_split()
    return train(DigitsNet(), x_train, y_train, 8), x_train, x_test, y_test


def scores(model, reference, x, y):
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
        return (pred == y).float().mean().item(), (pred == reference(x).argmax(1)).float().mean().item()


@pytest.mark.parametrize("recipe", ["bn_to_gn", "bn_to_ln"])
def test_calibrated_swap_keeps_the_original_function(digits, recipe):
    model, x_train, x_test, y_test = digits
    accuracy, _ = scores(model, model, x_test, y_test)
    assert accuracy > 0.97
    calibration = list(x_train[:256].split(32))
    plain = normswap.apply(model, recipe, input_size=(1, 1, 8, 8))
    fitted, report = normswap.apply(model, recipe, calibration=calibration, return_report=True)
    plain_acc, plain_agree = scores(plain, model, x_test, y_test)
    fit_acc, fit_agree = scores(fitted, model, x_test, y_test)
    assert fit_agree >= 0.99 and abs(fit_acc - accuracy) <= 0.01
    assert plain_agree < 0.95 and plain_acc < accuracy - 0.05  # without calibration the swap costs predictions
    cal = report.calibration
    assert cal["fit"] == "least_squares" and cal["held_back"] == 1 and len(cal["layers"]) == 3
    assert (cal["batches"], cal["samples"], cal["world_size"]) == (8, 256, 1)
    assert all(r["error_after"] < r["error_before"] for r in cal["layers"])
    assert cal["fidelity"]["top1_after"] >= cal["fidelity"]["top1_before"]
    assert cal["fidelity"]["cosine_after"] > 0.98 > cal["fidelity"]["cosine_before"]


def test_only_the_new_layers_affine_changes(digits):
    model, x_train, _, _ = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = normswap.apply(model, "bn_to_gn")
    fitted = normswap.apply(model, "bn_to_gn", calibration=list(x_train[:64].split(32)))
    changed = {k for k, v in fitted.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert changed == {f"features.{i}.1.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fit", ["moments"])
def test_other_fits(digits, fit):
    model, x_train, x_test, y_test = digits
    fitted = normswap.apply(model, "bn_to_gn", calibration=list(x_train[:256].split(32)), calibration_fit=fit)
    assert scores(fitted, model, x_test, y_test)[1] >= 0.99


def test_calibration_failure_leaves_the_model_untouched(digits):
    model, _, _, _ = digits
    snapshot = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    for inplace in (False, True):
        with pytest.raises(NormswapError, match="calibration failed in the model's forward"):
            normswap.apply(model, "bn_to_gn", calibration=[torch.randn(4, 3, 8, 8)], inplace=inplace)
        assert [type(m) for m in model.modules()] == types
        assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_inplace_calibration_puts_the_fitted_layers_in_the_callers_model(digits):
    model, x_train, x_test, y_test = digits
    mine = copy.deepcopy(model)
    out = normswap.apply(mine, "bn_to_gn", calibration=list(x_train[:256].split(32)), inplace=True)
    assert out is mine and type(mine.features[0][1]).__name__ == "GroupNorm"
    assert scores(mine, model, x_test, y_test)[1] >= 0.99


def test_rule_calibrate_key(digits):
    model, x_train, _, _ = digits
    rule = {"match": {"family": "batchnorm"}, "replace": "group_norm", "with": {"num_groups": 4}}
    with pytest.raises(NormswapError, match="asks for calibration, but no calibration data was given"):
        normswap.apply(model, {"version": 1, "rules": [{**rule, "calibrate": True}]})
    _, report = normswap.apply(model, {"version": 1, "rules": [{**rule, "calibrate": False}]},
                               calibration=list(x_train[:64].split(32)), return_report=True)
    assert report.calibration is None
    with pytest.raises(NormswapError, match="'calibrate' must be true or false"):
        normswap.recipe({"version": 1, "rules": [{**rule, "calibrate": "yes"}]})


def test_small_groups_are_warned_about(digits):
    model, x_train, _, _ = digits
    _, report = normswap.apply(model, "bn_to_gn", num_groups=32, min_group_size=1,
                               calibration=list(x_train[:64].split(32)), return_report=True)
    warned = {r["path"]: r["group_size"] for r in report.calibration["layers"] if r.get("warning")}
    assert warned == {"features.0.1": 1, "features.1.1": 1, "features.3.1": 2}


class PooledClassifier(nn.Module):
    """Classes told apart by each sample's channel means: what InstanceNorm before a global pool wipes out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_where_calibration_cannot_help_the_report_says_so():
    torch.manual_seed(0)
    model = PooledClassifier().eval()
    with torch.no_grad():
        model.bn.running_var.fill_(0.5)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 6, 6, generator=gen) + torch.randn(16, 3, 1, 1, generator=gen) for _ in range(4)]
    _, report = normswap.apply(model, "bn_to_in", calibration=batches, return_report=True)
    cal = report.calibration
    assert cal["fidelity"]["top1_after"] < 0.6
    assert any("InstanceNorm removes each sample's channel means" in n for n in cal["notes"])


def test_cli_calibrate_tensors(digits, tmp_path, capsys):
    model, x_train, x_test, _ = digits
    sd, data = tmp_path / "digits.pth", tmp_path / "cal.pt"
    torch.save(model.state_dict(), sd)
    torch.save(list(x_train[:256].split(32)), data)
    out = tmp_path / "gn.safetensors"
    assert main(["apply", "bn_to_ln", str(sd), "--arch", "digits:DigitsNet", "--calibrate-tensors", str(data),
                 "-o", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["calibration"]["layers"]) == 3 and res["check"]["ok"]
    reloaded = normswap.load(out)
    assert scores(reloaded, model, x_test, model(x_test).argmax(1))[1] >= 0.99
    assert main(["apply", "bn_to_gn", str(sd), "--arch", "digits:DigitsNet", "--calibrate-tensors", str(data),
                 "--calibrate-groups", "0", "-o", str(tmp_path / "auto.safetensors"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["calibration"]["layers"]
    assert [(r["groups_built"], r["groups"]) for r in rows] == [(4, 1), (8, 1), (16, 1)]
    assert [m.num_groups for m in normswap.load(tmp_path / "auto.safetensors").modules()
            if isinstance(m, nn.GroupNorm)] == [1, 1, 1]
    assert main(["apply", "bn_to_gn", str(sd), "--arch", "digits:DigitsNet", "--calibrate-tensors", str(data),
                 "--calibrate-groups", "some", "-o", str(tmp_path / "y.pt")]) == 2
    assert "not keep, auto or a tolerance" in capsys.readouterr().err
    assert main(["apply", "bn_to_gn", str(sd), "--arch", "digits:DigitsNet", "--calibrate-tensors",
                 str(tmp_path / "nope.pt"), "-o", str(tmp_path / "x.pt")]) == 2
    assert "input file" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def _subprocess_env() -> dict:
    """The package and examples/ (digits:DigitsNet) importable, one thread per process (2 processes share the
    machine, and float32 convs round alike only with the same thread count)."""
    paths = [str(ROOT), str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}


def test_two_processes_with_uneven_shards_match_one_process(digits, tmp_path):
    """torchrun, gloo on the CPU: 5 batches split 3 / 2, each process holding back its last one. The fitted
    GroupNorms equal one process's fit on the union of the two fit sets within 1e-6, and the held-back figures
    are those of both held-back batches together."""
    from safetensors.torch import load_file

    from normswap.passes.calibration import hold_back
    from normswap.verify.metrics import cosine, top1_matches

    model, x_train, _, _ = digits
    batches = list(x_train[:80].split(16))
    sd, data, out = tmp_path / "digits.pth", tmp_path / "cal.pt", tmp_path / "two.safetensors"
    torch.save(model.state_dict(), sd)
    torch.save(batches, data)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "normswap", "apply",
                           "bn_to_gn", str(sd), "--arch", "digits:DigitsNet", "--calibrate-tensors", str(data),
                           "-o", str(out)], capture_output=True, text=True, timeout=300, env=_subprocess_env(),
                          cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = " ".join(proc.stdout.split())  # the report wraps at 80 columns
    assert printed.count("calibration (least_squares): 3 layer(s) fitted on 3 batch(es), 2 held back, "
                         "80 sample(s) in all, 2 processes") == 1, printed  # printed once: by process 0
    splits = [hold_back(batches[rank::2]) for rank in (0, 1)]
    fitted = splits[0][0] + splits[1][0]  # batches 0, 2 | 1
    held = splits[0][1] + splits[1][1]  # batches 4 | 3
    assert [b.data_ptr() for b in fitted + held] == [batches[i].data_ptr() for i in (0, 2, 1, 4, 3)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the two processes
    try:  # one process holding back one batch after the same three: the same fit set
        one, report = normswap.apply(model, "bn_to_gn", calibration=fitted + held[:1], return_report=True)
        plain = normswap.apply(model, "bn_to_gn", input_size=(1, 1, 8, 8))
        with torch.no_grad():
            outputs = [[m.eval()(b).double() for b in held] for m in (model, plain, one)]
    finally:
        torch.set_num_threads(threads)
    two = load_file(out)
    keys = [f"features.{i}.1.{p}" for i in (0, 1, 3) for p in ("weight", "bias")]
    assert all(not torch.equal(two[k], plain.state_dict()[k]) for k in keys)  # the fit moved them
    for k in keys:
        want = one.state_dict()[k].double()
        assert ((two[k].double() - want).abs().max() / want.abs().max()).item() < 1e-6, k
    cal = json.loads((tmp_path / "two.safetensors.json").read_text())["report"]["calibration"]
    assert (cal["batches"], cal["held_back"], cal["samples"], cal["world_size"]) == (5, 2, 80, 2)
    for mine, single in zip(cal["layers"], report.calibration["layers"]):
        assert mine["error_after"] == pytest.approx(single["error_after"], rel=1e-6)
    reference, before, after = outputs
    hits = [[top1_matches(r, c) for r, c in zip(reference, m)] for m in (before, after)]
    assert cal["fidelity"] == pytest.approx({
        "cosine_before": min(cosine(r, c) for r, c in zip(reference, before)),
        "cosine_after": min(cosine(r, c) for r, c in zip(reference, after)),
        "top1_before": sum(h for h, _ in hits[0]) / 32, "top1_after": sum(h for h, _ in hits[1]) / 32}, rel=1e-6)
    assert [n for _, n in hits[0]] == [16, 16]


def test_an_empty_shard_stops_every_process_with_the_fix(digits, tmp_path):
    """One batch over two processes leaves process 1 nothing: both exit 2 with the message and the fix, no
    traceback, nothing written, no hang. Launched with the environment torchrun gives its workers, not through
    torchrun, whose own status is 1 and which prints a traceback of its own when a worker fails."""
    model, x_train, _, _ = digits
    sd, data, out = tmp_path / "digits.pth", tmp_path / "one.pt", tmp_path / "never.safetensors"
    torch.save(model.state_dict(), sd)
    torch.save([x_train[:16]], data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "normswap", "apply", "bn_to_gn", str(sd), "--arch", "digits:DigitsNet",
               "--calibrate-tensors", str(data), "-o", str(out)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**_subprocess_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in (0, 1)]
    try:
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errors):
        assert p.returncode == 2 and "Traceback" not in err, err
        assert "calibration: process 1 of 2 has no batch (1 batch(es) over 2 processes)" in err
        assert "fix: give at least one batch to every process (2 or more in all" in err
    assert not out.exists()


def test_without_calibration_data_process_zero_does_the_rewrite_alone(digits, tmp_path, capsys, monkeypatch):
    """Only calibration is shared: under torchrun without calibration data, the other processes return at once
    and process 0 rewrites, writes and says so (no process group is needed, none is started)."""
    model, _, _, _ = digits
    sd, out = tmp_path / "digits.pth", tmp_path / "gn.safetensors"
    torch.save(model.state_dict(), sd)
    command = ["apply", "bn_to_gn", str(sd), "--arch", "digits:DigitsNet", "--input-size", "1,1,8,8", "-o", str(out)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(command) == 0 and not out.exists() and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(command) == 0 and out.exists()
    assert "without calibration data process 0 did the whole rewrite" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("groups", [1, 3, 6, 24])
def test_group_sums_from_channel_moments_match_the_normalized_tensor(groups):
    """The candidate group counts are fitted from per-sample channel moments; they must give the sums of the
    normalized tensor itself (float64 here, so the two agree to rounding)."""
    from normswap.passes.calibration import _group_sums, _sums

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 24, 7, 5, generator=gen, dtype=torch.float64) * 3 * torch.rand(1, 24, 1, 1, generator=gen,
         dtype=torch.float64) + 5 * torch.randn(1, 24, 1, 1, generator=gen, dtype=torch.float64))
    z = torch.randn(4, 24, 7, 5, generator=gen, dtype=torch.float64) + 0.3 * x
    got = _group_sums(x, z, [groups], 1e-5)[0]
    want = _sums(torch.nn.functional.group_norm(x, groups, eps=1e-5), z, 1)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_group_sums_keep_their_digits_when_the_mean_dwarfs_the_spread():
    """float32 inputs with mean 1000 and spread 0.1: Σx²/L − mean² alone would lose the variance."""
    from normswap.passes.calibration import _group_sums, _sums

    gen = torch.Generator().manual_seed(1)
    x = 1000 + 0.1 * torch.randn(2, 8, 9, 9, generator=gen)
    z = torch.randn(2, 8, 9, 9, generator=gen) + 10 * (x - 1000)
    got = _group_sums(x, z, [8, 2], 1e-5)
    for k, groups in enumerate((8, 2)):
        want = _sums(torch.nn.functional.group_norm(x.double(), groups, eps=1e-5), z.double(), 1)
        assert torch.allclose(got[k], want, rtol=1e-4, atol=1e-3), groups


def test_auto_groups_take_fewer_groups_where_small_ones_lose_the_function(digits):
    """32 groups with min_group_size 1 makes groups of 1-2 channels; calibration_groups (a tolerance) takes
    fewer, never more than the recipe built, and keeps more predictions."""
    model, x_train, x_test, y_test = digits
    kw = dict(num_groups=32, min_group_size=1, calibration=list(x_train[:256].split(32)), return_report=True)
    kept, kept_report = normswap.apply(model, "bn_to_gn", **kw)
    auto, auto_report = normswap.apply(model, "bn_to_gn", calibration_groups=0.005, **kw)
    rows = auto_report.calibration["layers"]
    assert [r["groups_built"] for r in rows] == [16, 32, 32]
    assert [r["groups"] for r in rows] == [2, 1, 1]
    assert all(isinstance(m, nn.GroupNorm) for m in (auto.features[0][1], auto.features[1][1], auto.features[3][1]))
    assert [m.num_groups for m in (auto.features[0][1], auto.features[1][1], auto.features[3][1])] == [2, 1, 1]
    for r in rows:  # the chosen count is the most groups within the tolerance of the best count's own error
        own = r["own_error_by_groups"]
        assert own[str(r["groups"])] <= min(own.values()) + 0.005
        assert all(e > min(own.values()) + 0.005 for g, e in own.items() if int(g) > r["groups"])
    assert not any(r.get("warning") for r in rows) and any(r.get("warning") for r in kept_report.calibration["layers"])
    assert scores(kept, model, x_test, y_test)[1] <= 0.994
    assert scores(auto, model, x_test, y_test)[1] >= 0.997
    assert set(auto.state_dict()) == set(kept.state_dict())
    assert auto_report.calibration["group_tolerance"] == 0.005 and kept_report.calibration["group_tolerance"] is None
    _, report = normswap.apply(model, "bn_to_gn", calibration_groups="auto", **kw)
    assert report.calibration["group_tolerance"] == normswap.passes.calibration.GROUP_TOLERANCE == 0.002
    assert "group counts chosen (own error within 0.002 of the best count's)" in "\n".join(
        normswap.passes.calibration.CalibrationReport(**report.calibration).lines())


def test_chosen_groups_go_to_their_own_rule_after_an_inactive_rule(digits, tmp_path, capsys):
    """Regression: calibration's group counts were written into the sidecar recipe by the rule's place among
    the active rules, so a `when: false` rule before the calibrated one took them and the output no longer
    replayed."""
    model, x_train, _, _ = digits
    sd, data, recipe = tmp_path / "digits.pth", tmp_path / "cal.pt", tmp_path / "gn.yaml"
    torch.save(model.state_dict(), sd)
    torch.save(list(x_train[:256].split(32)), data)
    recipe.write_text("version: 1\nname: gn_after_off\nparams: {drop_bn: false}\nrules:\n"
                      "  - match: {family: batchnorm}\n    replace: identity\n    when: ${drop_bn}\n"
                      "  - match: {family: batchnorm}\n    replace: group_norm\n    with: {num_groups: 32}\n"
                      "check: interface\n")
    out = tmp_path / "auto.safetensors"
    assert main(["apply", str(recipe), str(sd), "--arch", "digits:DigitsNet", "--calibrate-tensors", str(data),
                 "--calibrate-groups", "0", "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    rules = json.loads((tmp_path / "auto.safetensors.json").read_text())["steps"][-1]["recipe"]["rules"]
    assert "with" not in rules[0] and len(rules[1]["with"]["groups_by_path"]) == 3
    assert [m.num_groups for m in normswap.load(out).modules() if isinstance(m, nn.GroupNorm)] == [1, 1, 1]


def test_auto_groups_keep_min_group_size_and_groups_by_path(digits):
    model, x_train, _, _ = digits
    recipe = {"version": 1, "rules": [{"match": {"family": "batchnorm"}, "replace": "group_norm", "with": {
        "num_groups": 32, "min_group_size": 8, "groups_by_path": {"features.3.1": 16}}}]}
    _, report = normswap.apply(model, recipe, calibration=list(x_train[:128].split(32)), calibration_groups=0.0,
                               return_report=True)
    rows = {r["path"]: r for r in report.calibration["layers"]}
    assert [rows[p]["groups_built"] for p in ("features.0.1", "features.1.1")] == [2, 4]
    assert all(r["group_size"] >= 8 for p, r in rows.items() if p != "features.3.1")
    assert [list(rows[p]["own_error_by_groups"]) for p in ("features.0.1", "features.1.1")] == [["2", "1"],
                                                                                            ["4", "2", "1"]]
    for p in ("features.0.1", "features.1.1"):  # tolerance 0: the count with the least own error
        own = rows[p]["own_error_by_groups"]
        assert rows[p]["groups"] == int(min(own, key=own.get))
    assert rows["features.3.1"]["groups"] == 16 and "groups_built" not in rows["features.3.1"]
    with pytest.raises(NormswapError, match="unknown calibration group mode"):
        normswap.apply(model, "bn_to_gn", calibration=list(x_train[:64].split(32)), calibration_groups="fewest")
    with pytest.raises(NormswapError, match="unknown calibration group mode"):
        normswap.apply(model, "bn_to_gn", calibration=list(x_train[:64].split(32)), calibration_groups=-0.1)


def test_keeping_the_recipes_groups_says_when_auto_would_keep_clearly_more(digits):
    """With the recipe's 32 (-> 4/8/16) groups kept, the same pass measures every count; the report says what
    calibration_groups='auto' would give when it is clearly better."""
    model, x_train, _, _ = digits
    calibration = list(x_train[:256].split(32))
    _, kept = normswap.apply(model, "bn_to_gn", calibration=calibration, return_report=True, min_group_size=1)
    rows = kept.calibration["layers"]
    assert all("groups_built" not in r and r["auto_groups"] <= r["groups"] for r in rows)
    _, auto = normswap.apply(model, "bn_to_gn", calibration=calibration, return_report=True, min_group_size=1,
                             calibration_groups="auto")
    first = auto.calibration["layers"][0]  # later layers see different inputs once auto changed an earlier one
    assert rows[0]["auto_groups"] == first["groups"] and rows[0]["auto_error"] == pytest.approx(first["error_after"])
    assert any(r["auto_groups"] < r["groups"] and r["auto_error"] < r["error_after"] for r in rows)
    advice = [n for n in kept.calibration["notes"] if "would keep clearly more" in n]
    kept_median = sorted(r["error_after"] for r in rows)[1]
    auto_median = sorted(r["auto_error"] for r in rows)[1]
    assert bool(advice) == (auto_median <= 0.5 * kept_median and kept_median - auto_median > 0.01), (rows, advice)
