"""ParScale in plain PyTorch, with the official semantics and an explicit KV cache.

This one module is both the PyTorch reference that `validate` compares against and the graph
that `convert` exports. Module names follow the checkpoint's, except that q/k/v and gate/up are
stacked into one projection each (`stack_projections`; `unstack_projections` undoes it).

Layout:
- Hidden states are [B, S*P, h]: the P streams of a token are adjacent rows, so the projections'
  outputs [B, S*P, n*D] are already [B, S, P*n, D], the head layout attention runs in, where
  query head `p*H + h` shares key/value head `p*KV + h // (H/KV)`: plain grouped-query
  attention that stays inside its own stream. No reshape of the hidden states copies anything.
- In the cache, row `b*P + p` is stream p of sequence b: [P*B, KV, L, D] is also, for free,
  [B, P*KV, L, D], the same head layout.
- Contract version 1 (`attention="append"`): the cache passed in and returned holds real tokens
  only, [P*B, KV, past, D] per layer, and grows by concatenation. The learned prefix (T slots
  per stream and layer, no RoPE, never masked) is a constant of the module, prepended to the
  keys and values inside attention.
- Contract version 2 (`attention="scatter"`): the cache is one [B, P*KV, capacity, D] buffer per
  layer and kind. Each call writes its new keys (after RoPE) at slot `past` and the prefix
  right after them, then attends over the whole buffer; the bias hides unused slots. Attention
  is a weighted sum over keys, so where the prefix sits changes nothing: it only has to be
  un-rotated and always visible, as in the official model.
- Contract version 3 (`attention="grouped_query"`): version 2's buffers, written and read by
  ONNX Runtime's GroupQueryAttention (`group_query_attention`), which attends only over the
  slots in use. The prefix sits in slots [0, T), written by a sequence's first call as extra
  rows in front of its tokens; tokens follow from slot T.
- `packed=True` (the onnxruntime-genai graphs) also accepts what genai's batching feeds:
  rows padded on the right, a cache whose columns after a row's length hold garbage, a
  present as long as the mask (or the past, when genai shares one buffer). Each row's new
  keys go right after its last real token, and positions come from the mask. With left
  padding this is the same computation as the default.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .rope import rope_frequencies

KVCache = Sequence[tuple[Tensor, Tensor]]


@torch.library.custom_op("parscale::cache_write", mutates_args=())
def cache_write(buffer: Tensor, update: Tensor, start: Tensor) -> Tensor:
    """`buffer` [B, H, capacity, D] with `update` [B, H, n, D] at slots [start[b], start[b] + n).

    The export turns this into ONNX TensorScatter, which ONNX Runtime runs in place when past
    and present are bound to the same memory. Here it returns a copy: a custom op may not
    return an alias of its input."""
    out = buffer.clone()
    n = update.shape[2]
    for row, first in enumerate(start.tolist()):
        out[row, :, first : first + n] = update[row]
    return out


@cache_write.register_fake
def _(buffer: Tensor, update: Tensor, start: Tensor) -> Tensor:
    return torch.empty_like(buffer)


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm (`rms_norm`) with its weight; `add_and_norm` fuses the residual add before it."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: Tensor, update: Tensor) -> tuple[Tensor, Tensor]:
        """(this norm of x + update, x + update): a residual add and the norm after it."""
        return add_rms_norm(x, update, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Qwen2's RMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _add_rms_norm(x: Tensor, update: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    total = x + update
    return rms_norm(total, weight, eps), total


@torch.library.custom_op("parscale::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, update: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Qwen2's RMSNorm of x + update, and the sum: one ONNX Runtime SkipSimplifiedLayerNormalization
    node in the export (opset 23+) instead of an Add and a norm."""
    return _add_rms_norm(x, update, weight, eps)


