#!/usr/bin/env bash
# The prepared GPU check (under 5 minutes on one H200): install onnxruntime-gpu from carried
# parts, convert the tiny fixture (fp16, fp32) and a mid-size checkpoint (P=1 and P=4, fp16;
# P=4 also with the in-place cache, contract v2), validate each on CUDA, and time decoding. Results go to stdout and to $OUT (reports).
#
# The GPU machine has python3 3.12 with torch (CUDA 13), onnx, onnxscript, transformers, typer
# and a CPU-only onnxruntime, and no network. Carry onnxruntime-gpu first: see gpu_wheel.sh.
# Locally, `PROVIDER=cpu PYTHON=.venv/bin/python bash scripts/gpu_check.sh` dry-runs the logic.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
PROVIDER="${PROVIDER:-cuda}"
OUT="${OUT:-build/gpu-out}"
WORK="${WORK:-/tmp/parscale-gpu}"
mkdir -p "$OUT" "$WORK"

if [ "$PROVIDER" = cuda ]; then
    nvidia-smi -L || true
    site=/tmp/parscale-site
    if [ -f build/gpu-wheel/NAME ]; then
        wheel="$WORK/$(cat build/gpu-wheel/NAME)"
        cat build/gpu-wheel/part-* > "$wheel"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$wheel"
    fi
    # Our package, without pip (no network, maybe no setuptools): the same layout pip would install.
    rm -rf "$site/parscale_export" && mkdir -p "$site" && cp -r parscale_export "$site/" && cp -r cli "$site/parscale_export/cli"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
cli() { "$PYTHON" -c 'from parscale_export.cli.main import run; run()' "$@"; }
"$PYTHON" -c 'import onnxruntime as o, torch; print("onnxruntime", o.__version__, o.get_available_providers()); print("torch", torch.__version__, torch.cuda.is_available())'

"$PYTHON" - "$WORK" <<'PY'
import sys
from pathlib import Path
from parscale_export.synthetic import parscale_config, write_checkpoint
root = Path(sys.argv[1])
shape = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, parscale_n_tokens=48)
for n in (1, 4):
    write_checkpoint(root / f"mid-p{n}", parscale_config(parscale_n=n, **shape), seed=n)
print("wrote mid-size checkpoints (vocab 32000, hidden 512, 8 layers, 8/2 heads, T=48), P=1 and P=4")
PY

status=0
for spec in "fixtures/tiny-parscale fp16 tiny-fp16" "fixtures/tiny-parscale fp32 tiny-fp32" \
            "$WORK/mid-p4 fp16 mid-p4-fp16" "$WORK/mid-p1 fp16 mid-p1-fp16" \
            "fixtures/tiny-parscale fp16 tiny-fp16-static --cache static --max-length 64" \
            "$WORK/mid-p4 fp16 mid-p4-fp16-static --cache static --max-length 2560"; do
    set -- $spec
    echo "== convert $1 ($2 ${*:4})"
    cli convert "$1" -o "$WORK/$3" --dtype "$2" "${@:4}" --force
    echo "== validate $3 on $PROVIDER"
    cli validate "$WORK/$3" --provider "$PROVIDER" --report "$OUT/$3.json" || status=$?
done

echo "== decode speed on $PROVIDER (fp16, ONNX Runtime; IO binding keeps the cache on the GPU)"
cli bench "$WORK/mid-p1-fp16" "$WORK/mid-p4-fp16" --batch 1 --batch 8 --provider "$PROVIDER" --no-reference
echo "== step time vs context on $PROVIDER, contract v1 vs v2 (fp16, P=4)"
cli bench "$WORK/mid-p4-fp16" "$WORK/mid-p4-fp16-static" --batch 1 --prompt-length 64 --prompt-length 2048 \
    --provider "$PROVIDER" --no-reference
exit $status
