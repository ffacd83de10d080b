"""The examples run (shortened); their figures are for reading, not asserting, except what they claim."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def test_small_batch_writes_a_plot(tmp_path, capsys):
    import small_batch

    threads = torch.get_num_threads()
    try:
        assert small_batch.main(["--steps", "20", "--out", str(tmp_path / "curve.png")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "GroupNorm (bn_to_gn)" in out
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_style_transfer_instance_norm_ignores_batch_mates(capsys):
    import style_transfer

    assert style_transfer.main() == 0
    out = capsys.readouterr().out
    assert "InstanceNorm: the first image's output moves by 0 when" in out
    assert "11 BatchNorm2d -> InstanceNorm2d" in out


def test_sn_discriminator_singular_values_end_near_one(capsys):
    import sn_discriminator

    assert sn_discriminator.main(["--steps", "30"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in ("conv1", "conv2", "fc")]
    assert [r[0] for r in rows] == ["conv1", "conv2", "fc"]
    assert all(abs(float(r[2]) - 1) < 0.1 for r in rows), out
    assert "discriminator.bn2 Identity" in out


def test_domain_shift_recalibration_recovers_accuracy(capsys):
    import domain_shift

    assert domain_shift.main(["--epochs", "6"]) == 0
    out = capsys.readouterr().out
    figures = {line.split(":")[0].strip(): float(line.split()[-1]) for line in out.splitlines()
               if line.startswith(("source", "shifted"))}
    before, after = figures["shifted domain, before recalibration"], figures["shifted domain, after recalibration"]
    assert figures["source domain, test accuracy"] > 0.9
    assert after > before + 0.3 and after > 0.8, out


def test_calibrated_swap_starts_where_the_original_was(tmp_path, capsys):
    import calibrated_swap

    assert calibrated_swap.main(["--steps", "20", "--every", "10", "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    start = {line.split(",")[1].split(":")[0].strip(): float(line.split("test accuracy ")[1].split()[0])
             for line in out.splitlines() if line.startswith("GroupNorm, ")}
    assert start["calibrated"] > start["uncalibrated"] + 0.05, out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_quickstart_the_demo_prints_80_columns(capsys):
    import quickstart

    assert quickstart.main() == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "bn_to_gn on ResNet: swapped 20 BatchNorm2d → GroupNorm"
    assert "interface check: passed: outputs and gradients" in out
    assert all(len(line) <= 80 and line == line.rstrip() for line in out)


def test_rotation_invariance_holds_after_the_fold_and_only_after_it(capsys):
    import rotation_invariance

    assert rotation_invariance.main([]) == 0
    out = capsys.readouterr().out
    figures = {}
    for line in out.splitlines():
        words = line.split()
        if words[:1] in (["llama"], ["gpt2"]):
            figures[(words[0], " ".join(words[1:-3]))] = float(words[-1])
    for model in ("llama", "gpt2"):
        assert figures[(model, "rotated folded vs folded")] < 1e-12
        assert figures[(model, "folded vs original")] < 1e-6
        assert figures[(model, "rotated original vs original (no fold)")] > 1e-2