@add_rms_norm.register_fake
def _(x: Tensor, update: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


def _save_add_rms_norm_inputs(ctx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs[:3])
    ctx.eps = inputs[3]


def _add_rms_norm_backward(ctx, grad_normed: Tensor, grad_total: Tensor) -> tuple:
    """Gradients by differentiating the eager math again (scripts/train_tiny.py trains this model)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        outputs = _add_rms_norm(*leaves, ctx.eps)
        grads = torch.autograd.grad(outputs, leaves, (grad_normed, grad_total))
    return (*grads, None)


add_rms_norm.register_autograd(_add_rms_norm_backward, setup_context=_save_add_rms_norm_inputs)


class RotaryEmbedding(nn.Module):
    """cos/sin of each position's angles [B, S, D/2], in float32 as transformers computes them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # A plain attribute, not a buffer: model.to(float16) must not round the frequencies.
        self.inv_freq, self.attention_scaling = rope_frequencies(config)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        angles = position_ids.float()[..., None] * self.inv_freq  # [B, S, D/2]
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of x [..., D] by cos/sin [..., D/2], already broadcastable to x's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@torch.library.custom_op("parscale::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of `x` [B, N, S, D] by cos/sin [B, S, D/2]: one ONNX RotaryEmbedding
    node in the export (opset 23+) instead of the six ops this eager form traces to."""
    return _rotate(x, cos[:, None], sin[:, None])


@rope.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return torch.empty_like(x)


def _save_rope_angles(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


def _rope_backward(ctx, grad: Tensor) -> tuple:
    """A rotation's transpose is the rotation back: the gradient of x is `grad` rotated by -angle
    (positions, hence cos and sin, are never trained)."""
    cos, sin = ctx.saved_tensors
    return rope(grad, cos, -sin), None, None


rope.register_autograd(_rope_backward, setup_context=_save_rope_angles)


@torch.library.custom_op("parscale::rope_heads_last", mutates_args=())
def rope_heads_last(x: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    """`rope` for x [B, S, heads*D] (the layout GroupQueryAttention takes): one ONNX
    RotaryEmbedding with num_heads in the export."""
    batch, seq, _ = x.shape
    return _rotate(x.reshape(batch, seq, heads, -1), cos[:, :, None], sin[:, :, None]).reshape(x.shape)


@rope_heads_last.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("parscale::group_query_attention", mutates_args=())
def group_query_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    buffer_k: Tensor,
    buffer_v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    last: Tensor,
    first: Tensor,
    bias: Tensor,
    bias_shape: Tensor,
    total: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Contract v3's attention, ONNX Runtime's GroupQueryAttention with a shared buffer in the
    export. q [B, S, NH*D], k/v [B, S, NKV*D] (rotated), buffers [B, NKV, capacity, D], prefix
    [1, T, NKV*D] (T may be 0), `last` [B] int32 the slot of each row's last new token, `first`
    [1] 1 on a sequence's first call, `bias` [B, 1, 1, total] additive over slots [0, total).
    `bias_shape` (the bias for every new row, [B, 1, rows, total]) and `total` (int32 scalar) are
    what the ONNX op wants, computed once per call by the caller so no layer repeats them.

    The first call writes the prefix too: T extra rows at slots [0, T) (unrotated, so exact) in
    front of the tokens, with zero queries whose outputs are dropped. Every row's new keys go to
    slots (last - rows, last]; query i attends slots up to its own, plus the bias."""
    batch, seq, _ = q.shape
    n_kv, d = buffer_k.shape[1], buffer_k.shape[3]
    if int(first) and prefix_k.shape[1]:
        t = prefix_k.shape[1]
        q = torch.cat((q.new_zeros(batch, t, q.shape[2]), q), dim=1)
        k = torch.cat((prefix_k.expand(batch, -1, -1), k), dim=1)
        v = torch.cat((prefix_v.expand(batch, -1, -1), v), dim=1)
    rows = q.shape[1]
    start = last.long() + 1 - rows  # [B]
    present_k = cache_write(buffer_k, k.reshape(batch, rows, n_kv, d).transpose(1, 2), start)
    present_v = cache_write(buffer_v, v.reshape(batch, rows, n_kv, d).transpose(1, 2), start)
    total = bias.shape[-1]
    slots = torch.arange(total, device=q.device)
    query_slots = start[:, None] + torch.arange(rows, device=q.device)  # [B, rows]
    causal = torch.where(slots <= query_slots[..., None], 0.0, torch.finfo(q.dtype).min).to(q.dtype)
    mask = causal[:, None] + bias[..., :total]  # [B, 1, rows, total]
    qh = q.reshape(batch, rows, -1, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qh, present_k[:, :, :total], present_v[:, :, :total], attn_mask=mask, enable_gqa=qh.shape[1] != n_kv
    )
    return out.transpose(1, 2).reshape(batch, rows, -1)[:, rows - seq :], present_k, present_v


@group_query_attention.register_fake
def _(q, k, v, buffer_k, buffer_v, prefix_k, prefix_v, last, first, bias, bias_shape, total):
    return torch.empty_like(q), torch.empty_like(buffer_k), torch.empty_like(buffer_v)


@dataclass(frozen=True)
class Step:
    """What every layer reads in one call, computed once by ParScaleModel.

    cos/sin [B, S, D/2] rotate the new queries and keys; `bias` is the additive attention bias.
    Where the new keys go: `write_at` [B], the slot of each row's first new token (contract v2);
    otherwise `slots` (packed contract v1 graphs) scatters them after each row's last real token;
    with neither they are appended. Contract v3 (`last` set) hands the write and the attention to
    group_query_attention."""

    cos: Tensor
    sin: Tensor
    bias: Tensor
    slots: PackedSlots | None = None
    write_at: Tensor | None = None
    last: Tensor | None = None  # contract v3: each row's last new slot (GroupQueryAttention)
    first: Tensor | None = None  # contract v3: [1], 1 on a sequence's first call
    bias_shape: Tensor | None = None  # contract v3: [B, 1, new rows, total], the bias as the op takes it
    total: Tensor | None = None  # contract v3: slots in use after this call (int32 scalar)


class Attention(nn.Module):
    """Self-attention over the P streams of each sequence, hidden states [B, S*P, h].

    q/k/v are one projection (`qkv_proj`, the checkpoint's three stacked by build_model): one
    weight read and, in int4, one activation quantization per layer instead of three."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_streams, self.n_heads, self.n_kv = config.parscale_n, config.num_heads, config.num_kv_heads
        self.head_dim = d = config.head_dim
        self.sizes = (self.n_heads * d, self.n_kv * d, self.n_kv * d)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.sizes), bias=True)
        self.o_proj = nn.Linear(self.n_heads * d, config.hidden_size, bias=False)
        if self.n_streams > 1:
            prefix = (self.n_streams, self.n_kv, config.parscale_n_tokens, d)
            self.prefix_k = nn.Parameter(torch.zeros(prefix))
            self.prefix_v = nn.Parameter(torch.zeros(prefix))

    def _prefix(self, prefix: Tensor, batch: int) -> Tensor:
        # [P, KV, T, D] -> [B, P*KV, T, D]: the same prefix for every sequence
        return prefix.reshape(1, self.n_streams * self.n_kv, -1, self.head_dim).expand(batch, -1, -1, -1)

    def _append(
        self, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, slots: PackedSlots | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Contract v1: past [B*P, KV, past, D] + new -> presents [B*P, KV, past + S, D] (packed:
        new keys scattered after each row's last real token instead); the keys attention sees
        are the prefix followed by the presents, [B, P*KV, T + present, D]."""
        batch, _, _, d = k.shape
        # Past arrives as [B*P, KV, past, D]; the same memory seen as [B, P*KV, past, D].
        past_k = past_k.reshape(batch, self.n_streams * self.n_kv, -1, d)
        past_v = past_v.reshape(batch, self.n_streams * self.n_kv, -1, d)
        if slots is None:
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        else:
            k, v = slots.write(past_k, k), slots.write(past_v, v)
        present_k = k.reshape(batch * self.n_streams, self.n_kv, -1, d)
        present_v = v.reshape(batch * self.n_streams, self.n_kv, -1, d)
        if self.n_streams > 1:
            # The prefix joins the keys only here, so the cache never stores it.
            k = torch.cat((self._prefix(self.prefix_k, batch), k), dim=2)
            v = torch.cat((self._prefix(self.prefix_v, batch), v), dim=2)
        return k, v, present_k, present_v

    def _write(self, k: Tensor, v: Tensor, buffer_k: Tensor, buffer_v: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
        """Contract v2: write the new keys/values [B, P*KV, S, D] into the [B, P*KV, capacity, D]
        buffers at slot `start`, the prefix right after them; attention reads the whole buffers."""
        if self.n_streams > 1:
            batch = k.shape[0]
            k = torch.cat((k, self._prefix(self.prefix_k, batch)), dim=2)
            v = torch.cat((v, self._prefix(self.prefix_v, batch)), dim=2)
        return cache_write(buffer_k, k, start), cache_write(buffer_v, v, start)

    def _attend_by_kv_head(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """Grouped-query attention with each key/value head's H/KV query heads stacked along the
        query axis, [B, P*H, S, D] -> [B, P*KV, (H/KV)*S, D] (query head p*H + j*g + i is row
        i*S + s of key/value head p*KV + j): the same result, but ONNX Runtime's CPU kernel then
        reads each cached head once, not once per query head (8 layers of the mid-size P=4
        shape over 2160 slots, one thread: 7.9 -> 6.4 ms of CPU time per step)."""
        batch, heads, seq, d = q.shape
        group = self.n_heads // self.n_kv
        if group == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        q = q.reshape(batch, heads // group, group * seq, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.repeat(1, 1, group, 1))
        return out.reshape(batch, heads, seq, d)

    def forward(self, x: Tensor, step: Step, past_k: Tensor, past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq, n, d = x.shape[0], step.cos.shape[1], self.n_streams, self.head_dim
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)  # [B, S*P, n*D] each
        if step.last is not None:  # contract v3: [B, S*P, n*D] is [B, S, P*n*D], GroupQueryAttention's layout
            return self._group_query(q, k, v, step, past_k, past_v)
        # Streams are the outer part of the head axis: query head p*H + h is stream p's head h.
        q = rope(q.reshape(batch, seq, n * self.n_heads, d).transpose(1, 2), step.cos, step.sin)  # [B, P*H, S, D]
        k = rope(k.reshape(batch, seq, n * self.n_kv, d).transpose(1, 2), step.cos, step.sin)  # [B, P*KV, S, D]
        v = v.reshape(batch, seq, n * self.n_kv, d).transpose(1, 2)

        if step.write_at is not None:  # contract v2: in place, the prefix inside the buffer
            k, v = present_k, present_v = self._write(k, v, past_k, past_v, step.write_at)
            out = self._attend_by_kv_head(q, k, v, step.bias)
        else:
            k, v, present_k, present_v = self._append(k, v, past_k, past_v, step.slots)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.bias, enable_gqa=self.n_heads != self.n_kv)
        out = out.transpose(1, 2).reshape(batch, seq * n, self.n_heads * d)  # [B, P*H, S, D] -> [B, S*P, H*D]
        return self.o_proj(out), present_k, present_v

    def _group_query(
        self, q: Tensor, k: Tensor, v: Tensor, step: Step, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq, n = q.shape[0], step.cos.shape[1], self.n_streams
        q = rope_heads_last(q.reshape(batch, seq, -1), step.cos, step.sin, n * self.n_heads)
        k = rope_heads_last(k.reshape(batch, seq, -1), step.cos, step.sin, n * self.n_kv)
        v = v.reshape(batch, seq, -1)
        if n > 1:  # [P, KV, T, D] -> [1, T, P*KV*D]: one row per prefix slot, like k and v
            prefix_k, prefix_v = (
                t.permute(2, 0, 1, 3).reshape(1, t.shape[2], -1) for t in (self.prefix_k, self.prefix_v)
            )
        else:
            prefix_k = prefix_v = k.new_zeros(1, 0, k.shape[2])
        out, present_k, present_v = group_query_attention(
            q, k, v, past_k, past_v, prefix_k, prefix_v, step.last, step.first, step.bias, step.bias_shape, step.total
        )
        return self.o_proj(out.reshape(batch, seq * n, -1)), present_k, present_v


class MLP(nn.Module):
    """SwiGLU with gate and up as one projection (`gate_up_proj`, stacked by build_model)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One block. The residual stream arrives without the previous block's MLP output (`update`,
    None for the first block) and leaves without its own: each residual add is fused with the
    norm that follows it (RMSNorm.add_and_norm), as ONNX Runtime's fused op wants it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, update: Tensor | None, step: Step, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (the residual stream, this block's MLP output still to be added, present k, v)."""
        if update is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm.add_and_norm(x, update)
        attn, present_k, present_v = self.self_attn(h, step, past_k, past_v)
        h, x = self.post_attention_layernorm.add_and_norm(x, attn)
        return x, self.mlp(h), present_k, present_v


def attention_bias(
    attention_mask: Tensor, seq: int, n_prefix: int, dtype: torch.dtype, capacity: int | None = None
) -> Tensor:
    """Additive bias over the keys attention sees: prefix always visible, real keys causal and
    unpadded. Contract v1: [B, 1, S, T + past + S], prefix first. Contract v2 (`capacity`):
    [B, 1, S, capacity], the buffer's order: tokens, prefix, then unused slots (hidden).

    `attention_mask` [B, past + S] covers real tokens only. Query i sits at absolute index
    past + i. Every query may also see its own key: for real tokens that changes nothing, and
    it keeps a padded query row from being fully masked, whose softmax would be NaN and
    could poison the cache of later layers (0 * NaN is NaN).
    """
    batch, total = attention_mask.shape
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = (torch.arange(seq, device=attention_mask.device) + (total - seq))[:, None]  # [S, 1]
    visible = (key_pos <= query_pos) & (attention_mask[:, None, :] == 1)  # [B, S, L]
    visible = visible | (key_pos == query_pos)
    hidden = torch.finfo(dtype).min
    bias = torch.where(visible, 0.0, hidden).to(dtype)[:, None]  # [B, 1, S, L]
    prefix = bias.new_zeros(batch, 1, seq, n_prefix)
    if capacity is None:
        return torch.cat((prefix, bias), dim=-1) if n_prefix else bias
    if n_prefix:
        bias = torch.cat((bias, prefix), dim=-1)
    return F.pad(bias, (0, capacity - total - n_prefix), value=hidden)


class PackedSlots:
    """Where each row's new tokens go when rows may be padded on either side (`packed=True`).

    Row b's S new tokens end at the last 1 of its mask, so they take columns
    start[b] + s with start[b] = max(last[b] + 1 - S, 0): with left padding the last S columns,
    as in the default layout; with right padding (onnxruntime-genai's batches) right after the
    row's own tokens, overwriting what a padded column left there. Contract v1: the present is
    max(past, total) long: total when genai passes a growing cache, past when it shares one
    buffer between past and present. Contract v2: the buffer has a fixed capacity and the
    prefix follows each row's new tokens, at start[b] + S.
    """

    def __init__(self, attention_mask: Tensor, seq: int, past_length: int | torch.SymInt) -> None:
        total = attention_mask.shape[1]
        columns = torch.arange(total, device=attention_mask.device)
        last = (attention_mask * columns).amax(-1)  # [B]: the last real column
        self.start = (last + 1 - seq).clamp(min=0)  # [B]
        self.columns = (self.start[:, None] + torch.arange(seq, device=attention_mask.device)).clamp(max=total - 1)
        self.length = torch.sym_max(past_length, total)
        self.mask = attention_mask

    def positions(self) -> Tensor:
        """[B, S]: real tokens before each new token's column (genai's own position_ids count a
        real token equal to the pad id as padding, so they are not trusted)."""
        return (self.mask.cumsum(-1) - 1).clamp(min=0).gather(1, self.columns)

    def bias(self, n_prefix: int, dtype: torch.dtype) -> Tensor:
        """[B, 1, S, T + length]: the prefix, then every real column up to the query's own, and
        the query's own column (so a padded query row is never fully masked)."""
        batch, total = self.mask.shape
        keys = torch.arange(self.length, device=self.mask.device)  # [L]
        real = self.mask.gather(1, keys.clamp(max=total - 1)[None].expand(batch, -1)) == 1
        real = real & (keys < total)  # [B, L]: columns past the mask are never real
        query = self.columns[:, :, None]  # [B, S, 1]
        visible = (real[:, None, :] & (keys <= query)) | (keys == query)  # [B, S, L]
        bias = torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]
        return torch.cat((bias.new_zeros(batch, 1, bias.shape[2], n_prefix), bias), dim=-1) if n_prefix else bias

    def buffer_bias(self, n_prefix: int, dtype: torch.dtype, capacity: int | torch.SymInt) -> Tensor:
        """[B, 1, S, capacity] for contract v2's buffer: every real column up to the query's own,
        the query's own column, and the T prefix slots after the row's new tokens; whatever else a
        slot holds (padding, an older copy of the prefix, nothing yet) stays hidden."""
        batch, total = self.mask.shape
        keys = torch.arange(capacity, device=self.mask.device)  # [C]
        real = self.mask.gather(1, keys.clamp(max=total - 1)[None].expand(batch, -1)) == 1
        real = real & (keys < total)  # [B, C]
        query = self.columns[:, :, None]  # [B, S, 1]
        prefix = (self.start + self.columns.shape[1])[:, None, None]  # [B, 1, 1]: first prefix slot
        in_prefix = (keys >= prefix) & (keys < prefix + n_prefix)  # [B, 1, C]
        visible = (real[:, None, :] & (keys <= query)) | (keys == query) | in_prefix  # [B, S, C]
        return torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]

    def write(self, past: Tensor, new: Tensor) -> Tensor:
        """past [B, H, Lp, D], grown with zeros to `length`, with new [B, H, S, D] at `columns`."""
        batch, heads, past_length, d = past.shape
        buffer = torch.cat((past, past.new_zeros(batch, heads, self.length - past_length, d)), dim=2)
        return buffer.scatter(2, self.columns[:, None, :, None].expand(-1, heads, -1, d), new)


class ParScaleModel(nn.Module):
    """The decoder: embeddings, layers, final norm and the stream aggregation."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        if config.parscale_n > 1:
            n, h = config.parscale_n, config.hidden_size
            self.aggregate_layer = nn.Sequential(nn.Linear(n * h, h), nn.SiLU(), nn.Linear(h, n))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        past: KVCache,
        packed: bool = False,
        attention: str = "append",
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        n = self.config.parscale_n
        batch, seq = input_ids.shape
        x = self.embed_tokens(input_ids)[:, :, None].expand(-1, -1, n, -1)  # a copy per stream
        x = x.reshape(batch, seq * n, -1)  # [B, S*P, h]
        step = self._step(attention_mask, position_ids, past[0][0].shape[2], seq, x.dtype, packed, attention)
        presents = []
        update = None
        for layer, (past_k, past_v) in zip(self.layers, past, strict=True):
            x, update, present_k, present_v = layer(x, update, step, past_k, past_v)
            presents.append((present_k, present_v))
        x, _ = self.norm.add_and_norm(x, update)
        return (self._aggregate(x.view(batch, seq, n, -1)) if n > 1 else x), presents

    def _step(
        self,
        attention_mask: Tensor,
        position_ids: Tensor,
        past_length: int,
        seq: int,
        dtype: torch.dtype,
        packed: bool,
        attention: str,
    ) -> Step:
        """What every layer reads, by the contract's attention (CacheKind.attention): "append"
        (v1), "scatter" (v2: written at slot `past`, or packed after each row's last real token)
        or "grouped_query" (v3: always packed, the prefix in slots [0, T))."""
        n_prefix = self.config.parscale_n_tokens
        batch, total = attention_mask.shape
        slots = PackedSlots(attention_mask, seq, past_length) if packed else None
        if slots is not None:
            position_ids = slots.positions()
        cos, sin = self.rotary_emb(position_ids, dtype)
        if attention == "grouped_query":
            assert slots is not None, "contract v3 graphs read each row's slots from the mask"
            last = (slots.start + seq - 1 + n_prefix).to(torch.int32)
            first = (torch.full((1,), total - seq) == 0).long()  # the first call also writes the prefix
            visible = torch.cat((attention_mask.new_ones(batch, n_prefix), attention_mask), dim=1) == 1
            bias = torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None]
            rows = seq + n_prefix * first
            bias_shape = torch.cat((torch.full((1,), batch), torch.ones(1, dtype=torch.long), rows,
                                    torch.full((1,), n_prefix + total)))  # fmt: skip
            used = torch.full((), n_prefix + total, dtype=torch.int32)
            return Step(cos, sin, bias, last=last, first=first, bias_shape=bias_shape, total=used)
        if attention == "scatter":  # contract v2: this call's tokens go to slot `past` of every sequence's buffers
            if slots is not None:  # ...or, packed, right after each row's last real token
                return Step(cos, sin, slots.buffer_bias(n_prefix, dtype, past_length), slots, slots.start)
            write_at = torch.full((batch,), total - seq, dtype=torch.long)
            bias = attention_bias(attention_mask, seq, n_prefix, dtype, capacity=past_length)
            return Step(cos, sin, bias, None, write_at)
        if slots is not None:
            return Step(cos, sin, slots.bias(n_prefix, dtype), slots)
        return Step(cos, sin, attention_bias(attention_mask, seq, n_prefix, dtype))

    def _aggregate(self, streams: Tensor) -> Tensor:
        """Weighted sum of the P streams [B, S, P, h] -> [B, S, h], as the official model does."""
        batch, seq, n, h = streams.shape
        # Feature-major, stream-minor: z[..., j*P + p] = stream p's feature j.
        z = streams.transpose(2, 3).reshape(batch, seq, h * n)
        weights = torch.softmax(self.aggregate_layer(z).float(), dim=-1)  # [B, S, P]
        eps = self.config.parscale_attn_smooth
        if eps:
            weights = weights * (1 - eps) + eps / n
        mixed = (streams * weights[..., None]).sum(dim=2)  # float32
        return mixed.to(streams.dtype)


class ParScaleForCausalLM(nn.Module):
    """Decoder plus LM head. `forward` is one step: prefill (past length 0) or decode/chunk."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = ParScaleModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        past: KVCache,
        packed: bool = False,
        attention: str = "append",
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """logits [B, S, V] float32 and the presents per layer: [P*B, KV, past + S, D] (contract
        v1; with `packed`, max(past, mask length) long: see PackedSlots), or with `attention`
        "scatter" (v2) or "grouped_query" (v3) the [B, P*KV, capacity, D] buffers after this
        call's write."""
        hidden, presents = self.model(input_ids, attention_mask, position_ids, past, packed, attention)
        return self.lm_head(hidden).float(), presents

    def empty_cache(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        """A past of length 0 for `batch` sequences, in the model's dtype."""
        c = self.config
        dtype = self.lm_head.weight.dtype
        shape = (c.parscale_n * batch, c.num_kv_heads, 0, c.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(c.num_layers)]


# Fused projection -> the checkpoint's projections it stacks, in order along the output axis.
STACKED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _stacks(num_layers: int) -> Iterator[tuple[str, str, list[str]]]:
    """(projection, fused tensor name, the checkpoint tensor names it stacks) for every layer,
    weight and bias."""
    for layer in range(num_layers):
        for fused, parts in STACKED.items():
            for kind in ("weight", "bias"):
                prefix = f"model.layers.{layer}."
                yield fused, f"{prefix}{fused}.{kind}", [f"{prefix}{part}.{kind}" for part in parts]


def stacked_names(num_layers: int) -> dict[str, list[str]]:
    """The model's stacked tensor names -> the checkpoint tensors each stacks, in order along the
    output axis (what `stack_projections` concatenates)."""
    return {fused: parts for _, fused, parts in _stacks(num_layers)}


def stack_projections(weights: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Checkpoint names -> the model's, in place: each layer's q/k/v (weights and biases) and
    gate/up concatenated along the output axis. The parts leave `weights` as their stack enters,
    so a 1.8B model never holds both. Returns `weights`."""
    for _, fused, parts in _stacks(num_layers):
        if parts[0] in weights:
            weights[fused] = torch.cat([weights.pop(name) for name in parts])
    return weights


def unstack_projections(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """The model's names -> the checkpoint's (the inverse of `stack_projections`)."""
    d = config.head_dim
    sizes = {
        "self_attn.qkv_proj": [config.num_heads * d, config.num_kv_heads * d, config.num_kv_heads * d],
        "mlp.gate_up_proj": [config.intermediate_size] * 2,
    }
    out = dict(state)
    for projection, fused, parts in _stacks(config.num_layers):
        if fused in out:
            out |= dict(zip(parts, out.pop(fused).split(sizes[projection]), strict=True))
    return out


def build_model(
    config: ModelConfig, weights: dict[str, Tensor], dtype: torch.dtype = torch.float32
) -> ParScaleForCausalLM:
    """Instantiate the model on checked weights (names already validated by checkpoint.py). Takes
    `weights` over: its projections are stacked in place (stack_projections)."""
    with torch.device("meta"):
        model = ParScaleForCausalLM(config)
    model = model.to_empty(device="cpu")
    model.model.rotary_emb = RotaryEmbedding(config)  # a computed buffer, not a weight
    stacked = stack_projections(weights, config.num_layers)
    missing, unexpected = model.load_state_dict(stacked, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    return model.to(dtype).eval().requires_grad_(False)
