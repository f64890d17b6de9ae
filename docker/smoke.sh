#!/usr/bin/env bash
# Build the image and run it as a user would on a locked-down cluster: no network, a read-only
# root file system with a tmpfs /tmp, an arbitrary UID. `make container-test` runs this.
#
#   docker/smoke.sh [IMAGE]                     (default IMAGE: dualglow:smoke)
#
# Steps, each timed: the build context holds no .git/.venv/scratch; build; --version; --help;
# a 2-subject phantom (dualglow-phantom, in the image); the participant level with the shipped
# model and the DEFAULT work dir, its outputs checked by bids-validator-deno; a tiny group
# level, whose model the participant level then uses; bad inputs (a missing BIDS_DIR, a
# read-only OUTPUT_DIR) that must exit 2 with one error line and no traceback.
#
# Settings (environment):
#   DOCKER          docker client (default: `docker`, or one on PATH that can build with BuildKit)
#   SMOKE_BASE      base image; default debian:bookworm-slim if present or pullable, else one made
#                   here by docker/make-base.sh (debootstrap; needs root), reused afterwards
#   SMOKE_TORCH     TORCH_SPEC for the build (default torch==2.13.0+cpu: this tests the
#                   container, not CUDA; SMOKE_TORCH=torch==2.13.0 builds the default CUDA image)
#   SMOKE_WHEELS    a folder of wheels served to the build as PIP_FIND_LINKS (default: a folder
#                   of the host's PIP_FIND_LINKS that holds the wanted torch wheel, if any; else
#                   the CPU wheels come from download.pytorch.org/whl/cpu), on 127.0.0.1:
#                   SMOKE_WHEELS_PORT (default 38517)
#   SMOKE_CA        CA bundle passed as the build secret "ca" (default: $PIP_CERT, $SSL_CERT_FILE
#                   or $REQUESTS_CA_BUNDLE when one is a file)
#   SMOKE_NETWORK   network of the build's RUN steps (default: host)
#   SMOKE_SKIP_BUILD=1  test IMAGE as it is
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-dualglow:smoke}
torch_spec=${SMOKE_TORCH-torch==2.13.0+cpu}
declare -a timings=()

say() { printf '\n== %s\n' "$*" >&2; }
fail() { printf 'smoke.sh: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
record() { timings+=("$(awk -v label="$1" -v t0="$2" -v t1="$(now)" 'BEGIN { printf "%-44s %7.1f s", label, t1 - t0 }')"); }
gigabytes() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1e9 }'; }

# ---- a docker client that builds with BuildKit (the Dockerfile uses RUN --mount) ----------
buildkit_ok() { # $1: client. A one-line build of a --mount step, from the base.
  local empty rc=0
  empty=$(mktemp -d)
  printf 'FROM %s\nRUN --mount=type=secret,id=none true\n' "$base" \
    | DOCKER_BUILDKIT=1 "$1" build -q -f - --network none -t dualglow-smoke-probe:buildkit "$empty" >/dev/null 2>&1 || rc=$?
  rmdir "$empty"
  return "$rc"
}
pick_client() {
  local candidates=("$DOCKER")
  [ -n "$user_docker" ] || candidates+=($(type -ap docker | tail -n +2))
  for client in "${candidates[@]}"; do
    if buildkit_ok "$client"; then DOCKER=$client; return; fi
  done
  fail "no docker client here builds with BuildKit (${candidates[*]}); install the buildx plugin or Docker >= 23"
}

user_docker=${DOCKER:-}
DOCKER=${DOCKER:-docker}
"$DOCKER" info >/dev/null 2>&1 || fail "no Docker daemon answers ($DOCKER info); start dockerd"

# ---- the base image --------------------------------------------------------------------------
base=${SMOKE_BASE:-}
if [ -z "$base" ]; then
  if "$DOCKER" image inspect debian:bookworm-slim >/dev/null 2>&1 \
     || timeout 120 "$DOCKER" pull -q debian:bookworm-slim >/dev/null 2>&1; then
    base=debian:bookworm-slim
  else
    base=dualglow-local/debian:bookworm-slim
    if ! "$DOCKER" image inspect "$base" >/dev/null 2>&1; then
      say "no registry: making $base with debootstrap (docker/make-base.sh)"
      t=$(now); bash docker/make-base.sh "$base" >/dev/null; record "base image (debootstrap)" "$t"
    fi
  fi
fi
pick_client
echo "client: $DOCKER ($("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null)); base: $base" >&2

# ---- the build context is the allowlist of .dockerignore ------------------------------------
say "build context"
t=$(now)
context=$(printf 'FROM %s\nCOPY . /context\nRUN find /context -mindepth 1 -maxdepth 2 | sort\n' "$base" \
  | DOCKER_BUILDKIT=1 "$DOCKER" build --no-cache --progress=plain -f - -t dualglow-smoke-probe:context . 2>&1 \
  | sed -n 's|^#[0-9]* [0-9.]* /context/||p')
