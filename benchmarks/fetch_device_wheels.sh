#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before the device call: downloads the wheels of
# benchmarks/device_wheels.txt for the device's python3 (CPython 3.12, x86-64) into .whl/ (git-ignored, ~4 MB).
# The device call then names .whl in `carry`; benchmarks/gpu_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
grep -v '^#' benchmarks/device_wheels.txt | xargs "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl
ls -la .whl
