#!/usr/bin/env bash
# The one prepared call on a lent GPU (issue 25): device_bench with profiles, then, if the
# call's budget allows, what model.remat saves there. Everything goes to OUT_DIR.
#   bash benchmarks/device_call.sh OUT_DIR [device_bench args...]
# Wheels the device image lacks (ml_collections) are taken from .whl/ when it exists.
# REMAT_ARGS overrides remat_memory's arguments; CALL_BUDGET_S (default 540) is the call's
# whole budget: remat_memory runs only with 150 s of it left, and is cut off before the end.
set -uo pipefail
out=${1:?usage: device_call.sh OUT_DIR [device_bench args...]}
shift
mkdir -p "$out"
budget=${CALL_BUDGET_S:-540}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$out/device.txt"
python3 -m benchmarks.device_bench --profile "$out" "$@" 2>&1 | tee "$out/device_bench.log"
rc=${PIPESTATUS[0]}
left=$((budget - SECONDS))
if [ "$left" -ge 150 ]; then
  # shellcheck disable=SC2086  (REMAT_ARGS is a list of arguments)
  timeout $((left - 20)) python3 -m benchmarks.remat_memory \
    ${REMAT_ARGS:---encoder resnet50 --size 224 --batch 64} 2>&1 | tee "$out/remat_memory.log"
else
  echo "remat_memory skipped: ${left} s of the call's ${budget} s left" |
    tee "$out/remat_memory.log"
fi
exit "$rc"
