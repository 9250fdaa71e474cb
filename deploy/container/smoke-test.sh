#!/usr/bin/env bash
# Smoke-test the `nimbleml serve` image on this machine: start the image's own entrypoint and
# arguments with `buildah run --isolation chroot` (podman run cannot set rlimits here), listening
# on loopback, with a tiny recommender trained by the project's commands on the host; check
# /healthz, /readyz, the image's HEALTHCHECK command and one Recommend; stop it with SIGTERM.
#
#   deploy/container/smoke-test.sh [IMAGE]     (default localhost/nimbleml-serve:0.1.0)
#
# Exits non-zero on any failure. The server is stopped and the working container removed
# whatever happens; the whole run is bounded (NIMBLEML_SMOKE_TIMEOUT_S, default 600 s).
set -euo pipefail
cd "$(dirname "$0")/../.."
image=${1:-localhost/nimbleml-serve:0.1.0}
python=${PYTHON:-.venv/bin/python}
limit_s=${NIMBLEML_SMOKE_TIMEOUT_S:-600}
work=build/container/smoke
key=smoke-test-key
mkdir -p "$work"
started=$SECONDS
say() { printf 'smoke: %s\n' "$*"; }
fail() { say "FAILED: $*"; exit 1; }

# A tiny trained recommender (1 epoch, 150 synthetic users), made once and re-used.
if [[ ! -f $work/model/model.safetensors ]]; then
    say "training a tiny recommender in $work/model"
    rm -rf "$work/data" "$work/model"
    "$python" -c "from pathlib import Path; from nimbleml.rec.synthetic import write_synthetic_taobao; \
write_synthetic_taobao(Path('$work/log.csv'), n_users=150, n_items=300, events_per_user=(8, 30))"
    NIMBLEML_PROGRESS=0 "$python" -m nimbleml.cli rec prepare --data "$work/log.csv" --format taobao --out "$work/data" >/dev/null
    NIMBLEML_PROGRESS=0 "$python" -m nimbleml.cli rec train --data "$work/data" --preset small --epochs 1 --threads 1 \
        --out "$work/model" >"$work/train.log" 2>&1 || { tail -20 "$work/train.log"; fail "training the tiny model"; }
fi

