"""README.md's "Command line" block, line by line, so it cannot rot: every line runs in a test, in README
order and in one folder, against offline caches, as tests/readme_commands.yaml says (a small model for a
large one, elided arguments filled in), with its exit code, key output and written files asserted."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import yaml

from normswap.cli import main
from normswap.testing import randomize_bn

from hub_cache import hub_repo, known_weights, offline_hub, torch_home_checkpoints

ROOT = Path(__file__).resolve().parent.parent
TABLE = Path(__file__).with_name("readme_commands.yaml")
FIXTURES = Path(__file__).with_name("fixtures") / "readme"
FIELDS = {"readme", "run", "exit", "stdout", "stderr", "files", "json", "without_cuda", "covered_by"}
OUTCOME = ("exit", "stdout", "stderr", "files", "json")


def readme_lines() -> list[str]:
    """The command part of each line of the ```sh block right under "## Command line" (comments cut off)."""
    section = (ROOT / "README.md").read_text().split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [re.split(r"\s+#(?:\s|$)", line, maxsplit=1)[0].strip() for line in block.splitlines() if line.strip()]


LINES = readme_lines()
ENTRIES = yaml.safe_load(TABLE.read_text())
BY_LINE = {entry.get("readme"): entry for entry in ENTRIES}


def how_to_add(line: str) -> str:
    return (f"README line without an entry in {TABLE.relative_to(ROOT)}:\n  {line}\nadd one:\n"
            f"- readme: {line}\n  run: {line}   # a small model for a large one, elided arguments filled in\n"
            "  exit: 0\n  stdout: [key output a user would check]\n  files: [what it writes]")


def test_the_block_is_found_and_every_line_is_a_command():
    """The parser reads the block the README shows, not an empty or neighbouring one."""
    assert len(LINES) >= 15 and LINES[0].startswith("normswap ")
    assert LINES[-1] == "normswap schema > recipe.schema.json"
    assert all(line.split()[0] in ("normswap", "torchrun") for line in LINES), LINES


def test_every_table_entry_is_a_readme_line_and_well_formed():
    """An entry whose line left the README is stale; a mistyped field would silently check nothing."""
    keys = [entry.get("readme") for entry in ENTRIES]
    stale = [key for key in keys if key not in LINES]
    assert not stale, (f"entries in {TABLE.name} whose line is no longer in README.md's Command line block "
                       "(update the readme: field to the new line, or remove the entry):\n  "
                       + "\n  ".join(map(str, stale)))
    assert len(set(keys)) == len(keys), f"two entries for one line: {sorted({k for k in keys if keys.count(k) > 1})}"
    for entry in ENTRIES:
        line = entry["readme"]
        assert set(entry) <= FIELDS, f"{line}: unknown fields {sorted(set(entry) - FIELDS)}"
        if "covered_by" in entry:
            assert line.startswith("torchrun ") and set(entry) == {"readme", "covered_by"}, \
                f"{line}: covered_by is only for torchrun lines, and replaces run/exit/..."
            continue
        assert "run" in entry and "exit" in entry, f"{line}: needs run and exit"
        readme, run = shlex.split(line), shlex.split(entry["run"])
        assert run[:2] == readme[:2], f"{line}: runs {run[:2]}, not the README's {readme[:2]}"
        unbracketed = re.sub(r"\[[^\]]*\]", "", line)
        missing = [t for t in shlex.split(unbracketed) if t.startswith("-") and t not in run]
        assert not missing, f"{line}: the run leaves out the README's {missing}"


def assert_covered(entry: dict) -> None:
    """A covered_by reference names a test function that exists and runs the line: its argv list holds the
    line's words after the program, up to the `...`, in order."""
    path, _, name = entry["covered_by"].partition("::")
    tree = ast.parse((ROOT / path).read_text())
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"{entry['readme']}: {entry['covered_by']} names no test function"
    program, *words = shlex.split(entry["readme"].partition("...")[0])
    argvs = [[e.value if isinstance(e, ast.Constant) else None for e in n.elts]
             for n in ast.walk(found[0]) if isinstance(n, ast.List)]
    runs = any(argv[i:i + len(words)] == words for argv in argvs for i in range(len(argv)))
    names = {n.value for n in ast.walk(found[0]) if isinstance(n, ast.Constant)}
    assert runs and program in names, f"{entry['covered_by']} does not run {entry['readme']!r}"


# ------------------------------------------------------------------ the folder the block assumes


def _gan_module():
    """tests/fixtures/readme/my_gan.py under a private name: sys.modules["my_gan"] stays for the CLI's import."""
    spec = importlib.util.spec_from_file_location("readme_fixture_my_gan", FIXTURES / "my_gan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _caches(hub: Path, torch_home: Path) -> dict:
    """The pretrained weights the substituted specs load, with known weights: timm's through the hub cache
    (resnet18's with the config.json an hf-hub: spec reads), torchvision's through TORCH_HOME. Returns
    resnet10t's, which the block's checkpoints hold too."""
    r10 = known_weights("resnet10t")
    hub_repo(hub, "timm/resnet10t.c3_in1k", r10, None)
    cfg = timm.models.get_pretrained_cfg("resnet18.a1_in1k").to_dict()
    hub_repo(hub, "timm/resnet18.a1_in1k", known_weights("resnet18"),
             {"architecture": "resnet18", "num_classes": 1000, "num_features": 512, "pretrained_cfg": cfg})
    hub_repo(hub, "timm/convnext_atto.d2_in1k", known_weights("convnext_atto"), None)
    torch.manual_seed(3)
    tv = randomize_bn(torchvision.models.resnet18(), (2, 3, 64, 64))
    torch_home_checkpoints(torch_home, [torchvision.models.ResNet18_Weights.IMAGENET1K_V1], tv.state_dict())
    return r10


def _files(here: Path, weights: dict) -> None:
    """The inputs the block's lines name, in the folder they run in; ``weights`` are timm resnet10t's."""
    torch.save(weights, here / "ckpt.pth")
    torch.save(weights, here / "a.pth")
    off = {**weights, "layer3.0.bn2.running_mean": weights["layer3.0.bn2.running_mean"] + 1}
    torch.save(off, here / "b.pth")
    model = timm.create_model("resnet10t")
    model.load_state_dict(weights)
    torch.save(model, here / "model.pt")
    for name in ("my_recipe.yaml", "my_gan.py"):
        shutil.copy(FIXTURES / name, here / name)
    gan = _gan_module()
    torch.manual_seed(0)
    torch.save(randomize_bn(gan.GAN(), (8, 16)).state_dict(), here / "gan.pth")
    old = gan.Discriminator()
    for name in ("conv1", "conv2", "fc"):
        setattr(old, name, torch.nn.utils.spectral_norm(getattr(old, name)))
    with torch.no_grad():
        old(torch.randn(4, 1, 8, 8))  # a power iteration moves u and v off their initial values
    torch.save(old.state_dict(), here / "old_sn.pth")
    from PIL import Image

    (here / "new_camera").mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(here / "new_camera" / f"{i}.png")


@dataclass
class Ran:
    code: int | str
    out: str
    err: str
    written: list[str]


@dataclass
class Block:
    """Runs the block's lines in README order, each once: a line's test first runs the lines before it, so
    `-k` on one line still finds what the earlier lines write."""
    here: Path
    done: dict[int, Ran] = field(default_factory=dict)

    def run(self, index: int, capsys) -> Ran:
        for i in range(index + 1):
            if i not in self.done:
                self.done[i] = self._run(BY_LINE.get(LINES[i]), capsys)
        return self.done[index]

    def _state(self) -> dict:
        return {p.name: (p.stat().st_mtime_ns, p.stat().st_size, p.stat().st_ino)
                for p in self.here.iterdir() if p.is_file()}

    def _run(self, entry: dict | None, capsys) -> Ran:
        if entry is None or "run" not in entry:
            return Ran("not run", "", "", [])
        words = shlex.split(entry["run"])
        redirect = words.index(">") if ">" in words else None
        argv = words[1:redirect]
        before = self._state()
        capsys.readouterr()
        try:
            code = main(argv)
        except Exception:
            code = "raised"
            print(traceback.format_exc(), file=sys.stderr)
        out, err = capsys.readouterr()
        if redirect is not None:
            (self.here / words[redirect + 1]).write_text(out)  # what the shell's `> FILE` does
        after = self._state()
        return Ran(code, out, err, sorted(name for name in after if before.get(name) != after[name]))


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    """One folder for the whole block, the cwd while it runs; HF_HOME (offline) and TORCH_HOME beside it."""
    base = tmp_path_factory.mktemp("readme")
    here = base / "cwd"
    here.mkdir()
    saved = sys.modules.pop("my_gan", None)  # the block's my_gan.py, not one another test imported
    with pytest.MonkeyPatch.context() as mp:
        hub = offline_hub(base / "hf", mp)
        mp.setenv("TORCH_HOME", str(base / "torch"))
        _files(here, _caches(hub, base / "torch"))
        mp.chdir(here)
        try:
            yield Block(here)
        finally:
            sys.modules.pop("my_gan", None)
            if saved is not None:
                sys.modules["my_gan"] = saved


def expected(entry: dict) -> dict:
    source = entry["without_cuda"] if "without_cuda" in entry and not torch.cuda.is_available() else entry
    return {key: source.get(key, [] if key != "json" else {}) for key in OUTCOME}


def one_space(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("index", range(len(LINES)), ids=LINES)
def test_readme_line(index, request, capsys):
    """One README line: the exit code, key output and files written that its table entry names."""
    line = LINES[index]
    entry = BY_LINE.get(line)
    assert entry is not None, how_to_add(line)
    if "covered_by" in entry:  # torchrun's start-up costs ~20 s a run; the test named runs the same command
        assert_covered(entry)
        return
    block = request.getfixturevalue("block")  # built once, on the first line that runs
    ran = block.run(index, capsys)
    want = expected(entry)
    shown = (f"README line:\n  {line}\nran as:\n  {entry['run']}\nexit {ran.code}\n--- stdout\n{ran.out[-4000:]}"
             f"\n--- stderr\n{ran.err[-4000:]}")
    assert ran.code == want["exit"], f"exit {ran.code}, expected {want['exit']}\n{shown}"
    for stream, text in (("stdout", ran.out), ("stderr", ran.err)):
        missing = [s for s in want[stream] if one_space(s) not in one_space(text)]
        assert not missing, f"{stream} lacks {missing}\n{shown}"
    assert ran.written == sorted(want["files"]), f"wrote {ran.written}, expected {sorted(want['files'])}\n{shown}"
    for name, keys in want["json"].items():
        data = json.loads((block.here / name).read_text())
        assert isinstance(data, dict) and set(keys) <= set(data), f"{name} lacks {set(keys) - set(data)}\n{shown}"
