"""Carry a wheel to the GPU machine in pieces, and put it back together there, verified.

The GPU machine cannot reach a package registry and takes at most 64 MiB per call, working tree
included, so the onnxruntime-gpu wheel (~256 MB) travels as parts, one call each. Each part is
named after the wheel's digest, so parts of an older wheel never mix with a newer one's, and a
small manifest (wheel name, size, sha256 of the wheel and of every part) travels with every part.

    python scripts/gpu_carry.py split WHEEL build/gpu-wheel [--part-mib 50]   # here
    python scripts/gpu_carry.py join build/gpu-wheel WORKDIR [--install SITE] # there: prints the wheel's path

`join --install SITE` also unpacks the verified wheel into SITE (emptied first), a private
directory to put first on PYTHONPATH: the machine's own packages stay as they are.
`join` refuses, naming the part, when a part is missing, has the wrong size or digest, or
when the joined wheel's digest differs from the manifest's. Standard library only: the GPU
machine's Python has no extra packages to spare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

MANIFEST = "gpu-wheel.json"
CHUNK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def split(wheel: Path, out_dir: Path, part_bytes: int) -> dict:
    """Write `wheel` as parts plus the manifest into `out_dir`; stale parts of other wheels go."""
    out_dir.mkdir(parents=True, exist_ok=True)
    whole = sha256(wheel)
    for stale in out_dir.glob("*.part-*"):
        if not stale.name.startswith(whole[:16]):
            stale.unlink()
    size = wheel.stat().st_size
    count = max(1, -(-size // part_bytes))
    parts = []
    with wheel.open("rb") as f:
        for index in range(count):
            name = f"{whole[:16]}.part-{index:02d}-of-{count:02d}"
            (out_dir / name).write_bytes(f.read(part_bytes))
            parts.append({"name": name, "size": (out_dir / name).stat().st_size, "sha256": sha256(out_dir / name)})
    manifest = {"wheel": wheel.name, "size": size, "sha256": whole, "parts": parts}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def join(parts_dir: Path, work_dir: Path) -> Path:
    """Check every part against the manifest, concatenate, check the whole; return the wheel."""
    manifest_path = parts_dir / MANIFEST
    if not manifest_path.is_file():
        raise SystemExit(f"{manifest_path}: missing; carry it with every part (see scripts/gpu_wheel.sh)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for part in manifest["parts"]:
        path = parts_dir / part["name"]
        if not path.is_file():
            have = sorted(p.name for p in parts_dir.glob("*.part-*")) or ["none"]
            raise SystemExit(f"{path}: part missing (have: {', '.join(have)}); carry it and run again")
        if path.stat().st_size != part["size"] or sha256(path) != part["sha256"]:
            raise SystemExit(f"{path}: size or sha256 differs from {MANIFEST}; carry this part again")
    work_dir.mkdir(parents=True, exist_ok=True)
    wheel = work_dir / manifest["wheel"]
    with wheel.open("wb") as out:
        for part in manifest["parts"]:
            with (parts_dir / part["name"]).open("rb") as f:
                while block := f.read(CHUNK):
                    out.write(block)
    if sha256(wheel) != manifest["sha256"]:
        wheel.unlink()
        raise SystemExit(f"{wheel}: joined wheel's sha256 differs from {MANIFEST}")
    return wheel


def install(wheel: Path, site: Path) -> None:
    """Unpack a wheel into `site`, as `pip install --target` would lay out a binary wheel
    without scripts; works where pip is missing or cannot reach an index."""
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("split", help="cut a wheel into parts plus a manifest")
    s.add_argument("wheel", type=Path)
    s.add_argument("out_dir", type=Path)
    s.add_argument("--part-mib", type=float, default=50, help="part size; a call carries 64 MiB with the tree")
    j = commands.add_parser("join", help="verify the parts and rebuild the wheel; prints its path")
    j.add_argument("parts_dir", type=Path)
    j.add_argument("work_dir", type=Path)
    j.add_argument("--install", type=Path, metavar="SITE", help="also unpack the wheel into this directory")
    args = parser.parse_args(argv)
    if args.command == "split":
        manifest = split(args.wheel, args.out_dir, int(args.part_mib * (1 << 20)))
        for part in manifest["parts"]:
            print(f"{args.out_dir / part['name']}  {part['size']} bytes")
        print(f"{args.out_dir / MANIFEST}: {manifest['wheel']}, {len(manifest['parts'])} parts")
    else:
        wheel = join(args.parts_dir, args.work_dir)
        if args.install:
            install(wheel, args.install)
        print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
