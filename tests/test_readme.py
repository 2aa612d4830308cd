"""The README's plain-onnxruntime example runs and agrees with our runtime."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import ROOT, TINY, TRAINED

from parscale_export.runtime import Runtime


def test_readme_example_generates_what_the_runtime_generates(bundle, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    code = blocks[0]
    path = bundle(TRAINED)
    assert 'bundle = "build/demo-bundle"' in code
    namespace: dict = {}
    exec(code.replace('bundle = "build/demo-bundle"', f"bundle = {str(path)!r}"), namespace)
    ids = np.array([[72, 101, 108, 108, 111], [0, 0, 72, 105, 33]])
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    expected = Runtime(path).greedy(ids, mask, steps=5)
    np.testing.assert_array_equal(np.stack(namespace["generated"], axis=1), expected)
    assert str(expected[0, 0]) in capsys.readouterr().out


def test_readme_library_example_runs(bundle) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    code = blocks[1]
    assert '"build/demo-bundle"' in code
    namespace: dict = {}
    path = bundle(TRAINED)
    exec(code.replace('"build/demo-bundle"', repr(str(path))), namespace)
    eos = Runtime(path).manifest.eos_ids
    assert all(len(t) == 16 or t[-1] in eos for t in namespace["tokens"]), namespace["tokens"]


@pytest.mark.parametrize("cache", ["static", "gqa"])  # contract v3 is driven exactly as v2
def test_readme_static_cache_example_generates_what_the_runtime_generates(cache: str, bundle) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (code,) = [b for b in blocks if 'bundle = "build/demo-bundle-static"' in b]
    path = bundle(TINY, cache=cache)
    namespace: dict = {}
    exec(code.replace('bundle = "build/demo-bundle-static"', f"bundle = {str(path)!r}"), namespace)
    ids = np.array([[72, 101, 108, 108, 111], [0, 0, 72, 105, 33]])
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    expected = Runtime(bundle(TINY)).greedy(ids, mask, steps=5)  # contract v1 gives the same tokens
    np.testing.assert_array_equal(np.stack(namespace["generated"], axis=1), expected)
