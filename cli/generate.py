"""`parscale-export generate`: run a bundle on ONNX Runtime, no PyTorch involved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from parscale_export.errors import BundleError, UsageError
from parscale_export.generate import Sampling, generate
from parscale_export.runtime import Runtime
from parscale_export.text import TextStream, load_tokenizer

from .validate import Provider


def generate_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by `parscale-export convert`.")],
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="Text to continue (needs the bundle's tokenizer). Repeat for a batch."),
    ] = None,
    input_ids: Annotated[
        list[str] | None,
        typer.Option("--input-ids", help='Token ids instead of text, e.g. "1 2 3". Repeat for a batch.'),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", min=1, help="Stop after this many tokens.")
    ] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy; above 0 samples.")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Sample from the smallest set holding this much probability.")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling: the same seed gives the same tokens.")] = None,
    provider: Annotated[Provider, typer.Option(help="auto: CUDA when usable, else CPU.")] = Provider.auto,
    parallel: Annotated[
        int | None, typer.Option(min=1, help="For a family bundle: the P to run (default: its largest).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: tokens (and text) per prompt.")
    ] = False,
) -> None:
    """Generate tokens from a bundle with ONNX Runtime (greedy by default).

    Prompts are left-padded into one batch. Generation stops at the checkpoint's EOS token or
    after --max-new-tokens. Text streams to stdout as it is produced (one prompt, no --json).

    Examples:

        parscale-export generate ./bundle --prompt "Hello" -n 20

        parscale-export generate ./bundle --input-ids "1 2 3" --json
    """
    if bool(prompt) == bool(input_ids):
        raise UsageError("give either --prompt or --input-ids (each may be repeated for a batch)")
    runtime = Runtime(bundle, provider=provider.value, parallel=parallel)
    if runtime.manifest.family and parallel is None:
        sizes = ", ".join(map(str, runtime.manifest.family))
        typer.echo(f"note: {bundle} holds P = {sizes}; running P={runtime.contract.parscale_n} (--parallel)", err=True)
    tokenizer = load_tokenizer(bundle)
    if prompt:
        if tokenizer is None:
            raise BundleError(f"{bundle}: no tokenizer.json in the bundle; use --input-ids")
        prompts = [tokenizer.encode(text).ids for text in prompt]
    else:
        prompts = [_parse_ids(text, runtime.contract.vocab_size) for text in input_ids or []]
    if not all(prompts):
        raise UsageError("a prompt encodes to no tokens")

    stream = TextStream(tokenizer) if tokenizer and len(prompts) == 1 and not as_json else None

    def show(row: int, token: int) -> None:
        if stream:
            typer.echo(stream.push(token), nl=False)

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    manifest = runtime.manifest
    outputs = generate(runtime, prompts, max_new_tokens, manifest.eos_ids, sampling, manifest.pad_id, show)
    if as_json:
        texts = [tokenizer.decode(tokens) for tokens in outputs] if tokenizer else None
        single = len(outputs) == 1
        result: dict = {"tokens": outputs[0] if single else outputs, "provider": runtime.provider}
        if texts is not None:
            result["text"] = texts[0] if single else texts
        typer.echo(json.dumps(result))
    elif stream:
        typer.echo()
    else:
        for tokens in outputs:
            typer.echo(tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens)))


def _parse_ids(text: str, vocab: int) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--input-ids {text!r}: expected integers separated by spaces") from None
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UsageError(f"--input-ids: token {bad[0]} is outside the vocabulary [0, {vocab})")
    return ids
