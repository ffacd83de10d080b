"""--device on every command that runs a model; the API works where the model is.

The CUDA tests need a GPU and skip without one (``-m cuda`` selects them).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import normswap
from normswap.cli import main
from normswap.devices import device_named, to_device
from normswap.errors import InputSpecError
from normswap.testing import randomize_bn

from models import ConvBN

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SIZE = ["--input-size", "2,3,16,16"]


def convbn(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(ConvBN(), (2, 3, 16, 16), seed=seed).eval()


def _commands(tmp_path):
    sd = tmp_path / "sd.pt"
    torch.save(convbn().state_dict(), sd)
    batches = tmp_path / "batches.pt"
    torch.save([torch.randn(4, 3, 16, 16) for _ in range(3)], batches)
    model = [str(sd), "--arch", "models:ConvBN"]
    return {
        "fold": ["fold", *model, *SIZE, "-o", str(tmp_path / "out.safetensors")],
        "apply": ["apply", "bn_to_gn", *model, *SIZE, "-o", str(tmp_path / "out.safetensors")],
        "bake": ["bake", *model, *SIZE, "-o", str(tmp_path / "out.safetensors")],
        "recalibrate": ["recalibrate", *model, "--tensors", str(batches), "-o", str(tmp_path / "out.safetensors")],
        "inspect": ["inspect", *model, *SIZE],
        "check": ["check", str(sd), str(sd), "--arch", "models:ConvBN", *SIZE],
    }


@pytest.mark.parametrize("command", ["fold", "apply", "bake", "recalibrate", "inspect", "check"])
def test_cuda_asked_for_where_there_is_none_is_exit_2_before_loading(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = _commands(tmp_path)[command]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available here" in err and "fix: use --device cpu" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("command", ["fold", "apply", "recalibrate", "inspect", "check"])
def test_device_cpu_is_accepted_by_every_command_that_runs_the_model(tmp_path, capsys, command):
    argv = _commands(tmp_path)[command]
    assert main([*argv, "--device", "cpu"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("text, needle", [
    ("tpu", "is not a device"),
    ("mps", "normswap runs models on cpu or cuda"),
    ("gpu!", "is not a device"),
    ("meta", "normswap runs models on cpu or cuda"),
])
def test_device_that_is_not_cpu_or_cuda_is_exit_2(tmp_path, capsys, text, needle):
    assert main([*_commands(tmp_path)["fold"], "--device", text]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cuda_index_beyond_the_devices_names_the_ones_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputSpecError) as e:
        device_named("cuda:5")
    assert "this machine has 2 CUDA device(s), cuda:0 to cuda:1" in str(e.value)
    assert device_named("cuda:1") == torch.device("cuda", 1)


def test_inputs_follow_the_model_not_the_other_way(tmp_path):
    """to_device moves every tensor of a nested batch and leaves the rest; the API keeps the model's device."""
    meta = torch.device("meta")
    moved = to_device((torch.ones(2), {"mask": torch.ones(1, dtype=torch.bool), "n": 3}, [torch.zeros(1)]), meta)
    assert moved[0].device == meta and moved[1]["mask"].device == meta and moved[2][0].device == meta
    assert moved[1]["n"] == 3 and moved[1]["mask"].dtype == torch.bool
    model = convbn()
    folded = normswap.fold(model)
    assert all(p.device.type == "cpu" for p in folded.parameters())


# ------------------------------------------------------------------ on a GPU

@cuda
@pytest.mark.cuda
def test_fold_on_cuda_stays_there_and_matches_the_cpu_fold():
    cpu = normswap.fold(convbn())
    gpu = normswap.fold(convbn().cuda())
    assert all(p.is_cuda for p in gpu.parameters())
    for (name, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        assert torch.allclose(a, b.cpu(), rtol=1e-6, atol=1e-7), name
    x = torch.randn(2, 3, 16, 16)
    ref = convbn()(x).double()
    assert ((gpu(x.cuda()).double().cpu() - ref).abs().max() / ref.abs().max()).item() < 1e-5


@cuda
@pytest.mark.cuda
def test_float64_check_runs_on_cuda_with_cpu_inputs():
    model = convbn().cuda()
    broken = convbn().cuda()
    with torch.no_grad():
        broken.bn2.running_mean += 0.5
    inputs = [torch.randn(2, 3, 16, 16)]  # on the CPU: the check brings them to the model
    assert normswap.check(model, normswap.fold(model), inputs).ok
    result = normswap.check(model, broken, inputs)
    assert not result.ok and result.dtype == "float64"


@cuda
@pytest.mark.cuda
def test_calibration_and_recalibration_take_cpu_batches_on_a_cuda_model():
    batches = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    cpu_gn, cpu_report = normswap.apply(convbn(), "bn_to_gn", calibration=batches, return_report=True, num_groups=4)
    gpu_gn, gpu_report = normswap.apply(convbn().cuda(), "bn_to_gn", calibration=batches, return_report=True,
                                        num_groups=4)
    assert gpu_gn.bn1.weight.is_cuda
    assert torch.allclose(gpu_gn.bn1.weight.cpu(), cpu_gn.bn1.weight, rtol=1e-4, atol=1e-5)
    cpu_re = normswap.recalibrate(convbn(), batches)
    gpu_re = normswap.recalibrate(convbn().cuda(), batches)
    assert torch.allclose(gpu_re.bn2.running_var.cpu(), cpu_re.bn2.running_var, rtol=1e-5)


@cuda
@pytest.mark.cuda
def test_cli_fold_on_cuda_writes_a_file_that_loads_on_the_cpu(tmp_path, capsys):
    argv = _commands(tmp_path)["fold"]
    assert main([*argv, "--device", "cuda", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any(n.startswith("ran on cuda") for n in report["notes"])
    assert all(t.device.type == "cpu" for t in load_file(tmp_path / "out.safetensors").values())
    assert report["check"]["ok"]
