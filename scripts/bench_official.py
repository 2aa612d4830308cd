"""Time the official ParScale PyTorch code (QwenLM/ParScale) on a checkpoint, for side-by-side
comparison with `parscale-export bench` (same prompt recipe, same greedy loop).

Not part of the package or CI: it needs transformers 4.51 (the official file does not run on
5.x) and a checkout of the official repository, which this project does not ship. Typical use:

  python3 -m venv /tmp/venv-official
  /tmp/venv-official/bin/pip install torch==2.13.0 transformers==4.51.3 einops numpy
  mkdir -p /tmp/official/parscale_official && touch /tmp/official/parscale_official/__init__.py
  cp ParScale/{modeling,configuration}_qwen2_parscale.py /tmp/official/parscale_official/
  /tmp/venv-official/bin/python scripts/bench_official.py /tmp/official CHECKPOINT --batch 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("official_dir", help="folder holding parscale_official/ (the two official files)")
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, args.official_dir)
    from parscale_official.configuration_qwen2_parscale import Qwen2ParScaleConfig
    from parscale_official.modeling_qwen2_parscale import Qwen2ParScaleForCausalLM

    torch.set_num_threads(args.threads)
    config = Qwen2ParScaleConfig.from_pretrained(args.checkpoint)
    model = Qwen2ParScaleForCausalLM.from_pretrained(args.checkpoint, config=config, torch_dtype=torch.float32).eval()
    # The same prompt recipe as parscale_export.bench.time_generation.
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(args.batch, args.prompt_length))
    ids = torch.from_numpy(ids)

    @torch.inference_mode()
    def run(prompt: torch.Tensor, steps: int) -> tuple[float, float, list]:
        mask = torch.ones_like(prompt)
        start = time.perf_counter()
        out = model(input_ids=prompt, attention_mask=mask, use_cache=True)
        prefill = time.perf_counter() - start
        past, token, tokens = out.past_key_values, out.logits[:, -1].argmax(-1), []
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1)
            tokens.append(token)
        return prefill, time.perf_counter() - start, torch.stack(tokens, 1).tolist()

    run(ids[:, :8], 2)  # warm-up
    results = [run(ids, args.steps) for _ in range(args.repeats)]
    prefill, decode = min(r[0] for r in results), min(r[1] for r in results)
    print(json.dumps({
        "engine": "official-pytorch", "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "batch": args.batch, "parscale_n": config.parscale_n,
        "prefill_tokens_per_second": args.batch * args.prompt_length / prefill,
        "decode_tokens_per_second": args.batch * args.steps / decode,
        "tokens": results[0][2],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
