"""Carry packages to the GPU machine in pieces, and put them back together there, verified.

The GPU machine cannot reach a package registry and takes at most 64 MiB per call, working tree
included, so the packages it lacks (onnxruntime-gpu, ~256 MB, and the official model's
transformers 4.51) travel as one xz-compressed archive cut into parts, one call each. Each part
is named after the archive's digest, so parts of an older archive never mix with a newer one's,
and a small manifest (archive name, size, sha256 of the archive and of every part) travels with
every part.

    python scripts/gpu_carry.py pack ARCHIVE FOLDER=PATH...   # here: wheels unpacked into FOLDER/
    python scripts/gpu_carry.py split ARCHIVE build/gpu-carry --fit-tree .  # parts sized to the tree
    python scripts/gpu_carry.py status build/gpu-carry         # there, after each call: parts so far
    python scripts/gpu_carry.py join build/gpu-carry WORKDIR [--unpack DEST]  # there: the archive

`pack` unpacks each wheel into its folder inside the archive (xz compresses the native libraries
of a wheel a fifth smaller than the wheel's own zip does) and copies other files as they are.
`split --fit-tree REPO` sizes the parts from the tree that travels with each one (tracked and
untracked-not-ignored files, and shared/): tree + part + manifest stays under 64 MiB, with the
parts equal so that the spare room is shared. `join` refuses, naming the part, when a part is
missing, has the wrong size or digest, or when the joined archive's digest differs from the
manifest's; `--unpack DEST` extracts it (emptied first). Standard library only: the GPU
machine's Python has no extra packages to spare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

MANIFEST = "gpu-carry.json"
CHUNK = 1 << 20
CALL_LIMIT = 64 << 20  # what one device call carries, working tree included
MANIFEST_ROOM = 8 << 10  # the manifest's share of a call; a manifest of 40 parts stays under it
MARGIN = 256 << 10  # room for the tree to grow between preparing the parts and making the calls


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def mib(size: int) -> str:
    return f"{size / (1 << 20):.2f} MiB"


def write_tar(sink, items: list[tuple[str, Path]]) -> None:
    """A tar stream of each wheel unpacked under its folder and each other file as it is."""
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for folder, path in items:
            if path.suffix != ".whl":
                tar.add(path, arcname=f"{folder}/{path.name}", recursive=False)
                continue
            with zipfile.ZipFile(path) as wheel:
                for entry in wheel.infolist():
                    if entry.is_dir():
                        continue
                    info = tarfile.TarInfo(f"{folder}/{entry.filename}")
                    info.size = entry.file_size
                    info.mode = 0o755 if entry.external_attr >> 16 & 0o111 else 0o644
                    info.mtime = time.mktime((*entry.date_time, 0, 0, -1))
                    with wheel.open(entry) as member:
                        tar.addfile(info, member)


def pack(archive: Path, items: list[tuple[str, Path]]) -> int:
    """Write `items` into a tar.xz; return its size."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".tmp")
    xz = shutil.which("xz")
    with tmp.open("wb") as raw:
        if xz:  # the xz program compresses on every core; the lzma module on one (minutes longer)
            with subprocess.Popen([xz, "-6", "-T0", "-c"], stdin=subprocess.PIPE, stdout=raw) as compressor:
                write_tar(compressor.stdin, items)
                compressor.stdin.close()
            if compressor.returncode != 0:
                raise SystemExit(f"xz failed ({compressor.returncode}) while writing {archive}")
        else:
            with lzma.open(raw, "wb", preset=6) as sink:
                write_tar(sink, items)
    tmp.replace(archive)
    return archive.stat().st_size


