"""No top-level folder of the repository shadows an installed module of the same name when the
repository root is first on ``sys.path`` (``python -m`` and ``python -c`` from a clone, pytest,
Ray workers): kernels/toplevel.py, docs/design.md "Layout".

Fake distributions named like the folders are installed into a temporary site folder, then
subprocesses whose working directory and ``sys.path[0]`` are the repository root import them.
Before the guard, each of these imports returned the repository's folder instead (and
transformers 5.2x, which imports Hugging Face's ``kernels``, failed from the root)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "engine", "bindings", "bench")
FROM_ROOT = f"""
import os, sys
assert os.path.realpath(sys.path[0] or os.curdir) == {str(ROOT)!r}, sys.path[0]
"""


def run_from_root(code_or_args, env=None, timeout=120):
    args = ["-c", FROM_ROOT + code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def fake_site(tmp_path):
    """A site folder holding a fake distribution (package and dist-info) per folder name."""
    for name in FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"FAKE = {name!r}\n")
        info = tmp_path / f"{name}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    return tmp_path


def test_installed_modules_win_over_the_repository_folders(fake_site):
    code = "\n".join(f"import {name}; assert {name}.FAKE == {name!r}, {name}.__file__" for name in FOLDERS)
    run = run_from_root(code + "\nimport forvalue.kernels, forvalue.engine\n"
                        "assert forvalue.engine.Valuator and forvalue.kernels.reference_score\n",
                        env={"PYTHONPATH": str(fake_site)})
    assert run.returncode == 0, run.stderr


def test_a_folder_name_without_an_installed_module_is_not_found():
    run = run_from_root("import engine")
    assert run.returncode != 0
    assert "ModuleNotFoundError: No module named 'engine'" in run.stderr


def test_transformers_and_the_cli_work_from_the_root():
    """Hugging Face's ``kernels`` (in the test extra) is what transformers 5.2x imports."""
    run = run_from_root("import kernels, transformers.modeling_utils\n"
                        "assert 'site-packages' in kernels.__file__ or 'dist-packages' in kernels.__file__, "
                        "kernels.__file__\n")
    assert run.returncode == 0, run.stderr
    run = run_from_root(["-m", "forvalue.bindings.cli", "--help"])
    assert run.returncode == 0 and "score" in run.stdout, run.stderr


@pytest.mark.slow
def test_pytest_collects_from_the_root():
    run = run_from_root(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "error" not in run.stdout.splitlines()[-1].lower(), run.stdout[-3000:]


@pytest.mark.slow
def test_a_wheel_holds_every_module_and_imports_from_the_root(tmp_path):
    """A non-editable install: the wheel built from the repository has every source module
    under ``forvalue/``, and imports from it while the root is first on ``sys.path``."""
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the repository
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("forvalue-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if name.endswith(".py")}
    sources = {f"forvalue/{path.relative_to(ROOT).as_posix()}" for folder in FOLDERS
               for path in (ROOT / folder).rglob("*.py") if "__pycache__" not in path.parts}
    experiments = {name for name in sources if "/experiments/" in name}  # scripts, not installed
    assert experiments and sources - experiments - packaged == set()
    assert not experiments & packaged
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    run = run_from_root(f"site = {str(tmp_path / 'site')!r}\n"
                        "import forvalue.bindings.cli, forvalue.engine, forvalue.kernels, kernels\n"
                        "assert forvalue.engine.__file__.startswith(site), forvalue.engine.__file__\n"
                        "assert forvalue.kernels.reference_score and forvalue.engine.Valuator\n"
                        "assert not kernels.__file__.startswith(site)\n",
                        env={"PYTHONPATH": str(tmp_path / "site")})
    assert run.returncode == 0, run.stderr
