#!/usr/bin/env bash
# The one install recipe shared by the Makefile (README), CI and the container image.
#
#   docker/install.sh PYTHON [EXTRAS]     e.g. docker/install.sh .venv/bin/python "[test]"
#
# DUALGLOW_TORCH_SPEC chooses the torch build installed first (default torch==2.13.0; set it
# to "" when the environment already has the torch it should keep, as the image build does).
# The package itself does not pin torch.
# DUALGLOW_INSTALL_MODE: editable (default), wheel (a normal install, as in the image), or
# deps (only the dependencies listed in pyproject.toml: the image caches them in their own
# layer, so editing the source does not download them again).
set -euo pipefail
python=${1:-python3}
extras=${2:-}
mode=${DUALGLOW_INSTALL_MODE:-editable}
here=$(cd "$(dirname "$0")/.." && pwd)
torch_spec=${DUALGLOW_TORCH_SPEC-torch==2.13.0}
if [ -n "$torch_spec" ]; then
  "$python" -m pip install --quiet "$torch_spec"
fi
case "$mode" in
  editable) "$python" -m pip install --quiet -e "${here}${extras}" ;;
  wheel) "$python" -m pip install --quiet "${here}${extras}" ;;
  deps)
    # [project] dependencies = [...] of pyproject.toml, read without tomllib (Python 3.10).
    "$python" - "$here/pyproject.toml" >"${TMPDIR:-/tmp}/dualglow-deps.txt" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.MULTILINE | re.DOTALL).group(1)
lines = [line.split("#", 1)[0] for line in block.splitlines()]
print("\n".join(re.findall(r'"([^"]+)"', "\n".join(lines))))
PY
    "$python" -m pip install --quiet -r "${TMPDIR:-/tmp}/dualglow-deps.txt"
    rm -f "${TMPDIR:-/tmp}/dualglow-deps.txt"
    exit 0 ;;
  *) echo "install.sh: DUALGLOW_INSTALL_MODE must be editable, wheel or deps, not '$mode'" >&2; exit 2 ;;
esac
"$python" -c "import dualglow_app, torch; print('dualglow', dualglow_app.__version__, 'torch', torch.__version__)"
