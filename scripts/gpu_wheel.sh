#!/usr/bin/env bash
# Run HERE (a machine with PyPI): fetch the onnxruntime-gpu wheel for the GPU machine's Python
# (3.12 by default) and cut it into verified parts (scripts/gpu_carry.py) small enough to travel
# with the working tree in one device call each (64 MiB per call; parts are 50 MiB).
# It prints the device calls to make, in order. The machine goes back after ~30 s idle, so make
# them back to back: each part stays there only while the machine is warm.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${ORT_GPU_VERSION:-1.31.1}"
pyver="${GPU_PYTHON_VERSION:-3.12}"
out="${GPU_WHEEL_DIR:-build/gpu-wheel}"
download=build/gpu-download
rm -rf "$download" && mkdir -p "$download"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$download" "onnxruntime-gpu==${version}"
python3 scripts/gpu_carry.py split "$download"/onnxruntime_gpu-*.whl "$out" --part-mib "${PART_MIB:-50}"
rm -rf "$download"

tree_bytes=$(git ls-files -z | xargs -0 stat -c %s | awk '{s+=$1} END {print s+0}')
part_bytes=$(stat -c %s "$out"/*.part-* | sort -n | tail -1)
echo "working tree ${tree_bytes} bytes + largest part ${part_bytes} bytes (a call carries at most 67108864)"
if [ $((tree_bytes + part_bytes)) -gt 67108864 ]; then
    echo "too large for one call: lower PART_MIB" >&2
    exit 1
fi
parts=("$out"/*.part-*)
echo "device calls, back to back:"
for ((i = 0; i < ${#parts[@]} - 1; i++)); do
    echo "  run(command=\"ls build/gpu-wheel\", carry=[\"$out/gpu-wheel.json\", \"${parts[$i]}\"])"
done
echo "  run(command=\"bash scripts/gpu_check.sh\", carry=[\"$out/gpu-wheel.json\", \"${parts[-1]}\"], timeout_s=420)"
