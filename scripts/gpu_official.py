"""The official ParScale PyTorch model beside our bundles of the same checkpoint, on one device.

What a GPU user would otherwise run is QwenLM/ParScale's `Qwen2ParScaleForCausalLM` under
transformers 4.51 (its file does not run on 5.x). This script times it and our ONNX Runtime
bundles with one prompt recipe and one greedy loop (parscale_export.bench.time_generation's:
random ids from numpy's default_rng(0), a warm-up of 2 steps over 8 tokens, the best of
`--repeats` runs), and compares the official prefill logits with ours:

    official sdpa fp16 batch 8: 123.4 tok/s; ours v3 default: 456.7 tok/s (3.70x, same greedy tokens); ...
    max |logit difference| official sdpa fp16 vs ours v3 default prefill (batch 8): 6.41e-03 (limit 0.0951)

(ratios: our decode tokens/s over the official's; limits: validate's thresholds for the dtype)

The official model runs in a child process whose sys.path starts with `--official-site` (the
carried transformers 4.51.3, tokenizers, huggingface_hub and einops wheels, unpacked); this
process, which runs ours, never imports transformers. The official classes are imported from
the files in `--official` (a QwenLM/ParScale checkout); nothing from the checkpoint is executed.
Writes a JSON summary (`--json`) and exits 1 when a logit difference exceeds the dtype's
validate threshold or the official model did not load every weight.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OFFICIAL_FILES = ("modeling_qwen2_parscale.py", "configuration_qwen2_parscale.py")
DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16"}


def prompt(vocab: int, batch: int, length: int) -> np.ndarray:
    """The prompt of parscale_export.bench.time_generation (seed 0)."""
    return np.random.default_rng(0).integers(0, vocab, size=(batch, length), dtype=np.int64)


# ---- the official side: runs in the child, under transformers 4.51 --------------------------------


def load_official_classes(official_dir: Path):
    """Import the two official files as the package `parscale_official` (their modeling file
    imports its configuration relatively), without copying them or writing bytecode beside them."""
    import importlib
    import types

    sys.dont_write_bytecode = True
    package = types.ModuleType("parscale_official")
    package.__path__ = [str(official_dir)]
    sys.modules["parscale_official"] = package
    configuration = importlib.import_module("parscale_official.configuration_qwen2_parscale")
    modeling = importlib.import_module("parscale_official.modeling_qwen2_parscale")
    return configuration.Qwen2ParScaleConfig, modeling.Qwen2ParScaleForCausalLM


def official_worker(job: dict) -> dict:
    import torch
    import transformers

    if not transformers.__version__.startswith("4.51"):
        raise SystemExit(f"the official model needs transformers 4.51, found {transformers.__version__} at "
                         f"{transformers.__file__}: unpack the carried wheels into --official-site")  # fmt: skip
    config_class, model_class = load_official_classes(Path(job["official"]))
    device = torch.device(job["device"])
    torch.set_num_threads(job["threads"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for run in job["runs"]:
        dtype = getattr(torch, run["dtype"])
        start = time.perf_counter()
        config = config_class.from_pretrained(job["checkpoint"])
        model, info = model_class.from_pretrained(
            job["checkpoint"], config=config, torch_dtype=dtype, attn_implementation=run["attention"],
            output_loading_info=True,
        )  # fmt: skip
        model = model.to(device).eval()
        loaded = time.perf_counter() - start

        @torch.inference_mode()
        def generate(ids: torch.Tensor, steps: int, model=model) -> tuple[float, float, torch.Tensor, list]:
            mask = torch.ones_like(ids)
            sync()
            start = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            sync()
            prefill = time.perf_counter() - start
            logits, past = out.logits, out.past_key_values
            tokens = [logits[:, -1].argmax(-1)]
            start = time.perf_counter()
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = model(input_ids=tokens[-1][:, None], attention_mask=mask, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tokens.append(out.logits[:, -1].argmax(-1))
            sync()
            return prefill, time.perf_counter() - start, logits, torch.stack(tokens[1:], 1).tolist()

        timings = []
        for batch in job["batches"]:
            ids = torch.from_numpy(prompt(config.vocab_size, batch, job["prompt_length"])).to(device)
            generate(ids[:, :8], 2)  # warm-up, as time_generation
            best = [float("inf"), float("inf"), None, None]
            for _ in range(job["repeats"]):
                prefill, decode, logits, tokens = generate(ids, job["steps"])
                best = [min(best[0], prefill), min(best[1], decode), logits, tokens]
            timings.append({"batch": batch, "prefill_seconds": best[0], "decode_seconds": best[1], "tokens": best[3]})
        logits_path = Path(job["logits_dir"]) / f"official-{run['attention']}-{run['dtype']}.npy"
        np.save(logits_path, best[2].float().cpu().numpy())  # the largest batch's prefill logits
        results.append({**run, "load_seconds": loaded, "missing_keys": info["missing_keys"],
                        "unexpected_keys": info["unexpected_keys"], "timings": timings,
                        "logits": str(logits_path)})  # fmt: skip
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "runs": results}  # fmt: skip


# ---- our side: this process, our package and onnxruntime --------------------------------------------


def run_official(args: argparse.Namespace, runs: list[dict]) -> dict:
    job = {"official": str(args.official), "checkpoint": str(args.checkpoint), "runs": runs,
           "device": "cuda" if args.provider == "cuda" else "cpu", "threads": args.threads,
           "batches": args.batch, "prompt_length": args.prompt_length, "steps": args.steps,
           "repeats": args.repeats, "logits_dir": str(args.work)}  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.official_site), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, __file__, "--official-worker", json.dumps(job)], env=env,
                          stdout=subprocess.PIPE, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"the official model failed (exit {done.returncode}); its messages are above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-worker", help=argparse.SUPPRESS)
    parser.add_argument("--official", type=Path, help="a QwenLM/ParScale checkout (holds modeling_qwen2_parscale.py)")
    parser.add_argument("--official-site", type=Path, help="folder with transformers 4.51.3 and its wheels unpacked")
    parser.add_argument("--checkpoint", type=Path, help="the checkpoint our bundles were converted from")
    parser.add_argument("--ours", action="append", default=[], metavar="[LABEL=]BUNDLE", help="fp16 and bf16 bundles")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, action="append", help="default: 1 and 8")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/parscale-official"), help="for the logits files")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args(argv)
    if args.official_worker:
        print(json.dumps(official_worker(json.loads(args.official_worker))))
        return 0
    missing = [name for name in OFFICIAL_FILES if not (args.official and (args.official / name).is_file())]
    if missing or not args.official_site or not args.checkpoint or not args.ours:
        parser.error(f"--official (a folder holding {', '.join(OFFICIAL_FILES)}), --official-site, --checkpoint "
                     "and --ours are required")  # fmt: skip
    args.batch = sorted(set(args.batch or [1, 8]))  # the official side keeps the largest batch's logits
    args.work.mkdir(parents=True, exist_ok=True)

    from parscale_export.bench import time_generation
    from parscale_export.bundle import read_manifest
    from parscale_export.errors import ProviderError
    from parscale_export.runtime import Runtime
    from parscale_export.validate import DEFAULT_THRESHOLDS

    ours: dict[str, list[tuple[Path, object]]] = {}
    labels = {}
    for item in args.ours:
        label, _, path = item.rpartition("=")
        manifest = read_manifest(Path(path))
        ours.setdefault(manifest.dtype, []).append((Path(path), manifest))
        labels[path] = f"v{manifest.contract.version} {label or Path(path).name}"
    runs = [{"dtype": "float16", "attention": "eager"}, {"dtype": "float16", "attention": "sdpa"},
            {"dtype": "bfloat16", "attention": "sdpa"}]  # fmt: skip
    runs = [run for run in runs if run["dtype"] in ours]
    where = args.provider.upper()
    print(f"official PyTorch model vs ours on {where}: prompt {args.prompt_length}, {args.steps} greedy steps, "
          f"best of {args.repeats}, batch {' and '.join(map(str, args.batch))}")  # fmt: skip
    official = run_official(args, runs)
    print(f"official: transformers {official['transformers']}, torch {official['torch']} on {official['device']}")

    ok = True
    summary: dict = {"official": official, "ours": [], "comparisons": []}
    for run in official["runs"]:
        name = f"official {run['attention']} {DTYPE_NAMES[run['dtype']]}"
        lost = len(run["missing_keys"]) + len(run["unexpected_keys"])
        print(f"{name}: loaded in {run['load_seconds']:.1f} s, {len(run['missing_keys'])} missing and "
              f"{len(run['unexpected_keys'])} unexpected keys")  # fmt: skip
        ok &= lost == 0

    measured: dict[str, dict] = {}  # bundle path -> {"timings": {batch: Timing} or None, "logits": array or None}
    for dtype, bundles in ours.items():
        for path, manifest in bundles:
            label = labels[str(path)]
            try:
                runtime = Runtime(path, provider=args.provider, threads=args.threads)
            except ProviderError as exc:  # bf16 off CUDA: a refusal, as validate gives
                print(f"ours {label}: not run on {where} ({str(exc).split(';')[0]})")
                measured[str(path)] = {"label": label, "timings": None, "logits": None}
                continue
            vocab = manifest.contract.vocab_size
            timings = {b: time_generation(runtime, vocab, b, args.prompt_length, args.steps, repeats=args.repeats)
                       for b in args.batch}  # fmt: skip
            ids = prompt(vocab, max(args.batch), args.prompt_length)
            logits, _ = runtime.prefill(ids, np.ones_like(ids), reserve=args.steps)
            measured[str(path)] = {"label": label, "timings": timings, "logits": np.asarray(logits, np.float32)}
            summary["ours"].append({"bundle": str(path), "contract": manifest.contract.version, "dtype": dtype,
                                    "decode_tokens_per_second": {b: t.decode_tokens_per_second
                                                                 for b, t in timings.items()}})  # fmt: skip
            del runtime

    for run in official["runs"]:
        name = f"official {run['attention']} {DTYPE_NAMES[run['dtype']]}"
        for timing in run["timings"]:
            batch = timing["batch"]
            rate = batch * args.steps / timing["decode_seconds"]
            cells = [f"{name} batch {batch}: {rate:.1f} tok/s"]
            for path, _ in ours[run["dtype"]]:
                mine = measured[str(path)]
                if mine["timings"] is None:
                    cells.append(f"ours {mine['label']}: not run on {where}")
                    continue
                t = mine["timings"][batch]
                same = "same" if t.tokens.tolist() == timing["tokens"] else "other"
                cells.append(f"ours {mine['label']}: {t.decode_tokens_per_second:.1f} tok/s "
                             f"({t.decode_tokens_per_second / rate:.2f}x, {same} greedy tokens)")  # fmt: skip
            print("; ".join(cells))
        reference = np.load(run["logits"])
        limits = DEFAULT_THRESHOLDS[run["dtype"]]
        limit = limits.max_abs * (max(1.0, float(np.abs(reference).max())) if limits.scaled else 1.0)
        for path, _ in ours[run["dtype"]]:
            mine = measured[str(path)]
            if mine["logits"] is None:
                continue
            worst = float(np.abs(mine["logits"] - reference).max())
            verdict = "" if worst <= limit else "  EXCEEDS the limit"
            print(f"max |logit difference| {name} vs ours {mine['label']} prefill (batch {max(args.batch)}): "
                  f"{worst:.2e} (limit {limit:.3g}){verdict}")  # fmt: skip
            summary["comparisons"].append({"official": name, "ours": str(path), "max_abs_logit_difference": worst,
                                           "limit": limit})  # fmt: skip
            ok &= worst <= limit
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"official vs ours: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
