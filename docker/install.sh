#!/usr/bin/env bash
# Install tokbench and its pinned dependencies into the Python environment of $PYTHON
# (default: the `python` on PATH; the Ray image's conda Python, or an activated venv).
# The Docker image runs exactly this script, and the deployment tests run it in a fresh
# virtual environment.
#
#   docker/install.sh [--deps-only] [PROJECT_DIR]     PROJECT_DIR: default, this repository
#
#   --deps-only      torch and the dependencies named in pyproject.toml, not tokbench itself:
#                    the image installs them in a layer of their own, so a code change does
#                    not reinstall them
#
# Environment:
#   TORCH_SPEC       the torch requirement (default torch==2.13.0, the version pinned in
#                    docker/constraints.txt)
#   TORCH_INDEX_URL  where torch comes from (default https://download.pytorch.org/whl/cpu;
#                    GPU nodes: https://download.pytorch.org/whl/cu128). torch is installed
#                    first and alone because a resolver left to pick it from PyPI takes the
#                    CUDA build and several GB of CUDA packages. Empty: pip's own configured
#                    index (for a machine with a local wheel of the right build).
#   PIP_NO_CACHE_DIR and the other PIP_* variables apply as usual.
set -euo pipefail

deps_only=false
if [[ ${1:-} == --deps-only ]]; then
  deps_only=true
  shift
fi
project=$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")/..}" && pwd -P)
[[ -f $project/pyproject.toml ]] || {
  echo "error: $project has no pyproject.toml; pass the tokbench checkout as PROJECT_DIR" >&2
  exit 1
}
python=${PYTHON:-python}
constraints=$project/docker/constraints.txt
torch_spec=${TORCH_SPEC:-torch==2.13.0}
torch_index=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}

pip_install=("$python" -m pip install --no-input --progress-bar off)
if [[ -n $torch_index ]]; then
  "${pip_install[@]}" --index-url "$torch_index" "$torch_spec"
else
  "${pip_install[@]}" "$torch_spec"
fi

if $deps_only; then
  # The [project] dependencies, read the way pip reads them, so this layer and the full
  # install below resolve the same set.
  mapfile -t deps < <("$python" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' "$project/pyproject.toml")
  "${pip_install[@]}" --constraint "$constraints" "${deps[@]}"
else
  "${pip_install[@]}" --constraint "$constraints" "$project"
  # Compile the tokenizer's CPU kernel into numba's cache beside the installed package, so
  # trials on a fresh node load machine code instead of compiling it first.
  (cd / && "$python" -c 'from tokbench.tokenizers.constructor import compile_kernels; compile_kernels()')
fi
