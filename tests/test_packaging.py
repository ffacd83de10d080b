"""The wheel holds every package and reads its version without importing normswap (or torch)."""
import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import setuptools

import normswap

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def test_wheel_lists_every_package():
    """A subpackage missing from [tool.setuptools] packages passes `make test` but is absent from the wheel."""
    listed = SETUPTOOLS["packages"]
    assert len(listed) == len(set(listed))
    found = setuptools.find_packages(where=str(ROOT), include=["normswap*"])
    assert SETUPTOOLS["package-dir"] == {"normswap.recipes": "recipes"}
    assert (ROOT / "recipes" / "__init__.py").is_file()
    assert setuptools.find_packages(where=str(ROOT / "recipes")) == []  # recipes/ has no subpackages to list
    assert sorted(listed) == sorted(found + ["normswap.recipes"])


def test_every_source_folder_is_a_package():
    """find_packages only sees folders with an __init__.py; a folder of modules without one would be left out."""
    for folder in (ROOT / "normswap", ROOT / "recipes"):
        for path, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if any(f.endswith(".py") for f in files):
                assert "__init__.py" in files, path


def test_version_is_a_literal_read_without_imports():
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert SETUPTOOLS["dynamic"]["version"] == {"attr": "normswap._version.__version__"}
    tree = ast.parse((ROOT / "normswap" / "_version.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assigned = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))]
    assert len(assigned) == 1
    (node,) = assigned
    assert isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"]
    assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    assert node.value.value == normswap.__version__


BUILD_METADATA = """
import sys
sys.modules["torch"] = None  # importing torch (or normswap, which needs it) now fails
from setuptools import build_meta
print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))
"""


def test_wheel_metadata_builds_without_torch(tmp_path):
    """What pip runs first: the metadata, version included, from a copy of the source tree, torch unimportable."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("normswap", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", BUILD_METADATA, str(out)], cwd=src, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_info = out / proc.stdout.strip().splitlines()[-1]
    metadata = (dist_info / "METADATA").read_text().splitlines()
    assert "Name: normswap" in metadata
    assert f"Version: {normswap.__version__}" in metadata