for forbidden in .git .venv tests benchmarks Makefile demo work; do
  if grep -qx -- "$forbidden" <<<"$context"; then fail "the build context holds $forbidden (.dockerignore)"; fi
done
grep -qx dualglow_app <<<"$context" || fail "the build context lacks dualglow_app: $context"
echo "context: $(tr '\n' ' ' <<<"$context" | cut -c1-300)" >&2
"$DOCKER" image rm -f dualglow-smoke-probe:context dualglow-smoke-probe:buildkit >/dev/null 2>&1 || true
record "build context check" "$t"

# ---- build ---------------------------------------------------------------------------------
if [ "${SMOKE_SKIP_BUILD:-0}" = 1 ]; then
  say "using $image as it is (SMOKE_SKIP_BUILD=1)"
else
  build_args=(--build-arg "BASE_IMAGE=$base" --build-arg "TORCH_SPEC=$torch_spec" --network "${SMOKE_NETWORK:-host}")
  ca=${SMOKE_CA:-}
  for candidate in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}"; do
    [ -n "$ca" ] || { [ -n "$candidate" ] && [ -f "$candidate" ] && ca=$candidate; } || true
  done
  [ -z "$ca" ] || build_args+=(--secret "id=ca,src=$ca")
  wheels=${SMOKE_WHEELS:-}
  if [ -z "$wheels" ] && [[ $torch_spec == torch==* ]]; then
    wanted="torch-${torch_spec#torch==}-"
    for folder in ${PIP_FIND_LINKS:-}; do
      if compgen -G "$folder/$wanted*.whl" >/dev/null; then wheels=$folder; break; fi
    done
  fi
  server_pid=
  if [ -n "$wheels" ]; then
    # A fixed port by default: PIP_FIND_LINKS is part of the build cache key.
    port=${SMOKE_WHEELS_PORT:-38517}
    if python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" 2>/dev/null; then
      port=$(( 20000 + RANDOM % 20000 ))
    fi
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$wheels" >/dev/null 2>&1 &
    server_pid=$!
    trap '[ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true' EXIT
    for _ in $(seq 50); do
      python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" 2>/dev/null && break
      sleep 0.2
    done
    build_args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
    [ "${SMOKE_NETWORK:-host}" = host ] || fail "SMOKE_WHEELS needs SMOKE_NETWORK=host (the wheels are served on 127.0.0.1)"
  elif [[ $torch_spec == *+cpu* ]]; then
    build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu")
  fi
  say "build $image (TORCH_SPEC=$torch_spec${wheels:+, wheels from $wheels}${ca:+, CA bundle $ca})"
  t=$(now)
  DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain "${build_args[@]}" -t "$image" . >"${TMPDIR:-/tmp}/dualglow-smoke-build.log" 2>&1 \
    || { tail -40 "${TMPDIR:-/tmp}/dualglow-smoke-build.log" >&2; fail "docker build (log: ${TMPDIR:-/tmp}/dualglow-smoke-build.log)"; }
  record "build ($torch_spec)" "$t"
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; server_pid=; fi
fi
size=$("$DOCKER" image inspect "$image" --format '{{.Size}}')
echo "image $image: $(gigabytes "$size") GB" >&2

# ---- runs: offline, read-only, an arbitrary UID ----------------------------------------------
uid=$(( 20000 + RANDOM % 40000 ))
run=("$DOCKER" run --rm --network none --read-only --tmpfs /tmp -u "$uid:$uid")
scratch=$(mktemp -d "${TMPDIR:-/tmp}/dualglow-smoke.XXXXXX")
mkdir -m 0777 "$scratch"/{bids,out,group,trained,work,readonly}
cleanup() {
  [ -z "${server_pid:-}" ] || kill "$server_pid" 2>/dev/null || true
  # Files the container wrote belong to $uid: remove them as $uid when we may not.
  rm -rf "$scratch" 2>/dev/null \
    || { "$DOCKER" run --rm -u "$uid:$uid" -v "$scratch:/s" --entrypoint /bin/rm "$image" -rf /s/bids /s/out /s/group /s/trained /s/work \
         && rm -rf "$scratch"; } || true
}
trap cleanup EXIT
echo "runs as UID $uid, --network none --read-only --tmpfs /tmp; scratch $scratch" >&2

say "--version"
t=$(now); out=$("${run[@]}" "$image" --version) || fail "--version: $out"
grep -q "dualglow" <<<"$out" || fail "--version printed: $out"; echo "$out" >&2
record "dualglow --version" "$t"

say "--help"
t=$(now); out=$("${run[@]}" "$image" --help) || fail "--help"
grep -q "{participant|group}" <<<"$out" || fail "--help lacks the levels: $out"
record "dualglow --help" "$t"

