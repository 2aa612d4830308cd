"""ParScale in plain PyTorch, with the official semantics and an explicit KV cache.

This one module is both the PyTorch reference that `validate` compares against and the graph
that `convert` exports. Module names follow the checkpoint's names, so loading is an identity map.

Layout:
- The P streams are folded into the batch: row `b*P + p` is stream p of sequence b.
- Because a sequence's P streams are adjacent rows, [P*B, KV, L, D] is also, for free,
  [B, P*KV, L, D]; attention runs in that view, where query head `p*H + h` shares key/value
  head `p*KV + h // (H/KV)`, i.e. plain grouped-query attention stays inside its own stream.
- Contract version 1 (`in_place=False`): the cache passed in and returned holds real tokens
  only, [P*B, KV, past, D] per layer, and grows by concatenation. The learned prefix (T slots
  per stream and layer, no RoPE, never masked) is a constant of the module, prepended to the
  keys and values inside attention.
- Contract version 2 (`in_place=True`): the cache is one [B, P*KV, capacity, D] buffer per
  layer and kind. Each call writes its new keys (after RoPE) at slot `past` and the prefix
  right after them, then attends over the whole buffer; the bias hides unused slots. Attention
  is a weighted sum over keys, so where the prefix sits changes nothing: it only has to be
  un-rotated and always visible, as in the official model.
- `packed=True` (the onnxruntime-genai graphs) also accepts what genai's batching feeds:
  rows padded on the right, a cache whose columns after a row's length hold garbage, a
  present as long as the mask (or the past, when genai shares one buffer). Each row's new
  keys go right after its last real token, and positions come from the mask. With left
  padding this is the same computation as the default.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for explicit positions, computed in float32 as transformers does."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # A plain attribute, not a buffer: model.to(float16) must not round the frequencies.
        self.inv_freq, self.attention_scaling = rope_frequencies(config)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_streams, self.n_heads, self.n_kv = config.parscale_n, config.num_heads, config.num_kv_heads
        self.head_dim = d = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * d, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * d, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * d, bias=True)
        self.o_proj = nn.Linear(self.n_heads * d, config.hidden_size, bias=False)
        if self.n_streams > 1:
            prefix = (self.n_streams, self.n_kv, config.parscale_n_tokens, d)
            self.prefix_k = nn.Parameter(torch.zeros(prefix))
            self.prefix_v = nn.Parameter(torch.zeros(prefix))

    def _split_heads(self, x: Tensor, batch: int, n_heads: int) -> Tensor:
        # [B*P, S, n*D] -> [B, P*n, S, D]  (row b*P+p, head i  ->  sequence b, head p*n+i)
        _, seq, _ = x.shape
        x = x.view(batch, self.n_streams, seq, n_heads, self.head_dim).transpose(2, 3)
        return x.reshape(batch, self.n_streams * n_heads, seq, self.head_dim)

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

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        bias: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        slots: PackedSlots | None = None,
        write_at: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`write_at` [B] (contract v2): the slot each row's tokens go to; None: contract v1, where
        `slots` (packed graphs) scatters them after each row's last real token instead of appending."""
        rows, seq, _ = x.shape  # rows = B*P
        batch = rows // self.n_streams
        d = self.head_dim
        q = self._split_heads(self.q_proj(x), batch, self.n_heads)  # [B, P*H, S, D]
        k = self._split_heads(self.k_proj(x), batch, self.n_kv)  # [B, P*KV, S, D]
        v = self._split_heads(self.v_proj(x), batch, self.n_kv)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, D]: same position for every stream
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        if write_at is not None:  # contract v2: in place, the prefix inside the buffer
            k, v = present_k, present_v = self._write(k, v, past_k, past_v, write_at)
            out = self._attend_by_kv_head(q, k, v, bias)
        else:
            k, v, present_k, present_v = self._append(k, v, past_k, past_v, slots)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=self.n_heads != self.n_kv)
        # [B, P*H, S, D] -> [B*P, S, H*D]
        out = out.view(batch, self.n_streams, self.n_heads, seq, d).transpose(2, 3)
        return self.o_proj(out.reshape(rows, seq, self.n_heads * d)), present_k, present_v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        bias: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        slots: PackedSlots | None = None,
        write_at: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        attn, present_k, present_v = self.self_attn(
            self.input_layernorm(x), cos, sin, bias, past_k, past_v, slots, write_at
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present_k, present_v


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
        in_place: bool = False,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        n, n_prefix = self.config.parscale_n, self.config.parscale_n_tokens
        batch, seq = input_ids.shape
        x = self.embed_tokens(input_ids)  # [B, S, h]
        x = x[:, None].expand(-1, n, -1, -1).reshape(batch * n, seq, -1)  # [B*P, S, h]: copy per stream
        slots = PackedSlots(attention_mask, seq, past[0][0].shape[2]) if packed else None
        write_at = None
        if slots is not None:
            position_ids = slots.positions()
        if in_place:  # contract v2: this call's tokens go to slot `past` of every sequence's buffers
            capacity = past[0][0].shape[2]
            if slots is not None:  # ...or, packed, right after each row's last real token
                write_at, bias = slots.start, slots.buffer_bias(n_prefix, x.dtype, capacity)
            else:
                write_at = torch.full((batch,), attention_mask.shape[1] - seq, dtype=torch.long)
                bias = attention_bias(attention_mask, seq, n_prefix, x.dtype, capacity=capacity)
        elif slots is not None:
            bias = slots.bias(n_prefix, x.dtype)
        else:
            bias = attention_bias(attention_mask, seq, n_prefix, x.dtype)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        presents = []
        for layer, (past_k, past_v) in zip(self.layers, past, strict=True):
            x, present_k, present_v = layer(x, cos, sin, bias, past_k, past_v, slots, write_at)
            presents.append((present_k, present_v))
        x = self.norm(x)
        if n > 1:
            x = self._aggregate(x.view(batch, n, seq, -1))
        return x, presents

    def _aggregate(self, streams: Tensor) -> Tensor:
        """Weighted sum of the P streams [B, P, S, h] -> [B, S, h], as the official model does."""
        batch, n, seq, h = streams.shape
        # Feature-major, stream-minor: z[..., j*P + p] = stream p's feature j.
        z = streams.permute(0, 2, 3, 1).reshape(batch, seq, h * n)
        weights = torch.softmax(self.aggregate_layer(z).float(), dim=-1)  # [B, S, P]
        eps = self.config.parscale_attn_smooth
        if eps:
            weights = weights * (1 - eps) + eps / n
        mixed = (streams.transpose(1, 2) * weights[..., None]).sum(dim=2)  # float32
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
        in_place: bool = False,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """logits [B, S, V] float32 and the presents per layer: [P*B, KV, past + S, D] (contract
        v1; with `packed`, max(past, mask length) long: see PackedSlots), or with `in_place` the
        [B, P*KV, capacity, D] buffers after this call's write (v2)."""
        hidden, presents = self.model(input_ids, attention_mask, position_ids, past, packed, in_place)
        return self.lm_head(hidden).float(), presents

    def empty_cache(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        """A past of length 0 for `batch` sequences, in the model's dtype."""
        c = self.config
        dtype = self.lm_head.weight.dtype
        shape = (c.parscale_n * batch, c.num_kv_heads, 0, c.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(c.num_layers)]


def build_model(
    config: ModelConfig, weights: dict[str, Tensor], dtype: torch.dtype = torch.float32
) -> ParScaleForCausalLM:
    """Instantiate the model and copy in checked weights (names already validated by checkpoint.py)."""
    with torch.device("meta"):
        model = ParScaleForCausalLM(config)
    model = model.to_empty(device="cpu")
    model.model.rotary_emb = RotaryEmbedding(config)  # a computed buffer, not a weight
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    return model.to(dtype).eval().requires_grad_(False)
