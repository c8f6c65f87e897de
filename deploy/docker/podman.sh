# Sourced by build-local.sh, run-demo.sh and deploy/compose/local.sh: podman as it
# runs on the development machines (no Docker engine, no registry, root).
# ../shared/ENVIRONMENT.md: the default runtime (crun), the systemd cgroup manager
# and podman's default ulimits are refused in that sandbox; runc, cgroupfs and
# these ulimits work. Elsewhere, SLUICE_PODMAN_FLAGS="" and SLUICE_PODMAN_ULIMITS=""
# give podman's defaults.
# shellcheck shell=bash

[ -n "${SLUICE_PODMAN_FLAGS+set}" ] || SLUICE_PODMAN_FLAGS="--runtime runc --cgroup-manager=cgroupfs"
[ -n "${SLUICE_PODMAN_ULIMITS+set}" ] || SLUICE_PODMAN_ULIMITS="--ulimit nofile=20000:20000 --ulimit nproc=4096:4096"
read -r -a PODMAN_FLAGS <<<"$SLUICE_PODMAN_FLAGS"
read -r -a PODMAN_ULIMITS <<<"$SLUICE_PODMAN_ULIMITS"
SLUICE_CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
# Local base images, kept outside the clone (podman's own store is /var/lib/containers).
IMAGES_CACHE="$SLUICE_CACHE/images"
BOOKWORM_IMAGE=localhost/bookworm:minbase
SLUICE_IMAGE="${SLUICE_IMAGE:-localhost/sluice:dev}"

pm() { podman "${PODMAN_FLAGS[@]}" "$@"; }

say() { printf '\033[1m%s:\033[0m %s\n' "$(basename "$0" .sh)" "$*" >&2; }

# Installs the Debian packages whose commands are missing: need_packages cmd:pkg ...
need_packages() {
    local want=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || want+=("${pair#*:}")
    done
    [ "${#want[@]}" -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    say "installing ${want[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -qq "${want[@]}" >/dev/null \
        || { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${want[@]}" >/dev/null; }
}

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        say "run as root: the local base is made with debootstrap and the images live in root's podman store"
        exit 1
    fi
}
