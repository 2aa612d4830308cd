"""Family bundles: checkpoints sharing a backbone ship it once, and each P computes what its own
bundle computes. The fixture family is written at test time from a seed by synthetic.write_family
(one backbone, P = 1 as a plain Qwen2 checkpoint, P = 2 and 4 with their own prefixes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFORMANCE, STATIC_MAX_LENGTH, edit_weights, official
from parscale_export.cli.main import main
from safetensors.torch import load_file

from parscale_export.bundle import DATA_FILE, MANIFEST_FILE, read_manifest
from parscale_export.contract import CACHE_NAMES
from parscale_export.errors import BundleError
from parscale_export.export import ExportOptions, convert
from parscale_export.family import convert_family
from parscale_export.runtime import Runtime, load_family
from parscale_export.synthetic import parscale_config, write_checkpoint, write_family

SIZES = (1, 2, 4)
SAME = 1e-6  # the family's graph for P and that checkpoint's own bundle: the same computation
TOL = 1e-4  # against the official outputs, as in test_conformance


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    config = parscale_config(parscale_n_tokens=8, vocab_size=1024)
    return write_family(tmp_path_factory.mktemp("family"), config, SIZES, seed=5)


@pytest.fixture(scope="module")
def family_bundle(family: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("family-bundle") / "bundle"
    convert_family(list(reversed(family)), out)  # any order: members are sorted by P
    return out


def prompts(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(3).integers(0, vocab, size=(3, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = mask[2, :5] = 0
    return ids, mask


def logits_over_steps(runtime: Runtime, steps: int = 4) -> list[np.ndarray]:
    """Prefill logits at real positions, then the last logits of greedy decode steps."""
    ids, mask = prompts(runtime.contract.vocab_size)
    logits, state = runtime.prefill(ids, mask)
    seen = [logits[mask.astype(bool)]]
    for _ in range(steps):
        logits, state = runtime.extend(logits[:, -1].argmax(-1)[:, None], state)
        seen.append(logits[:, -1])
    return seen


def test_family_bundle_layout(family_bundle: Path) -> None:
    names = sorted(p.name for p in family_bundle.iterdir())
    assert names == [
        "config.p1.json",
        "config.p2.json",
        "config.p4.json",
        "generation_config.p1.json",
        "generation_config.p2.json",
        "generation_config.p4.json",
        MANIFEST_FILE,
        DATA_FILE,
        "model.p1.onnx",
        "model.p2.onnx",
        "model.p2.onnx.data",
        "model.p4.onnx",
        "model.p4.onnx.data",
    ]  # fmt: skip  (P=1 owns no tensor: the plain checkpoint is all backbone)
    manifest = json.loads((family_bundle / MANIFEST_FILE).read_text())
    assert manifest["parallel"] == [1, 2, 4] and manifest["default_parallel"] == 4
    assert manifest["members"]["2"]["files"] == {
        "model": "model.p2.onnx",
        "external_data": [DATA_FILE, "model.p2.onnx.data"],
    }
    assert read_manifest(family_bundle).contract.parscale_n == 4
    assert read_manifest(family_bundle, 2).family == SIZES


@pytest.mark.parametrize("size", SIZES)
def test_each_p_equals_its_own_bundle(size: int, family: list[Path], family_bundle: Path, bundle) -> None:
    own = logits_over_steps(Runtime(bundle(family[SIZES.index(size)])))
    for runtime in (Runtime(family_bundle, parallel=size), load_family(family_bundle, [size])[size]):
        got = logits_over_steps(runtime)
        assert runtime.contract.parscale_n == size
        for a, b in zip(got, own, strict=True):
            assert np.abs(a - b).max() <= SAME


def test_all_p_loaded_together_share_one_backbone(family_bundle: Path) -> None:
    runtimes = load_family(family_bundle)
    assert sorted(runtimes) == list(SIZES)
    shared = runtimes[1].shared
    assert shared is not None and all(r.shared is shared for r in runtimes.values())
    # P=1 is all backbone: every tensor it stores lives in the shared file, and the others reuse them.
    assert len(shared.values) > 0
    for size, runtime in runtimes.items():
        alone = Runtime(family_bundle, parallel=size)
        for a, b in zip(logits_over_steps(runtime), logits_over_steps(alone), strict=True):
            assert np.abs(a - b).max() <= SAME


@pytest.mark.parametrize("cache", ["static", "gqa"])
def test_in_place_family_equals_each_p_alone_and_validates(cache: str, family: list[Path], bundle, tmp_path) -> None:
    """Contracts v2 and v3 make families too: every P, sharing the backbone, gives what its own
    bundle of that contract gives, and validate passes each."""
    out = tmp_path / f"family-{cache}"
    convert_family(family, out, ExportOptions(cache=cache, max_length=STATIC_MAX_LENGTH))
    for size, runtime in load_family(out).items():
        assert runtime.contract.version == CACHE_NAMES[cache] and runtime.shared is not None
        own = logits_over_steps(Runtime(bundle(family[SIZES.index(size)], cache=cache)))
        for a, b in zip(logits_over_steps(runtime), own, strict=True):
            assert np.abs(a - b).max() <= SAME
    assert main(["validate", str(out), "--decode-steps", "2"]) == 0


def test_family_is_at_most_1_25x_the_largest_single_bundle(family: list[Path], family_bundle: Path, bundle) -> None:
    single = sum(p.stat().st_size for p in bundle(family[-1]).iterdir())
    together = sum(p.stat().st_size for p in family_bundle.iterdir())
    assert together <= 1.25 * single, (together, single)


def test_two_family_converts_are_byte_identical(family: list[Path], family_bundle: Path, tmp_path: Path) -> None:
    """The fixture bundle was converted from the checkpoints in reverse order: order does not matter."""
    again = tmp_path / "again"
    convert_family(family, again)
    graphs = [f"model.p{p}.onnx" for p in SIZES] + [DATA_FILE, "model.p2.onnx.data", "model.p4.onnx.data"]
    for file in graphs:
        assert (again / file).read_bytes() == (family_bundle / file).read_bytes(), file


def test_changed_backbone_tensor_is_refused_and_leaves_nothing(family: list[Path], tmp_path: Path, capsys) -> None:
    changed = tmp_path / "p2-changed"
    shutil.copytree(family[1], changed)
    name = "model.layers.1.mlp.up_proj.weight"

    def nudge(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][0, 0] += 1e-3

    edit_weights(changed, nudge)
    out = tmp_path / "out"
    assert main(["convert", str(family[0]), str(changed), str(family[2]), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and name in err[-1] and str(changed) in err[-1]
    assert sum("error" in line for line in err) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p2-changed"], "nothing may be written"


def test_disagreeing_configs_and_repeated_p_are_refused(family: list[Path], tmp_path: Path, capsys) -> None:
    other = tmp_path / "p2-eps"
    shutil.copytree(family[1], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    out = tmp_path / "out"
    assert main(["convert", str(family[0]), str(other), "-o", str(out)]) == 2
    assert "rms_norm_eps" in capsys.readouterr().err
    assert main(["convert", str(family[1]), str(family[2]), str(family[1]), "-o", str(out)]) == 2
    assert "P=2 is already given" in capsys.readouterr().err
    assert not out.exists()


def test_cli_converts_a_family(family: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "family"
    assert main(["convert", str(family[1]), str(family[0]), "-o", str(out)]) == 0
    assert "family: P = 1, 2 over one backbone" in capsys.readouterr().out
    assert read_manifest(out).family == (1, 2)


def test_cli_switches_p(family_bundle: Path, capsys) -> None:
    assert main(["generate", str(family_bundle), "--input-ids", "1 2 3", "-n", "3", "--json"]) == 0
    captured = capsys.readouterr()
    assert "holds P = 1, 2, 4; running P=4" in captured.err
    default = json.loads(captured.out)["tokens"]
    four = Runtime(family_bundle, parallel=4).greedy(np.array([[1, 2, 3]]), np.ones((1, 3), np.int64), 3)
    assert default == four[0].tolist()
    assert main(["generate", str(family_bundle), "--input-ids", "1 2 3", "-n", "3", "--json", "--parallel", "1"]) == 0
    captured = capsys.readouterr()
    assert "note" not in captured.err
    one = Runtime(family_bundle, parallel=1).greedy(np.array([[1, 2, 3]]), np.ones((1, 3), np.int64), 3)
    assert json.loads(captured.out)["tokens"] == one[0].tolist()
    assert main(["generate", str(family_bundle), "--input-ids", "1", "--parallel", "8"]) == 2
    assert "not P=8" in capsys.readouterr().err


def test_validate_every_p(family_bundle: Path, capsys) -> None:
    assert main(["validate", str(family_bundle), "--decode-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "== P=1" in out and "== P=2" in out and "== P=4" in out and "every P (1, 2, 4) matches" in out
    assert main(["validate", str(family_bundle), "--parallel", "2", "--decode-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "== P=2" in out and "== P=4" not in out


def test_bench_gives_the_p_scaling_table(family_bundle: Path, capsys) -> None:
    args = ["bench", str(family_bundle), "--batch", "1", "--prompt-length", "4", "--steps", "2", "--no-reference"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "P scaling" in out and "P=1 1.00x" in out and "P=4" in out


def test_official_outputs_through_a_family(tmp_path: Path, bundle) -> None:
    """The conformance checkpoint p1_plain_mqa plus a P=2 checkpoint drawn on its backbone: the
    family's P=1 graph reproduces the official outputs, its P=2 graph its own bundle."""
    source = CONFORMANCE / "p1_plain_mqa"
    config = json.loads((source / "config.json").read_text()) | {"parscale_n": 2}
    derived = write_checkpoint(tmp_path / "p2", config, seed=9, backbone=load_file(source / "model.safetensors"))
    out = tmp_path / "family"
    convert_family([source, derived], out)
    ref = official("p1_plain_mqa")
    runtime = Runtime(out, parallel=1)
    real = ref["attention_mask"].astype(bool)
    logits, state = runtime.prefill(ref["input_ids"], ref["attention_mask"])
    assert np.abs(logits - ref["prefill_logits"])[real].max() < TOL
    for s in range(ref["step_tokens"].shape[1]):
        logits, state = runtime.extend(ref["step_tokens"][:, s : s + 1], state)
        assert np.abs(logits[:, 0] - ref["step_logits"][:, s]).max() < TOL, f"step {s}"
    for a, b in zip(
        logits_over_steps(Runtime(out, parallel=2)), logits_over_steps(Runtime(bundle(derived))), strict=True
    ):
        assert np.abs(a - b).max() <= SAME


