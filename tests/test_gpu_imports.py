"""scripts/gpu_check.sh imports this package from its private site under a plain interpreter.

The GPU machine's python3 has nothing of this project installed; the check copies the package
(with cli/ as parscale_export.cli) into a private site directory. `python -c`, `python -` and
`python -m` put the working directory first on sys.path, so from the repository root the
checkout's parscale_export/ (no cli/ inside) would shadow that copy. Our own .venv hides this:
its editable install maps parscale_export.cli to cli/. Here a plain interpreter is made from
the .venv's packages without that mapping (a venv whose .pth file lists .venv's site-packages:
.pth files inside that folder, the editable finder's among them, are not run), and the check's
preflight runs under it, then a copy of the check without its safe-path setting, which must fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
from conftest import ROOT

CHECK = ROOT / "scripts" / "gpu_check.sh"
SAFE_PATH = "export PYTHONSAFEPATH=1\n"


@pytest.fixture(scope="module")
def plain_python(tmp_path_factory) -> str:
    """An interpreter with the .venv's packages and without this project installed."""
    root = tmp_path_factory.mktemp("plain")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = str(root / "venv" / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    with open(f"{purelib}/image.pth", "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    probe = "import importlib.util as u; print(u.find_spec('typer') is not None, u.find_spec('parscale_export'))"
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=root, check=True).stdout
    assert found.split() == ["True", "None"], found  # the packages, not the project
    return python


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> str:
    """Parts of a token archive: the .venv's onnxruntime stands in for the carried one."""
    root = tmp_path_factory.mktemp("parts")
    (root / "marker.txt").write_text("carried\n")
    carry = [sys.executable, str(ROOT / "scripts" / "gpu_carry.py")]
    subprocess.run([*carry, "pack", str(root / "p.tar.xz"), f"site={root / 'marker.txt'}"], check=True)
    subprocess.run([*carry, "split", str(root / "p.tar.xz"), str(root / "parts"), "--part-mib", "1"], check=True)
    return str(root / "parts")


def preflight(script, python: str, parts: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "GPU_CHECK"))}
    env.update(PYTHON=python, PROVIDER="cpu", PARTS=parts, WORK=str(tmp_path / "work"), OUT=str(tmp_path / "out"),
               STEPS="preflight")  # fmt: skip
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, check=False)


def test_the_check_imports_its_private_copy(plain_python, parts, tmp_path) -> None:
    done = preflight(CHECK, plain_python, parts, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "work" / "packages" / "site"
    assert f"parscale_export and its command line from {site}/parscale_export" in done.stdout
    assert "gpu_check: preflight PASS on cpu" in done.stdout
    assert (tmp_path / "out" / "gpu_check.log").read_text() == done.stdout  # all it prints is kept in $OUT


def test_without_safe_path_the_checkout_shadows_the_copy(plain_python, parts, tmp_path) -> None:
    """The same check less its PYTHONSAFEPATH line, run from a copy of the checkout, fails as it
    failed on the GPU machine: so the test above would catch that mistake coming back."""
    checkout = tmp_path / "checkout"
    text = CHECK.read_text()
    assert text.count(SAFE_PATH) == 1
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "scripts" / "gpu_check.sh").write_text(text.replace(SAFE_PATH, ""))
    shutil.copy(ROOT / "scripts" / "gpu_carry.py", checkout / "scripts")
    for package in ("parscale_export", "cli"):
        shutil.copytree(ROOT / package, checkout / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = preflight(checkout / "scripts" / "gpu_check.sh", plain_python, parts, tmp_path)
    assert done.returncode != 0
    assert f"parscale_export comes from {checkout}/parscale_export/__init__.py, not from the private site" in (
        done.stdout + done.stderr
    )
