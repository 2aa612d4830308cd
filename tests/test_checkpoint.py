"""Weight loading: strict checks, each failure one line naming the file and the tensor."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import edit_weights
from safetensors.torch import load_file

from parscale_export.checkpoint import load_weights, weights_digest
from parscale_export.config import load_config
from parscale_export.errors import CheckpointError
from parscale_export.synthetic import parscale_config, write_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(tmp_path / "ckpt", parscale_config(parscale_n=2, parscale_n_tokens=3))


def load(ckpt):
    return load_weights(ckpt, load_config(ckpt))


def test_loads_every_expected_tensor_as_float32(ckpt) -> None:
    weights = load(ckpt)
    assert weights["model.layers.0.self_attn.prefix_k"].shape == (2, 2, 3, 16)
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_missing_tensor(ckpt) -> None:
    edit_weights(ckpt, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=re.escape("missing tensor 'model.norm.weight'")):
        load(ckpt)


def test_unexpected_tensor(ckpt) -> None:
    edit_weights(ckpt, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=re.escape("unexpected tensor 'model.extra.weight'")):
        load(ckpt)


def test_wrong_shape(ckpt) -> None:
    edit_weights(ckpt, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 64)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \[3, 64\]"):
        load(ckpt)


def test_config_p_disagrees_with_weights(ckpt) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(raw | {"parscale_n": 3}))
    with pytest.raises(
        CheckpointError, match=r"prefix_k' has shape \[2, 2, 3, 16\], the config implies \[3, 2, 3, 16\]"
    ):
        load(ckpt)


def test_non_finite(ckpt) -> None:
    def poison(t):
        t["model.layers.0.self_attn.prefix_v"][0, 0, 0, 0] = float("nan")

    edit_weights(ckpt, poison)
    with pytest.raises(CheckpointError, match=re.escape("'model.layers.0.self_attn.prefix_v' holds NaN")):
        load(ckpt)


def test_truncated_file(ckpt) -> None:
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors")):
        load(ckpt)


def test_pickle_only_is_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(parscale_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*execute code"):
        load(tmp_path)


def test_no_weights(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(parscale_config()))
    with pytest.raises(CheckpointError, match=re.escape("no model.safetensors")):
        load(tmp_path)


@pytest.fixture
def sharded(tmp_path):
    return write_checkpoint(tmp_path / "sharded", parscale_config(), shards=3)


def test_sharded_loads(sharded) -> None:
    assert "lm_head.weight" in load(sharded)


def test_index_escaping_the_directory(sharded) -> None:
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../outside.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="points outside the checkpoint directory"):
        load(sharded)


def test_missing_shard(sharded) -> None:
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape("'model-00002-of-00003.safetensors' is listed but missing")):
        load(sharded)


def test_malformed_index(sharded) -> None:
    (sharded / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="malformed index"):
        load(sharded)


def test_digest_tracks_the_bytes(ckpt) -> None:
    before = weights_digest(ckpt)
    edit_weights(ckpt, lambda t: t["model.norm.weight"].mul_(2))
    assert weights_digest(ckpt) != before


def test_integer_tensor_is_refused_by_name(ckpt) -> None:
    edit_weights(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int64)}))
    with pytest.raises(CheckpointError, match=re.escape("'model.norm.weight' has dtype I64")):
        load(ckpt)


def test_header_length_beyond_the_file(ckpt) -> None:
    path = ckpt / "model.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + path.read_bytes()[8:])
    with pytest.raises(CheckpointError, match="header length 1000000000 exceeds the file"):
        load(ckpt)


def test_fp16_overflow_is_named(ckpt) -> None:
    edit_weights(ckpt, lambda t: t["model.norm.weight"].__setitem__(0, 1e6))
    with pytest.raises(CheckpointError, match=re.escape("too large for torch.float16")):
        load_weights(ckpt, load_config(ckpt), dtype=torch.float16)


def test_reads_without_mmap_match_the_library(ckpt) -> None:
    reference = load_file(ckpt / "model.safetensors")
    ours = load(ckpt)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name].float(), rtol=0, atol=0)
