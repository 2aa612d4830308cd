"""onnxruntime-genai's continuous-batching Engine against each request run alone.

Run with the genai environment's Python (never beside onnxruntime-gpu):
  .venv-genai/bin/python scripts/genai_engine.py BUNDLE --prompts "1 2 3,4 5 6 7" --max-new "8,3" [--[no-]share-buffer]
Every request is greedy and forced to its full length (genai suppresses EOS then), submitted
together, or one per engine step with --stagger. Prints one JSON object: the tokens each
request got from the Engine, and from an og.Generator running it alone.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnxruntime_genai as og


def alone(model: og.Model, prompt: np.ndarray, new: int) -> list[int]:
    """The request alone in an og.Generator, max_length = prompt + new tokens as genai's examples set it."""
    params = og.GeneratorParams(model)
    length = len(prompt) + new
    params.set_search_options(do_sample=False, max_length=length, min_length=length)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt[None])
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < new:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def batched(model: og.Model, prompts: list[np.ndarray], news: list[int], stagger: bool) -> list[list[int]]:
    engine = og.Engine(model)
    token_flag = int(og.EngineEventFlags.TOKEN.value)
    failed_flag = int(og.EngineEventFlags.FAILED.value)
    requests, options, tokens = [], [], {}

    def submit(index: int) -> None:
        request = engine.create_request()
        turn = og.TurnOptions(request)
        turn.set_max_generated_tokens(news[index])
        turn.set_min_generated_tokens(news[index])
        turn.set_do_sample(False)
        request.begin_turn(prompts[index], turn)
        requests.append(request)
        options.append(turn)  # genai keeps a pointer: the options must outlive the request
        tokens[request] = []

    waiting = list(range(len(prompts)))
    while not stagger and waiting:
        submit(waiting.pop(0))
    events = engine.create_event_buffer(64)
    while engine.has_pending_requests() or waiting:
        if waiting:
            submit(waiting.pop(0))
        for event in engine.run(events):
            if int(event.flags) & failed_flag:
                raise SystemExit(f"engine request failed: {event.error_code}")
            if int(event.flags) & token_flag:
                tokens[event.request].append(int(event.token))
    return [tokens[r] for r in requests]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--prompts", required=True, help="comma-separated prompts of space-separated ids")
    parser.add_argument("--max-new", required=True, help="comma-separated new-token counts, one per prompt")
    share = parser.add_mutually_exclusive_group()
    share.add_argument(
        "--share-buffer",
        dest="share_buffer",
        action="store_true",
        default=None,
        help="past_present_share_buffer: true (default: as genai_config.json says)",
    )
    share.add_argument(
        "--no-share-buffer", dest="share_buffer", action="store_false", help="past_present_share_buffer: false"
    )
    parser.add_argument("--stagger", action="store_true", help="submit one request per engine step")
    args = parser.parse_args()
    prompts = [np.array(p.split(), dtype=np.int32) for p in args.prompts.split(",")]
    news = [int(n) for n in args.max_new.split(",")]
    config = og.Config(args.bundle)
    if args.share_buffer is not None:
        config.overlay(json.dumps({"search": {"past_present_share_buffer": args.share_buffer}}))
    model = og.Model(config)
    result = {
        "engine": batched(model, prompts, news, args.stagger),
        "alone": [alone(model, p, n) for p, n in zip(prompts, news, strict=True)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
