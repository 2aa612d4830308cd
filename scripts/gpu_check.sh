#!/usr/bin/env bash
# The prepared GPU check (meant to take under 6 minutes on one H200). Carry the parts first
# (scripts/gpu_wheel.sh prepares them and prints the calls), then run this in the last call. It:
#   1. verifies and joins the carried parts (scripts/gpu_carry.py) and unpacks onnxruntime-gpu
#      into a private site directory put first on PYTHONPATH, with this package copied beside it,
#      and the official model's transformers 4.51.3 into a second one used by that model alone;
#   2. points the loader at the CUDA 13 / cuDNN 9 libraries of the machine's nvidia-* wheels
#      (onnxruntime's preload_dlls looks only beside its own folder) and stops, loudly and with
#      the loader's reason, when CUDA was asked for but cannot start;
#   3. converts the tiny fixture (fp32, fp16, bf16) and a mid-size checkpoint (P=1, 4, 8, fp16;
#      P=4 also in bf16 and in contracts v1, v2 and v3 by name), validates each on the provider,
#      checks a fp16 family bundle (every P, and shared weights against each P alone), times
#      decoding for P=1/4/8 and against the context for v1/v2/v3;
#   4. times the official PyTorch model (QwenLM/ParScale, eager and sdpa attention, fp16 and
#      bf16) beside our P=4 bundles of the same checkpoint and compares their prefill logits
#      (scripts/gpu_official.py). OFFICIAL=DIR names the checkout (the folder holding
#      modeling_qwen2_parscale.py); by default the copy carried in the parts, if any; without one
#      the comparison is skipped, and says so.
# Everything printed goes to $OUT/gpu_check.log too; validate's reports to $OUT/validate.json and
# the comparison's numbers to $OUT/official.json.
# The GPU machine runs it with its own python3 (3.12, torch 2.11 CUDA 13, onnx, onnxscript, typer,
# safetensors, numpy, a CPU onnxruntime; see constraints-gpu-image.txt) with nothing of this
# project installed, and no registry. Dry run here, in a virtual environment built from those
# versions: `make gpu-dryrun` (PROVIDER=cpu; it cuts the parts for itself and runs a shorter
# comparison). STEPS=preflight stops once the imports are proven (tests/test_gpu_imports.py).
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")/.."
OUT="${OUT:-build/gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -z "${GPU_CHECK_LOGGED:-}" ]; then  # run again with everything printed also kept in $OUT
    set +e
    GPU_CHECK_LOGGED=1 OUT="$OUT" bash "$self" "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
# `python -c`, `python -` and `python -m` put the working directory first on sys.path: this
# checkout's parscale_export/ (without cli/ inside) would shadow the copy in the private site.
# Safe-path mode keeps it off sys.path here and in every Python these start.
export PYTHONSAFEPATH=1
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
PROVIDER="${PROVIDER:-cuda}"
WORK="${WORK:-/tmp/parscale-gpu}"
STEPS="${STEPS:-all}"
mkdir -p "$WORK"
step() { echo "== [${SECONDS}s] $*"; }

if [ "$PROVIDER" = cuda ]; then
    nvidia-smi -L || true
    PARTS="${PARTS:-build/gpu-carry}"
else  # dry run: prepare the parts for this Python, as gpu_wheel.sh does for the GPU machine's
    PARTS="${PARTS:-build/gpu-carry-dryrun}"
    if [ ! -f "$PARTS/gpu-carry.json" ]; then
        step "preparing the parts in $PARTS (scripts/gpu_wheel.sh)"
        GPU_CARRY_DIR="$PARTS" GPU_PYTHON_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
            bash scripts/gpu_wheel.sh > "$WORK/gpu_wheel.log" || { cat "$WORK/gpu_wheel.log"; exit 1; }
    fi
fi
step "joining and verifying the parts in $PARTS"
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
"$PYTHON" - "$PROVIDER" "$site" <<'PY'
import sys
from pathlib import Path
site = Path(sys.argv[2]).resolve()
import parscale_export
if site not in Path(parscale_export.__file__).resolve().parents:
    sys.exit(f"STOP: parscale_export comes from {parscale_export.__file__}, not from the private site {site}")
import importlib.util
import onnxruntime as ort
from parscale_export.errors import ProviderError
from parscale_export.runtime import resolve_provider
command_line = importlib.util.find_spec("parscale_export.cli")
if command_line is None:
    sys.exit(f"STOP: {site}/parscale_export has no cli/ inside")
