#!/bin/sh
# Install the camrt runtime (no torch) into the Python environment of $PYTHON (default python3).
# The Dockerfiles run this; tests/runtime/test_docker_recipe.py runs it in a fresh virtual env.
#
#   usage: install-runtime.sh cpu|gpu [SOURCE]      (SOURCE: camrt's source tree or wheel, default .)
#          install-runtime.sh check-cpu|check-gpu   (only the final check, of an installed env)
#
# gpu: onnxruntime-gpu in place of onnxruntime. Both distributions ship the same `onnxruntime`
# package; installed together, the second overwrites the first's files and uninstalling either
# breaks the other. So the CPU build that camrt's dependency pulled in is uninstalled first, then
# the GPU build installed ($ONNXRUNTIME_GPU: a requirement or wheel, default onnxruntime-gpu).
# `pip check` then reports "camrt requires onnxruntime, which is not installed": expected, the
# module is there. Last, a check that exactly one distribution owns the onnxruntime package, that
# torch is absent, and that the CLI starts.
set -eu
flavour=${1:-}
source_dir=${2:-.}
python=${PYTHON:-python3}
pip() { "$python" -m pip --disable-pip-version-check --no-input "$@"; }

case "$flavour" in
  cpu|gpu) pip install --no-cache-dir "$source_dir" ;;
  check-cpu|check-gpu) flavour=${flavour#check-} ;;
  *) echo "usage: install-runtime.sh cpu|gpu [SOURCE] | check-cpu|check-gpu" >&2; exit 2 ;;
esac
if [ "$1" = gpu ]; then
  pip uninstall --yes onnxruntime
  pip install --no-cache-dir "${ONNXRUNTIME_GPU:-onnxruntime-gpu}"
fi

"$python" - "$flavour" <<'PY'
import importlib.metadata as metadata
import importlib.util
import sys

flavour = sys.argv[1]
owners = sorted(
    dist.metadata["Name"] for dist in metadata.distributions()
    if any(str(f).replace("\\", "/") == "onnxruntime/__init__.py" for f in dist.files or ())
)
expected = ["onnxruntime-gpu"] if flavour == "gpu" else ["onnxruntime"]
if [name.lower().replace("_", "-") for name in owners] != expected:
    sys.exit(f"install-runtime.sh: the onnxruntime package belongs to {owners}; expected {expected} alone")
if importlib.util.find_spec("torch") is not None:
    sys.exit("install-runtime.sh: torch is installed; the runtime must not need it")
print(f"install-runtime.sh: camrt {metadata.version('camrt')} with {owners[0]} {metadata.version(owners[0])}")
PY
"$python" -m camrt --version
