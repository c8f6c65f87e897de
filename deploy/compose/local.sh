#!/usr/bin/env bash
# docker-compose.yml brought up with podman-compose on a machine where no
# container registry can be reached (the development machines), with local.yml's
# stand-ins for the third-party images: events produced, predictions read back
# from PostgreSQL, the stages scraped by Prometheus, and the stack torn down.
#
#   bash deploy/compose/local.sh            # up, smoke, down (what README.md describes)
#   bash deploy/compose/local.sh up|smoke|down
#
# Needs the image `make images` builds (localhost/sluice:dev) and the tansu
# binary deploy/setup.sh caches; builds the stand-ins' image once. Root only.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=../docker/podman.sh
. "$ROOT/deploy/docker/podman.sh"

EVENTS="${EVENTS:-2000}"
INVALID_EVERY="${INVALID_EVERY:-100}"
PROJECT=sluice
LOCAL_IMAGE=localhost/sluice-local-services:bookworm
export SLUICE_TANSU="${SLUICE_TANSU:-$SLUICE_CACHE/bin/tansu}"

need_root
need_packages podman-compose:podman-compose

# podman-compose says much (every podman command, and an error for each
# container it starts that exists already, before it starts that one): into a
# log, shown when a step fails.
LOG="${TMPDIR:-/tmp}/sluice-compose-local.log"
: >"$LOG"
compose() {
    podman-compose -p "$PROJECT" --podman-args="${PODMAN_FLAGS[*]}" --podman-run-args="${PODMAN_ULIMITS[*]}" \
        -f "$HERE/docker-compose.yml" -f "$HERE/local.yml" "$@" >>"$LOG" 2>&1 \
        || { say "podman-compose $1 failed (the end of $LOG:)"; tail -20 "$LOG" >&2; return 1; }
}
# A command inside a service's running container.
inside() { local service="$1"; shift; pm exec "${PROJECT}_${service}_1" "$@"; }

# Retries a check for up to $1 seconds.
wait_for() {
    local seconds="$1" what="$2"
    shift 2
    for _ in $(seq 1 $((seconds * 2))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    say "$what did not come within ${seconds}s"
    return 1
}

ready() { # ready SERVICE: its /readyz answers 200 (HTTP over /dev/tcp: the image has no curl)
    inside "$1" bash -c "exec 3<>/dev/tcp/127.0.0.1/9100 && printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3 && grep -q ' 200 ' <&3"
}

up() {
    [ -x "$SLUICE_TANSU" ] || { say "no tansu binary at $SLUICE_TANSU: run \`make setup\`"; exit 1; }
    pm image exists "$SLUICE_IMAGE" || { say "no image $SLUICE_IMAGE: run \`make images\` first"; exit 1; }
    if ! pm image exists "$LOCAL_IMAGE"; then
        say "building $LOCAL_IMAGE (Debian's redis-server, PostgreSQL 15, Prometheus; once)"
        pm build --network host "${PODMAN_ULIMITS[@]}" --build-arg BASE="$BOOKWORM_IMAGE" \
            -f "$HERE/Dockerfile.local-services" -t "$LOCAL_IMAGE" "$HERE"
    fi
    # In phases: podman-compose 1.0.3 starts services in dependency order but does
    # not wait for `condition: service_healthy` or `service_completed_successfully`.
    say "starting kafka (tansu), redis, postgres"
    compose up -d --no-build kafka redis postgres
    wait_for 60 "the broker" inside kafka /opt/kafka/bin/kafka-broker-api-versions.sh
    wait_for 60 "redis" inside redis redis-cli ping
    wait_for 60 "postgres" inside postgres pg_isready -U sluice -d sluice
    say "setup: the topics and the tables"
    compose up -d --no-build setup
    [ "$(pm wait "${PROJECT}_setup_1")" = 0 ] || { pm logs "${PROJECT}_setup_1" | tail -20; exit 1; }
    pm logs "${PROJECT}_setup_1" 2>&1 | tail -3
    say "starting the four stages and prometheus (grafana has no image here)"
    compose up -d --no-build fetcher normalizer inferrer writer prometheus
    for stage in fetcher normalizer inferrer writer; do
        wait_for 180 "$stage's /readyz" ready "$stage"
        echo "$stage: ready"
    done
}

smoke() {
    say "producing $EVENTS synthetic events (one in $INVALID_EVERY invalid)"
    compose run -T --rm --no-deps --entrypoint sluice setup produce --synthetic "$EVENTS" --invalid-every "$INVALID_EVERY"
    grep -E '^(published|produced)' "$LOG" | tail -1 || true
    local want=$((EVENTS - EVENTS / INVALID_EVERY)) rows=0
    count() {
        rows="$(inside postgres psql -U sluice -d sluice -tAc 'SELECT count(*) FROM stock_predictions')"
        [ "$rows" -ge "$want" ]
    }
    wait_for 180 "$want rows in stock_predictions" count || { say "$rows rows"; exit 1; }
    count || true
    echo "stock_predictions: $rows rows (want $want, the other $((EVENTS / INVALID_EVERY)) are dead letters)"
    local sample
    sample="$(inside postgres psql -U sluice -d sluice -tAc \
        "SELECT event_id || ' ' || symbol || ' ' || round(predicted_return::numeric, 5) || ' ' || model_version FROM stock_predictions ORDER BY event_id LIMIT 3")"
    echo "$sample"
    local up_targets
    up_targets() {
        inside prometheus wget -qO- 'http://127.0.0.1:9090/api/v1/query?query=sum(up{job="sluice"})' \
            | grep -q '"value":\[[0-9.]*,"4"\]'
    }
    wait_for 60 "Prometheus scraping the four stages" up_targets
    echo "prometheus: the four stages are up; $(inside prometheus wget -qO- 'http://127.0.0.1:9090/api/v1/rules' \
        | grep -o '"type":"alerting"' | wc -l) alerting rules loaded"
    say "events in, predictions out, scraped: the stack works"
}

down() {
    compose down
}

case "${1:-all}" in
    up) up ;;
    smoke) smoke ;;
    down) down ;;
    all)
        trap down EXIT
        up
        smoke
        ;;
    *)
        echo "usage: $0 [up|smoke|down|all]" >&2
        exit 2
        ;;
esac
