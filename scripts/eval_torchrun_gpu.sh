#!/usr/bin/env bash
# `sparseflow-bench eval` under torchrun on the GPU machine, from the repository root:
#
#     NPROC=1 bash scripts/eval_torchrun_gpu.sh
#
# 1. scripts/make_eval_data.py writes a small data set ($DATA: images.pt and an image folder; nothing downloaded);
# 2. the dense and the SparseFlow-optimized SEW-ResNet34 (fp16, CUDA graphs) run over images.pt, and the optimized
#    spiking ResNet-18 over the image folder, on NPROC ranks (one per GPU): each prints the samples/s of every
#    rank and in total, and writes predictions, summary.json and reports.json under $OUT;
# 3. scripts/sj_distributed_gpu.py: the same model family inside SpikingJelly's own distributed inference.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
unset TRITON_INTERPRET
export SPARSEFLOW_GPU_RUN=1
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then  # spikingjelly etc., as scripts/gpu_check.sh does
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/packages/sparseflow-kernels/src:$ROOT/packages/sparseflow-ops/src:$ROOT/packages/sparseflow-core/src:$ROOT/packages/sparseflow-bench/src:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
NPROC=${NPROC:-1}
OUT=${OUT:-/tmp/sf_eval_out}
DATA=${DATA:-/tmp/sf_eval_data}
N=${N:-512}
RUN="python3 -m torch.distributed.run --standalone --nproc_per_node=$NPROC"

python3 scripts/make_eval_data.py --out "$DATA" --n "$N" --size 224
for variant in dense sparseflow; do
    extra=()
    [ "$variant" = dense ] && extra=(--no-optimize)
    echo "=== sew_resnet34, images.pt, fp16, CUDA graphs: $variant"
    $RUN -m sparseflow_bench.cli eval --model sew_resnet34 --num-classes 10 --data "$DATA/images.pt" --T 4 \
        --batch-size 32 --dtype float16 --cuda-graph --out "$OUT/sew_resnet34_$variant" "${extra[@]}"
done
echo "=== spiking_resnet18, image folder, fp16: sparseflow"
$RUN -m sparseflow_bench.cli eval --model spiking_resnet18 --num-classes 10 --data "$DATA/images" --size 224 \
    --T 4 --batch-size 32 --dtype float16 --workers 4 --out "$OUT/spiking_resnet18_folder"
echo "=== SparseFlow inside SpikingJelly's distributed inference"
$RUN scripts/sj_distributed_gpu.py --data "$DATA/images" --out "$OUT/sj" --size 224 --batch-size 16
