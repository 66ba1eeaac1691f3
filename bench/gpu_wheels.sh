#!/usr/bin/env bash
# Fetches, here, the wheels that a lent GPU machine (the device tool's nvidia-h200 image: Python 3.12, its own jax
# 0.11.x with the CUDA plugin, no network) lacks for this package, into .whl/ (ignored by git), for
# bench/gpu_checks.sh to install there. About 16 MB; run from the repository root:
#
#   bash bench/gpu_wheels.sh                       (.whl/ is in .gitignore)
#   device run: command="bash bench/gpu_checks.sh", carry=[".whl"], timeout_s=590
#
# The list: what `pip install --dry-run --report` resolves for requirements.txt on Python 3.12, minus jax and
# jaxlib (the image's, with its CUDA plugin: jaxlib's wheel alone is over the tool's 64 MiB limit), minus the
# CPU-only allocator and the cleaning job's packages (apache-beam and the text filters), minus what the image
# already has (the device tool's KINDS.md list, read 2026-12-04), plus optax and orbax-checkpoint at our pins, and
# flax 0.12.12 with treescope: jax 0.11 (the image's; it needs Python >= 3.12, so CI's Python 3.11 stays on our
# 0.10.2 pin) dropped `jax.experimental.hijax.HiPrimitive`, which our flax pin 0.12.8 imports, and flax 0.12.9+
# needs jax >= 0.11.1. That pair (jax 0.11.2 CPU + flax 0.12.12, Python 3.12) passed the suite here, the tests that
# need torch aside (README, the GPU run). Every other package pinned in requirements.txt is
# carried at its pin (tests/test_gpu_scripts.py checks).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  annotated-types==0.8.0 array-record==0.8.6 dm-tree==0.1.10 docstring-parser==0.18.0 fastapi==0.165.0
  flax==0.12.12 googleapis-common-protos==1.76.0 grain==0.2.18 httpcore2==2.16.2 httpx2==2.16.2
  immutabledict==4.3.1 importlib-resources==7.1.0 ml-collections==1.1.0 opentelemetry-api==1.45.2 optax==0.2.8
  orbax-checkpoint==0.12.8 portpicker==1.6.0 pydantic-core==2.50.5 pydantic==2.14.4 qwix==0.1.8
  simple-parsing==0.1.9 starlette==1.10.0 tensorboardx==2.6.5 tensorflow-datasets==4.9.10
  tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2 treescope==0.1.10 truststore==0.10.5
  typing-inspection==0.4.5 uvicorn==0.55.0
)
# Published as a source distribution only: built here into a pure-Python wheel.
SOURCE_ONLY=(promise==2.3)
# Afresh each time: a wheel left from an earlier list (two versions of one package) would stop the install there.
rm -rf .whl
mkdir -p .whl
for spec in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
for spec in "${SOURCE_ONLY[@]}"; do
  python3 -m pip wheel -q --no-deps -w .whl "$spec"
done
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
