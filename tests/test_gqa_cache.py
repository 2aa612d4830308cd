"""Contract v3: GroupQueryAttention over fixed buffers shared by past and present. A batch's
chunks refused before ONNX Runtime fails on them, genai's config, and v3 as what `--genai` writes
by default (its slots, in-place writes, sizing, capacity and equality with v1 are tested with
v2's in test_static_cache.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import TINY
from parscale_export.cli.main import main

from parscale_export.config import load_config
from parscale_export.errors import UsageError
from parscale_export.export import ExportOptions, contract_for
from parscale_export.genai import genai_config
from parscale_export.runtime import Runtime


@pytest.fixture(scope="module")
def gqa(bundle) -> Runtime:
    return Runtime(bundle(TINY, cache="gqa"))


@pytest.fixture(scope="module")
def dynamic(bundle) -> Runtime:
    return Runtime(bundle(TINY, cache="dynamic"))


def test_a_batch_of_chunks_is_refused_one_sequence_runs(gqa: Runtime, dynamic: Runtime) -> None:
    """ONNX Runtime's GroupQueryAttention takes several new tokens over a past only for batch 1:
    the runtime says so before the session fails; the same chunk for one sequence is exact."""
    ids, mask = np.array([[5, 6, 7, 8], [9, 10, 11, 12]]), np.ones((2, 4), np.int64)
    _, state = gqa.prefill(ids[:, :2], mask[:, :2])
    with pytest.raises(UsageError, match="one sequence at a time"):
        gqa.extend(ids[:, 2:], state)
    _, one = gqa.prefill(ids[:1, :2], mask[:1, :2])
    got, _ = gqa.extend(ids[:1, 2:], one)
    want, _ = dynamic.prefill(ids[:1], mask[:1])
    np.testing.assert_allclose(got, want[:, 2:], atol=1e-4)


def test_genai_config_declares_the_capacity_without_the_v2_warning() -> None:
    """genai binds v3's buffers as it does v2's; only v2's attention pays for the whole buffer. The
    graph declares T + max_length slots, so genai's max_length and context_length are max_length."""
    config = load_config(TINY)
    contract = contract_for(config, ExportOptions(genai=True, cache="gqa", max_length=32))
    assert contract.fixed_capacity and contract.capacity == 32 + 8
    assert contract.input_spec()["past_key_values.0.key"][1][2] == 40 and contract.cache_slots(5) == 40
    settings, notes = genai_config(config, contract, {"eos_token_id": [1], "pad_token_id": [], "bos_token_id": []})
    assert settings["search"]["past_present_share_buffer"] and settings["search"]["max_length"] == 32
    assert settings["model"]["context_length"] == 32
    assert not any("reads the whole buffer" in note for note in notes)
    per_token = 2 * config.num_layers * config.parscale_n * config.num_kv_heads * config.head_dim * 4
    assert any(f"40 slots ({per_token * 40 / 1024:.1f} KiB) a sequence" in note for note in notes)


def test_convert_writes_contract_v3_unless_told_otherwise(tmp_path, capsys) -> None:
    """v3 is every target's default; its buffers default to the model's context (capped), and a
    genai convert says what genai will allocate and the longest max_length it takes."""
    config = load_config(TINY)
    assert main(["convert", str(TINY), "-o", str(tmp_path / "plain")]) == 0
    contract = json.loads((tmp_path / "plain" / "manifest.json").read_text())["contract"]
    assert contract["version"] == 3 and contract["max_length"] == min(config.max_position_embeddings, 4096)
    assert not contract["fixed_capacity"]  # our runtime sizes the buffers to each request
    capsys.readouterr()
    assert main(["convert", str(TINY), "-o", str(tmp_path / "v3"), "--genai"]) == 0
    err = capsys.readouterr().err
    contract = json.loads((tmp_path / "v3" / "manifest.json").read_text())["contract"]
    assert contract["version"] == 3 and contract["fixed_capacity"]
    settings = json.loads((tmp_path / "v3" / "genai_config.json").read_text())
    assert settings["search"]["max_length"] == contract["max_length"]
    slots = contract["max_length"] + config.parscale_n_tokens
    per_token = 2 * config.num_layers * config.parscale_n * config.num_kv_heads * config.head_dim * 4
    assert f"{slots} slots ({per_token * slots / 2**20:.1f} MiB) a sequence" in err
    proto = onnx.load(str(tmp_path / "v3" / "model.onnx"), load_external_data=False)
    declared = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                for v in (*proto.graph.input, *proto.graph.output)}  # fmt: skip
    assert declared["past_key_values.0.key"] == declared["present.1.value"] == ["batch", 8, slots, 16]
    assert main(["convert", str(TINY), "-o", str(tmp_path / "v1"), "--genai", "--cache", "dynamic"]) == 0
    assert json.loads((tmp_path / "v1" / "manifest.json").read_text())["contract"]["version"] == 1
