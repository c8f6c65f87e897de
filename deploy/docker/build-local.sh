#!/usr/bin/env bash
# Builds Sluice's images with podman where no Docker engine and no registry can be
# reached (the development machines), from the same Dockerfiles users build with
# Docker: local base images are passed as build arguments.
#
#   bash deploy/docker/build-local.sh          # the CPU image, localhost/sluice:dev (`make images`)
#   bash deploy/docker/build-local.sh cuda     # Dockerfile.cuda, as far as it goes without
#                                              # the CUDA base (README.md, "CUDA image")
#   bash deploy/docker/build-local.sh bases    # only the local base images
#
# Installs what is missing (podman, runc, debootstrap, with apt), then makes the
# local bases once:
#   localhost/bookworm:minbase        debootstrap --variant=minbase bookworm, as the
#                                     runtime base (for debian:12-slim); the root
#                                     filesystem is kept in $SLUICE_CACHE/images/
#   localhost/sluice-rust:<v>-bookworm that base with this machine's Rust toolchain
#                                     (for rust:1.95-bookworm), Dockerfile.rust-local;
#                                     it also trusts the CAs this machine adds (its
#                                     TLS-inspecting egress proxy), for pip and cargo
# and builds with torch from PyPI (torch==2.11.0, the CUDA 13 build: PyTorch's
# "+cpu" index is not reachable here). Root only. A rebuild reuses podman's layers
# and the cargo cache mount: only what changed is compiled again.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=podman.sh
. "$HERE/podman.sh"

TORCH_SPEC="${TORCH_SPEC:-torch==2.11.0}"
TORCH_INDEX="${TORCH_INDEX:-}"
CUDA_CHECK_IMAGE="${SLUICE_CUDA_IMAGE:-localhost/sluice-cuda:on-bookworm}"

need_root
need_packages podman:podman runc:runc debootstrap:debootstrap
mkdir -p "$IMAGES_CACHE"

# The runtime base: a Debian 12 minbase with the apt sources debian:12-slim has.
make_bookworm() {
    if pm image exists "$BOOKWORM_IMAGE"; then return 0; fi
    local tarball="$IMAGES_CACHE/bookworm-minbase.tar"
    if [ ! -s "$tarball" ]; then
        local mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}" dir
        dir="$(mktemp -d "$IMAGES_CACHE/rootfs.XXXXXX")"
        say "debootstrap bookworm (minbase) from $mirror into $dir (about a minute)"
        debootstrap --variant=minbase bookworm "$dir" "$mirror" >"$IMAGES_CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$IMAGES_CACHE/debootstrap.log" >&2; exit 1; }
        rm -f "$dir/etc/apt/sources.list"
        cat >"$dir/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
        # As debian:12-slim: no recommended packages, no package lists or .debs kept.
        printf 'APT::Install-Recommends "false";\n' >"$dir/etc/apt/apt.conf.d/90sluice-no-recommends"
        rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin "$dir"/var/lib/apt/lists/*
        tar -C "$dir" --numeric-owner -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$dir"
    fi
    say "importing $tarball as $BOOKWORM_IMAGE"
    pm import --change 'CMD ["bash"]' "$tarball" "$BOOKWORM_IMAGE" >/dev/null
}

# The builder base: this machine's Rust toolchain (rustup's) on the local base.
rust_image() {
    local version
    version="$(rustc --version | awk '{ print $2 }')"
    echo "localhost/sluice-rust:${version}-bookworm"
}
make_rust() {
    local image sysroot bindir
    image="$(rust_image)"
    if pm image exists "$image"; then return 0; fi
    command -v rustup >/dev/null || { say "no rustup here: the builder base copies rustup's toolchain"; exit 1; }
    sysroot="$(realpath "$(rustc --print sysroot)")"
    bindir="$(dirname "$(command -v rustup)")"
    case "$(rustc --version)" in
        "rustc 1.95."*) ;;
        *) say "warning: rustc here is $(rustc --version), the Dockerfile's default is rust:1.95" ;;
    esac
    say "making $image from $sysroot (the toolchain here) on $BOOKWORM_IMAGE"
    local ctx
    ctx="$(mktemp -d)"
    local ca=()
    [ -d /usr/local/share/ca-certificates ] && ca=(-v /usr/local/share/ca-certificates:/host/ca:ro)
    pm build --network host "${PODMAN_ULIMITS[@]}" \
        -v "$sysroot:/host/toolchain:ro" -v "$bindir:/host/cargo-bin:ro" "${ca[@]}" \
        --build-arg BASE="$BOOKWORM_IMAGE" --build-arg TOOLCHAIN="$(basename "$sysroot")" \
        -f "$HERE/Dockerfile.rust-local" -t "$image" "$ctx"
    rmdir "$ctx"
}

build() { # build DOCKERFILE TAG [extra build args...]
    local file="$1" tag="$2"
    shift 2
    say "building $tag from $file (the first time: torch from PyPI, then a release build, about 12 minutes on 2 cores)"
    pm build --network host "${PODMAN_ULIMITS[@]}" -f "$file" \
        --build-arg RUST_IMAGE="$(rust_image)" \
        --build-arg TORCH_INDEX="$TORCH_INDEX" --build-arg TORCH_SPEC="$TORCH_SPEC" \
        "$@" -t "$tag" "$ROOT"
}

make_bookworm
make_rust
case "${1:-cpu}" in
    bases) ;;
    cpu)
        build "$HERE/Dockerfile" "$SLUICE_IMAGE" --build-arg RUNTIME_IMAGE="$BOOKWORM_IMAGE"
        ;;
    cuda)
        # No CUDA base image here: the runtime stage runs on the local Debian 12
        # base instead, which shows everything but the base itself (README.md).
        build "$HERE/Dockerfile.cuda" "$CUDA_CHECK_IMAGE" --build-arg CUDA_IMAGE="$BOOKWORM_IMAGE"
        ;;
    *)
        echo "usage: $0 [cpu|cuda|bases]" >&2
        exit 2
        ;;
esac
pm images --filter reference='localhost/*' --format '{{.Repository}}:{{.Tag}}  {{.Size}}'
