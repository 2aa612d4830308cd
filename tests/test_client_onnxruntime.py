"""Client conformance, plain onnxruntime: the README's numpy-only blocks, run as a reader would
run them, drive every layout the CLI writes (P=1 and P=4) to the official greedy tokens.

Block A (the default contract, IO binding with past and present bound to one buffer) runs on
contracts v3 (the default, and as --genai declares its capacity) and v2; block C (--cache
dynamic, plain session.run) on contract v1 at the default opset and at 18.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import CONFORMANCE, ROOT, TRAINED, official
from parscale_export.cli.main import main

from parscale_export.runtime import Runtime

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
DEFAULT = 'bundle = "build/demo-bundle"  # what convert writes by default: contract v3'
DYNAMIC = 'bundle = "build/demo-bundle-dynamic"  # convert --cache dynamic: contract v1'
# The README's two prompts (the second left-padded) and its five greedy steps.
IDS = np.array([[72, 101, 108, 108, 111], [0, 0, 72, 105, 33]])
MASK = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
LAYOUTS = {
    "default": (DEFAULT, []),
    "genai": (DEFAULT, ["--genai"]),
    "static": (DEFAULT, ["--cache", "static"]),
    "dynamic": (DYNAMIC, ["--cache", "dynamic"]),
    "opset18": (DYNAMIC, ["--opset", "18"]),
}
CHECKPOINTS = {1: CONFORMANCE / "p1_plain_mqa", 4: CONFORMANCE / "p4_mha_tied_nosmooth"}


def run_block(marker: str, bundle_path) -> np.ndarray:
    (code,) = [block for block in BLOCKS if marker in block]
    namespace: dict = {}
    exec(code.replace(marker, f"bundle = {str(bundle_path)!r}"), namespace)
    return np.stack(namespace["generated"], axis=1)


def test_the_default_block_comes_first() -> None:
    assert DEFAULT in BLOCKS[0] and "bind_ortvalue_output" in BLOCKS[0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 4])
def test_readme_block_gives_the_official_tokens(n: int, layout: str, tmp_path) -> None:
    marker, flags = LAYOUTS[layout]
    out = tmp_path / "bundle"
    assert main(["convert", str(CHECKPOINTS[n]), "-o", str(out), *flags]) == 0
    ref = official(CHECKPOINTS[n].name)
    generated = run_block(marker, out)
    expected = Runtime(out).greedy(IDS, MASK, steps=5)
    np.testing.assert_array_equal(generated, expected)
    # Our runtime on the official fixture's own prompts gives the official tokens, so the block's do too.
    np.testing.assert_array_equal(
        Runtime(out).greedy(ref["input_ids"], ref["attention_mask"], ref["step_tokens"].shape[1]), ref["step_tokens"]
    )


def test_readme_library_example_runs(bundle) -> None:
    code = BLOCKS[1]
    assert '"build/demo-bundle"' in code
    namespace: dict = {}
    path = bundle(TRAINED, cache="gqa")
    exec(code.replace('"build/demo-bundle"', repr(str(path))), namespace)
    eos = Runtime(path).manifest.eos_ids
    assert all(len(t) == 16 or t[-1] in eos for t in namespace["tokens"]), namespace["tokens"]
