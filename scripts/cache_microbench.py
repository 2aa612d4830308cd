"""Micro-benchmark of one decode step's cache update + attention, the three roads side by side.

8 layers shaped like the mid-size P=4 model seen as one grouped-query model (32 query heads,
8 key/value heads, head_dim 64, batch 1, one new token), on ONNX Runtime CPU:
  concat   contract v1: Concat(past, new) -> present, opset-23 Attention (copies the cache)
  scatter  opset-24 TensorScatter into a fixed buffer + Attention over the buffer with a mask;
           past and present bound to the same OrtValue (no copy)
  grouped  scatter, with each key/value head's 4 query heads stacked along the query axis
           ([1, 8, 4, 64] against [1, 8, slots, 64]), as our graphs run Attention
  gqa      ONNX Runtime's contrib GroupQueryAttention with a shared past/present buffer
Prints ms per step (best of several rounds, interleaved) at each context, per capacity.

    python scripts/cache_microbench.py [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

LAYERS, HEADS, KV, D, PREFIX = 8, 32, 8, 64, 48
F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, opset: int, contrib: bool = False) -> bytes:
    graph = helper.make_graph(nodes, "step", inputs, outputs)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=11 if opset >= 24 else 10).SerializeToString()


def concat_graph() -> bytes:
    q = helper.make_tensor_value_info("q", F, [1, HEADS, 1, D])
    inputs, outputs, nodes = [q], [], []
    for i in range(LAYERS):
        for kind in "kv":
            inputs += [
                helper.make_tensor_value_info(f"{kind}{i}", F, [1, KV, 1, D]),
                helper.make_tensor_value_info(f"past_{kind}{i}", F, [1, KV, "past", D]),
            ]
            nodes.append(helper.make_node("Concat", [f"past_{kind}{i}", f"{kind}{i}"], [f"present_{kind}{i}"], axis=2))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}{i}", F, [1, KV, "total", D]))
        nodes.append(helper.make_node("Attention", ["q", f"present_k{i}", f"present_v{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", F, [1, HEADS, 1, D]))
    return _model(nodes, inputs, outputs, 23)


def scatter_graph(grouped: bool = False) -> bytes:
    """`grouped`: query heads of one key/value head as rows of one query (model.Attention's form)."""
    rows = HEADS // KV if grouped else 1
    inputs = [
        helper.make_tensor_value_info("q", F, [1, KV, rows, D] if grouped else [1, HEADS, 1, D]),
        helper.make_tensor_value_info("index", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("bias", F, [1, 1, rows, "capacity"]),
    ]
    outputs, nodes = [], []
    for i in range(LAYERS):
        for kind in "kv":
            inputs += [
                helper.make_tensor_value_info(f"{kind}{i}", F, [1, KV, 1, D]),
                helper.make_tensor_value_info(f"past_{kind}{i}", F, [1, KV, "capacity", D]),
            ]
            nodes.append(
                helper.make_node(
                    "TensorScatter", [f"past_{kind}{i}", f"{kind}{i}", "index"], [f"present_{kind}{i}"], axis=2
                )
            )
            outputs.append(helper.make_tensor_value_info(f"present_{kind}{i}", F, [1, KV, "capacity", D]))
        nodes.append(helper.make_node("Attention", ["q", f"present_k{i}", f"present_v{i}", "bias"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", F, [1, KV, rows, D] if grouped else [1, HEADS, 1, D]))
    return _model(nodes, inputs, outputs, 24)


def gqa_graph() -> bytes:
    inputs = [
        helper.make_tensor_value_info("q", F, [1, 1, HEADS * D]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    outputs, nodes = [], []
    for i in range(LAYERS):
        inputs += [helper.make_tensor_value_info(f"{kind}{i}", F, [1, 1, KV * D]) for kind in "kv"]
        inputs += [helper.make_tensor_value_info(f"past_{kind}{i}", F, [1, KV, "capacity", D]) for kind in "kv"]
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                ["q", f"k{i}", f"v{i}", f"past_k{i}", f"past_v{i}", "seqlens_k", "total"],
                [f"y{i}", f"present_k{i}", f"present_v{i}"],
                domain="com.microsoft",
                num_heads=HEADS,
                kv_num_heads=KV,
            )
        )
        outputs.append(helper.make_tensor_value_info(f"y{i}", F, [1, 1, HEADS * D]))
        outputs += [helper.make_tensor_value_info(f"present_{kind}{i}", F, [1, KV, "capacity", D]) for kind in "kv"]
    return _model(nodes, inputs, outputs, 21, contrib=True)


class Road:
    def __init__(self, name: str, model: bytes, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.name, self.session = name, ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def prepare(self, context: int, capacity: int) -> None:
        rng = np.random.default_rng(0)
        binding = self.session.io_binding()
        self.keep = []  # numpy arrays behind the OrtValues must outlive the binding

        def bind(name: str, array: np.ndarray, output: str | None = None) -> None:
            self.keep.append(array)
            value = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(name, value)
            if output:
                binding.bind_ortvalue_output(output, value)

        new = (1, 1, KV * D) if self.name == "gqa" else (1, KV, 1, D)
        query = {"gqa": (1, 1, HEADS * D), "grouped": (1, KV, HEADS // KV, D)}.get(self.name, (1, HEADS, 1, D))
        bind("q", rng.standard_normal(query, np.float32))
        for i in range(LAYERS):
            for kind in "kv":
                bind(f"{kind}{i}", rng.standard_normal(new, np.float32))
                if self.name == "concat":
                    bind(f"past_{kind}{i}", rng.standard_normal((1, KV, context, D), np.float32))
                    binding.bind_output(f"present_{kind}{i}")
                else:
                    cache = np.zeros((1, KV, capacity, D), np.float32)
                    cache[:, :, :context] = rng.standard_normal((1, KV, context, D))
                    bind(f"past_{kind}{i}", cache, f"present_{kind}{i}")
            binding.bind_output(f"y{i}")
        if self.name in ("scatter", "grouped"):
            bind("index", np.array([context], np.int64))
            rows = HEADS // KV if self.name == "grouped" else 1
            bias = np.full((1, 1, rows, capacity), np.finfo(np.float32).min, np.float32)
            bias[..., : context + 1] = 0
            bind("bias", bias)
        elif self.name == "gqa":
            bind("seqlens_k", np.array([context], np.int32))
            bind("total", np.array(context + 1, np.int32))
        self.binding = binding

    def step(self) -> float:
        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    builds = {"concat": concat_graph, "scatter": scatter_graph, "grouped": lambda: scatter_graph(grouped=True),
              "gqa": gqa_graph}  # fmt: skip
    roads = [Road(name, build(), args.threads) for name, build in builds.items()]
    print(f"ms per decode step, {LAYERS} layers, {HEADS}/{KV} heads, d {D}, best of {args.rounds}x{args.steps}")
    print("context  capacity" + "".join(f"{name:>9s}" for name in builds))
    for context in (64, 1024, 2048):
        for capacity in (PREFIX + context + 64, PREFIX + 2048 + 64):
            best = {}
            for road in roads:
                road.prepare(PREFIX + context, capacity)
                road.step()
            for _ in range(args.rounds):  # interleaved, so machine noise hits every road alike
                for road in roads:
                    road.prepare(PREFIX + context, capacity)
                    took = min(road.step() for _ in range(args.steps))
                    best[road.name] = min(best.get(road.name, took), took)
            cells = "".join(f"{1e3 * best[r.name]:9.2f}" for r in roads)
            print(f"{context:7d} {capacity:9d}{cells}")


if __name__ == "__main__":
    main()
