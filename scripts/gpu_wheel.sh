#!/usr/bin/env bash
# Run HERE (a machine with PyPI): prepare what the GPU machine lacks, in parts that travel with the
# working tree one device call each (a call carries 64 MiB in all), and print the calls.
#   - onnxruntime-gpu for the GPU machine's Python (3.12 by default);
#   - the official model's transformers 4.51.3, tokenizers 0.21.1, huggingface_hub 0.30.2, einops;
#   - with OFFICIAL=DIR, the official modeling and configuration files from that QwenLM/ParScale
#     checkout, so that scripts/gpu_check.sh finds them there without OFFICIAL.
# They go into one tar.xz, the wheels unpacked (xz: about 20% smaller than the wheels' zip), cut
# into equal parts sized from the tree as it is now: tree + part + manifest <= 64 MiB.
# The machine goes back after ~30 s idle: make the calls back to back, as each part stays there
# only while the machine is warm. Run this again if the tree grows past the spare room printed.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${ORT_GPU_VERSION:-1.31.1}"
official_wheels=(transformers==4.51.3 tokenizers==0.21.1 huggingface_hub==0.30.2 einops==0.8.2)
pyver="${GPU_PYTHON_VERSION:-3.12}"
out="${GPU_CARRY_DIR:-build/gpu-carry}"
download="build/gpu-download"
rm -rf "$download" && mkdir -p "$download"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$download" "onnxruntime-gpu==${version}" "${official_wheels[@]}"
items=("site=$(ls "$download"/onnxruntime_gpu-*.whl)")
for wheel in "$download"/*.whl; do
    case "$wheel" in *onnxruntime_gpu-*) ;; *) items+=("official-site=$wheel") ;; esac
done
if [ -n "${OFFICIAL:-}" ]; then
    for name in modeling_qwen2_parscale.py configuration_qwen2_parscale.py; do
        [ -f "$OFFICIAL/$name" ] || { echo "OFFICIAL=$OFFICIAL holds no $name" >&2; exit 1; }
        items+=("official=$OFFICIAL/$name")
    done
fi
python3 scripts/gpu_carry.py pack "$download/gpu-packages.tar.xz" "${items[@]}"
python3 scripts/gpu_carry.py split "$download/gpu-packages.tar.xz" "$out" --fit-tree .
rm -rf "$download"
[ -n "${OFFICIAL:-}" ] || echo "no OFFICIAL=DIR: the parts hold no official files; the check skips the comparison"
parts=("$out"/*.part-*)
echo "device calls, back to back (${#parts[@]}):"
for ((i = 0; i < ${#parts[@]} - 1; i++)); do
    echo "  run(command=\"python3 scripts/gpu_carry.py status $out\", carry=[\"$out/gpu-carry.json\", \"${parts[$i]}\"])"
done
check="bash scripts/gpu_check.sh"
[ "$out" = build/gpu-carry ] || check="PARTS=$out $check"
echo "  run(command=\"$check\", carry=[\"$out/gpu-carry.json\", \"${parts[-1]}\"], timeout_s=480)"
