"""Where ONNX Runtime really ran each node, read from a session profile.

A session asked for CUDA still starts when some node has no CUDA kernel: ONNX Runtime quietly
places that node on the CPU and copies tensors across for it. `session.get_providers()` cannot
see that; the profile can (every node event names its provider). A bundle whose heavy nodes
ran on the CPU is not a CUDA result, whatever the session says.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .errors import BundleError

# The nodes that carry the model's work; a shape op or a cast on CPU costs little, these do not.
HEAVY_OPS = frozenset(
    {
        "Attention",
        "GroupQueryAttention",
        "MultiHeadAttention",
        "MatMul",
        "MatMulNBits",
        "Gemm",
        "FusedMatMul",
        "RMSNormalization",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "LayerNormalization",
        "Softmax",
        "RotaryEmbedding",
    }
)

Placement = dict[str, Counter[str]]  # op type -> execution provider -> node runs


def read_placement(profile: Path) -> Placement:
    """op type -> Counter of the providers its node runs were placed on, from a profile JSON."""
    try:
        events = json.loads(Path(profile).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{profile}: cannot read the ONNX Runtime profile ({exc})") from None
    placement: Placement = {}
    for event in events if isinstance(events, list) else []:
        args = event.get("args") if isinstance(event, dict) else None
        if event.get("cat") != "Node" or not isinstance(args, dict) or "provider" not in args:
            continue
        if not str(event.get("name", "")).endswith("_kernel_time"):
            continue  # each node also has fence events; count one event per node run
        placement.setdefault(str(args.get("op_name")), Counter())[str(args["provider"])] += 1
    return placement


def misplaced(placement: Placement, provider: str) -> list[str]:
    """One line per heavy op type that ran (even once) on a provider other than `provider`."""
    problems = []
    for op in sorted(placement):
        elsewhere = {p: n for p, n in placement[op].items() if p != provider}
        if op in HEAVY_OPS and elsewhere:
            where = ", ".join(f"{n} on {p}" for p, n in sorted(elsewhere.items()))
            problems.append(f"{op}: {where} (expected {provider})")
    return problems


def summary(placement: Placement) -> dict[str, dict[str, int]]:
    """Plain dicts, for JSON reports: heavy ops only, providers sorted."""
    return {op: dict(sorted(placement[op].items())) for op in sorted(placement) if op in HEAVY_OPS}