print("parscale_export and its command line from", Path(command_line.origin).parent.parent)
print("onnxruntime", ort.__version__, "from", ort.__file__, ort.get_available_providers())
try:
    print("provider:", resolve_provider(sys.argv[1]))
except ProviderError as exc:
    sys.exit(f"STOP: {exc}")
PY
cli() { "$PYTHON" -c 'from parscale_export.cli.main import run; run()' "$@"; }
cli convert --help > /dev/null  # the very call that failed when the checkout shadowed the copy
if [ "$STEPS" = preflight ]; then
    echo "gpu_check: preflight PASS on $PROVIDER"
    exit 0
fi

mid=(vocab_size=32000 hidden_size=512 intermediate_size=1408 num_hidden_layers=8 num_attention_heads=8
     num_key_value_heads=2 parscale_n_tokens=48)
"$PYTHON" - "$WORK" "${mid[@]}" <<'PY'
import sys
from pathlib import Path
from parscale_export.synthetic import parscale_config, write_checkpoint
root, shape = Path(sys.argv[1]), {k: int(v) for k, v in (a.split("=") for a in sys.argv[2:])}
for n in (1, 4, 8):
    write_checkpoint(root / f"mid-p{n}", parscale_config(parscale_n=n, **shape), seed=n)
print("wrote mid-size checkpoints (vocab 32000, hidden 512, 8 layers, 8/2 heads, T=48), P=1, 4 and 8")
PY

status=0
rm -rf "$WORK/reports" "$WORK/logs"  # an earlier run's reports would join this one's
mkdir -p "$WORK/reports" "$WORK/logs"
# Converting is mostly single-threaded Python and validating checks one bundle at a time: both run
# as parallel jobs (as many as the cores, at most 8), each with its own log, printed in order.
jobs_max=$(nproc); [ "$jobs_max" -le 8 ] || jobs_max=8
threads=$(( $(nproc) / jobs_max ))  # PyTorch's threads in each job (the reference, the export)
background() {  # NAME COMMAND...: run COMMAND as a job, its output in $WORK/logs/NAME.log
    local name=$1; shift
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n || true; done
    ( set +e; OMP_NUM_THREADS=$threads "$@" > "$WORK/logs/$name.log" 2>&1; echo $? > "$WORK/logs/$name.rc" ) &
}
finished() {  # NAME...: wait for the jobs, print each log under its name; 1 when any failed
    local name failed=0
    wait
    for name in "$@"; do
        echo "-- $name"
        grep -v '^\[ *[0-9.]*s\]' "$WORK/logs/$name.log" || true  # convert's progress lines stay in the log
        [ "$(cat "$WORK/logs/$name.rc")" = 0 ] || { echo "-- $name FAILED"; failed=1; }
    done
    return $failed
}
validate_one() {  # NAME DTYPE
    if [ "$2" = bf16 ] && [ "$PROVIDER" != cuda ]; then  # no bfloat16 kernels on the CPU: a clear refusal is the pass
        local code=0
        cli validate "$WORK/$1" --provider "$PROVIDER" || code=$?
        [ $code = 2 ] && echo "bf16 refused off CUDA, as it must be" && return 0
        return 1
    fi
    cli validate "$WORK/$1" --provider "$PROVIDER" --report "$WORK/reports/$1.json"
}
"$PYTHON" - "$WORK" <<'PY'
import sys
from pathlib import Path
from parscale_export.synthetic import parscale_config, write_family
write_family(Path(sys.argv[1]) / "fam", parscale_config(parscale_n_tokens=8, vocab_size=1024), (1, 2, 4), seed=5)
print("wrote a family of checkpoints, P=1, 2 and 4 over one backbone")
PY
# CHECKPOINTS|DTYPE|NAME|OPTIONS; "default" is what convert writes without --cache, v1-v3 are named.
specs=("fixtures/tiny-parscale|fp32|tiny-fp32|" "fixtures/tiny-parscale|fp16|tiny-fp16|"
       "fixtures/tiny-parscale|bf16|tiny-bf16|" "$WORK/mid-p1|fp16|mid-p1-fp16|" "$WORK/mid-p4|fp16|mid-p4-fp16|"
       "$WORK/mid-p8|fp16|mid-p8-fp16|" "$WORK/mid-p4|bf16|mid-p4-bf16|"
       "$WORK/mid-p4|fp16|mid-p4-fp16-v1|--cache dynamic"
       "$WORK/mid-p4|fp16|mid-p4-fp16-v2|--cache static --max-length 2560"
       "$WORK/mid-p4|fp16|mid-p4-fp16-v3|--cache gqa --max-length 2560"
       "$WORK/fam/p1 $WORK/fam/p2 $WORK/fam/p4|fp16|fam-fp16|")
