#!/usr/bin/env bash
# The device machine's whole GPU check, in one call (about 5 minutes on one H200; 8 at most):
#   detkd bench gpu  ->  benchmarks/results/gpu.json (+ a copy and the log under $OUT when set).
# No venv there: the image's python3 holds torch/torchvision/numpy/pillow/yaml/tqdm/matplotlib/tensorboard;
# the rest come as wheels in .whl (benchmarks/fetch_device_wheels.sh, run beforehand with PyPI access),
# installed into /tmp/site in a few seconds. detkd itself runs from this tree (PYTHONPATH), no install.
# Usage: DETKD_COMMIT=<hash> bash benchmarks/gpu_check.sh [--cpu] [extra `detkd bench gpu` arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  t0=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 3; }
  export PYTHONPATH="$PWD:/tmp/site"
  echo "gpu_check: wheels installed in $(( $(date +%s) - t0 )) s"
fi
"$PY" - <<'PY' || { echo "gpu_check: a package detkd needs is missing (carry .whl, see benchmarks/fetch_device_wheels.sh)" >&2; exit 3; }
import torch, torchvision, pydantic, lmdb, yaml, faster_coco_eval  # noqa: F401
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision {torchvision.__version__}, "
      f"cuda available {torch.cuda.is_available()}")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p benchmarks/results /tmp/detkd-bench-gpu
case " $* " in *" --cpu "*) log=/tmp/detkd-bench-gpu/gpu-cpu.log ;; *) log=benchmarks/results/gpu.log ;; esac
# The report is rewritten after every part, so a run stopped by this limit still leaves what it measured.
timeout "${GPU_CHECK_TIMEOUT:-500}" "$PY" -m detkd bench gpu --out /tmp/detkd-bench-gpu "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  cp "$log" "$OUT"/ 2>/dev/null
  cp benchmarks/results/gpu.json /tmp/detkd-bench-gpu/gpu-cpu.json "$OUT"/ 2>/dev/null
fi
echo "gpu_check: exit $rc (0 all parts passed, 1 a part failed, 124 time limit)"
exit "$rc"