say "dualglow-check-gpu (the runs get no --gpus: exit 1 with the reason; then the bf16 step on the CPU)"
t=$(now); rc=0; out=$("${run[@]}" --entrypoint dualglow-check-gpu "$image" 2>&1) || rc=$?
echo "$out" >&2
{ [ "$rc" = 1 ] && grep -q "^Error: no GPU" <<<"$out"; } || fail "dualglow-check-gpu without a GPU: exit $rc, expected 1 and 'Error: no GPU'"
out=$("${run[@]}" --entrypoint dualglow-check-gpu "$image" --device cpu --grid tiny8mm --depth 2 --hidden 16 --steps 2) \
  || fail "dualglow-check-gpu --device cpu"
echo "$out" | tail -n 1 >&2
record "dualglow-check-gpu (+ --device cpu)" "$t"

say "phantom: 2 subjects"
t=$(now)
"${run[@]}" -v "$scratch/bids:/data" --entrypoint dualglow-phantom "$image" /data/ds --subjects 2 --seed 7 --overwrite \
  || fail "dualglow-phantom"
record "dualglow-phantom, 2 subjects" "$t"

say "participant level, shipped model, default work dir"
t=$(now)
"${run[@]}" -v "$scratch/bids/ds:/data:ro" -v "$scratch/out:/out" "$image" /data /out participant --nprocs 2 \
  || fail "participant level"
record "participant, 2 subjects (default model)" "$t"
n=$(find "$scratch/out" -path '*/pet/*desc-synthetic_pet.nii.gz' | wc -l)
[ "$n" -ge 2 ] || fail "expected a synthetic PET per subject, found $n"

say "bids-validator-deno on the outputs (in the image, offline)"
t=$(now)
"${run[@]}" -v "$scratch/out:/out:ro" --entrypoint bids-validator-deno "$image" /out >"$scratch/validator.txt" 2>&1 \
  || { cat "$scratch/validator.txt" >&2; fail "the participant outputs do not pass bids-validator-deno"; }
tail -3 "$scratch/validator.txt" >&2
record "bids-validator-deno on the outputs" "$t"

say "group level: a tiny model"
t=$(now)
"${run[@]}" -v "$scratch/bids/ds:/data:ro" -v "$scratch/group:/out" -v "$scratch/work:/work" "$image" /data /out group -w /work \
  --grid tiny8mm --epochs 2 --depth 1 --hidden 8 --relation-hidden 8 --batch-size 2 --val-fraction 0 \
  --side-info age --model-name smoke --nprocs 2 --skip-bids-validation \
  || fail "group level"
record "group level, tiny8mm, 2 epochs" "$t"
[ -f "$scratch/group/models/smoke.safetensors" ] || fail "the group level wrote no models/smoke.safetensors"

say "participant level with the group level's model (the group level's preprocessing cache, -w /work)"
t=$(now)
"${run[@]}" -v "$scratch/bids/ds:/data:ro" -v "$scratch/group/models:/models:ro" -v "$scratch/trained:/out" \
  -v "$scratch/work:/work" "$image" /data /out participant -w /work --weights /models/smoke.safetensors --skip-bids-validation --nprocs 2 \
  || fail "participant level with the trained model"
record "participant, 2 subjects (trained model)" "$t"
sha=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$scratch/group/models/smoke.json")
sidecar=$(find "$scratch/trained" -path '*/pet/*desc-synthetic_pet.json' | head -n 1)
grep -q "$sha" "$sidecar" || fail "$sidecar does not name the trained model (sha256 $sha)"

bad_input() { # $1: label; rest: docker run arguments. Must exit 2, one error line, no traceback.
  local label=$1 rc=0 out; shift
  out=$("${run[@]}" "$@" 2>&1) || rc=$?
  [ "$rc" = 2 ] || { echo "$out" >&2; fail "$label: exit $rc, expected 2"; }
  if grep -q Traceback <<<"$out"; then echo "$out" >&2; fail "$label: a traceback"; fi
  [ "$(grep -c '^Error: ' <<<"$out")" = 1 ] || { echo "$out" >&2; fail "$label: expected one 'Error: ' line"; }
  echo "$label -> exit 2: $(grep '^Error: ' <<<"$out")" >&2
}
say "bad inputs"
t=$(now)
bad_input "BIDS_DIR not mounted" "$image" /data /out participant
bad_input "OUTPUT_DIR read-only" -v "$scratch/bids/ds:/data:ro" -v "$scratch/readonly:/out:ro" "$image" /data /out participant
record "bad inputs (2 runs)" "$t"

printf '\nsmoke test passed: %s, %s GB, UID %s, --network none --read-only --tmpfs /tmp\n' \
  "$image" "$(gigabytes "$size")" "$uid"
printf '  %s\n' "${timings[@]}"
