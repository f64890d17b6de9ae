#!/usr/bin/env bash
# The prepared GPU check (issue 19; docs/PERFORMANCE.md, "GPU check"): on an H100/H200 machine
# with a CUDA build of torch installed and no package registry, in at most 8 minutes with its
# set-up, it runs
#   setup   a venv over the machine's torch (--system-site-packages), the wheels that
#           benchmarks/fetch_gpu_wheels.sh fetched beforehand (--no-index), the package (-e)
#   tests   the tests marked gpu (pytest -m gpu)
#   memory  benchmarks/bench_memory.py --device cuda (depths 8 and 16, plain and saving)
#   freia   benchmarks/bench_vs_freia.py --device cuda (ours vs FrEIA's AllInOneBlock)
#   train   bf16 training steps of the model issue's configuration (cpu4mm, levels 3, depth 4,
#           hidden 32, top prior mri+side, side template): throughput, peak memory, bpd
#   paper   the paper-size network (4 levels x 16 steps x 512 channels, 2 mm) with memory
#           saving, a few steps
#   capacity  (with --capacity NPZ, first) the model issue's capacity runs: the shipped model's
#           recipe and larger variants trained side by side on the GPU on a packed MNI stack
#           (benchmarks/bench_capacity.py pack), each under --capacity-seconds of training;
#           histories, logs and the best models that fit come back under $OUT/capacity
# each stage under its own timeout, so one failure or hang leaves time for the others.
# Every figure is JSON under $OUT when it is set, else benchmarks/results/gpu/; summary.json
# lists each stage's exit status and seconds (124: its timeout ran out).
#
#   benchmarks/gpu_check.sh                      # on the GPU machine, .gpu_wheels/ carried along
#   benchmarks/gpu_check.sh --cpu-dry-run        # the same stages on the CPU at tiny sizes (CI)
#   benchmarks/gpu_check.sh --capacity .gpu_carry/stack240.npz --capacity-seconds 250
#
# Options: --wheels DIR (default .gpu_wheels), --python PY (default python3; the dry run uses
# it as it is, without a venv), --budget SECONDS (default 470: all stages together),
# --capacity NPZ, --capacity-seconds S (default 250), --capacity-variants "LABEL[:NAME=VALUE,...] ..."
# (default: the recipe in bf16 and in float32, relation networks of 8 layers, 64 coupling
# channels, the group level's default size of 8 steps x 128 channels).
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0
wheels=.gpu_wheels
python=${PYTHON:-python3}
budget=470
capacity=""
capacity_seconds=250
capacity_variants="recipe recipe-fp32:amp=false rel8:relation_layers=8 wide:hidden=64 big:depth=8,hidden=128"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) dry_run=1; shift ;;
    --wheels) wheels=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --capacity) capacity=$2; shift 2 ;;
    --capacity-seconds) capacity_seconds=$2; shift 2 ;;
    --capacity-variants) capacity_variants=$2; shift 2 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$out/gpu_check.log
stages=$out/.stages.tsv
: >"$log"
: >"$stages"
export PYTHONUNBUFFERED=1 DUALGLOW_NO_PROGRESS=1
if [ "$dry_run" = 1 ]; then
  # Tiny sizes on a shared CPU: one thread (two contend on 2 cores and run 10-100x slower).
  export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
  device=cpu
else
  device=cuda
fi

# stage NAME TIMEOUT_S COMMAND...: run it with what is left of the budget, log, record.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, the budget of ${budget} s is spent" | tee -a "$log"
    printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 0 >>"$stages"
    return 0
  fi
  echo "== $name (timeout ${limit} s): $*" | tee -a "$log"
  local start=$SECONDS rc
  if declare -F "$1" >/dev/null; then
    # timeout runs programs, not shell functions: hand it a bash holding the function (the
    # variables it reads are exported below).
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); \"\$@\"" _ "$@" >>"$log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  fi
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$stages"
  return "$rc"
}

setup() {
  local venv=${TMPDIR:-/tmp}/dualglow-gpu-venv
  [ -f "$wheels/requirements.txt" ] || {
    echo "no $wheels/requirements.txt: run benchmarks/fetch_gpu_wheels.sh where PyPI is reachable, and carry $wheels"
    return 3
  }
  "$python" -m venv --system-site-packages "$venv" || return 4
  # When $python is itself a venv's (the H200 image's python3 is /opt/torch/.venv/bin/python3),
  # --system-site-packages reaches the base interpreter, not that venv where torch lives: a
  # .pth file adds $python's own site-packages (and their .pth files) after the venv's own.
  "$python" -c "import site; print('\n'.join(f'import site; site.addsitedir({d!r})' for d in site.getsitepackages()))" \
    >"$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_gpu_check_parent.pth" || return 4
  "$venv/bin/python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" || return 5
  "$venv/bin/python" -m pip install --quiet --no-index --find-links "$wheels" -r "$wheels/requirements.txt" || {
    echo "a requirement is neither on this machine nor in $wheels (left out: $(cat "$wheels/LEFT_OUT.txt" 2>/dev/null))"
    return 6
  }
  "$venv/bin/python" -m pip install --quiet --no-index --find-links "$wheels" --no-deps -e . || return 7
  "$venv/bin/python" -c "import dualglow_app, torch; print('dualglow', dualglow_app.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
}