def test_quantized_family_shares_quantized_weights(family: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "family-int8"
    convert_family(family[1:], out, ExportOptions(quantize="int8"))
    single = tmp_path / "p4-int8"
    convert(family[2], single, ExportOptions(quantize="int8"))
    assert read_manifest(out, 2).quantization == "int8"
    own_p4 = (out / "model.p4.onnx.data").stat().st_size
    assert own_p4 < 0.5 * (single / DATA_FILE).stat().st_size, "the quantized backbone lives in the shared file"
    own = logits_over_steps(Runtime(single))
    # Shared quantized weights keep prepacking: without it MatMulNBits takes a different CPU path.
    for runtime in (Runtime(out, parallel=4), load_family(out)[4]):
        for a, b in zip(logits_over_steps(runtime), own, strict=True):
            assert np.abs(a - b).max() <= SAME


def test_damaged_family_bundle_is_one_clear_error(family_bundle: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(family_bundle, broken)
    manifest = json.loads((broken / MANIFEST_FILE).read_text())
    (broken / MANIFEST_FILE).write_text(json.dumps(manifest | {"parallel": ["4"]}))
    assert main(["generate", str(broken), "--input-ids", "1"]) == 2
    assert "malformed family manifest" in capsys.readouterr().err
    (broken / MANIFEST_FILE).write_text(json.dumps(manifest))
    (broken / DATA_FILE).unlink()
    with pytest.raises(BundleError, match="shared weights are missing"):
        load_family(broken)
    assert main(["generate", str(broken), "--input-ids", "1", "--parallel", "2"]) == 2
    assert "ONNX Runtime cannot load it" in capsys.readouterr().err
