"""Row b*P + p of the cache is stream p of sequence b, checked against an independent,
deliberately naive one-stream implementation of the official semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONFORMANCE, TINY

from parscale_export.checkpoint import load_weights
from parscale_export.config import load_config
from parscale_export.model import _add_rms_norm, add_rms_norm, rope, stack_projections, unstack_projections
from parscale_export.rope import rope_frequencies
from parscale_export.runtime import Runtime


def one_stream_keys_values(checkpoint, ids: list[int], stream: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys [KV, S, D] after RoPE, values [KV, S, D]) of one stream on one unpadded sequence."""
    c = load_config(checkpoint)
    w = load_weights(checkpoint, c)
    d, n_rep = c.head_dim, c.num_heads // c.num_kv_heads

    def norm(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)

    def rope(x, pos):  # x [heads, S, D]
        inv_freq, scale = rope_frequencies(c)
        angles = pos[:, None].float() * inv_freq
        cos, sin = torch.cat([angles, angles], -1).cos() * scale, torch.cat([angles, angles], -1).sin() * scale
        half = d // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    seq = len(ids)
    pos = torch.arange(seq)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]  # [S, h]
    out = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).view(seq, -1, d).transpose(0, 1)
        k = (h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).view(seq, -1, d).transpose(0, 1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).view(seq, -1, d).transpose(0, 1)
        q, k = rope(q, pos), rope(k, pos)
        out.append((k, v))
        keys = torch.cat([w[p + "self_attn.prefix_k"][stream], k], 1).repeat_interleave(n_rep, 0)
        values = torch.cat([w[p + "self_attn.prefix_v"][stream], v], 1).repeat_interleave(n_rep, 0)
        n_prefix = c.parscale_n_tokens
        scores = q @ keys.transpose(1, 2) / d**0.5  # [H, S, T + S]
        causal = torch.ones(seq, seq).triu(1).bool()
        scores[:, :, n_prefix:] = scores[:, :, n_prefix:].masked_fill(causal, float("-inf"))
        attn = (scores.softmax(-1) @ values).transpose(0, 1).reshape(seq, -1)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return out


@pytest.mark.parametrize("checkpoint", [TINY, CONFORMANCE / "p2_gqa_bf16_sharded"], ids=lambda p: p.name)
def test_present_rows_are_sequence_major_stream_minor(checkpoint, bundle) -> None:
    runtime = Runtime(bundle(checkpoint, cache="dynamic"))  # contract v1's rows layout
    n = runtime.contract.parscale_n
    prompts = [[5, 17, 42, 8, 99], [7, 3, 150, 21, 64]]
    _, state = runtime.prefill(np.array(prompts), np.ones((2, 5), np.int64))
    for b, ids in enumerate(prompts):
        for stream in range(n):
            expected = one_stream_keys_values(checkpoint, ids, stream)
            for layer, (k, v) in enumerate(expected):
                row = b * n + stream
                np.testing.assert_allclose(state.past[2 * layer][row], k.numpy(), atol=1e-4)
                np.testing.assert_allclose(state.past[2 * layer + 1][row], v.numpy(), atol=1e-4)
    # The streams really differ after layer 0 (the prefix shapes them), so the check has teeth.
    assert not np.allclose(state.past[2][0], state.past[2][1], atol=1e-3)


def test_stacked_projections_unstack_to_the_checkpoint() -> None:
    """build_model stacks q/k/v and gate/up; train_tiny writes checkpoints through the inverse."""
    config = load_config(TINY)
    weights = load_weights(TINY, config)
    original = {name: t.clone() for name, t in weights.items()}
    stacked = stack_projections(weights, config.num_layers)
    assert "model.layers.0.self_attn.qkv_proj.bias" in stacked and "model.layers.0.mlp.up_proj.weight" not in stacked
    back = unstack_projections(stacked, config)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[name], original[name]) for name in original)


def test_fused_ops_train_like_their_math() -> None:
    """model.rope and model.add_rms_norm are custom ops (one ONNX node each); scripts/train_tiny.py
    backpropagates through them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    angles = torch.randn(2, 4, 4, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda x: rope(x, angles.cos(), angles.sin()), (x,))

    def grads(norm) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        leaves = [torch.randn(*shape, generator=g, requires_grad=True) for shape in ((2, 5, 8), (2, 5, 8), (8,))]
        normed, total = norm(*leaves, 1e-6)
        weights = [torch.randn(t.shape, generator=g) for t in (normed, total)]
        ((normed * weights[0]).sum() + (total * weights[1]).sum()).backward()
        return [leaf.grad for leaf in leaves]

    for ours, math in zip(grads(add_rms_norm), grads(_add_rms_norm), strict=True):
        torch.testing.assert_close(ours, math, rtol=0, atol=0)
