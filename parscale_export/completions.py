"""The OpenAI completions API as `parscale-export serve` speaks it: a request body checked field by
field (a bad one is a RequestError that names it), and the bodies of replies and stream chunks.

No HTTP and no Ray here: the server maps RequestError to HTTP 400 and hands the parsed request
to the batcher. Extensions beyond OpenAI's fields, as vLLM spells them: `top_k` and
`ignore_eos` in requests, `token_ids` (the generated ids) in every choice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .generate import Sampling

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
# Fields we do not implement: a request that sets one to anything but its neutral value is refused
# rather than answered as if it had not been asked.
NEUTRAL = {
    "stop": (None, [], ""),
    "logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "n": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
}


class RequestError(ValueError):
    """A request the server cannot run; `param` names the offending field (None: the body)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ModelInfo:
    """What a request is checked against."""

    name: str
    vocab_size: int
    context_length: int | None  # prompt + max_tokens may not exceed it; None: unknown, unchecked


@dataclass(frozen=True)
class Completion:
    prompts: list[list[int]]  # one choice per prompt
    max_tokens: int
    sampling: Sampling
    stream: bool
    ignore_eos: bool


def parse_completion(body: bytes, model: ModelInfo, encode: Callable[[str], list[int]] | None) -> Completion:
    """Check a /v1/completions body. `encode` turns text into ids (None: the bundle has no
    tokenizer, and only token ids are accepted)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(None, f"the body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RequestError(None, "the body must be a JSON object")
    if data.get("model") not in (None, model.name):
        raise RequestError("model", f"this server serves the model {model.name!r}, not {data['model']!r}")
    for name, neutral in NEUTRAL.items():
        if name in data and not _neutral(data[name], neutral):
            raise RequestError(name, f"{name}={data[name]!r} is not supported by this server")

    prompts = _prompts(data.get("prompt"), model.vocab_size, encode)
    max_tokens = _integer(data, "max_tokens", DEFAULT_MAX_TOKENS, minimum=0)
    if model.context_length is not None:
        longest = max(len(p) for p in prompts)
        if longest > model.context_length:
            raise RequestError("prompt", f"the prompt has {longest} tokens; the context holds {model.context_length}")
        if longest + max_tokens > model.context_length:
            raise RequestError(
                "max_tokens",
                f"{longest} prompt tokens + max_tokens {max_tokens} exceed the context of {model.context_length}",
            )
    temperature = _number(data, "temperature", 1.0)
    if temperature < 0:
        raise RequestError("temperature", f"temperature must be >= 0, got {temperature}")
    top_p = _number(data, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise RequestError("top_p", f"top_p must be in (0, 1], got {top_p}")
    top_k = _integer(data, "top_k", 0, minimum=-1)  # -1 (vLLM) and 0 both mean "no limit"
    seed = _integer(data, "seed", None, minimum=None)
    sampling = Sampling(temperature=temperature, top_k=max(top_k, 0), top_p=top_p, seed=seed)
    return Completion(prompts, max_tokens, sampling, _boolean(data, "stream"), _boolean(data, "ignore_eos"))


def _prompts(prompt: Any, vocab_size: int, encode: Callable[[str], list[int]] | None) -> list[list[int]]:
    """A string, a list of ids, or a list of either (one choice each)."""
    if prompt is None:
        raise RequestError("prompt", "prompt is required: a string, a list of token ids, or a list of those")
    many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str | list) for p in prompt)
    prompts = [_one_prompt(p, vocab_size, encode) for p in (prompt if many else [prompt])]
    return prompts


def _one_prompt(prompt: Any, vocab_size: int, encode: Callable[[str], list[int]] | None) -> list[int]:
    if isinstance(prompt, str):
        if encode is None:
            raise RequestError("prompt", "this model has no tokenizer; send the prompt as a list of token ids")
        ids = encode(prompt)
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        ids = prompt
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError("prompt", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    else:
        raise RequestError("prompt", "prompt must be a string, a list of token ids, or a list of those")
    if not ids:
        raise RequestError("prompt", "the prompt is empty")
    return list(ids)


def _neutral(value: Any, neutral: tuple) -> bool:
    """Whether `value` is one of the neutral values (JSON 0 and 0.0 alike, but false is not 0)."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(data: dict, name: str, default: int | None, minimum: int | None) -> int | None:
    value = data.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise RequestError(name, f"{name} must be an integer, got {json.dumps(value)}")
    if minimum is not None and value < minimum:
        raise RequestError(name, f"{name} must be >= {minimum}, got {value}")
    return value


def _number(data: dict, name: str, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if not (isinstance(value, int | float) and not isinstance(value, bool)) or not math.isfinite(value):
        raise RequestError(name, f"{name} must be a number, got {json.dumps(value)}")
    return float(value)


def _boolean(data: dict, name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(name, f"{name} must be true or false, got {json.dumps(value)}")
    return value


def choice(index: int, text: str, token_ids: list[int], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "token_ids": token_ids, "logprobs": None, "finish_reason": finish_reason}


def completion_body(
    ident: str, created: int, model: str, choices: list[dict[str, Any]], prompt_tokens: int
) -> dict[str, Any]:
    generated = sum(len(c["token_ids"]) for c in choices)
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
        },
    }


def chunk_event(ident: str, created: int, model: str, one_choice: dict[str, Any]) -> str:
    """One server-sent event of a streamed completion."""
    body = {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [one_choice]}
    return f"data: {json.dumps(body)}\n\n"


DONE_EVENT = "data: [DONE]\n\n"


def error_body(message: str, param: str | None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
