#!/usr/bin/env bash
# Here, once, from the repository root: pack what `stairs-bench gpu` needs on a lent GPU machine
# into 60 MiB parts under .carry/ (the device gets the working tree and carried files, not
# ../shared): the pycode pair's Hugging Face folders, the prompts, grow_t5.py and the t5-large
# config.
# onnxruntime-gpu's parts come from ../shared/gpu/pack-ort-gpu.sh.
set -euo pipefail
shared=${SHARED:-../shared}
mkdir -p .carry
rm -f .carry/kit.part-*
tar -C "$shared" -cf - models/pycode-t5-main models/pycode-t5-draft prompts/pycode_public.jsonl \
  tools/grow_t5.py models/configs/t5-large.json | split -b 60M - .carry/kit.part-
ls -l .carry/kit.part-*
