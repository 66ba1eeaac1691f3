#!/usr/bin/env bash
# The GPU figures issues 15 and 16 ask for, in one call of the device tool (one H200; 15 minutes of device time
# per session, the machine's start-up included), most important first, each under its own time limit so that a
# slow step cannot eat the others' time. Prepare here with bench/gpu_wheels.sh, then:
#
#   device run: command="bash bench/gpu_checks.sh", carry=[".whl"], timeout_s=590
#
# Each check's output comes back as $OUT/<name>.txt, with $OUT/summary.txt (exit status and seconds of each) and
# $OUT/env.txt (jax, devices, GPU). `bash bench/gpu_checks.sh train_step serve` runs only the named checks; with
# no names, the first three (the open issues' figures).
# Checks (names, limits in seconds):
#   train_step 270  issue 16: mid, stage 2, bf16, batch 8 x 2048, attention xla vs cudnn: the trainer's step time,
#                   tokens/s and MFU next to the planner's estimate (bench/bench_train_step_gpu.py)
#   serve      180  issue 15: the server with the mid preset in bf16, 1 / 4 / 16 / 64 clients (bench/bench_serve.py)
#   slots      100  issue 15: how many serving slots of mid fit and their decode tokens/s
#                   (bench/bench_server_slots_gpu.py; the full-size qwen_vl_7b figure needs longer than one call)
#   lora       240  issue 14 (resolved on paper): QLoRA nf4 of qwen_vl_7b, rank 64, seq 2048, cudnn: the device's
#                   peak bytes against the official 19.3 GB (bench/lora_memory.py)
#   quantized  200  int8 / int4 weights and the int8 KV cache against bf16, mid (bench/bench_quantized_decode.py)
#   score      120  issue 15: lm-evaluation-harness-style scoring through the server (echo, token prompts) against
#                   the in-process scorer, mid in bf16 (bench/bench_score.py)
#   n_choices  150  issue 15: an API request's n choices prefilled once against each choice prefilling, mid in
#                   bf16, n = 1 / 4 / 8 (bench/bench_n_choices.py)
#   serve_cpu  150  issue 15's CPU goal (16 clients >= 6x one client's tokens/s, tiny float32) on this host's 16
#                   cores: on the 2-core CI machine the clients, the HTTP server and XLA share two cores
#                   (bench/bench_serve.py, JAX_PLATFORMS=cpu)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# One compilation cache for every process: the planner's compile of the step the trainer just compiled may hit it.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" | tee "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
{
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import qwenvl_jax.train, qwenvl_jax.serve; print('qwenvl_jax imports')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# Every check imports the package: if it does not import, say so once instead of spending device time on each.
grep -q "^qwenvl_jax imports" "$OUT/env.txt" \
  || { echo "qwenvl_jax does not import here (env.txt): no check run" | tee "$OUT/summary.txt"; exit 1; }

check() {  # name, limit (s), command...
  local name=$1 limit=$2
  shift 2
  if [[ ! " ${SELECTED[*]} " == *" $name "* ]]; then
    return
  fi
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit; 124 = timed out)" | tee -a "$OUT/summary.txt"
  tail -n 12 "$OUT/$name.txt"
}
SELECTED=("$@")
[ ${#SELECTED[@]} -gt 0 ] || SELECTED=(train_step serve slots)
# PRESET / DTYPE / SEQ_LEN: a check of this script on a CPU (PRESET=tiny DTYPE=float32 SEQ_LEN=256
# JAX_PLATFORMS=cpu OUT=/tmp/x).
# The benches that default to the CPU (bench_serve, bench_score, bench_n_choices: JAX_PLATFORMS=cpu unless set)
# run on the GPU here; serve_cpu sets its own.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
PRESET=${PRESET:-mid}
DTYPE=${DTYPE:-bfloat16}
check train_step 270 python3 bench/bench_train_step_gpu.py --preset="$PRESET" --impls=xla,cudnn --batch=8 \
  --seq_len="${SEQ_LEN:-2048}" --steps=8 --log_every=4 ${DTYPE:+--dtype=$DTYPE}
check serve 180 python3 bench/bench_serve.py --model="$PRESET" --dtype="$DTYPE" --slots=64 --context=512 --requests=128
check slots 100 python3 bench/bench_server_slots_gpu.py --preset="$PRESET" --slots=64,256
check lora 240 python3 bench/lora_memory.py --model=qwen_vl_7b --lora=64 --base_quantize=nf4 --seq_len=2048 --batch=1 \
  --attention=cudnn
check score 120 python3 bench/bench_score.py --model="$PRESET" --dtype="$DTYPE" --items=32
check n_choices 150 python3 bench/bench_n_choices.py --model="$PRESET" --dtype="$DTYPE" --slots=8 --n=1,4,8 \
  --prompts=450 --repeats=3
check serve_cpu 150 env JAX_PLATFORMS=cpu python3 bench/bench_serve.py --agreement=4
check quantized 200 python3 bench/bench_quantized_decode.py --preset="$PRESET" --batch=4 --prompt_len=1024 \
  --platform=gpu
