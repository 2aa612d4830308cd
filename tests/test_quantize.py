"""convert --quantize: MatMulNBits weights, drift reported by validate with quantized thresholds."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from conftest import CONFORMANCE, TINY, TRAINED, drifted_copy, move_one_aggregation_bias, scale_one_prefix, swap_streams
from parscale_export.cli.main import main
from safetensors.torch import save_file

from parscale_export.checkpoint import load_weights
from parscale_export.config import load_config
from parscale_export.intweights import BLOCK_SIZE, dequantized
from parscale_export.synthetic import parscale_config, write_checkpoint

LINEAR_SUFFIXES = ("proj.weight", "lm_head.weight", "aggregate_layer.0.weight", "aggregate_layer.2.weight")


def snap_to_grid(weight: torch.Tensor, bits: int, gen: torch.Generator) -> torch.Tensor:
    """Weights ONNX Runtime's symmetric blockwise quantizer represents exactly: each block of 32
    along the input dimension is integers times one scale, led by the most negative integer
    (which fixes the scale the quantizer picks)."""
    low = -(2 ** (bits - 1))
    out_dim, in_dim = weight.shape
    ints = torch.randint(low + 1, -low, (out_dim, in_dim // BLOCK_SIZE, BLOCK_SIZE), generator=gen).float()
    ints[:, :, 0] = low
    scales = 0.5 / in_dim**0.5 * (1 + torch.rand(out_dim, in_dim // BLOCK_SIZE, 1, generator=gen))
    return (ints * scales).reshape(out_dim, in_dim) * (2.0 / -low)


@pytest.fixture(scope="module")
def grid_checkpoint(tmp_path_factory):
    raw = parscale_config(hidden_size=64, intermediate_size=128, parscale_n=2, parscale_n_tokens=4, vocab_size=96)
    ckpt = write_checkpoint(tmp_path_factory.mktemp("grid") / "ckpt", raw, seed=3)
    weights = load_weights(ckpt, load_config(ckpt))
    gen = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if name.endswith(LINEAR_SUFFIXES) and tensor.shape[1] % BLOCK_SIZE == 0:
            weights[name] = snap_to_grid(tensor, 4, gen)
    save_file(weights, ckpt / "model.safetensors")
    return ckpt


def convert_and_validate(ckpt, scheme: str, tmp_path, extra=()) -> tuple[int, dict, dict]:
    out = tmp_path / f"bundle-{scheme}"
    assert main(["convert", str(ckpt), "-o", str(out), "--quantize", scheme]) == 0
    report = tmp_path / f"report-{scheme}.json"
    code = main(["validate", str(out), "--provider", "cpu", "--report", str(report), *extra])
    return code, json.loads(report.read_text()), json.loads((out / "manifest.json").read_text())


def test_int4_on_representable_weights_passes(grid_checkpoint, tmp_path) -> None:
    code, report, manifest = convert_and_validate(grid_checkpoint, "int4", tmp_path)
    assert code == 0, report
    assert report["quantization"] == "int4" and report["thresholds"]["min_top1"] == 0.75
    quantization = manifest["quantization"]
    assert quantization["bits"] == 4 and quantization["op"] == "MatMulNBits"
    assert quantization["quantized_matmuls"] == 2 * 4 + 1 + 2  # per layer qkv o gate_up down, head, aggregation
    graph = onnx.load(str(tmp_path / "bundle-int4" / "model.onnx"), load_external_data=False).graph
    with_bias = [n for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) == 6 and n.input[5]]
    biases = sorted(n.input[5].rsplit(".", 2)[-2] for n in with_bias)  # MatMulNBits' bias input, no Add
    assert biases == ["0", "2", "qkv_proj", "qkv_proj"]  # both aggregation Linears, each layer's q/k/v


def test_int8_on_random_weights_passes(tmp_path) -> None:
    code, report, _ = convert_and_validate(TINY, "int8", tmp_path)
    assert code == 0, report
    assert all(p["min_cosine"] > 0.999 for p in report["phases"])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_trained_fixture_passes_quantized_validation(scheme, tmp_path) -> None:
    """The quantized thresholds were measured on this fixture (see its README) and set with a margin;
    the exact phases (float activations, the bundle's own weights in the reference) agree to fp32."""
    code, report, _ = convert_and_validate(TRAINED, scheme, tmp_path)
    assert code == 0, report
    assert report["quantization"] == scheme
    exact = [p for p in report["phases"] if p["name"].startswith("exact ")]
    assert len(exact) == 4 and all(p["max_abs"] < 1e-4 and p["top1"] == 1.0 for p in exact)
    assert report["exact_thresholds"]["max_abs"] == 1e-3


@pytest.mark.parametrize("change", [scale_one_prefix, move_one_aggregation_bias, swap_streams])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_bundle_of_a_drifted_checkpoint_fails(scheme: str, change, tmp_path) -> None:
    """Quantization's own thresholds are wide enough to let some drift through (a prefix scaled by
    1.5 moves the trained fixture's logits by 0.014, under int8's activation rounding): the exact
    phases catch every drift."""
    drifted = drifted_copy(tmp_path, "drifted", change, source=TRAINED)
    code, report, _ = convert_and_validate(drifted, scheme, tmp_path, ("--checkpoint", str(TRAINED)))
    assert code == 1
    exact = [p for p in report["phases"] if p["name"].startswith("exact ")]
    assert len(exact) == 4 and not any(p["passed"] for p in exact)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_weights_are_what_matmulnbits_multiplies_by(bits: int) -> None:
    """The exact phases' reference holds dequantized(W): it must be the matrix ONNX Runtime's
    MatMulNBits computes with (accuracy level 0: float activations), K not a multiple of 32."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from parscale_export.intweights import pack

    rng = np.random.default_rng(bits)
    k, n = 80, 24
    weight = rng.standard_normal((k, n)).astype(np.float32)
    packed, scales = pack(weight, bits)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=BLOCK_SIZE, accuracy_level=0)  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [onnx.numpy_helper.from_array(packed, "w"), onnx.numpy_helper.from_array(scales, "s")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString())
    x = rng.standard_normal((3, k)).astype(np.float32)
    want = dequantized(weight, bits)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - weight).max() < np.abs(weight).max() / (2 ** (bits - 1) - 1)  # a rounding, not garbage


def test_int4_drift_on_random_weights_is_reported_and_fails(tmp_path, capsys) -> None:
    code, report, _ = convert_and_validate(TINY, "int4", tmp_path)
    assert code == 1
    decode = next(p for p in report["phases"] if p["name"] == "decode")
    assert decode["greedy_agreeing_steps"] is not None and 0 < decode["min_cosine"] < 0.999
    assert "top-1" in capsys.readouterr().out


def test_streaming_quantizer_equals_onnxruntimes(bundle, tmp_path) -> None:
    """Same kernels, same layout: convert --quantize int4, which packs each weight as it streams
    from the checkpoint, gives bitwise the logits of ONNX Runtime's MatMulNBitsQuantizer (which
    loads the whole graph) run over the float bundle."""
    import numpy as np
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from parscale_export.runtime import Runtime

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert main(["convert", str(TINY), "-o", str(ours), "--quantize", "int4"]) == 0
    shutil.copytree(bundle(TINY), theirs)
    settings = dict(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=4, bits=4)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(theirs / "model.onnx")), **settings, algo_config=DefaultWeightOnlyQuantConfig(**settings)
    )
    quantizer.process()
    (theirs / "model.onnx.data").unlink()
    quantizer.model.save_model_to_file(str(theirs / "model.onnx"), use_external_data_format=True)
    ids, mask = np.array([[5, 17, 42, 8, 99], [0, 0, 3, 4, 5]]), np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(Runtime(ours).prefill(ids, mask)[0], Runtime(theirs).prefill(ids, mask)[0])


def test_tied_head_is_quantized_too(tmp_path) -> None:
    """A head tied to the embedding reaches MatMul through a Transpose; it is the largest
    matrix, so it is quantized as well (the embedding's Gather keeps the float table)."""
    code, report, manifest = convert_and_validate(CONFORMANCE / "p4_mha_tied_nosmooth", "int8", tmp_path)
    assert code == 0, report
    assert manifest["quantization"]["quantized_matmuls"] == 2 * 4 + 1 + 2


@pytest.mark.parametrize(
    "checkpoint, scheme", [(TINY, "int4"), (CONFORMANCE / "p4_mha_tied_nosmooth", None)], ids=["int4", "tied-fp32"]
)
def test_writing_in_small_chunks_changes_no_byte(checkpoint, scheme, tmp_path, monkeypatch) -> None:
    """Packed weights a few rows per step, transposed weights a few columns per step, the tied
    embedding a few rows per step: the same bytes as whole tensors at once."""
    import parscale_export.weightwriter as weightwriter

    quantize = ["--quantize", scheme] if scheme else []
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    assert main(["convert", str(checkpoint), "-o", str(whole), *quantize]) == 0
    monkeypatch.setattr(weightwriter, "CHUNK_BYTES", 4 * 48 * 3)  # a few rows or columns per step
    assert main(["convert", str(checkpoint), "-o", str(chunked), *quantize]) == 0
    for name in ("model.onnx", "model.onnx.data"):
        assert (whole / name).read_bytes() == (chunked / name).read_bytes(), name


def test_the_reference_does_not_import_the_quantizer() -> None:
    """The oracle reads the integer arithmetic from intweights, below both, never from the code it checks."""
    import subprocess
    import sys

    code = "import sys, parscale_export.reference; assert 'parscale_export.quantize' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
