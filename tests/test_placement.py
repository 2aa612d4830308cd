"""Where nodes ran: a heavy node off the asked-for provider fails validation; TF32 reaches CUDA."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY

from parscale_export import runtime as runtime_module
from parscale_export.placement import misplaced, read_placement, summary
from parscale_export.runtime import Runtime, provider_list


def profiled_placement(bundle):
    runtime = Runtime(bundle(TINY), profile=True)
    runtime.prefill(np.array([[1, 2, 3]]), np.ones((1, 3), np.int64))
    return runtime.placement()


def test_cpu_session_profile_names_the_heavy_nodes_and_their_provider(bundle) -> None:
    placement = profiled_placement(bundle)
    heavy = summary(placement)
    assert {"GroupQueryAttention", "MatMul", "RMSNormalization"} <= set(heavy)  # the default contract's graph
    assert all(set(where) == {"CPUExecutionProvider"} for where in heavy.values())
    assert misplaced(placement, "CPUExecutionProvider") == []


def test_heavy_nodes_on_cpu_fail_a_cuda_expectation(bundle) -> None:
    """The same CPU session judged as if CUDA had been asked for: every heavy op is named."""
    problems = misplaced(profiled_placement(bundle), "CUDAExecutionProvider")
    assert any(p.startswith("GroupQueryAttention: ") and "on CPUExecutionProvider" in p for p in problems)
    assert any(p.startswith("MatMul: ") for p in problems)
    assert any(p.startswith("RMSNormalization: ") for p in problems)


def test_light_nodes_elsewhere_are_not_problems(tmp_path) -> None:
    events = [
        {"cat": "Node", "name": "a_kernel_time", "args": {"op_name": "Reshape", "provider": "CPUExecutionProvider"}},
        {"cat": "Node", "name": "b_kernel_time", "args": {"op_name": "MatMul", "provider": "CUDAExecutionProvider"}},
        {"cat": "Node", "name": "b_fence_before", "args": {"op_name": "MatMul", "provider": "CPUExecutionProvider"}},
        {"cat": "Session", "name": "model_run", "args": {}},
    ]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(events))
    placement = read_placement(profile)
    assert misplaced(placement, "CUDAExecutionProvider") == []
    assert summary(placement) == {"MatMul": {"CUDAExecutionProvider": 1}}


def test_placement_needs_profiling_and_cleans_up(bundle) -> None:
    runtime = Runtime(bundle(TINY), profile=True)
    profile_dir = runtime._profile_dir
    runtime.prefill(np.array([[1, 2]]), np.ones((1, 2), np.int64))
    runtime.placement()
    assert not profile_dir.exists()
    with pytest.raises(ValueError, match="profile=True"):
        Runtime(bundle(TINY)).placement()


def test_tf32_is_off_on_cuda_unless_asked() -> None:
    assert provider_list("cuda") == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert provider_list("cuda", tf32=True)[0] == ("CUDAExecutionProvider", {"use_tf32": "1"})
    assert provider_list("cpu") == ["CPUExecutionProvider"]


def test_tf32_setting_reaches_the_cuda_session(bundle, monkeypatch) -> None:
    """With CUDA pretended available, the session is created with use_tf32=0 for the CUDA provider."""
    seen = {}
    real = ort.InferenceSession

    def recording(path, options, providers):
        seen["providers"] = providers
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(runtime_module, "cuda_available", lambda: True)
    monkeypatch.setattr(runtime_module.ort, "InferenceSession", recording)
    with pytest.raises(runtime_module.ProviderError, match="it started CPUExecutionProvider"):
        Runtime(bundle(TINY), provider="cuda")
    assert seen["providers"][0] == ("CUDAExecutionProvider", {"use_tf32": "0"})
