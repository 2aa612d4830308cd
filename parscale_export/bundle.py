"""What a bundle directory holds, and reading it back. No torch: the runtime imports this.

A bundle is:
  model.onnx, model.onnx.data   the graph and its weights (external data, always)
  manifest.json                 shapes, contract, dtype, opset, source checkpoint and its hash, versions
  config.json, generation_config.json, tokenizer files   copied from the checkpoint when present

A family bundle (several P over one backbone, written by family.py) is:
  manifest.json                 FAMILY_FORMAT: the P's, the default P, and one member manifest per P
  model.onnx.data               the smallest P's weights (the backbone), stored once for every graph
  model.p{P}.onnx, model.p{P}.onnx.data   the graph for P and what it has beyond those
  config.p{P}.json, generation_config.p{P}.json, tokenizer files
  genai-p{P}/genai_config.json  with --genai: onnxruntime-genai opens this folder for P
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .contract import Contract
from .errors import BundleError
from .jsonfile import read_json_object

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
FORMAT = "parscale-export bundle"
FAMILY_FORMAT = "parscale-export family"
SHARED_DATA_FILE = DATA_FILE  # a family's shared weights keep the single bundle's data file name
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


@dataclass(frozen=True)
class Manifest:
    bundle_dir: Path
    contract: Contract
    raw: dict[str, Any]  # for a family member: that member's manifest
    family: tuple[int, ...] = ()  # every P of a family bundle; empty for a single bundle

    @property
    def model_path(self) -> Path:
        files = self.raw.get("files")
        name = files.get("model") if isinstance(files, dict) else None
        return self.bundle_dir / (name if isinstance(name, str) and name else MODEL_FILE)

    @property
    def source_checkpoint(self) -> Path | None:
        path = self.raw.get("source", {}).get("checkpoint")
        return Path(path) if path else None

    @property
    def dtype(self) -> str:
        return self.contract.dtype

    @property
    def quantization(self) -> str | None:
        """ "int8" or "int4" for a quantized bundle, else None."""
        described = self.raw.get("quantization")
        return described.get("scheme") if isinstance(described, dict) else None

    @property
    def eos_ids(self) -> list[int]:
        return self.raw.get("tokens", {}).get("eos_token_id", [])

    @property
    def context_length(self) -> int | None:
        """max_position_embeddings of the bundle's config.json: the longest sequence a server
        accepts (None when the bundle does not say)."""
        path = self.bundle_dir / "config.json"
        if not path.is_file():
            return None
        value = read_json_object(path, BundleError).get("max_position_embeddings")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    @property
    def pad_id(self) -> int:
        tokens = self.raw.get("tokens", {})
        return next(iter(tokens.get("pad_token_id", []) + tokens.get("eos_token_id", [])), 0)


def human_size(size: float) -> str:
    """Bytes as B, KiB, MiB or GiB, one decimal above bytes: convert's file list, genai's memory note."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def genai_folder(parallel: int) -> str:
    """Where a family bundle made with --genai keeps the genai_config.json for P."""
    return f"genai-p{parallel}"


def member_file(name: str, parallel: int) -> str:
    """A family member's own copy of a bundle file: model.onnx -> model.p4.onnx."""
    stem, _, rest = name.partition(".")
    return f"{stem}.p{parallel}.{rest}"


def read_manifest(bundle_dir: Path, parallel: int | None = None) -> Manifest:
    """Open a bundle directory; BundleError names the file and the problem. For a family bundle,
    the member for P = `parallel` (default: the largest P); a single bundle only has its own P."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: bundle directory does not exist")
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{path}: missing; is {bundle_dir} a parscale-export bundle?")
    raw = read_json_object(path, BundleError)
    family: tuple[int, ...] = ()
    if raw.get("format") == FAMILY_FORMAT:
        raw, family = _member(path, raw, parallel)
    if raw.get("format") != FORMAT or not isinstance(raw.get("contract"), dict):
        raise BundleError(f"{path}: not a parscale-export manifest")
    try:
        contract = Contract.from_dict(raw["contract"])
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if parallel is not None and parallel != contract.parscale_n:
        raise BundleError(f"{bundle_dir}: the bundle holds P={contract.parscale_n} only, not P={parallel}")
    manifest = Manifest(bundle_dir=bundle_dir, contract=contract, raw=raw, family=family)
    model = manifest.model_path
    if model.parent != bundle_dir or not model.is_file():
        raise BundleError(f"{model}: missing from the bundle")
    return manifest


def _member(path: Path, raw: dict[str, Any], parallel: int | None) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The manifest of one member of a family bundle, and every P the family holds."""
    members = raw.get("members")
    sizes = raw.get("parallel")
    if not isinstance(members, dict) or not isinstance(sizes, list) or not sizes:
        raise BundleError(f"{path}: malformed family manifest (no members)")
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in sizes):
        raise BundleError(f"{path}: malformed family manifest (parallel must list integers)")
    chosen = max(sizes) if parallel is None else parallel
    member = members.get(str(chosen))
    if not isinstance(member, dict):
        listed = ", ".join(f"P={p}" for p in sizes)
        raise BundleError(f"{path.parent}: the family holds {listed}, not P={chosen}")
    return member, tuple(sizes)
