#!/usr/bin/env bash
# Build run_package against the libtorch of the installed pip torch wheel, then (given a package) run it:
#   examples/deploy/build.sh [model.pt2 T N C H W]
# e.g. after `python -m sparseflow_bench.gpu_run --sections deploy --out OUT`:
#   examples/deploy/build.sh OUT/deploy/spiking_resnet34.pt2 4 8 3 224 224
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python}"
prefix="$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
build="${BUILD_DIR:-$here/build}"
cmake -S "$here" -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$(nproc)"
if [ "$#" -ge 6 ]; then
  "$build/run_package" "$@"
fi
