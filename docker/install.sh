#!/usr/bin/env bash
# The one install recipe shared by the Makefile (README), CI and the container image.
#
#   docker/install.sh PYTHON [EXTRAS]     e.g. docker/install.sh .venv/bin/python "[test]"
#
# DUALGLOW_TORCH_SPEC chooses the torch build installed first (default torch==2.13.0; set it
# to "" when the environment already has the torch it should keep, as the CUDA image does).
# The package itself does not pin torch.
set -euo pipefail
python=${1:-python3}
extras=${2:-}
mode=${DUALGLOW_INSTALL_MODE:-editable}
here=$(cd "$(dirname "$0")/.." && pwd)
torch_spec=${DUALGLOW_TORCH_SPEC-torch==2.13.0}
if [ -n "$torch_spec" ]; then
  "$python" -m pip install --quiet "$torch_spec"
fi
if [ "$mode" = editable ]; then
  "$python" -m pip install --quiet -e "${here}${extras}"
else
  "$python" -m pip install --quiet "${here}${extras}"
fi
"$python" -c "import dualglow_app, torch; print('dualglow', dualglow_app.__version__, 'torch', torch.__version__)"
