"""Colab without a git URL: a wheel built from this checkout, found and installed by the notebook's setup
cell (its code, read from S8_Assignment.ipynb) in a fresh environment that cannot see the checkout."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

from conftest import REPO


def _setup_cell() -> str:
    nb = nbformat.read(REPO / "S8_Assignment.ipynb", as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code" and "WHEEL_PLACES = " in c.source)


def _cell_functions() -> dict:
    """The setup cell's imports and functions alone (nothing installed, nothing raised)."""
    tree = ast.parse(_setup_cell())
    tree.body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
    scope: dict = {}
    exec(compile(tree, "setup cell", "exec"), scope)
    return scope


def _touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_the_setup_cell_picks_the_highest_version_then_the_newest_file(tmp_path):
    cell = _cell_functions()
    content, drive = tmp_path / "content", tmp_path / "drive"
    _touch(content / "eva_api-0.9.3-py3-none-any.whl", 3000)
    high = _touch(drive / "eva_api-0.10.0-py3-none-any.whl", 1000)  # 0.10 > 0.9 (not as strings)
    _touch(content / "eva_api-0.10.0-py3-none-any.whl", 500)  # same version, older file
    _touch(content / "other-9.0-py3-none-any.whl", 9000)
    places = [str(tmp_path / "missing"), "", str(content), str(drive)]
    assert cell["find_wheel"](places) == str(high)
    newer = _touch(content / "eva_api-0.10.0-py3-none-any (1).whl", 2000)  # uploaded again, renamed by the browser
    assert cell["find_wheel"](places) == str(newer)
    assert cell["find_wheel"]([str(newer)]) == str(newer)  # EVA_API_WHEEL may name the file itself
    assert cell["find_wheel"]([str(tmp_path / "missing")]) is None
    copy = Path(cell["pip_readable"](str(newer)))
    assert copy.name == "eva_api-0.10.0-py3-none-any.whl" and copy.is_file()
    assert cell["pip_readable"](str(high)) == str(high)


def _fresh_venv(root: Path) -> tuple[Path, Path]:
    """A venv without eva_api. torch & co. are this venv's, linked (nothing downloaded or reinstalled); the
    checkout's eva_api (editable hook, metadata, any copy) is left out. `venv --system-site-packages` would
    not do: the system site is the base interpreter's, without torch."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(("eva_api", "eva-api", "__editable__", "__pycache__")):
            (site / entry.name).symlink_to(entry)
    return python, site


def _build_wheel(tmp_path: Path) -> Path:
    """`python -m pip wheel --no-deps -w dist .` on a copy of the checkout (the build writes build/ and
    *.egg-info next to the sources); offline, hence --no-build-isolation (setuptools from this venv)."""
    src = tmp_path / "checkout"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "eva_api", src / "eva_api", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), "."], cwd=src, check=True, env=_env())
    (wheel,) = (tmp_path / "dist").glob("eva_api-*.whl")
    return wheel


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "EVA_API_WHEEL", "EVA_API_REPO_URL", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", **extra)
    return env


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="venv layout (bin/python) and symlinks")
def test_the_setup_cell_installs_a_freshly_built_wheel_into_a_clean_venv(tmp_path):
    python, site = _fresh_venv(tmp_path / "venv")
    content = tmp_path / "content"  # the Colab session's folder: the cell's "."
    content.mkdir()
    script = tmp_path / "setup_cell.py"
    script.write_text(_setup_cell() + "\n\nimport eva_api\nprint('imported', eva_api.__file__)\n")
    run = dict(cwd=content, capture_output=True, text=True, timeout=300)

    # nothing uploaded, no git URL: one line with the three ways, nothing installed
    nothing = subprocess.run([python, script], env=_env(), **run)
    assert nothing.returncode == 1
    last = nothing.stderr.strip().splitlines()[-1]
    assert last.startswith("SetupError: eva_api is not installed"), nothing.stderr
    assert "pip wheel --no-deps -w dist ." in last and "REPO_URL" in last and "pip install -e ." in last
    assert not list(site.glob("eva_api*"))

    # the wheel uploaded to the session's folder; an older one on "Drive" (EVA_API_WHEEL), newer as a file
    wheel = shutil.copy(_build_wheel(tmp_path), content)
    drive = tmp_path / "drive"
    drive.mkdir()
    (drive / "eva_api-0.1.0-py3-none-any.whl").write_bytes(b"not a wheel: installing it fails")
    done = subprocess.run([python, script], env=_env(EVA_API_WHEEL=str(drive)), **run)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"installed eva_api from {content / Path(wheel).name}" in done.stdout
    assert f"imported {site / 'eva_api' / '__init__.py'}" in done.stdout  # importable in the same process

    # a new process, elsewhere: eva_api is the wheel's copy in the venv, torch still the linked one
    check = subprocess.run([python, "-c", "import eva_api, importlib.metadata as m, json; print(eva_api.__file__); "
                            "print(json.loads(m.distribution('eva_api').read_text('direct_url.json'))['url']); "
                            "print(eva_api.count_parameters(eva_api.ResNet18()))"],
                           env=_env(), **{**run, "cwd": tmp_path})
    assert check.returncode == 0, check.stderr
    file, url, params = check.stdout.split()
    assert file == str(site / "eva_api" / "__init__.py")
    assert url == Path(wheel).resolve().as_uri()
    assert params == "11173962"
    assert (site / "torch").is_symlink()  # --no-deps: torch untouched

    # already importable: the cell does nothing
    again = subprocess.run([python, script], env=_env(), **run)
    assert again.returncode == 0 and "installed" not in again.stdout, again.stderr
