#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run on a CUDA machine, under 10 minutes in all, each
# step with its own time limit and log under OUTDIR, a step that fails or runs out of time never
# stopping the next:
#   gpu        bench/gpu.py --budget 280: samples/s per stage of cnn9 on 50,000 images, the A/B
#              variants (fp32/bf16, cuDNN autotuning, batch sizes, torch.compile, CUDA graphs),
#              eager vs graphed steps; then, as the budget allows, resnet18, the MLP at a million
#              and the gpu-marked tests                                                  (300 s)
#   overhead   bench/service_overhead.py --device cuda --images 20000: one default cnn9 job
#              through the gRPC server against the direct engine call                    (170 s)
#   real_noise bench/real_noise.py --quick --device cuda: real label noise, GPU defaults (100 s)
# `--smoke` runs every step tiny on the CPU, to check the script before a GPU is spent on it.
# The first step needs only torch, NumPy, scikit-learn and the engine; the others need the
# project's environment (`pip install -e .`, or its wheels on PYTHONPATH). CIFAR-10N is read from
# $CIFAR10N (default: bench/real_noise.py's own lookup); without it that step prints "skipped".
# A summary of the steps' outcomes and `summary:` lines is printed at the end and kept in
# OUTDIR/summary.txt.
#
# Usage: bench/gpu_session.sh [--smoke] OUTDIR [STEP...]     (steps: gpu overhead real_noise)
set -uo pipefail

smoke=0
if [[ ${1:-} == --smoke ]]; then
  smoke=1
  shift
fi
if (($# < 1)); then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
out=$1
shift
steps=("$@")
((${#steps[@]})) || steps=(gpu overhead real_noise)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")"
export PYTHONPATH="..${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
data_args=()
[[ -n ${CIFAR10N:-} ]] && data_args=(--data "$CIFAR10N")

step_command() {  # prints nothing; fills `command` and `limit` for step $1
  case $1 in
    gpu)
      limit=300
      command=("$python" gpu.py --budget 280)
      ((smoke)) && command+=(--smoke) && limit=600
      ;;
    overhead)
      limit=170
      command=("$python" service_overhead.py --device cuda --images 20000 --repeats 1)
      ((smoke)) && command=("$python" service_overhead.py --images 64 --quick --repeats 1) && limit=240
      ;;
    real_noise)
      limit=100
      command=("$python" real_noise.py --quick --device cuda "${data_args[@]}")
      ((smoke)) && command=("$python" real_noise.py --subsample 200 --no-digits --threads 1 "${data_args[@]}")
      ;;
    *)
      echo "unknown step: $1 (steps: gpu overhead real_noise)" >&2
      return 1
      ;;
  esac
}

: >"$out/summary.txt"
for step in "${steps[@]}"; do
  step_command "$step" || exit 2
  echo "== $step: ${command[*]} (limit ${limit} s)" | tee -a "$out/summary.txt"
  began=$SECONDS
  timeout --kill-after=10 "$limit" "${command[@]}" >"$out/$step.log" 2>&1
  rc=$?
  outcome="exit $rc"
  ((rc == 124 || rc == 137)) && outcome="stopped at its ${limit}-s limit"
  echo "   $outcome after $((SECONDS - began)) s; log $step.log" | tee -a "$out/summary.txt"
  grep -E '^(summary:|service/direct|skipped|bench/gpu.py:)' "$out/$step.log" | sed 's/^/   /' | tee -a "$out/summary.txt"
done
