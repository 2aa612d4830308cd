"""Run a bundle on whatever onnxruntime this Python has, against an official reference.

Needs only onnxruntime and numpy (no parscale_export), so it runs in old runtimes' own
environments: `make test` builds one with the oldest onnxruntime the README names for
`convert --opset 18`. Feeds the reference's left-padded prompts, then its greedy tokens one at a
time, and prints one JSON line: the runtime's version, the largest |logit error| and whether
every greedy token agreed.

    python scripts/ort_conformance.py BUNDLE fixtures/conformance/NAME/reference.npz
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main(bundle: Path, reference: Path) -> dict:
    contract = json.loads((bundle / "manifest.json").read_text())["contract"]
    ref = dict(np.load(reference))
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [f"past_key_values.{i}.{kind}" for i in range(contract["num_layers"]) for kind in ("key", "value")]
    batch = ref["input_ids"].shape[0]
    rows = batch * contract["parscale_n"] if contract["cache_layout"] == "rows" else batch
    heads = contract["num_kv_heads"] * (1 if contract["cache_layout"] == "rows" else contract["parscale_n"])
    past = [np.zeros((rows, heads, 0, contract["head_dim"]), np.float32) for _ in names]

    ids, mask = ref["input_ids"], ref["attention_mask"]
    errors, agree = [], True
    for step in range(ref["step_tokens"].shape[1] + 1):
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -ids.shape[1] :]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feeds |= dict(zip(names, past, strict=True))
        logits, *past = session.run(None, feeds)
        if step == 0:
            errors.append(float(np.abs(logits - ref["prefill_logits"])[mask.astype(bool)].max()))
        else:
            errors.append(float(np.abs(logits[:, 0] - ref["step_logits"][:, step - 1]).max()))
        if step < ref["step_tokens"].shape[1]:
            agree &= bool((logits[:, -1].argmax(-1) == ref["step_tokens"][:, step]).all())
            ids = ref["step_tokens"][:, step : step + 1]
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return {"onnxruntime": ort.__version__, "max_error": max(errors), "greedy_tokens_agree": agree}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
