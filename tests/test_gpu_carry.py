"""The GPU procedure's carry step: a wheel cut into verified parts and put back together."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_carry.py"


def carry(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, check=False)


@pytest.fixture
def parts(tmp_path):
    """A small wheel-shaped zip cut into parts of 2 KiB (the real ones are 50 MiB)."""
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "VALUE = 42\n" + "# padding\n" * 600)
        archive.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\nVersion: 1.0\n")
    wheel.write_bytes(wheel.read_bytes() + bytes(range(256)) * 8)  # not compressible filler after the zip
    result = carry("split", wheel, tmp_path / "parts", "--part-mib", 2 / 1024)
    assert result.returncode == 0, result.stderr
    return wheel, tmp_path / "parts"


def test_split_join_install_round_trip(parts, tmp_path) -> None:
    wheel, parts_dir = parts
    manifest = json.loads((parts_dir / "gpu-wheel.json").read_text())
    assert manifest["wheel"] == wheel.name and len(manifest["parts"]) == -(-wheel.stat().st_size // 2048) > 1
    assert all(p["name"].startswith(manifest["sha256"][:16]) for p in manifest["parts"])
    result = carry("join", parts_dir, tmp_path / "work", "--install", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "work" / wheel.name).read_bytes() == wheel.read_bytes()
    assert (tmp_path / "site" / "pkg" / "__init__.py").read_text().startswith("VALUE = 42")


def test_missing_part_is_named(parts, tmp_path) -> None:
    _, parts_dir = parts
    missing = sorted(parts_dir.glob("*.part-*"))[2]
    missing.unlink()
    result = carry("join", parts_dir, tmp_path / "work")
    assert result.returncode != 0 and f"{missing.name}: part missing" in result.stderr
    assert not (tmp_path / "work").exists()


def test_corrupt_part_is_named(parts, tmp_path) -> None:
    _, parts_dir = parts
    bad = sorted(parts_dir.glob("*.part-*"))[1]
    data = bytearray(bad.read_bytes())
    data[10] ^= 0xFF
    bad.write_bytes(bytes(data))
    result = carry("join", parts_dir, tmp_path / "work")
    assert result.returncode != 0 and f"{bad.name}: size or sha256 differs" in result.stderr


def test_a_new_wheel_replaces_the_old_parts(parts, tmp_path) -> None:
    wheel, parts_dir = parts
    old = {p.name for p in parts_dir.glob("*.part-*")}
    wheel.write_bytes(wheel.read_bytes() + b"newer")
    assert carry("split", wheel, parts_dir, "--part-mib", 2 / 1024).returncode == 0
    new = {p.name for p in parts_dir.glob("*.part-*")}
    assert new and not (new & old)
