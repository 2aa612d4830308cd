"""Shared fixtures: paths, the official reference outputs, and bundles converted once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from parscale_export.export import ExportOptions, convert
from parscale_export.runtime import cuda_available

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
CONFORMANCE = FIXTURES / "conformance"
CONFORMANCE_NAMES = ["p1_plain_mqa", "p2_gqa_bf16_sharded", "p4_mha_tied_nosmooth"]
TINY = FIXTURES / "tiny-parscale"  # random weights: for tests that need arbitrary logits
TRAINED = FIXTURES / "tiny-python-p4"  # trained on Python source: the demo, quantization on real weights


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no working CUDA execution provider on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


STATIC_MAX_LENGTH = 40  # --max-length of the static-cache bundles tests make: small, so capacity is reachable


class BundleCache:
    """Converts each (checkpoint, dtype, cache) once per test session. No cache: as `convert`
    does with no flags (contract v3, the model's max_length); caches named "static" (contract
    v2) and "gqa" (v3) get max_length STATIC_MAX_LENGTH, so tests can reach their capacity."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[tuple[Path, str, str], Path] = {}

    def __call__(self, checkpoint: Path, dtype: str = "fp32", cache: str | None = None) -> Path:
        key = (Path(checkpoint), dtype, cache)
        if key not in self.done:
            out = self.root / f"{Path(checkpoint).name}-{dtype}-{cache or 'default'}-{len(self.done)}"
            max_length = STATIC_MAX_LENGTH if cache in ("static", "gqa") else None
            convert(checkpoint, out, ExportOptions(dtype=dtype, cache=cache, max_length=max_length))
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> BundleCache:
    return BundleCache(tmp_path_factory.mktemp("bundles"))


def official(name: str) -> dict[str, np.ndarray]:
    with np.load(CONFORMANCE / name / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def edit_weights(checkpoint: Path, change) -> None:
    """Apply `change(tensors)` to a single-file checkpoint's weights, in place."""
    tensors = load_file(checkpoint / "model.safetensors")
    change(tensors)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})


def drifted_copy(folder: Path, name: str, change, source: Path = TINY) -> Path:
    """A copy of `source` at folder/name with `change` applied to its weights."""
    checkpoint = folder / name
    shutil.copytree(source, checkpoint)
    edit_weights(checkpoint, change)
    return checkpoint


# Drifts of a P=4 checkpoint that validate must catch, in every layout and quantization.
def scale_one_prefix(t) -> None:
    t["model.layers.1.self_attn.prefix_k"][2] *= 1.5  # one stream, one layer


def move_one_aggregation_bias(t) -> None:
    t["model.aggregate_layer.2.bias"][1] += 0.5


def swap_streams(t) -> None:
    """What a wrong row order would look like: streams 0 and 1 trade prefixes everywhere."""
    for name, tensor in t.items():
        if name.endswith(("prefix_k", "prefix_v")):
            t[name] = tensor[[1, 0, 2, 3]].contiguous()
