#!/usr/bin/env bash
# Wheels for a GPU machine that has CUDA torch but no package index (a lent device machine: Python 3.12, torch,
# numpy, pandas, pyarrow, tokenizers and safetensors already there): the packages specdistill needs beyond those, at
# the versions this machine's environment has (the ones the CPU suite passed with), plus specdistill itself.
#
#     bash benchmarks/gpu_wheels.sh [folder]        # default .whl (add /.whl/ to .git/info/exclude)
#
# There, before benchmarks/gpu_check.sh:
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#     OUT=<folder> PYTHON=python3 bash benchmarks/gpu_check.sh
# About 29 MB. Packages published as source only (antlr4-python3-runtime, DeepSpeed) are built here as pure-Python
# wheels (DeepSpeed builds its CUDA ops just in time where it runs).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
FOLDER=${1:-.whl}
PACKAGES=(hydra-core omegaconf datasets dill multiprocess hjson pydantic pydantic_core annotated-types
          typing-inspection typing_extensions transformers accelerate huggingface_hub httpx2 httpcore2 truststore click
          hf-xet kernels tomlkit regex fsspec typer)
SOURCE_ONLY=(antlr4-python3-runtime deepspeed)

pinned() {  # name==version as installed here
    for name in "$@"; do
        echo "$name==$("$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")"
    done
}

# the folder holds these wheels only: one holding anything else is refused, never emptied
if [[ -e "$FOLDER" && ! -d "$FOLDER" ]] ||
   { [[ -d "$FOLDER" ]] && find "$FOLDER" -mindepth 1 ! -name '*.whl' | grep -q .; }; then
    echo "error: $FOLDER is a file or holds files other than wheels; give an empty or new folder" >&2
    exit 2
fi
mkdir -p "$FOLDER"
rm -f "$FOLDER"/*.whl
owns_build=$([[ -e build ]] && echo no || echo yes)  # setuptools' in-tree build folder: removed after, if ours
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$FOLDER" $(pinned "${PACKAGES[@]}")
"$PYTHON" -m pip wheel -q --no-deps -w "$FOLDER" $(pinned "${SOURCE_ONLY[@]}")
"$PYTHON" -m pip wheel -q --no-deps -w "$FOLDER" .
[[ $owns_build == yes ]] && rm -rf build
ls "$FOLDER"
du -sh "$FOLDER"
