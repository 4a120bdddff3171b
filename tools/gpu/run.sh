#!/usr/bin/env bash
# Run the GPU matrix prepared by tools/gpu/prepare.sh, cell by cell.
#
#   tools/gpu/run.sh [--dry-run] [CELL ...]      (default: every cell of `nf-bench --preset gpu`)
#
# On the GPU machine: installs the carried wheels (no index), installs this
# package without building anything, checks torch.cuda and the versions,
# measures the GPU's device profile (so later plans for it are exact), then
# runs each cell with its prepared plan. Run directories (checkpoints,
# caches) stay in $NF_GPU_WORK (default /tmp/nf-gpu); results.json,
# results.md, env.json and device-profile.json are copied after every cell to
# $OUT (the device tool's folder, at most 8 files come back) or bench-out/gpu,
# so a run cut off at its time limit keeps every finished cell.
#
# --dry-run: the same script on this CPU with tiny data and one step per
# epoch (the ImageNet-shaped cell is planned and loaded, not trained: one
# step of it takes minutes on two cores). CI runs it.
set -uo pipefail
cd "$(dirname "$0")/../.."
G=$(realpath -m "${NF_GPU_DIR:-.gpu}")
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
RES=${OUT:-bench-out/gpu}
[ $DRY = 1 ] && RES=${NF_DRY_OUT:-bench-out/gpu-dry}
WORK=${NF_GPU_WORK:-/tmp/nf-gpu}
[ $DRY = 1 ] && WORK="$RES/work"
mkdir -p "$RES" "$WORK"
[ -d "$G/plans" ] || { echo "run: no prepared plans in $G/plans; run tools/gpu/prepare.sh first" >&2; exit 2; }

if [ $DRY = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$G"/whl/*.whl \
    || { echo "run: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || { echo "run: installing neuroflux failed" >&2; exit 2; }
  export NEUROFLUX_DATA="$G/data/fashion_mnist.npz" PYTHONUNBUFFERED=1
  python3 - "$RES/env.json" <<'PY' || exit 2
import json, sys, platform
import torch
if not torch.cuda.is_available():
    sys.exit("run: torch.cuda is not available on this machine")
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name(0), "total_memory": torch.cuda.get_device_properties(0).total_memory}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print("run:", env)
PY
  # NF_SKIP_PROFILE=1: the committed profile of this GPU kind is recent; spend the device time on the cells.
  [ -n "${NF_SKIP_PROFILE:-}" ] || [ -f "$RES/device-profile.json" ] || timeout 120 python3 -m neuroflux.planner.device_profile --device cuda \
    -o "$RES/device-profile.json" || echo "run: device profile failed (not fatal)"
  ARGS=(--device cuda)
else
  ARGS=(--dry-run --skip-runs resnet34-imagenet-8GB)
  # A bf16 cell's dry run on a CPU without native bf16 (AVX2 only) runs emulated: slow, but it checks the path.
  export NEUROFLUX_ALLOW_EMULATED_PRECISION=1
fi

CELLS=("$@")
if [ ${#CELLS[@]} = 0 ]; then
  mapfile -t CELLS < <(nf-bench --preset gpu --list | cut -d: -f1)
fi
status=0
for c in "${CELLS[@]}"; do
  echo "run: cell $c"
  # results.json/.md go straight to $RES after every method: a call cut off
  # mid-cell still brings back the methods it finished.
  timeout "${NF_CELL_TIMEOUT:-580}" nf-bench --preset gpu --cell "$c" --plans "$G/plans" --out "$WORK" \
    --results "$RES" "${ARGS[@]}" 2>&1 | tee -a "$RES/log.txt" | tail -40
  rc=${PIPESTATUS[0]}
  echo "run: cell $c rc=$rc"
  [ "$rc" = 0 ] || status=1
done
if [ $DRY = 0 ] && [ -z "${NF_SKIP_MICRO:-}" ] && [ ! -f "$RES/runtime-micro.json" ]; then
  # The runtime's device options (inference_mode, foreach SGD, channels_last), before and after, on this GPU;
  # after the cells, which matter more.
  timeout 120 python3 benchmarks/runtime_micro.py --device cuda --model resnet18 --batch 128 \
    -o "$RES/runtime-micro.json" || echo "run: runtime micro-benchmark failed (not fatal)"
fi
[ -f "$RES/results.md" ] && cat "$RES/results.md"
exit $status
