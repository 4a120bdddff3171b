#!/usr/bin/env bash
# Prepare the GPU matrix on a CPU machine, so that scarce GPU time is spent
# measuring, not installing, planning or debugging.
#
#   tools/gpu/prepare.sh [--no-wheels]
#
# 1. wheels of the runtime packages the GPU image lacks (CPython 3.12,
#    manylinux x86_64) into .gpu/whl;
# 2. the plans of every `nf-bench --preset gpu` cell, made here with a GPU
#    device profile (a measured h100.json or h200.json under
#    benchmarks/device-profiles, else h100-estimated.json), so the GPU needs no solver;
# 3. the full Fashion-MNIST file (already compressed) into .gpu/data;
# 4. a check that everything that travels (tracked and untracked files, .gpu)
#    stays under the device's 64 MiB.
# .gpu is ignored through .git/info/exclude; the device call carries it.
set -euo pipefail
cd "$(dirname "$0")/../.."
G=$(realpath -m "${NF_GPU_DIR:-.gpu}")
LIMIT_MIB=64
mkdir -p "$G/whl" "$G/data"
# A clean export (CI's copy) may have no .git/info: nothing to exclude from then.
if [ -d .git/info ]; then grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude; fi

if [ "${1:-}" != "--no-wheels" ]; then
  # What `import neuroflux.runtime` and the schema check need beyond the GPU
  # image (KINDS.md's package list): jsonschema and its own dependencies.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$G/whl" jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0
fi

DATA=${NEUROFLUX_DATA:-../shared/data/fashion_mnist.npz}
[ -f "$DATA" ] || { echo "prepare: $DATA not found; set NEUROFLUX_DATA to fashion_mnist.npz" >&2; exit 2; }
cp "$DATA" "$G/data/fashion_mnist.npz"

# A measured profile of a lent GPU (the device tool lends H100s and H200s, both
# Hopper: same library workspace, similar speed), else the estimate.
PROFILE=""
for p in h100.json h200.json h100-estimated.json; do
  [ -z "$PROFILE" ] && [ -f "benchmarks/device-profiles/$p" ] && PROFILE="benchmarks/device-profiles/$p"
done
echo "prepare: planning the GPU cells with $PROFILE"
# NF_GPU_CELLS="a b": plan only those cells (the runbook's dry run in the tests); default every cell.
# shellcheck disable=SC2086
NEUROFLUX_DATA="$G/data/fashion_mnist.npz" nf-bench --preset gpu --plan-only --plan-device cuda \
  --device-profile "$PROFILE" --out "$G/plans" --time-limit 30 ${NF_GPU_CELLS:+--cell $NF_GPU_CELLS} \
  > "$G/plans.log" 2>&1 \
  || { cat "$G/plans.log" >&2; exit 1; }

if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  tracked=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
else  # not a git checkout: count the whole folder but .gpu (an over-estimate)
  tracked=$(du -sb --exclude=./.gpu --exclude=./.git . | cut -f1)
fi
extra=$(du -sb "$G" | cut -f1)
total=$((tracked + extra))
python3 -c 'import sys; t, r, e, lim = map(int, sys.argv[1:]); m = 1 << 20
print(f"prepare: travelling size {t / m:.1f} MiB (repo {r / m:.1f} MiB + .gpu {e / m:.1f} MiB), limit {lim} MiB")' \
  "$total" "$tracked" "$extra" "$LIMIT_MIB"
if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then
  echo "prepare: over the device's limit; drop wheels or data from $G" >&2
  exit 1
fi
echo "prepare: ready. On the GPU (device tool, carry [\".gpu\"]), one call per line of BENCHMARKS.md's GPU section."
