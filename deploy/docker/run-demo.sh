#!/usr/bin/env bash
# Runs the CPU image as k8s/ runs it (no network, read-only root filesystem,
# the numeric non-root user 10001, no capabilities, /tmp the only writable
# place) and checks what a user's first run would:
#   1. `sluice --help` answers;
#   2. `sluice demo` runs the pipeline on the embedded broker and ends with `lost: 0`;
#   3. a stage's /healthz and /metrics answer from inside the container (a
#      writer, its broker unreachable: the health server does not wait for it).
#
#   bash deploy/docker/run-demo.sh [IMAGE]      # default localhost/sluice:dev (`make images` built it)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=podman.sh
. "$HERE/podman.sh"
IMAGE="${1:-$SLUICE_IMAGE}"
EVENTS="${EVENTS:-2000}"

pm image exists "$IMAGE" || { say "no image $IMAGE: run \`make images\` first"; exit 1; }
# As the Deployments' securityContext: runAsNonRoot (10001), readOnlyRootFilesystem,
# capabilities drop ALL, allowPrivilegeEscalation false; an emptyDir at /tmp.
AS_IN_K8S=(--network none --read-only --tmpfs /tmp --user 10001:10001 --cap-drop ALL
    --security-opt no-new-privileges "${PODMAN_ULIMITS[@]}")

say "1. sluice --help"
pm run --rm "${AS_IN_K8S[@]}" "$IMAGE" --help | head -4

say "2. sluice demo --events $EVENTS"
out="$(pm run --rm "${AS_IN_K8S[@]}" "$IMAGE" demo --events "$EVENTS" 2>&1)" || { echo "$out" | tail -30; exit 1; }
echo "$out" | grep -v '^{' | tail -14
grep -Eq '^ *lost: +0$' <<<"$out" || { say "the demo did not end with lost: 0"; exit 1; }

say "3. /healthz and /metrics from inside"
name="sluice-probe-$$"
pm run -d --name "$name" "${AS_IN_K8S[@]}" -e SLUICE_KAFKA__BROKERS=127.0.0.1:9 "$IMAGE" run writer >/dev/null
trap 'pm rm -f "$name" >/dev/null 2>&1 || true' EXIT
# The image has bash but no curl: HTTP over /dev/tcp, as the compose healthchecks do.
get() {
    pm exec "$name" bash -c "exec 3<>/dev/tcp/127.0.0.1/9100 && printf 'GET $1 HTTP/1.0\r\n\r\n' >&3 && cat <&3"
}
for _ in $(seq 1 60); do
    if health="$(get /healthz 2>/dev/null)" && grep -q ' 200 ' <<<"$health"; then break; fi
    sleep 0.5
done
grep -q ' 200 ' <<<"${health:-}" || { say "/healthz did not answer 200"; pm logs "$name" | tail -20; exit 1; }
echo "/healthz: $(head -1 <<<"$health")"
metrics="$(get /metrics)"
series="$(grep -c '^sluice_' <<<"$metrics" || true)"
[ "$series" -gt 0 ] || { say "/metrics has no sluice_ series"; exit 1; }
echo "/metrics: $(head -1 <<<"$metrics"), $series sluice_ series"
user="$(pm exec "$name" id -u)"
[ "$user" = 10001 ] || { say "the stage runs as uid $user, not 10001"; exit 1; }
echo "runs as uid $user; root filesystem read-only: $(pm exec "$name" bash -c 'touch /x 2>&1 || true' | head -1)"
say "the image runs: help, demo (lost: 0), /healthz, /metrics"
