#!/usr/bin/env bash
# On the GPU machine, from the repository root, after every carried part was copied to
# /root/stash (see docs/benchmarks.md#device-cache): install onnxruntime-gpu, export the pycode
# pair and a t5-large-shape main grown from it, then run `stairs-bench gpu` into $OUT/gpu
# (as python3 -m bench.gpu: the checkout is on PYTHONPATH, not installed).
#   PROVIDER=cpu STASH=.carry WORK=/tmp/kit LARGE=0 BUDGET=60 N=2 bash bench/gpu/kit/run.sh
# is a dry run on a CPU machine (LARGE=0: no t5-large shape).
set -euo pipefail
provider=${PROVIDER:-cuda}
work=${WORK:-/root/work}
out=${OUT:-/tmp/out}
mkdir -p "$work" "$out/gpu"
if [ "$provider" = cuda ]; then
  bash /root/stash/ortgpu.install.sh
  export PYTHONPATH=/root/site:$PWD
else
  export PYTHONPATH=$PWD
fi
stash=${STASH:-/root/stash}
cat "$stash"/kit.part-* | tar -C "$work" -xf -
m="$work/models"
t0=$(date +%s)
python3 -m export.cli "$m/pycode-t5-main" -o "$work/onnx/pycode-t5-main" \
  --assistant "$m/pycode-t5-draft" --force -q
pairs=(--pair "pycode=$work/onnx/pycode-t5-main,$work/onnx/pycode-t5-draft")
if [ "${LARGE:-1}" = 1 ]; then
  python3 "$work/tools/grow_t5.py" "$m/pycode-t5-main" "$m/configs/t5-large.json" \
    "$work/large-hf" --dtype bf16
  python3 -m export.cli "$work/large-hf" -o "$work/onnx/t5-large" --assistant none --force -q
  pairs+=(--pair "t5-large=$work/onnx/t5-large,$work/onnx/pycode-t5-draft")
fi
echo "exports: $(( $(date +%s) - t0 )) s"
python3 -m bench.gpu --provider "$provider" --budget-s "${BUDGET:-400}" -n "${N:-16}" "${pairs[@]}" \
  --prompts "$work/prompts/pycode_public.jsonl" --out "$out/gpu" 2>&1 | tail -n 80
