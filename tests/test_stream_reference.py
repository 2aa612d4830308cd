"""The reference can run a layer at a time, its weights read from the checkpoint as each layer
runs, with the same numbers as the whole model in memory; validate says which way it ran."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CONFORMANCE, TINY, TRAINED
from parscale_export.cli.main import main

from parscale_export.reference import Reference


@pytest.mark.parametrize(
    "checkpoint, quantization",
    [(TRAINED, None), (CONFORMANCE / "p4_mha_tied_nosmooth", "int4"), (CONFORMANCE / "p2_gqa_bf16_sharded", "int8")],
    ids=["untied", "tied-int4", "sharded-int8"],
)
def test_the_layered_reference_is_the_whole_reference(checkpoint, quantization) -> None:
    """Layer by layer (weights read as each layer runs, the head by bands, the embedding by rows,
    quantized weights packed once and unpacked each call) gives bitwise the whole model's logits."""
    whole = Reference.from_checkpoint(checkpoint, quantization, way="whole")
    layers = Reference.from_checkpoint(checkpoint, quantization, way="layers")
    assert (whole.how, layers.how) == ("whole", "layers")
    assert not any(p.device.type == "cpu" for p in layers.model.model.layers.parameters())  # nothing resident
    rng = np.random.default_rng(0)
    ids = rng.integers(0, whole.model.config.vocab_size, (2, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    want, want_state = whole.prefill(ids, mask)
    got, got_state = layers.prefill(ids, mask)
    for _ in range(3):
        np.testing.assert_array_equal(got, want)
        token = want[:, -1].argmax(-1)[:, None]
        want, want_state = whole.extend(token, want_state)
        got, got_state = layers.extend(token, got_state)
    np.testing.assert_array_equal(got, want)
    assert torch.equal(got_state.past[0], want_state.past[0])


def test_validate_says_how_the_reference_ran(bundle, tmp_path, capsys) -> None:
    report = tmp_path / "report.json"
    code = main(["validate", str(bundle(TINY)), "--provider", "cpu", "--reference", "layers", "--report", str(report)])
    assert code == 0
    assert json.loads(report.read_text())["reference"] == "layers"
    assert "layer by layer" in capsys.readouterr().out