export python wheels device out capacity capacity_seconds capacity_variants
if [ "$dry_run" = 0 ]; then
  if stage setup 150 setup; then
    python=${TMPDIR:-/tmp}/dualglow-gpu-venv/bin/python
  else
    echo "set-up failed: the stages run with $python as it is" | tee -a "$log"
  fi
fi

# The capacity runs, side by side on one device; each resumes its checkpoint if run again.
capacity_runs() {
  local stack=${TMPDIR:-/tmp}/dualglow-capacity-stack work=${TMPDIR:-/tmp}/dualglow-capacity-work
  local pids=() variant label sets rc=0
  "$python" benchmarks/bench_capacity.py unpack "$capacity" "$stack" || return 8
  mkdir -p "$work"
  for variant in $capacity_variants; do
    label=${variant%%:*}
    sets=()
    if [ "$variant" != "$label" ]; then
      IFS=, read -ra pairs <<<"${variant#*:}"
      for pair in "${pairs[@]}"; do sets+=(--set "$pair"); done
    fi
    # Three CPU threads each (the template fit, the tissue model, the batches): 16 cores, 5 runs.
    OMP_NUM_THREADS=3 "$python" benchmarks/bench_capacity.py train "$stack" --label "$label" "${sets[@]}" \
      --device "$device" --threads 3 --time-limit "$capacity_seconds" --work "$work" >"$work/$label.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=9; done
  "$python" benchmarks/bench_capacity.py collect "$work" "$out/capacity" --max-mib "${CAPACITY_MAX_MIB:-50}" || rc=10
  return $rc
}
if [ -n "$capacity" ]; then
  stage capacity $((capacity_seconds + 150)) capacity_runs
fi

gpu_tests=$(grep -l "pytest.mark.gpu" tests/*.py tests/*/*.py 2>/dev/null | tr '\n' ' ')
bench=(--device "$device" --threads 1 --results-dir "$out")
train=(-m dualglow_app.gpu_check --device "$device" --top-prior mri+side --side-template --lr 1e-3)
if [ "$dry_run" = 1 ]; then
  # Without CUDA the gpu-marked tests skip themselves: the stage checks they still collect.
  stage tests 120 "$python" -m pytest -q -p no:cacheprovider -m gpu $gpu_tests
  stage memory 90 "$python" benchmarks/bench_memory.py "${bench[@]}" --depths 1 2 --grid 8 8 8 --levels 2 --hidden 8
  stage freia 60 "$python" benchmarks/bench_vs_freia.py "${bench[@]}" --grid 8 8 8 --levels 2 --depth 2 --hidden 8 --repeats 2
  stage train 60 "$python" "${train[@]}" --grid tiny8mm --levels 2 --depth 2 --hidden 8 --steps 3 --json "$out/train_bf16.json"
  stage paper 60 "$python" "${train[@]}" --grid tiny8mm --levels 2 --depth 2 --hidden 16 --batch-size 1 \
    --memory-saving on --steps 2 --json "$out/paper_size.json"
else
  stage tests 120 "$python" -m pytest -q -p no:cacheprovider -m gpu $gpu_tests
  stage memory 90 "$python" benchmarks/bench_memory.py "${bench[@]}" --depths 8 16
  stage freia 60 "$python" benchmarks/bench_vs_freia.py "${bench[@]}" --repeats 9
  stage train 60 "$python" "${train[@]}" --grid cpu4mm --levels 3 --depth 4 --hidden 32 --steps 50 \
    --json "$out/train_bf16.json"
  # lr 1e-4 (the later --lr wins): the group level warms up over 100 steps, the check does not, and
  # at lr 1e-3 a 16-step flow's first steps diverged (the H200, 2026-11-30; also on a CPU at
  # cpu4mm, with or without bf16 and memory saving), which is no measure of speed or memory.
  stage paper 120 "$python" "${train[@]}" --grid paper2mm --levels 4 --depth 16 --hidden 512 --batch-size 1 \
    --memory-saving on --steps 3 --lr 1e-4 --json "$out/paper_size.json"
fi

"$python" - "$stages" "$out/summary.json" "$dry_run" "$budget" <<'PY'
import json, platform, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
stages = [{"stage": n, "exit": (None if rc == "skipped" else int(rc)), "seconds": int(s), "timeout_s": int(t),
           "timed_out": rc in ("124", "137")} for n, rc, s, t in rows]
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
except Exception as err:  # the summary must be written even when torch is broken
    gpu, versions = None, {"torch": f"not importable: {err}"}
summary = {"dry_run": sys.argv[3] == "1", "budget_s": int(sys.argv[4]), "gpu": gpu, **versions,
           "python": platform.python_version(), "stages": stages,
           "passed": all(s["exit"] == 0 for s in stages)}
open(sys.argv[2], "w").write(json.dumps(summary, indent=2) + "\n")
print(f"gpu_check: {'all stages passed' if summary['passed'] else 'FAILED: ' + ', '.join(s['stage'] for s in stages if s['exit'] != 0)}"
      f" ({sum(s['seconds'] for s in stages)} s); figures in {sys.argv[2].rsplit('/', 1)[0]}")
sys.exit(0 if summary["passed"] else 1)
PY
status=$?
rm -f "$stages"
exit "$status"
