#!/usr/bin/env bash
# The prepared GPU check (about 5 minutes on one H200). Carry the onnxruntime-gpu parts first
# (scripts/gpu_wheel.sh prepares them and prints the calls), then run this in the last call. It:
#   1. verifies and joins the carried parts (scripts/gpu_carry.py), unpacks the archive they make
#      (onnxruntime-gpu into a private site directory put first on PYTHONPATH) and copies this
#      package beside it;
#   2. points the loader at the CUDA 13 / cuDNN 9 libraries of the machine's nvidia-* wheels
#      (onnxruntime's preload_dlls looks only beside its own folder) and stops, loudly and with
#      the loader's reason, when CUDA was asked for but cannot start;
#   3. converts the tiny fixture (fp32, fp16, bf16) and a mid-size checkpoint (P=1, 4, 8, fp16;
#      P=4 and the tiny one also with the in-place caches, contracts v2 and v3),
#      validates each on the provider (reports in $OUT), checks a fp16 family bundle (every P,
#      and shared weights against each P alone), and times decoding for P=1/4/8.
# The GPU machine's Python has torch (CUDA 13), onnx, onnxscript, typer, safetensors, numpy and
# a CPU onnxruntime, and no registry. Dry run here (it cuts and carries a wheel for this Python):
#   PROVIDER=cpu PYTHON=.venv/bin/python bash scripts/gpu_check.sh
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
    PARTS="${PARTS:-build/gpu-carry}"
else  # dry run: cut this Python's onnxruntime-gpu wheel into parts, as gpu_wheel.sh does for the GPU
    PARTS="${PARTS:-build/gpu-carry-dryrun}"
    if [ ! -f "$PARTS/gpu-carry.json" ]; then
        GPU_CARRY_DIR="$PARTS" GPU_PYTHON_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
            bash scripts/gpu_wheel.sh > /dev/null
    fi
fi
echo "== joining and verifying the parts in $PARTS"
"$PYTHON" scripts/gpu_carry.py join "$PARTS" "$WORK/carried" --unpack "$WORK/packages"
site="$WORK/packages/site"
mkdir -p "$site"
# Our package, without pip: the layout pip would install (cli/ becomes parscale_export.cli).
cp -r parscale_export "$site/" && cp -r cli "$site/parscale_export/cli"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

if [ "$PROVIDER" = cuda ]; then
    nvidia_libs=$("$PYTHON" -c 'import glob, os, sys
print(":".join(sorted({os.path.dirname(p) for d in sys.path if os.path.isdir(d)
                       for p in glob.glob(os.path.join(d, "nvidia", "*", "lib", "*.so*"))})))')
    export LD_LIBRARY_PATH="$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
"$PYTHON" - "$PROVIDER" <<'PY'
import sys
import onnxruntime as ort
from parscale_export.errors import ProviderError
from parscale_export.runtime import resolve_provider
print("onnxruntime", ort.__version__, "from", ort.__file__, ort.get_available_providers())
try:
    print("provider:", resolve_provider(sys.argv[1]))
except ProviderError as exc:
    sys.exit(f"STOP: {exc}")
PY
cli() { "$PYTHON" -c 'from parscale_export.cli.main import run; run()' "$@"; }

"$PYTHON" - "$WORK" <<'PY'
import sys
from pathlib import Path
from parscale_export.synthetic import parscale_config, write_checkpoint
root = Path(sys.argv[1])
shape = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, parscale_n_tokens=48)
for n in (1, 4, 8):
    write_checkpoint(root / f"mid-p{n}", parscale_config(parscale_n=n, **shape), seed=n)
print("wrote mid-size checkpoints (vocab 32000, hidden 512, 8 layers, 8/2 heads, T=48), P=1, 4 and 8")
PY

status=0
for spec in "fixtures/tiny-parscale fp32 tiny-fp32" "fixtures/tiny-parscale fp16 tiny-fp16" \
            "fixtures/tiny-parscale bf16 tiny-bf16" "$WORK/mid-p1 fp16 mid-p1-fp16" \
            "$WORK/mid-p4 fp16 mid-p4-fp16" "$WORK/mid-p8 fp16 mid-p8-fp16" \
            "fixtures/tiny-parscale fp16 tiny-fp16-static --cache static --max-length 64" \
            "$WORK/mid-p4 fp16 mid-p4-fp16-static --cache static --max-length 2560" \
            "fixtures/tiny-parscale fp16 tiny-fp16-gqa --cache gqa --max-length 64" \
            "$WORK/mid-p4 fp16 mid-p4-fp16-gqa --cache gqa --max-length 2560"; do
    set -- $spec
    echo "== convert $1 ($2 ${*:4})"
    cli convert "$1" -o "$WORK/$3" --dtype "$2" "${@:4}" --force > /dev/null
    echo "== validate $3 on $PROVIDER"
    if [ "$2" = bf16 ] && [ "$PROVIDER" != cuda ]; then  # no bfloat16 kernels on the CPU: a clear refusal is the pass
        code=0; cli validate "$WORK/$3" --provider "$PROVIDER" || code=$?
        [ $code = 2 ] && echo "bf16 refused off CUDA, as it must be" || status=1
        continue
    fi
    cli validate "$WORK/$3" --provider "$PROVIDER" --report "$OUT/$3.json" || status=1
done

echo "== family bundle: P=1,2,4 over one backbone (fp16), every P validated, then shared weights"
"$PYTHON" - "$WORK" <<'PY'
import sys
from pathlib import Path
from parscale_export.synthetic import parscale_config, write_family
write_family(Path(sys.argv[1]) / "fam", parscale_config(parscale_n_tokens=8, vocab_size=1024), (1, 2, 4), seed=5)
PY
cli convert "$WORK/fam/p1" "$WORK/fam/p2" "$WORK/fam/p4" -o "$WORK/fam-fp16" --dtype fp16 --force
cli validate "$WORK/fam-fp16" --provider "$PROVIDER" --report "$OUT/fam-fp16.json" || status=1
"$PYTHON" - "$WORK/fam-fp16" "$PROVIDER" <<'PY' || status=1
import sys
import numpy as np
from parscale_export.runtime import Runtime, load_family
bundle, provider = sys.argv[1], sys.argv[2]
ids = np.random.default_rng(0).integers(0, 1024, size=(2, 9))
mask = np.ones_like(ids)
worst = 0.0
for p, shared in load_family(bundle, provider=provider).items():
    got, _ = shared.prefill(ids, mask)
    want, _ = Runtime(bundle, provider=provider, parallel=p).prefill(ids, mask)
    worst = max(worst, float(np.abs(got - want).max()))
print(f"shared weights vs each P alone on {provider}: max |logit difference| {worst:.3g}")
sys.exit(0 if worst <= 1e-3 else 1)
PY

echo "== decode speed on $PROVIDER (fp16, ONNX Runtime; IO binding keeps the cache on the device)"
cli bench "$WORK/mid-p1-fp16" "$WORK/mid-p4-fp16" "$WORK/mid-p8-fp16" --batch 1 --batch 8 \
    --provider "$PROVIDER" --no-reference || status=1
echo "== step time vs context on $PROVIDER, contracts v1, v2 and v3 (fp16, P=4)"
cli bench "$WORK/mid-p4-fp16" "$WORK/mid-p4-fp16-static" "$WORK/mid-p4-fp16-gqa" --batch 1 --prompt-length 64 \
    --prompt-length 2048 \
    --provider "$PROVIDER" --no-reference || status=1
echo "gpu_check: $([ $status = 0 ] && echo PASS || echo FAIL) on $PROVIDER"
exit $status
