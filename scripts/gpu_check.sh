#!/usr/bin/env bash
# GPU checks for a CUDA host with PyTorch (e.g. a lent H100/H200, whose image has torch and transformers
# but not the service's packages): the unit tests with the GPU-marked ones, bench/gpu_routing.py, the
# random-init edit-speed benches (SmolLM2-135M and Llama-3-8B shapes) and bench/service_load.py on a
# random SmolLM2-shaped model served from the GPU, bench/bulk_import.py on it, and the CPU index at 1M keys on the host's cores.
# Logs go to $OUT (default ./gpu-out), one per step.
#
#   .whl/  (optional) wheels installed first into /tmp/site: the service's dependencies; on the lent
#          image alembic, annotated-types, faiss-cpu, fastapi, mako, opentelemetry-api
#          (fastapi 0.165 imports it), pydantic, pydantic-core, pydantic-settings, python-dotenv,
#          sqlalchemy, starlette, typing-inspection and uvicorn, at the versions of .venv (26 MB)
#   TOK    a folder holding <name>/tokenizer_config.json (default .gpu/tok; else .horen/converted)
#   ONLY   (optional) space-separated step names to run, e.g. "env tests gpu_routing"; default all
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
TOK=${TOK:-.gpu/tok}
[ -d "$TOK" ] || TOK=.horen/converted
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
ONLY=${ONLY:-}
step() { # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.txt, keep going on failure
  local name=$1 limit=$2
  shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "== $name: $*" | tee "$OUT/$name.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$OUT/$name.txt" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
  tail -n 25 "$OUT/$name.txt"
}
step env 40 bash -c "nvidia-smi -L; $PY -c 'import torch, transformers, faiss, fastapi, sqlalchemy; \
print(torch.__version__, torch.cuda.get_device_name(0), transformers.__version__, faiss.__version__, \
\"faiss gpu:\", hasattr(faiss, \"StandardGpuResources\"))'"
step tests 150 "$PY" -m pytest -q -p no:cacheprovider -m "not real_model and not postgres" --ignore=tests/deploy \
  tests/horen_core tests/service
step gpu_routing 150 "$PY" bench/gpu_routing.py --sizes 10000,100000,1000000
step edit_8b 120 "$PY" bench/edit_speed.py --random-init llama3-8b --device cuda --n 10 --converted-dir "$TOK"
step edit_135m 80 "$PY" bench/edit_speed.py --random-init llama-135m --device cuda --n 20 --converted-dir "$TOK"
RAND=/tmp/horen-random-135m
step save_random 40 "$PY" -c "
import sys, torch; from pathlib import Path; sys.path.insert(0, 'bench')
from edit_speed import random_model
m, t = random_model('llama-135m', torch.device('cpu'), Path('$TOK'))
m.save_pretrained('$RAND'); t.save_pretrained('$RAND'); print('saved')"
step service_load 180 "$PY" bench/service_load.py --device cuda --model "$RAND"
# batched against one-by-one training of the same 100 edits (random weights: throughput only)
step bulk_import 150 "$PY" bench/bulk_import.py --device cuda --model "$RAND" --n 100 --batch 32 \
  --data tests/fixtures/zsre_small.json
# the CPU index at 1M keys on this host's cores (synthetic keys: timing, not agreement)
step index_cpu_1m 120 "$PY" bench/index_bench.py --sizes 1000000 --queries 500 --unrelated 100 --timed 300 \
  --exact-budget 5 --scan-threads 4
