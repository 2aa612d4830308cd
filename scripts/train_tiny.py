"""Train a tiny ParScale checkpoint on the Python standard library's own source.

The demo needs a model whose greedy continuation a person can read, and quantization needs
weights shaped by training (random weights have nearly flat logits). This script makes both
from text every machine with Python already has: the interpreter's top-level `Lib/*.py`.

It trains, deterministically (fixed seeds, sorted files, fixed thread count):
  1. a byte-level BPE tokenizer (`tokenizers`) with `--vocab` tokens, `<|endoftext|>` first;
  2. the project's own PyTorch module (parscale_export.model, the official semantics, an
     empty past, prefix and aggregation trained with everything else) with AdamW.
It writes a checkpoint directory `parscale-export convert` reads: config.json,
generation_config.json, model.safetensors (bfloat16), tokenizer.json, tokenizer_config.json,
and train_log.json (data files, Python version, settings, loss curve, time).

Usage (the fixture; see fixtures/tiny-python-p4/README.md):
  python scripts/train_tiny.py --out fixtures/tiny-python-p4
A quick run (seconds): python scripts/train_tiny.py --out /tmp/t --steps 20 --corpus-bytes 200000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from parscale_export.config import parse_config
from parscale_export.model import ParScaleForCausalLM, unstack_projections
from parscale_export.synthetic import parscale_config

EOS = "<|endoftext|>"
HELD_OUT = 0.05  # the stream's last 5% is never trained on; its loss is reported at the end


def corpus_files(stdlib: Path, max_bytes: int) -> list[Path]:
    """The top-level `*.py` files of the standard library, sorted by name, up to `max_bytes`."""
    chosen, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    if not chosen:
        raise SystemExit(f"error: {stdlib}: no *.py files within {max_bytes} bytes")
    return chosen


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization), so every byte sequence round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> Tensor:
    """One long stream of ids: each file followed by EOS, so the model learns where files end."""
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids += [*encoding.ids, eos]
    return torch.tensor(ids, dtype=torch.long)


def init_weights(model: ParScaleForCausalLM, gen: torch.Generator) -> None:
    """Qwen2's initialisation (normal, std 0.02; zero biases; unit norms), prefixes included."""
    for name, param in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(param)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(param)
        else:
            torch.nn.init.normal_(param, std=0.02, generator=gen)


def batch_loss(model: ParScaleForCausalLM, data: Tensor, starts: Tensor, context: int) -> Tensor:
    """Next-token cross-entropy on windows data[s : s + context + 1], prefill with an empty past."""
    window = starts[:, None] + torch.arange(context + 1)
    tokens = data[window]  # [B, context + 1]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch = inputs.shape[0]
    mask = torch.ones_like(inputs)
    positions = torch.arange(context).expand(batch, -1)
    logits, _ = model(inputs, mask, positions, model.empty_cache(batch))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model: ParScaleForCausalLM, data: Tensor, context: int, batch: int) -> float:
    """Mean loss over consecutive windows of the held-out stream (at most 8 batches)."""
    starts = torch.arange(0, len(data) - context - 1, context)[: 8 * batch]
    losses = [batch_loss(model, data, chunk, context).item() for chunk in starts.split(batch)]
    return sum(losses) / len(losses)


@torch.no_grad()
def greedy_sample(model: ParScaleForCausalLM, tokenizer: Tokenizer, prompt: str, new_tokens: int) -> str:
    """A quick look at what the model writes (full re-prefill per token: tiny model, no cache needed)."""
    ids = tokenizer.encode(prompt).ids
    for _ in range(new_tokens):
        x = torch.tensor([ids])
        logits, _ = model(x, torch.ones_like(x), torch.arange(len(ids))[None], model.empty_cache(1))
        ids.append(int(logits[0, -1].argmax()))
    return tokenizer.decode(ids)