def tree_bytes(repo: Path) -> int:
    """Bytes of the working tree a device call sends: tracked and untracked-not-ignored files,
    and shared/ where the checkout has one (it travels even when ignored)."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    paths = {repo / name for name in listed if name}
    shared = repo / "shared"
    if shared.is_dir():
        paths.update(p for p in shared.rglob("*") if not p.is_dir())
    return sum(p.lstat().st_size for p in paths if p.is_symlink() or p.is_file())


def plan_parts(size: int, tree: int) -> tuple[int, int]:
    """(parts, bytes per part): as few parts as fit beside the tree, cut equal."""
    room = CALL_LIMIT - tree - MANIFEST_ROOM - MARGIN
    if room < CHUNK:
        raise SystemExit(f"the working tree ({mib(tree)}) leaves no room for a part in a 64 MiB call")
    count = -(-size // room)
    return count, -(-size // count)


def split(archive: Path, out_dir: Path, part_bytes: int) -> dict:
    """Write `archive` as parts plus the manifest into `out_dir`; stale parts of others go."""
    out_dir.mkdir(parents=True, exist_ok=True)
    whole = sha256(archive)
    for stale in out_dir.glob("*.part-*"):
        if not stale.name.startswith(whole[:16]):
            stale.unlink()
    size = archive.stat().st_size
    count = max(1, -(-size // part_bytes))
    parts = []
    with archive.open("rb") as f:
        for index in range(count):
            name = f"{whole[:16]}.part-{index:02d}-of-{count:02d}"
            (out_dir / name).write_bytes(f.read(part_bytes))
            parts.append({"name": name, "size": (out_dir / name).stat().st_size, "sha256": sha256(out_dir / name)})
    manifest = {"file": archive.name, "size": size, "sha256": whole, "parts": parts}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(parts_dir: Path) -> dict:
    path = parts_dir / MANIFEST
    if not path.is_file():
        raise SystemExit(f"{path}: missing; carry it with every part (see scripts/gpu_wheel.sh)")
    return json.loads(path.read_text(encoding="utf-8"))


def part_problem(parts_dir: Path, part: dict) -> str | None:
    path = parts_dir / part["name"]
    if not path.is_file():
        have = sorted(p.name for p in parts_dir.glob("*.part-*")) or ["none"]
        return f"{path}: part missing (have: {', '.join(have)}); carry it and run again"
    if path.stat().st_size != part["size"] or sha256(path) != part["sha256"]:
        return f"{path}: size or sha256 differs from {MANIFEST}; carry this part again"
    return None


def join(parts_dir: Path, work_dir: Path) -> Path:
    """Check every part against the manifest, concatenate, check the whole; return the file."""
    manifest = read_manifest(parts_dir)
    for part in manifest["parts"]:
        if problem := part_problem(parts_dir, part):
            raise SystemExit(problem)
    work_dir.mkdir(parents=True, exist_ok=True)
    joined = work_dir / manifest["file"]
    with joined.open("wb") as out:
        for part in manifest["parts"]:
            with (parts_dir / part["name"]).open("rb") as f:
                while block := f.read(CHUNK):
                    out.write(block)
    if sha256(joined) != manifest["sha256"]:
        joined.unlink()
        raise SystemExit(f"{joined}: joined file's sha256 differs from {MANIFEST}")
    return joined


def unpack(archive: Path, dest: Path) -> None:
    """Extract a tar.xz from `pack` (or a single wheel) into `dest`, emptied first."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            wheel.extractall(dest)
        return
    with tarfile.open(archive, mode="r:xz") as tar:
        tar.extractall(dest, filter="data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="wheels (unpacked) and files into one tar.xz")
    p.add_argument("archive", type=Path)
    p.add_argument("items", nargs="+", metavar="FOLDER=PATH", help="a wheel or file and its folder in the archive")
    s = commands.add_parser("split", help="cut a file into parts plus a manifest")
    s.add_argument("file", type=Path)
    s.add_argument("out_dir", type=Path)
    size = s.add_mutually_exclusive_group(required=True)
    size.add_argument("--part-mib", type=float, help="part size")
    size.add_argument("--fit-tree", type=Path, metavar="REPO", help="size parts to travel beside REPO's tree")
    st = commands.add_parser("status", help="which parts are here and verified")
    st.add_argument("parts_dir", type=Path)
    j = commands.add_parser("join", help="verify the parts and rebuild the file; prints its path")
    j.add_argument("parts_dir", type=Path)
    j.add_argument("work_dir", type=Path)
    j.add_argument("--unpack", type=Path, metavar="DEST", help="also extract it into this directory")
    args = parser.parse_args(argv)
    if args.command == "pack":
        items = []
        for item in args.items:
            folder, sep, path = item.partition("=")
            if not sep or not folder or not Path(path).is_file():
                parser.error(f"{item}: expected FOLDER=PATH of an existing file")
            items.append((folder, Path(path)))
        inside = sum(Path(path).stat().st_size for _, path in items)
        print(f"{args.archive}: {mib(pack(args.archive, items))} ({len(items)} files of {mib(inside)})")
    elif args.command == "split":
        total = args.file.stat().st_size
        tree = tree_bytes(args.fit_tree) if args.fit_tree else 0
        part_bytes = plan_parts(total, tree)[1] if args.fit_tree else int(args.part_mib * (1 << 20))
        manifest = split(args.file, args.out_dir, part_bytes)
        for part in manifest["parts"]:
            print(f"{args.out_dir / part['name']}  {part['size']} bytes")
        print(f"{args.out_dir / MANIFEST}: {manifest['file']}, {len(manifest['parts'])} parts")
        if args.fit_tree:
            manifest_bytes = (args.out_dir / MANIFEST).stat().st_size
            largest = max(part["size"] for part in manifest["parts"])
            each = tree + largest + manifest_bytes
            print(f"each call: tree {mib(tree)} + part {mib(largest)} + manifest {manifest_bytes} bytes "
                  f"= {mib(each)} of 64 MiB ({mib(CALL_LIMIT - each)} spare)")  # fmt: skip
            if each > CALL_LIMIT:
                raise SystemExit("a part does not fit beside the tree: run split again")
    elif args.command == "status":
        manifest = read_manifest(args.parts_dir)
        problems = [problem for part in manifest["parts"] if (problem := part_problem(args.parts_dir, part))]
        done = len(manifest["parts"]) - len(problems)
        print(f"{args.parts_dir}: {done} of {len(manifest['parts'])} parts of {manifest['file']} here and verified")
        for problem in problems:
            print(f"  {problem.split(';')[0]}")
    else:
        joined = join(args.parts_dir, args.work_dir)
        if args.unpack:
            unpack(joined, args.unpack)
        print(joined)
    return 0


if __name__ == "__main__":
    sys.exit(main())
