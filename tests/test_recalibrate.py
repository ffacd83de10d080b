"""Recalibration (AdaBN): exact pooled statistics of each BN's inference input, on one process or two."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn
from torchvision.ops.misc import FrozenBatchNorm2d

import normswap
from normswap.cli import main
from normswap.errors import NormswapError
from normswap.testing import randomize_bn

ROOT = Path(__file__).resolve().parent.parent


class Net(nn.Module):
    """Several BNs in sequence (2-d and 1-d), so each one's input depends on the ones before it."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc, self.b4 = nn.Linear(8, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.b4(self.fc(x.mean((2, 3))))


def net():
    torch.manual_seed(0)
    return randomize_bn(Net(), (4, 3, 8, 8))


def sorted_batches(n=5, size=6, side=8):
    """Batches whose means and scales differ from batch to batch, as class-sorted data does."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, side, side, generator=gen) * (1 + 0.3 * i) + i for i in range(n)]


def exact_reference(model, batches):
    """Independently, in float64: BN by BN in execution order, the mean and unbiased variance of all its input
    with every BN before it already set and in eval mode."""
    ref = copy.deepcopy(model).double().eval()
    bns = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        seen = []
        handle = bn.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().clone()))
        with torch.no_grad():
            for b in batches:
                ref(b.double())
        handle.remove()
        x = torch.cat([s.transpose(0, 1).reshape(bn.num_features, -1) for s in seen], dim=1)
        bn.running_mean.copy_(x.mean(1))
        bn.running_var.copy_(x.var(1, unbiased=True))
    return ref


def stats_error(model, ref):
    """Largest relative difference of any running_mean / running_var."""
    mine, theirs = dict(model.named_buffers()), dict(ref.named_buffers())
    worst = 0.0
    for name, t in theirs.items():
        if "running_" in name:
            worst = max(worst, ((mine[name].double() - t).abs().max() / t.abs().max()).item())
    return worst


@pytest.mark.parametrize("max_samples", [256, 10])  # one pass; one partial pass per BN
def test_statistics_are_the_pooled_statistics_of_each_bn_inference_input(max_samples):
    model, batches = net(), sorted_batches()
    out, report = normswap.recalibrate(model, batches, max_samples=max_samples, return_report=True)
    assert stats_error(out, exact_reference(model, batches)) < 1e-4
    assert report.mode == ("one pass" if max_samples == 256 else "per layer")
    assert report.passes == (1 if max_samples == 256 else 4) and report.samples == 30
    if max_samples == 10:
        assert "30 samples in this process exceed max_samples=10" in report.notes[0]
    assert [r["path"] for r in report.layers] == ["b1", "b2", "b3", "b4"]


def test_batches_of_different_shapes_are_exact_too():
    model = net()
    batches = sorted_batches(3, side=8) + sorted_batches(2, side=12)
    for max_samples in (256, 1):
        out, report = normswap.recalibrate(model, batches, return_report=True, max_samples=max_samples)
        assert report.mode == ("one pass" if max_samples == 256 else "per layer")
        assert stats_error(out, exact_reference(model, batches)) < 1e-4


def test_momentum_and_per_batch_estimates_fail_the_same_test():
    model, batches = net(), sorted_batches()
    ref = exact_reference(model, batches)
    single_train_pass = copy.deepcopy(model)
    update_bn(batches, single_train_pass)  # torch's cumulative average, upstream BNs on batch statistics
    assert stats_error(single_train_pass, ref) > 1e-2
    per_batch = copy.deepcopy(model).eval()  # momentum 1, per-batch figures averaged (upstream already set)
    for bn in [m for m in per_batch.modules() if isinstance(m, nn.BatchNorm2d)] + [per_batch.b4]:
        means, variances = [], []

        def per_batch_figures(mod, a, means=means, variances=variances):
            x = a[0].transpose(0, 1).flatten(1)
            means.append(x.mean(1))
            variances.append(x.var(1))

        handle = bn.register_forward_pre_hook(per_batch_figures)
        with torch.no_grad():
            for b in batches:
                per_batch(b)
        handle.remove()
        bn.running_mean.copy_(torch.stack(means).mean(0))
        bn.running_var.copy_(torch.stack(variances).mean(0))
    assert stats_error(per_batch, ref) > 1e-2  # the variance between batches is missing


def test_only_running_statistics_change_and_the_caller_keeps_its_model():
    model = net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = normswap.recalibrate(model, sorted_batches())
    assert not out.training and all(not m.training for m in out.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.training
    changed = {k for k, v in out.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"b{i}.running_{s}" for i in range(1, 5) for s in ("mean", "var")}
    same = normswap.recalibrate(model, sorted_batches(), inplace=True)
    assert same is model and not model.training
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in model.state_dict().items())


def test_timm_model_with_norm_act_layers():
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobilenetv3_small_050", pretrained=False), (2, 3, 64, 64)).eval()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 64, 64, generator=gen) * 0.5 + 0.2 * i for i in range(4)]
    out, report = normswap.recalibrate(model, batches, return_report=True)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(report.layers) == n_bn and report.passes == 1
    assert stats_error(out, exact_reference(model, batches)) < 1e-3  # float32 forward vs a float64 reference


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(torch.relu(self.bn(x))))


def test_a_bn_called_twice_reaches_a_fixed_point():
    torch.manual_seed(0)
    model = randomize_bn(Shared(), (4, 4, 6, 6))
    batches = [torch.randn(8, 4, 6, 6) + i for i in range(3)]
    out, report = normswap.recalibrate(model, batches, return_report=True)
    assert report.passes > 1 and "called more than once" in report.notes[0]
    seen = []  # with the final statistics, the pooled input of both calls is what the BN holds
    handle = out.bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    with torch.no_grad():
        out(torch.cat(batches))
    handle.remove()
    x = torch.cat(seen).transpose(0, 1).flatten(1)
    assert torch.allclose(out.bn.running_mean.double(), x.mean(1), rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.bn.running_var.double(), x.var(1), rtol=1e-4, atol=1e-5)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = FrozenBatchNorm2d(3)
        self.free = nn.BatchNorm2d(3, track_running_stats=False)
        self.bn = nn.BatchNorm2d(3)
        self.unused = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.free(self.frozen(x)))


def test_what_is_left_and_why():
    _, report = normswap.recalibrate(Mixed(), [torch.randn(4, 3, 5, 5)], return_report=True)
    reasons = {s["path"]: s["reason"] for s in report.skipped}
    assert reasons == {"frozen": "a frozen BatchNorm: its statistics are fixed by design",
                       "free": "no running statistics (track_running_stats=False)",
                       "unused": "never called in the forward pass: statistics left as they were"}
    assert [r["path"] for r in report.layers] == ["bn"]


def test_bad_inputs_are_normswap_errors_and_leave_the_model():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NormswapError, match="a single tensor"):
        normswap.recalibrate(model, torch.randn(4, 3, 8, 8))
    with pytest.raises(NormswapError, match="no data to recalibrate on"):
        normswap.recalibrate(model, [])
    with pytest.raises(NormswapError, match="recalibration failed in the model's forward"):
        normswap.recalibrate(model, [torch.randn(4, 5, 8, 8)], inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ CLI and data sources


def test_cli_tensors_and_random(tmp_path, capsys):
    batches = sorted_batches()
    data = tmp_path / "batches.pt"
    torch.save(batches, data)
    sd = tmp_path / "net.pth"
    torch.save(net().state_dict(), sd)
    out = tmp_path / "recal.safetensors"
    assert main(["recalibrate", str(sd), "--arch", "test_recalibrate:Net", "--tensors", str(data),
                 "-o", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["samples"] == 30 and res["recalibrated"] == 4
    reloaded = normswap.load(out)  # replayed: spec, then the weights (the step changed only weights)
    assert stats_error(reloaded, exact_reference(net(), batches)) < 1e-4
    assert main(["recalibrate", "test_recalibrate:Net", "--random", "3", "--batch-size", "4",
                 "--input-size", "1,3,8,8", "-o", str(tmp_path / "r.pt")]) == 0
    assert "recalibrated 4 BatchNorm layer(s) on 12 sample(s)" in capsys.readouterr().out


def test_cli_image_folder(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            arr = (torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(folder / cls / f"{i}.png")
    out = tmp_path / "r18.safetensors"
    assert main(["recalibrate", "timm:resnet18", "--data", str(folder), "--batch-size", "4",
                 "--input-size", "1,3,32,32", "-o", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["samples"] == 6 and res["recalibrated"] == 20


@pytest.mark.parametrize("setup, argv, needle", [
    (None, ["--data", "{d}/missing"], "image folder {d}/missing does not exist"),
    ("empty", ["--data", "{d}/empty"], "holds no images"),
    ("corrupt", ["--data", "{d}/corrupt"], "cannot decode image {d}/corrupt/x.png"),
    (None, ["--random", "0"], "--random 0 must be at least 1"),
    (None, ["--tensors", "{d}/none.pt"], "input file {d}/none.pt does not exist"),
])
def test_cli_bad_data_exit_2(tmp_path, capsys, setup, argv, needle):
    if setup == "empty":
        (tmp_path / "empty").mkdir()
    if setup == "corrupt":
        (tmp_path / "corrupt").mkdir()
        (tmp_path / "corrupt" / "x.png").write_bytes(b"not a png")
    out = tmp_path / "o.pt"
    argv = [a.format(d=tmp_path) for a in argv]
    assert main(["recalibrate", "test_recalibrate:Net", "--input-size", "1,3,8,8", "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert needle.format(d=tmp_path) in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("max_samples", ["256", "4"])  # one pass; one partial pass per BN
def test_two_processes_with_uneven_shards_match_one_process(tmp_path, max_samples):
    """torchrun, gloo on the CPU: 5 batches split 3 / 2 give one process's statistics within 1e-6."""
    batches = sorted_batches(5)
    data = tmp_path / "batches.pt"
    torch.save(batches, data)
    out = tmp_path / "two.safetensors"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "normswap",
                           "recalibrate", "test_recalibrate:net", "-o", str(out), "--tensors", str(data),
                           "--no-progress", "--max-samples", max_samples],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 30 sample(s)" in proc.stdout and "2 processes" in proc.stdout
    from safetensors.torch import load_file

    two = load_file(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the two processes: float32 convs round alike only with the same threads
    try:
        one = normswap.recalibrate(net(), batches).state_dict()
    finally:
        torch.set_num_threads(threads)
    for key in one:
        if "running_" in key:
            assert ((two[key].double() - one[key].double()).abs().max() / one[key].abs().max()).item() < 1e-6, key


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.a(x) if x.mean() > 0 else self.b(x)


def test_batches_taking_different_paths_are_refused():
    batches = [torch.randn(4, 3, 5, 5) + 3, torch.randn(4, 3, 5, 5) - 3]
    with pytest.raises(NormswapError, match="batches take different paths through the model"):
        normswap.recalibrate(Branchy(), batches)
    out, report = normswap.recalibrate(Branchy(), batches[:1], return_report=True)  # one path: fine
    assert [r["path"] for r in report.layers] == ["a"] and report.skipped[0]["path"] == "b"


class Swallowing(nn.Module):
    """A forward that catches every Exception around a layer (as some model code does)."""

    def __init__(self):
        super().__init__()
        self.b1, self.b2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        try:
            if x.shape[0] == 1:
                raise ValueError("this batch fails before b1")
            x = self.b1(x)
        except Exception:  # noqa: BLE001
            pass
        return self.b2(x)


def test_a_forward_that_swallows_exceptions_cannot_hang_the_lockstep():
    with pytest.raises(NormswapError, match="different paths"):
        normswap.recalibrate(Swallowing(), [torch.randn(4, 3, 5, 5), torch.randn(1, 3, 5, 5)])


def test_half_precision_statistics_do_not_overflow():
    from normswap.passes.moments import chunk_moments

    m = chunk_moments(torch.randn(32, 4, 56, 56).half() * 4)
    assert torch.isfinite(m.m2).all() and abs(m.variance.mean().item() - 16) < 1