def write_checkpoint(out: Path, raw_config: dict, model: ParScaleForCausalLM, tokenizer: Tokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.token_to_id(EOS)
    state = unstack_projections(model.state_dict(), model.config)
    weights = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in state.items()}
    save_file(dict(sorted(weights.items())), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    generation = {"eos_token_id": eos, "pad_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": raw_config["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=1600, help="optimizer steps")
    parser.add_argument("--corpus-bytes", type=int, default=5_000_000, help="cap on the source bytes read")
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size, EOS included")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--parscale-n", type=int, default=4, help="P, the number of parallel streams")
    parser.add_argument("--prefix-tokens", type=int, default=8, help="T, learned prefix slots per stream")
    parser.add_argument("--context", type=int, default=128, help="tokens per training window")
    parser.add_argument("--batch", type=int, default=8, help="windows per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed: results depend on it)")
    parser.add_argument("--prompt", default="def ", help="prompt of the greedy sample printed at the end")
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace, vocab_size: int) -> dict:
    """config.json for the checkpoint; P=1 is written as a plain Qwen2 model."""
    raw = parscale_config(
        parscale_n=args.parscale_n,
        parscale_n_tokens=args.prefix_tokens,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=args.context,
        torch_dtype="bfloat16",
    )
    if args.parscale_n == 1:
        raw |= {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
        for key in ("parscale_n", "parscale_n_tokens", "parscale_attn_smooth"):
            raw.pop(key)
    return raw


def make_optimizer(model: ParScaleForCausalLM, lr: float) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices only (not on norms, biases or the learned prefixes)."""
    named = sorted(model.named_parameters())
    decays = [p.dim() >= 2 and "prefix" not in n for n, p in named]
    groups = [
        {"params": [p for (_, p), d in zip(named, decays, strict=True) if d], "weight_decay": 0.1},
        {"params": [p for (_, p), d in zip(named, decays, strict=True) if not d], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train(
    model: ParScaleForCausalLM, data: Tensor, args: argparse.Namespace, gen: torch.Generator, started: float
) -> list[dict]:
    """The optimisation loop; returns the loss curve (mean training loss since the previous entry)."""
    optimizer = make_optimizer(model, args.lr)
    curve: list[dict] = []
    running: list[float] = []
    log_every = max(1, args.steps // 20)
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        starts = torch.randint(0, len(data) - args.context - 1, (args.batch,), generator=gen)
        loss = batch_loss(model, data, starts, args.context)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step == 0 or step + 1 == args.steps:
            mean = sum(running) / len(running)
            curve.append({"step": step + 1, "loss": round(mean, 4), "seconds": round(time.perf_counter() - started, 1)})
            print(f"step {step + 1:5d}  loss {mean:.4f}  {curve[-1]['seconds']:7.1f} s", flush=True)
            running = []
    return curve


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = corpus_files(stdlib, args.corpus_bytes)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    tokenizer = train_tokenizer(texts, args.vocab)
    data = encode(tokenizer, texts)
    split = int(len(data) * (1 - HELD_OUT))
    train_data, held_data = data[:split], data[split:]
    source_bytes = sum(len(t.encode()) for t in texts)
    print(
        f"data: {len(files)} files from {stdlib} (Python {platform.python_version()}), "
        f"{source_bytes} bytes -> {len(data)} tokens ({source_bytes / len(data):.2f} bytes/token), "
        f"last {HELD_OUT:.0%} held out"
    )

    raw_config = model_config(args, tokenizer.get_vocab_size())
    model = ParScaleForCausalLM(parse_config(raw_config))
    gen = torch.Generator().manual_seed(args.seed)
    init_weights(model, gen)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params} parameters, P={args.parscale_n}, {args.steps} steps of {args.batch}x{args.context}")
    curve = train(model, train_data, args, gen, started)

    model.eval()
    held = held_out_loss(model, held_data, args.context, args.batch)
    seconds = time.perf_counter() - started
    print(f"held-out loss {held:.4f} ({len(held_data)} tokens); {seconds:.1f} s in all")
    print("sample:", repr(greedy_sample(model, tokenizer, args.prompt, 40)))

    write_checkpoint(args.out, raw_config, model, tokenizer)
    log = {
        "command_args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "stdlib": str(stdlib),
        "files": [{"name": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files],
        "train_tokens": len(train_data),
        "held_out_tokens": len(held_data),
        "parameters": params,
        "loss_curve": curve,
        "held_out_loss": round(held, 4),
        "seconds": round(seconds, 1),
    }
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
