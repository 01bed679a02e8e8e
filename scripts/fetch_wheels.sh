#!/usr/bin/env bash
# Wheels for running jaxdiff and its benchmark on a GPU machine without network access whose
# Python already has the accelerator stack (jax with CUDA, flax, optax, orbax-checkpoint, chex,
# einops, torch, numpy, scipy, PIL, scikit-learn, ...): the pure-Python packages such images
# usually lack, at the versions the project is tested with.
#
#   scripts/fetch_wheels.sh wheels 3.12     # here, with network: DIR and the target's Python
#   # there:
#   python3 -m pip install --no-index --no-deps --target /tmp/site wheels/*.whl
#   PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_benchmark.py --out=gpu_bench
set -euo pipefail
dir=${1:?usage: scripts/fetch_wheels.sh DIR [PYTHON_VERSION]}
py=${2:-3.12}
packages=(ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
          diffusers==0.42.1 importlib_metadata==10.2.0)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
  --implementation cp "${platforms[@]}" -d "$dir" "${packages[@]}"
ls -l "$dir"
