"""What a bundle directory holds, and reading it back. No torch: the runtime imports this.

A bundle is:
  model.onnx, model.onnx.data   the graph and its weights (external data, always)
  manifest.json                 shapes, contract, dtype, opset, source checkpoint and its hash, versions
  config.json, generation_config.json, tokenizer files   copied from the checkpoint when present
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
    raw: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.bundle_dir / MODEL_FILE

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


def read_manifest(bundle_dir: Path) -> Manifest:
    """Open a bundle directory; BundleError names the file and the problem."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: bundle directory does not exist")
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{path}: missing; is {bundle_dir} a parscale-export bundle?")
    raw = read_json_object(path, BundleError)
    if raw.get("format") != FORMAT or not isinstance(raw.get("contract"), dict):
        raise BundleError(f"{path}: not a parscale-export manifest")
    try:
        contract = Contract.from_dict(raw["contract"])
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if not (bundle_dir / MODEL_FILE).is_file():
        raise BundleError(f"{bundle_dir / MODEL_FILE}: missing from the bundle")
    return Manifest(bundle_dir=bundle_dir, contract=contract, raw=raw)
