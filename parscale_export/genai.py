"""genai_config.json for onnxruntime-genai.

genai drives the graph as if it were a plain Qwen2 with P*heads query heads and P*kv_heads
key/value heads: the bundle's cache is declared [batch, P*kv_heads, seq, head_dim] (contract
cache_layout "heads"). Contract v1: the prefix lives inside the graph and present length =
total length. Contracts v2 and v3 (in place): genai binds one buffer per cache tensor as past and
present (`past_present_share_buffer`). Our graph keeps the T prefix slots there too, so the
graph declares the buffer's length as a number, T + max_length (`Contract.fixed_capacity`):
genai then allocates exactly that, whatever max_length a request sets, and refuses a
max_length above `context_length` (= max_length) with its own clear error. A buffer sized by
max_length would overflow T slots before the end (ONNX Runtime's GroupQueryAttention fails on
the first call when max_length is prompt + new tokens, as genai's examples set it). v3's
attention reads only the slots in use, v2's the whole buffer.

Threads: unless told, genai gives a session half the logical CPUs (it assumes two hardware
threads per core), so a machine without SMT siblings, like a 2-vCPU VM, decodes on one thread.
Our config says `intra_op_num_threads: 0`, ONNX Runtime's own default: one thread per physical
core, whatever the machine. The same on SMT machines, up to twice the threads where genai's
guess is wrong (issue 10's note has the numbers, the builder's graph with it included).
"""

from __future__ import annotations

import math
from typing import Any

from .bundle import human_size
from .config import ModelConfig
from .contract import Contract
from .errors import ConfigError

GENAI_CONFIG = "genai_config.json"
# intra_op_num_threads 0: ONNX Runtime picks one thread per physical core, not genai's half of
# the logical CPUs (see the module docstring).
THREADS = {"intra_op_num_threads": 0}


def genai_config(
    config: ModelConfig, contract: Contract, tokens: dict[str, list[int]]
) -> tuple[dict[str, Any], list[str]]:
    """The genai_config.json dictionary, and notes for the user about choices made for them."""
    notes = []
    vocab = config.vocab_size
    eos = [i for i in tokens["eos_token_id"] if 0 <= i < vocab]
    if tokens["eos_token_id"] and not eos:
        raise ConfigError(
            f"eos_token_id {tokens['eos_token_id']} is outside the vocabulary [0, {vocab}); "
            "onnxruntime-genai refuses such a config"
        )
    if not eos:
        eos = [vocab - 1]
        notes.append(f"the checkpoint names no eos_token_id; genai_config.json uses {vocab - 1} (the last id)")
    pad = next((i for i in tokens["pad_token_id"] if 0 <= i < vocab), eos[0])
    bos = next((i for i in tokens["bos_token_id"] if 0 <= i < vocab), eos[0])
    n = config.parscale_n
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", **THREADS, "provider_options": []},
        "filename": "model.onnx",
        "head_size": config.head_dim,
        "hidden_size": config.hidden_size,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        # The P streams look like P times the heads to genai: row b*P+p of our cache is heads p*KV.. of b.
        "num_attention_heads": n * config.num_heads,
        "num_hidden_layers": config.num_layers,
        "num_key_value_heads": n * config.num_kv_heads,
    }
    assert contract.cache_layout == "heads", "genai needs the heads layout"
    if contract.cache.in_place:
        # The graph declares the buffers' capacity (T + max_length slots): genai allocates exactly
        # that whatever max_length a request sets, and refuses one above context_length.
        assert contract.fixed_capacity, "genai sizes an undeclared buffer by max_length, leaving no room for the prefix"
        length = contract.max_length
        size = len(contract.past_names()) * math.prod(contract.cache_shape(1, contract.capacity)) * contract.itemsize
        notes.append(
            f"genai allocates {contract.capacity} slots ({human_size(size)}) a sequence, whatever max_length a "
            f"request sets, and refuses a max_length above {length} (prompt + new tokens); convert with another "
            "--max-length to change both"
        )
    else:
        length = config.max_position_embeddings
    if contract.cache.attention == "scatter":
        notes.append(
            "contract v2's attention reads the whole buffer at every decode step, however short the sequence: "
            "the default cache (gqa, contract v3) reads only the slots in use"
        )
    model = {
        "bos_token_id": bos,
        "context_length": length,
        "decoder": decoder,
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": pad,
        "type": "qwen2",
        "vocab_size": vocab,
    }
    search = {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": length,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": contract.cache.in_place,  # v1: present is a new tensor, past + new
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
    }
    return {"model": model, "search": search}, notes