read -r http_port grpc_port < <("$python" -c "
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(('127.0.0.1', 0))
print(*(s.getsockname()[1] for s in socks))")
url=http://127.0.0.1:$http_port

container="" run_pid="" server_pid=""
descendants() {  # the pids under $1, deepest last
    local child
    for child in $(ps -o pid= --ppid "$1"); do echo "$child"; descendants "$child"; done
}
cleanup() {  # SIGTERM the server if it got that far, then SIGKILL whatever is left under `buildah run`
    local status=$? pids
    if [[ -n $run_pid ]] && kill -0 "$run_pid" 2>/dev/null; then
        pids=$(descendants "$run_pid")
        if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
            kill -TERM "$server_pid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        fi
        kill -KILL $pids "$run_pid" 2>/dev/null || true
        wait "$run_pid" 2>/dev/null || true
    fi
    [[ -n $container ]] && buildah rm "$container" >/dev/null 2>&1 || true
    exit "$status"
}
trap cleanup EXIT INT TERM

container=$(buildah from --pull-never "$image")
buildah copy --quiet --chown 10001:10001 "$container" "$work/model" /models >/dev/null
buildah config --env "NIMBLEML_API_KEYS=$key=premium:admin" "$container"
buildah inspect --type container "$container" >"$work/container.json"
config() {  # a list from the image's Docker config, one element a line: config 'Entrypoint + Cmd'
    "$python" -c "import json, sys; c = json.load(open(sys.argv[1]))['Docker']['config']
print(*eval(sys.argv[2], {}, c), sep='\n')" "$work/container.json" "$1"
}
mapfile -t command < <(config 'Entrypoint + Cmd')
[[ ${command[0]:-} == nimbleml ]] || fail "no nimbleml entrypoint in the image: ${command[*]}"
# argparse keeps the last value of a repeated option: loopback and free ports instead of 0.0.0.0:8000/9000.
command+=(--host 127.0.0.1 --port "$http_port" --grpc-port "$grpc_port" --workers 1 --ready-file /home/nimbleml/ready.json)
say "image $image: ${command[*]}"
timeout --kill-after=10 "$limit_s" buildah run --isolation chroot "$container" -- "${command[@]}" >"$work/server.log" 2>&1 &
run_pid=$!

say "waiting for $url/healthz"
until curl -fsS --max-time 2 "$url/healthz" >/dev/null 2>&1; do
    kill -0 "$run_pid" 2>/dev/null || { tail -30 "$work/server.log"; fail "the server exited before answering"; }
    ((SECONDS - started < limit_s - 60)) || { tail -30 "$work/server.log"; fail "no answer on /healthz in time"; }
    sleep 1
done
say "healthz: $(curl -fsS --max-time 5 "$url/healthz") after $((SECONDS - started)) s"

# The server's pid, from its ready file (chroot isolation shares the host's pid namespace);
# checked to be this server before it is ever signalled.
root=$(buildah mount "$container")
for _ in $(seq 50); do [[ -f $root/home/nimbleml/ready.json ]] && break; sleep 0.2; done
server_pid=$("$python" -c "import json, sys; print(json.load(open(sys.argv[1]))['pid'])" "$root/home/nimbleml/ready.json")
buildah umount "$container" >/dev/null
tr '\0' ' ' <"/proc/$server_pid/cmdline" | grep -q -- "--port $http_port" || fail "pid $server_pid is not this server"

ready=""
for _ in $(seq 60); do
    ready=$(curl -sS --max-time 5 "$url/readyz" || true)
    [[ $ready == *true* ]] && break
    sleep 1
done
[[ $ready == *true* ]] || fail "readyz: $ready"
say "readyz: $ready"

mapfile -t health < <(config 'Healthcheck["Test"]')
[[ ${health[0]:-} == CMD ]] || fail "no exec-form HEALTHCHECK in the image: ${health[*]}"
health=("${health[@]:1}")
buildah config --env "NIMBLEML_HEALTH_URL=$url/healthz" "$container"
timeout 60 buildah run --isolation chroot "$container" -- "${health[@]}" || fail "the image's HEALTHCHECK command failed"
say "HEALTHCHECK command: ok"

body="{\"history\": [5, 6, 7, 8], \"candidates\": [$(seq -s ', ' 1 50)]}"  # the contract's 50 candidates
answer=$(curl -fsS --max-time 30 -H "x-api-key: $key" -H 'content-type: application/json' -d "$body" "$url/v1/recommend") \
    || fail "recommend: $(curl -sS --max-time 30 -H "x-api-key: $key" -H 'content-type: application/json' -d "$body" "$url/v1/recommend")"
"$python" -c "
import json, sys
answer = json.loads(sys.argv[1])
items = answer['items']
assert sorted(i['item'] for i in items) == list(range(1, 51)), answer
print('smoke: recommend: %d candidates ranked by %s (%s path), top %s'
      % (len(items), answer['model_version'], answer['path'], items[0]))" "$answer"
code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 30 -H 'content-type: application/json' -d "$body" "$url/v1/recommend")
[[ $code == 401 ]] || fail "recommend without a key answered $code, not 401"
say "recommend without a key: 401"
"$python" -c "
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel('127.0.0.1:$grpc_port') as channel:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
assert answer.status == health_pb2.HealthCheckResponse.SERVING, answer
print('smoke: gRPC health on port $grpc_port: SERVING')"
memory() {  # proportional set size (shared pages split between the processes), MiB
    local pid total=0
    for pid in "$@"; do total=$((total + $(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup"))); done
    echo "$((total / 1024)) MiB"
}
workers=$(descendants "$server_pid" | tr '\n' ' ')
say "memory: front end $(memory "$server_pid"), workers [$workers] $(memory $workers) (PSS)"

kill -TERM "$server_pid"
for _ in $(seq 300); do kill -0 "$run_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$run_pid" 2>/dev/null && fail "the server did not stop within 30 s of SIGTERM"
wait "$run_pid" && status=0 || status=$?
server_pid="" run_pid=""
((status == 0)) || { tail -30 "$work/server.log"; fail "the server exited with status $status"; }
say "stopped cleanly on SIGTERM; log: $work/server.log"
say "passed in $((SECONDS - started)) s"
