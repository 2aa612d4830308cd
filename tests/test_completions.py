"""Request checking of the completions API, without a server: every bad field is named."""

from __future__ import annotations

import json

import pytest

from parscale_export.completions import ModelInfo, RequestError, parse_completion
from parscale_export.generate import Sampling

MODEL = ModelInfo("m", vocab_size=100, context_length=32)


def encode(text: str) -> list[int]:
    return [ord(c) % 100 for c in text]


def parse(body, encoder=encode):
    return parse_completion(json.dumps(body).encode(), MODEL, encoder)


def test_defaults_follow_openai() -> None:
    completion = parse({"prompt": [1, 2, 3]})
    assert completion.prompts == [[1, 2, 3]]
    assert completion.max_tokens == 16
    assert completion.sampling == Sampling(temperature=1.0, top_p=1.0)
    assert not completion.stream and not completion.ignore_eos


def test_every_prompt_form() -> None:
    assert parse({"prompt": "ab"}).prompts == [[97, 98]]
    assert parse({"prompt": ["ab", [5]]}).prompts == [[97, 98], [5]]
    assert parse({"prompt": [[1], [2, 3]], "model": "m"}).prompts == [[1], [2, 3]]
    settings = parse({"prompt": [1], "temperature": 0, "top_p": 0.5, "top_k": -1, "seed": 4, "stream": True})
    assert settings.sampling == Sampling(temperature=0.0, top_p=0.5, top_k=0, seed=4) and settings.stream
    assert parse({"prompt": [1], "n": 1, "presence_penalty": 0.0, "stop": None}).max_tokens == 16


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [1, 100]}, "prompt"),  # outside the vocabulary
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [1, True]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 7}, "prompt"),
        ({"prompt": [1.5]}, "prompt"),
        ({}, "prompt"),
        ({"prompt": list(range(33))}, "prompt"),  # past the context
        ({"prompt": [1] * 30, "max_tokens": 3}, "max_tokens"),  # prompt + max_tokens past the context
        ({"prompt": [1], "max_tokens": -1}, "max_tokens"),
        ({"prompt": [1], "max_tokens": "5"}, "max_tokens"),
        ({"prompt": [1], "max_tokens": 2.0}, "max_tokens"),
        ({"prompt": [1], "temperature": -0.1}, "temperature"),
        ({"prompt": [1], "temperature": "hot"}, "temperature"),
        ({"prompt": [1], "top_p": 0}, "top_p"),
        ({"prompt": [1], "top_p": 1.5}, "top_p"),
        ({"prompt": [1], "seed": "x"}, "seed"),
        ({"prompt": [1], "stream": "yes"}, "stream"),
        ({"prompt": [1], "model": "other"}, "model"),
        ({"prompt": [1], "n": 2}, "n"),
        ({"prompt": [1], "stop": ["\n"]}, "stop"),
        ({"prompt": [1], "echo": True}, "echo"),
        ({"prompt": [1], "logprobs": 2}, "logprobs"),
    ],
)
def test_bad_fields_are_named(body: dict, param: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse(body)
    assert caught.value.param == param


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_a_body_that_is_no_json_object(raw: bytes) -> None:
    with pytest.raises(RequestError) as caught:
        parse_completion(raw, MODEL, encode)
    assert caught.value.param is None


def test_text_needs_a_tokenizer() -> None:
    with pytest.raises(RequestError, match="no tokenizer") as caught:
        parse({"prompt": "hello"}, encoder=None)
    assert caught.value.param == "prompt"
    assert parse({"prompt": [1]}, encoder=None).prompts == [[1]]
