#!/usr/bin/env bash
# Packs what bench/gpu_session.sh needs on a CUDA machine that has PyTorch but neither this
# project's other dependencies nor a network:
#   BUNDLE/wheels/       wheels of the project's dependencies (pinned in pyproject.toml) and of
#                        cleanlab, for the target's Python (default 3.12, x86-64 manylinux), less
#                        the packages a PyTorch image already ships (NumPy, SciPy, scikit-learn,
#                        pandas, pyarrow, Pillow, ...): about 23 MB
#   BUNDLE/cifar10n_10k.npz
#                        CIFAR-10N, copied from $CIFAR10N when it is set (28 MB)
# Then, on the CUDA machine: bench/gpu_session.sh --bundle BUNDLE OUTDIR
# $BUNDLE_PYTHON_VERSION picks another target Python (e.g. 3.11 to try the bundle on this one).
#
# Usage: bench/gpu_bundle.sh BUNDLE
set -euo pipefail

if (($# != 1)); then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
bundle=$1
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
[[ -z ${PYTHON:-} && -x $root/.venv/bin/python ]] && python=$root/.venv/bin/python
version=${BUNDLE_PYTHON_VERSION:-3.12}

# Shipped with PyTorch images (and needed by it), so left out: a second copy would shadow them.
shipped=(torch torchvision numpy pillow pyarrow scipy scikit-learn pandas joblib threadpoolctl
  python-dateutil tzdata narwhals six pyyaml rich markdown-it-py mdurl pygments urllib3 certifi
  typing-extensions markupsafe cloudpickle tqdm psutil)

mapfile -t requirements < <("$python" - "$root/pyproject.toml" "${shipped[@]}" <<'EOF'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
shipped = set(sys.argv[2:])
wanted = project["dependencies"] + [
    r for r in project["optional-dependencies"]["dev"] if r.startswith("cleanlab")
]
for requirement in wanted:
    name = re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
    if name not in shipped:
        print(requirement)
EOF
)

rm -rf "$bundle/wheels"
mkdir -p "$bundle/wheels"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$python" -m pip download -q --only-binary=:all: --python-version "$version" --implementation cp \
  "${platforms[@]}" -d "$bundle/wheels" "${requirements[@]}"
for wheel in "$bundle"/wheels/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]_' '[:lower:]-')
  for skip in "${shipped[@]}"; do
    [[ $name == "$skip" ]] && rm "$wheel"
  done
done
if [[ -n ${CIFAR10N:-} ]]; then
  cp "$CIFAR10N" "$bundle/cifar10n_10k.npz"
fi
echo "$bundle: $(ls "$bundle/wheels" | wc -l) wheels for Python $version, $(du -sh "$bundle" | cut -f1) in all"
ls "$bundle/wheels"
