"""Several checkpoints that share a backbone -> one family bundle with one graph per P.

The released ParScale-Qwen-3B-P2/P4/P8 models froze Qwen2.5-3B and trained only the prefixes
and the aggregation MLP, so every other tensor is the same bytes in each. Before anything is
written, `check_family` proves that, one tensor at a time (a 3B backbone never needs to be in
memory twice); then each member is exported as an ordinary bundle inside the staging directory
and `datafile.SharedStore` keeps of it only what is not stored yet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .bundle import (
    COPIED_FILES,
    FAMILY_FORMAT,
    MANIFEST_FILE,
    MODEL_FILE,
    SHARED_DATA_FILE,
    genai_folder,
    member_file,
)
from .checkpoint import expected_shapes, weight_files
from .config import ModelConfig, load_config
from .datafile import SharedStore
from .errors import CheckpointError, ConfigError, OutputError
from .export import (
    DEFAULT_OPTIONS,
    ConvertResult,
    ExportOptions,
    Log,
    _check_target,
    _move_into_place,
    _staging_dir,
    convert,
)
from .genai import GENAI_CONFIG
from .jsonfile import read_json_object
from .tensorfile import TensorFile
from .weightwriter import Progress

# Per-member fields: everything else in the configs must agree.
MEMBER_FIELDS = ("model_type", "parscale_n", "parscale_n_tokens", "parscale_attn_smooth")
# Files copied per member with the P in their name; the rest (tokenizer) come from the default member.
PER_MEMBER_FILES = ("config.json", "generation_config.json")
CHUNK = 64 << 20  # bytes compared at a time


@dataclass(frozen=True)
class Member:
    checkpoint: Path
    config: ModelConfig


def is_shared(name: str) -> bool:
    """Backbone tensors: everything but the learned prefixes and the aggregation MLP."""
    own = name.endswith(("self_attn.prefix_k", "self_attn.prefix_v")) or name.startswith("model.aggregate_layer.")
    return not own


def check_family(checkpoints: list[Path]) -> list[Member]:
    """Members sorted by P, after proving that configs agree (but for P and the prefix settings)
    and that every backbone tensor is bit-for-bit equal to the first checkpoint's. Raises
    ConfigError or CheckpointError naming the checkpoint and the first difference."""
    members = [Member(Path(c), load_config(c)) for c in checkpoints]
    first = members[0]
    by_p: dict[int, Path] = {}
    for m in members:
        if m.config.parscale_n in by_p:
            raise ConfigError(
                f"{m.checkpoint}: P={m.config.parscale_n} is already given by {by_p[m.config.parscale_n]}; "
                "a family holds each P once"
            )
        by_p[m.config.parscale_n] = m.checkpoint
        _check_same_backbone_config(first, m)
    names = [n for n in expected_shapes(first.config) if is_shared(n)]
    reference = _locate(first.checkpoint, names)
    for m in members[1:]:
        theirs = _locate(m.checkpoint, names)
        for name in names:
            if not _same_tensor(reference[name], theirs[name], name):
                raise CheckpointError(
                    f"{m.checkpoint}: backbone tensor {name!r} differs from {first.checkpoint}; "
                    "a family must share every tensor but the prefixes and the aggregation layer"
                )
    return sorted(members, key=lambda m: m.config.parscale_n)


def _check_same_backbone_config(first: Member, other: Member) -> None:
    ours, theirs = dataclasses.asdict(first.config), dataclasses.asdict(other.config)
    for key in ours:
        if key not in MEMBER_FIELDS and ours[key] != theirs[key]:
            raise ConfigError(
                f"{other.checkpoint / 'config.json'}: {key} is {theirs[key]!r}, but {first.checkpoint} has "
                f"{ours[key]!r}; a family's checkpoints may differ only in parscale_n, parscale_n_tokens "
                "and parscale_attn_smooth"
            )


def _locate(checkpoint: Path, names: list[str]) -> dict[str, TensorFile]:
    """The (header-checked) safetensors file holding each tensor."""
    files = weight_files(checkpoint)
    opened: dict[Path, TensorFile] = {}
    for name in names:
        if name not in files:
            raise CheckpointError(f"{checkpoint}: missing backbone tensor {name!r}")
        opened.setdefault(files[name], TensorFile(files[name]))
    return {name: opened[files[name]] for name in names}


def _same_tensor(file_a: TensorFile, file_b: TensorFile, name: str) -> bool:
    """Same dtype, shape and stored bytes, compared CHUNK bytes at a time."""
    ea, eb = file_a.entries[name], file_b.entries[name]
    if (ea.dtype, ea.shape) != (eb.dtype, eb.shape):
        return False
    with file_a.path.open("rb") as fa, file_b.path.open("rb") as fb:
        fa.seek(ea.begin)
        fb.seek(eb.begin)
        left = ea.end - ea.begin
        while left:
            size = min(CHUNK, left)
            if fa.read(size) != fb.read(size):
                return False
            left -= size
    return True


def convert_family(
    checkpoints: list[Path],
    out_dir: Path,
    options: ExportOptions = DEFAULT_OPTIONS,
    force: bool = False,
    log: Log = lambda _: None,
    progress: Progress | None = None,
) -> ConvertResult:
    """Export each checkpoint, then store the weights the graphs share once. Nothing is written
    until every check has passed; the bundle appears at `out_dir` only when complete. Every
    member is written with `options`, so with the same cache contract."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    for checkpoint in checkpoints:
        _check_target(out_dir, Path(checkpoint), force)
    log(f"checking that {len(checkpoints)} checkpoints share one backbone")
    members = check_family(checkpoints)
    sizes = [m.config.parscale_n for m in members]
    log(f"  they do: P = {', '.join(map(str, sizes))}")
    with _staging_dir(out_dir) as staging:
        store = SharedStore(staging)
        manifests = {}
        default = sizes[-1]
        shared_files: list[str] = []
        for m in members:
            p = m.config.parscale_n
            log(f"exporting P={p} from {m.checkpoint}")
            part = staging / f".member-p{p}"
            convert(m.checkpoint, part, options, log=lambda s: log("  " + s), progress=progress)
            manifests[p] = read_json_object(part / MANIFEST_FILE, OutputError)
            log(f"  storing P={p}'s weights beside those already stored")
            manifests[p]["files"] = store.add(p, part)
            for name in PER_MEMBER_FILES:
                if (part / name).is_file():
                    shutil.copyfile(part / name, staging / member_file(name, p))
            if p == default:  # the tokenizer, once: the default member's
                shared_files = [n for n in COPIED_FILES if n not in PER_MEMBER_FILES and (part / n).is_file()]
                for name in shared_files:
                    shutil.copyfile(part / name, staging / name)
            if options.genai:
                shutil.copyfile(part / GENAI_CONFIG, staging / member_file(GENAI_CONFIG, p))
            shutil.rmtree(part)  # free its disk before the next export
        if options.genai:
            for p in sizes:
                linked = [manifests[p]["files"]["model"], *manifests[p]["files"]["external_data"], *shared_files]
                _genai_folder(staging, p, linked, log)
        manifest = {
            "format": FAMILY_FORMAT,
            "parallel": sizes,
            "default_parallel": default,
            "shared_data": SHARED_DATA_FILE,
            "members": {str(p): manifests[p] for p in sizes},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
        _move_into_place(staging, out_dir)
    return ConvertResult(out_dir=out_dir, files=files, seconds=time.perf_counter() - start, config=members[-1].config)


def _genai_folder(staging: Path, parallel: int, files: list[str], log: Log) -> None:
    """genai-p{P}/: genai_config.json and hard links to the graph for P, its data files and the
    tokenizer. genai refuses a filename with "..", and ONNX Runtime refuses external data outside
    the graph's folder (symbolic links included), so the folder holds links to the same bytes."""
    folder = staging / genai_folder(parallel)
    folder.mkdir()
    (staging / member_file(GENAI_CONFIG, parallel)).rename(folder / GENAI_CONFIG)  # names model.onnx
    copied = []
    for name in files:
        target = MODEL_FILE if name == member_file(MODEL_FILE, parallel) else name
        try:
            os.link(staging / name, folder / target)
        except OSError:  # a file system without hard links: correct, but no longer shared on disk
            shutil.copyfile(staging / name, folder / target)
            copied.append(name)
    if copied:
        log(f"note: no hard links here; {folder.name}/ holds its own copy of {', '.join(copied)}")
