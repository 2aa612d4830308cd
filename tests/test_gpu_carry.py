"""The GPU procedure's carry step: packages packed, cut into verified parts sized to the tree,
and put back together."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
import zipfile

import pytest
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_carry.py"


def carry(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, check=False)


def load_carry():
    spec = importlib.util.spec_from_file_location("gpu_carry", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def archive(tmp_path):
    """A wheel and a plain file packed as gpu_wheel.sh packs onnxruntime-gpu and the official files."""
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "VALUE = 42\n" + "# padding\n" * 600)
        archive.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\nVersion: 1.0\n")
    (tmp_path / "modeling.py").write_text("OFFICIAL = True\n")
    packed = tmp_path / "packages.tar.xz"
    result = carry("pack", packed, f"site={wheel}", f"official={tmp_path / 'modeling.py'}")
    assert result.returncode == 0, result.stderr
    # not compressible filler after the archive (tar ignores it), so that there are several parts
    packed.write_bytes(packed.read_bytes() + bytes(range(256)) * 8)
    return packed


@pytest.fixture
def parts(archive, tmp_path):
    """The archive cut into parts of 1 KiB (the real ones are sized to the tree, ~50 MiB)."""
    result = carry("split", archive, tmp_path / "parts", "--part-mib", 1 / 1024)
    assert result.returncode == 0, result.stderr
    return archive, tmp_path / "parts"


def test_pack_unpacks_wheels_and_keeps_files(archive) -> None:
    with tarfile.open(archive, mode="r:xz") as tar:
        names = set(tar.getnames())
    assert names == {"site/pkg/__init__.py", "site/pkg-1.0.dist-info/METADATA", "official/modeling.py"}


def test_split_join_unpack_round_trip(parts, tmp_path) -> None:
    archive, parts_dir = parts
    manifest = json.loads((parts_dir / "gpu-carry.json").read_text())
    assert manifest["file"] == archive.name and len(manifest["parts"]) == -(-archive.stat().st_size // 1024) > 1
    assert all(p["name"].startswith(manifest["sha256"][:16]) for p in manifest["parts"])
    status = carry("status", parts_dir)
    assert f"{len(manifest['parts'])} of {len(manifest['parts'])} parts" in status.stdout
    result = carry("join", parts_dir, tmp_path / "work", "--unpack", tmp_path / "packages")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "work" / archive.name).read_bytes() == archive.read_bytes()
    assert (tmp_path / "packages" / "site" / "pkg" / "__init__.py").read_text().startswith("VALUE = 42")
    assert (tmp_path / "packages" / "official" / "modeling.py").read_text() == "OFFICIAL = True\n"


def test_missing_part_is_named(parts, tmp_path) -> None:
    _, parts_dir = parts
    missing = sorted(parts_dir.glob("*.part-*"))[2]
    missing.unlink()
    assert f"{missing.name}: part missing" in carry("status", parts_dir).stdout
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


def test_a_new_archive_replaces_the_old_parts(parts) -> None:
    archive, parts_dir = parts
    old = {p.name for p in parts_dir.glob("*.part-*")}
    archive.write_bytes(archive.read_bytes() + b"newer")
    assert carry("split", archive, parts_dir, "--part-mib", 1 / 1024).returncode == 0
    new = {p.name for p in parts_dir.glob("*.part-*")}
    assert new and not (new & old)


def test_parts_fit_beside_the_tree() -> None:
    """The part size follows from the tree: tree + part + manifest stays within one 64 MiB call,
    with as few parts as that allows (here: 200 MiB beside a 4.4 MiB tree goes in 4, not 5)."""
    gpu_carry = load_carry()
    mib = 1 << 20
    for size, tree, count in [(200 * mib, int(4.4 * mib), 4), (257 * mib, int(4.4 * mib), 5), (mib, 0, 1)]:
        parts, part_bytes = gpu_carry.plan_parts(size, tree)
        assert parts == count and parts * part_bytes >= size
        assert tree + part_bytes + gpu_carry.MANIFEST_ROOM + gpu_carry.MARGIN <= 64 * mib
    with pytest.raises(SystemExit, match="leaves no room"):
        gpu_carry.plan_parts(mib, 64 * mib)


def test_tree_counts_what_travels(tmp_path) -> None:
    """Tracked and untracked-not-ignored files count; ignored ones (build/, the parts) do not."""
    gpu_carry = load_carry()
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("build/\n")
    (repo / "tracked.py").write_bytes(b"x" * 1000)
    subprocess.run(["git", "-C", str(repo), "add", "tracked.py", ".gitignore"], check=True)
    (repo / "untracked.py").write_bytes(b"y" * 300)
    (repo / "build").mkdir()
    (repo / "build" / "part").write_bytes(b"z" * 5000)
    assert gpu_carry.tree_bytes(repo) == 1000 + 300 + len("build/\n")
