#!/usr/bin/env bash
# Build the slim CPU serving image and run it as Kubernetes would (non-root, read-only root
# filesystem, no capabilities, the API key as a file, the demo bundles on a read-only
# volume): it must get healthy, answer one classification, refuse a request without the
# key, and on SIGTERM finish the request in flight and exit 0. Prints the image size and
# fails over 1.5 GB.
#
#   make image-test                       # docker, else podman
#   CONTAINER=podman make image-test
#   CONTAINER_FLAGS="--runtime runc --cgroup-manager cgroupfs --storage-driver vfs" \
#     RUN_FLAGS="--ulimit nofile=4096:4096 --network host" CONTAINER=podman make image-test
#
# Where no container engine runs, it says so and exits 0 (skipped).
set -euo pipefail
cd "$(dirname "$0")/../.."

CONTAINER=${CONTAINER:-docker}
read -r -a GLOBAL <<< "${CONTAINER_FLAGS:-}"
read -r -a BUILD_ARGS <<< "${IMAGE_BUILD_ARGS:-}"
read -r -a RUN_ARGS <<< "${RUN_FLAGS:-}"
IMAGE=${IMAGE:-supportlens:cpu}
INTENT=${INTENT_BUNDLE:-runs/demo-intent/bundle}
SUMMARIZER=${SUMMARIZER_BUNDLE:-runs/demo-summarizer/bundle}
LIMIT_BYTES=$((1500 * 1000 * 1000))
c() { "$CONTAINER" "${GLOBAL[@]}" "$@"; }

if ! command -v "$CONTAINER" >/dev/null 2>&1 || ! c info >/dev/null 2>&1; then
    echo "image-test skipped: no running container engine ($CONTAINER is missing or its daemon is not running)"
    exit 0
fi

if [[ ! -d "$INTENT" || ! -d "$SUMMARIZER" ]]; then
    echo "== demo models missing: make demo-models"
    make demo-models
fi

format=()
[[ "$(basename "$CONTAINER")" == podman* ]] && format=(--format docker)  # keeps HEALTHCHECK
echo "== build $IMAGE"
c build "${format[@]}" "${BUILD_ARGS[@]}" -f deploy/docker/cpu.Dockerfile -t "$IMAGE" .
size=$(c image inspect --format '{{.Size}}' "$IMAGE")
echo "image size: $((size / 1000000)) MB"

work=$(mktemp -d)
name="supportlens-image-test-$$"
cleanup() { c rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
key="image-test-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
# Copies the container user (10001) can read, as fsGroup arranges on a cluster volume.
mkdir -p "$work/secret" "$work/models"
cp -r "$INTENT" "$work/models/intent"
cp -r "$SUMMARIZER" "$work/models/summarizer"
chmod -R a+rX "$work/models"
printf '%s' "$key" > "$work/secret/api-key"
chmod 0444 "$work/secret/api-key"
port=${PORT:-18080}

network=(-p "127.0.0.1:$port:$port")
for arg in "${RUN_ARGS[@]}"; do [[ "$arg" == --network* ]] && network=(); done
echo "== run"
c run -d --name "$name" "${RUN_ARGS[@]}" "${network[@]}" \
    --user 10001:10001 --read-only --tmpfs /tmp:rw,size=256m --cap-drop ALL \
    --security-opt no-new-privileges \
    -e SUPPORTLENS_PORT="$port" -e SUPPORTLENS_WORKERS=1 -e SUPPORTLENS_DRAIN_TIMEOUT=25 \
    -e SUPPORTLENS_API_KEY_FILE=/var/run/secrets/supportlens/api-key \
    -v "$work/models/intent:/models/intent/current/bundle:ro" \
    -v "$work/models/summarizer:/models/summarizer/current/bundle:ro" \
    -v "$work/secret:/var/run/secrets/supportlens:ro" \
    "$IMAGE" >/dev/null

url="http://127.0.0.1:$port"
for _ in $(seq 1 120); do
    curl -fsS "$url/health" >/dev/null 2>&1 && break
    if [[ "$(c inspect --format '{{.State.Running}}' "$name")" != "true" ]]; then
        c logs "$name" | tail -40; echo "FAIL: the container exited"; exit 1
    fi
    sleep 2
done
curl -fsS "$url/health" >/dev/null || { c logs "$name" | tail -40; echo "FAIL: not ready"; exit 1; }
echo "ready"
if [[ "$(basename "$CONTAINER")" == podman* ]]; then
    c healthcheck run "$name" && echo "HEALTHCHECK: healthy"
else
    for _ in $(seq 1 30); do
        [[ "$(c inspect --format '{{.State.Health.Status}}' "$name")" == healthy ]] && break
        sleep 2
    done
    [[ "$(c inspect --format '{{.State.Health.Status}}' "$name")" == healthy ]] && echo "HEALTHCHECK: healthy"
fi

body='{"texts": ["I was charged twice for my order"], "top_k": 3}'
status=$(curl -s -o /dev/null -w '%{http_code}' "$url/v1/classify" -H 'Content-Type: application/json' -d "$body")
[[ "$status" == 401 ]] || { echo "FAIL: a request without the key got $status, not 401"; exit 1; }
echo "no key: 401"
answer=$(curl -fsS "$url/v1/classify" -H 'Content-Type: application/json' \
    -H "Authorization: Bearer $key" -d "$body")
echo "classify: $answer"
grep -q '"label"' <<< "$answer" || { echo "FAIL: no label in the answer"; exit 1; }

echo "== SIGTERM with a request in flight"
slow='{"texts": ["my card was charged twice and the refund never arrived", "where is my parcel"], "explain": ["integrated_gradients", "occlusion"]}'
curl -sS -o "$work/slow.json" -w '%{http_code}' "$url/v1/classify" -H 'Content-Type: application/json' \
    -H "Authorization: Bearer $key" -d "$slow" > "$work/slow.status" &
client=$!
sleep 0.5
c kill --signal TERM "$name" >/dev/null
wait "$client" || true
code=$(c wait "$name")
echo "in-flight request: HTTP $(cat "$work/slow.status"); container exit status: $code"
[[ "$(cat "$work/slow.status")" == 200 ]] || { c logs "$name" | tail -40; echo "FAIL: the in-flight request was not finished"; exit 1; }
[[ "$code" == 0 ]] || { c logs "$name" | tail -40; echo "FAIL: exit status $code after SIGTERM"; exit 1; }
(( size < LIMIT_BYTES )) || { echo "FAIL: image is $((size / 1000000)) MB, over 1500 MB"; exit 1; }
echo "image-test passed"