names=()
step "convert ${#specs[@]} bundles (the last a family: P=1, 2, 4 over one backbone), $jobs_max at a time"
for spec in "${specs[@]}"; do
    IFS='|' read -r sources dtype name options <<< "$spec"
    read -r -a sources <<< "$sources"
    read -r -a options <<< "$options"
    names+=("$name")
    background "convert-$name" cli convert "${sources[@]}" -o "$WORK/$name" --dtype "$dtype" "${options[@]}" --force
done
finished "${names[@]/#/convert-}" || { step "gpu_check: FAIL, a bundle did not convert"; exit 1; }
step "validate each on $PROVIDER, $jobs_max at a time"
for spec in "${specs[@]}"; do
    IFS='|' read -r _ dtype name _ <<< "$spec"
    background "validate-$name" validate_one "$name" "$dtype"
done
finished "${names[@]/#/validate-}" || status=1
step "family bundle: shared weights against each P alone"
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
"$PYTHON" - "$WORK/reports" "$OUT/validate.json" <<'PY'
import json, sys
from pathlib import Path
reports = {p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))}
Path(sys.argv[2]).write_text(json.dumps(reports, indent=1) + "\n")
print(f"{len(reports)} validate reports in {sys.argv[2]}")
PY

step "decode speed on $PROVIDER (fp16, ONNX Runtime; IO binding keeps the cache on the device)"
cli bench "$WORK/mid-p1-fp16" "$WORK/mid-p4-fp16" "$WORK/mid-p8-fp16" --batch 1 --batch 8 \
    --provider "$PROVIDER" --no-reference || status=1
step "step time vs context on $PROVIDER, contracts v1, v2 and v3 (fp16, P=4)"
cli bench "$WORK/mid-p4-fp16-v1" "$WORK/mid-p4-fp16-v2" "$WORK/mid-p4-fp16-v3" --batch 1 --prompt-length 64 \
    --prompt-length 2048 --provider "$PROVIDER" --no-reference || status=1

OFFICIAL="${OFFICIAL:-}"
if [ -z "$OFFICIAL" ] && [ -f "$WORK/packages/official/modeling_qwen2_parscale.py" ]; then
    OFFICIAL="$WORK/packages/official"
fi
if [ -z "$OFFICIAL" ]; then
    step "official PyTorch model: SKIPPED, no QwenLM/ParScale checkout (set OFFICIAL=DIR, the folder holding" \
        "modeling_qwen2_parscale.py, or prepare the parts with it)"
else
    step "official PyTorch model ($OFFICIAL) vs ours, mid-size P=4 on $PROVIDER"
    # Our bundles in the default and the in-place layouts (fp16), and the default one in bf16.
    if [ "$PROVIDER" = cuda ]; then
        shape=()
    else  # CPU fp16 matrix products are slow in PyTorch: a bounded run proves only that it runs and agrees
        shape=(--prompt-length 16 --steps 4 --repeats 1 --threads 2)
        echo "(CPU dry run: prompt 16, 4 steps, 1 run; on CUDA: prompt 64, 32 steps, best of 3)"
    fi
    "$PYTHON" scripts/gpu_official.py --official "$OFFICIAL" --official-site "$WORK/packages/official-site" \
        --checkpoint "$WORK/mid-p4" --provider "$PROVIDER" --work "$WORK/official" --json "$OUT/official.json" \
        --ours "default=$WORK/mid-p4-fp16" --ours "in-place=$WORK/mid-p4-fp16-v2" \
        --ours "in-place=$WORK/mid-p4-fp16-v3" --ours "default=$WORK/mid-p4-bf16" "${shape[@]}" || status=1
fi
step "gpu_check: $([ $status = 0 ] && echo PASS || echo FAIL) on $PROVIDER"
exit $status
