"""scripts/gpu_official.py feeds the official model the prompts our bench feeds our bundles."""

from __future__ import annotations

import importlib.util

import numpy as np
from conftest import ROOT

from parscale_export.bench import time_generation


def load_official_script():
    spec = importlib.util.spec_from_file_location("gpu_official", ROOT / "scripts" / "gpu_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder:
    """A stepper that remembers the prompts it is given and answers with flat logits."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.prompts = vocab, []

    def _logits(self, ids: np.ndarray) -> np.ndarray:
        return np.zeros((*ids.shape, self.vocab), np.float32)

    def greedy(self, ids, mask, steps):
        return np.zeros((ids.shape[0], steps), np.int64)

    def prefill(self, ids, mask, reserve=None):
        self.prompts.append(ids.copy())
        return self._logits(ids), None

    def extend(self, ids, state):
        return self._logits(ids), state


def test_the_official_prompt_is_the_bench_prompt() -> None:
    official = load_official_script()
    for batch, length in [(1, 64), (8, 64), (8, 16)]:
        engine = Recorder(32000)
        time_generation(engine, 32000, batch, length, steps=2, repeats=1)
        np.testing.assert_array_equal(official.prompt(32000, batch, length), engine.prompts[0])
