#!/usr/bin/env bash
# Run HERE (a machine with PyPI): fetch the onnxruntime-gpu wheel for the GPU machine's Python
# (3.12) and cut it into parts small enough for one device call each (64 MiB per call).
# Then carry each part in its own call, in order, e.g. for part 00:
#   run(command="ls build/gpu-wheel", carry=["build/gpu-wheel/part-00"])
# and finish with:  run(command="bash scripts/gpu_check.sh", carry=["build/gpu-wheel/part-NN"])
# Parts stay on the warm machine between calls (build/ is ignored), and gpu_check.sh joins them.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${ORT_GPU_VERSION:-1.31.1}"
mkdir -p build/gpu-wheel
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    -d build/gpu-wheel "onnxruntime-gpu==${version}"
wheel=$(ls build/gpu-wheel/onnxruntime_gpu-*.whl)
basename "$wheel" > build/gpu-wheel/NAME
(cd build/gpu-wheel && split -b 60M -d "$(cat NAME)" part- && rm "$(cat NAME)")
ls -la build/gpu-wheel
