#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run on a CUDA machine, under 10 minutes in all, each
# step with its own time limit and log under OUTDIR, a step that fails or runs out of time never
# stopping the next:
#   gpu        bench/gpu.py --budget 270: samples/s per stage of cnn9 on 50,000 images, the A/B
#              variants (fp32/bf16, cuDNN autotuning, batch sizes, torch.compile, CUDA graphs),
#              eager vs graphed steps; then, as the budget allows, resnet18, the MLP at a million
#              and the gpu-marked tests                                                  (290 s)
#   overhead   bench/service_overhead.py --device cuda --images 20000: one default cnn9 job
#              through the gRPC server against the direct engine call                    (170 s)
#   real_noise bench/real_noise.py --quick --device cuda: real label noise, GPU defaults (100 s)
# and, only when named (it does not fit the 10 minutes with the others):
#   overhead_process  the overhead step with O2U_TRAINING_ISOLATION=process (the server trains in
#              its training process instead of its thread)                             (170 s)
# `--smoke` runs every step tiny on the CPU, to check the script before a GPU is spent on it.
# The first step needs only torch, NumPy, scikit-learn and the engine; the others need the
# project's dependencies: its environment, or `--bundle BUNDLE` made by bench/gpu_bundle.sh, whose
# wheels are installed into a scratch folder put first on PYTHONPATH. CIFAR-10N is read from
# $CIFAR10N, else BUNDLE/cifar10n_10k.npz, else bench/real_noise.py's own lookup; without it that
# step prints "skipped".
# A summary of the steps' outcomes and `summary:` lines is printed at the end and kept in
# OUTDIR/summary.txt.
#
# Usage: bench/gpu_session.sh [--smoke] [--bundle BUNDLE] OUTDIR [STEP...]
#        (steps: gpu overhead real_noise, the default; overhead_process)
set -uo pipefail

smoke=0
bundle=
while [[ ${1:-} == --* ]]; do
  case $1 in
    --smoke) smoke=1 ;;
    --bundle) bundle=${2:?--bundle needs a folder} && shift ;;
    *) echo "unknown option: $1" >&2 && exit 2 ;;
  esac
  shift
done
if (($# < 1)); then
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"  # the header above
  exit 2
fi
out=$1
shift
steps=("$@")
((${#steps[@]})) || steps=(gpu overhead real_noise)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")"
root=$(cd .. && pwd)
python=${PYTHON:-python3}
# The project's packages from this checkout, for the benchmarks and the servers they start.
path=$root:$root/server:$root/client/python:$root/protos/python
if [[ -n $bundle ]]; then
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$bundle"/wheels/*.whl || exit 2
  path=$site:$path
  [[ -z ${CIFAR10N:-} && -f $bundle/cifar10n_10k.npz ]] && CIFAR10N=$(cd "$bundle" && pwd)/cifar10n_10k.npz
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
data_args=()
[[ -n ${CIFAR10N:-} ]] && data_args=(--data "$CIFAR10N")

step_command() {  # prints nothing; fills `command` and `limit` for step $1 (status 0, 1: unknown step)
  case $1 in
    gpu)
      limit=290
      command=("$python" gpu.py --budget 270)
      if ((smoke)); then
        command+=(--smoke) && limit=600
      fi
      ;;
    overhead | overhead_process)
      limit=170
      command=("$python" service_overhead.py --device cuda --images 20000 --repeats 1)
      if ((smoke)); then
        command=("$python" service_overhead.py --images 64 --quick --repeats 1) && limit=240
      fi
      if [[ $1 == overhead_process ]]; then
        command=(env O2U_TRAINING_ISOLATION=process "${command[@]}")
      fi
      ;;
    real_noise)
      limit=100
      command=("$python" real_noise.py --quick --device cuda "${data_args[@]}")
      if ((smoke)); then
        command=("$python" real_noise.py --subsample 200 --no-digits --threads 1 "${data_args[@]}") && limit=300
      fi
      ;;
    *)
      echo "unknown step: $1 (steps: gpu overhead real_noise overhead_process)" >&2
      return 1
      ;;
  esac
}

for step in "${steps[@]}"; do  # a misspelt step stops the session before any device time is spent
  step_command "$step" || exit 2
done
: >"$out/summary.txt"
for step in "${steps[@]}"; do
  step_command "$step"
  echo "== $step: ${command[*]} (limit ${limit} s)" | tee -a "$out/summary.txt"
  began=$SECONDS
  timeout --kill-after=10 "$limit" "${command[@]}" >"$out/$step.log" 2>&1
  rc=$?
  outcome="exit $rc"
  ((rc == 124 || rc == 137)) && outcome="stopped at its ${limit}-s limit"
  echo "   $outcome after $((SECONDS - began)) s; log $step.log" | tee -a "$out/summary.txt"
  { grep -E '^(summary:|service/direct|skipped|bench/gpu.py:)' "$out/$step.log" || true; } |
    sed 's/^/   /' | tee -a "$out/summary.txt"
done
exit 0  # each step's outcome is in the summary; a failed step does not fail the session
