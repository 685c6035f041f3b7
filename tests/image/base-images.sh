#!/usr/bin/env bash
# Makes the two base images the image test builds the Dockerfile with, from
# Debian's packages (no image registry is needed):
#   localhost/syncgate-runtime:bookworm  Debian bookworm, minimal, CA certificates
#   localhost/syncgate-build:bookworm    the same with gcc; the Rust toolchain is
#                                        mounted at build time (/usr/local/rustup,
#                                        /usr/local/cargo, as in the rust image)
# Each is made once and kept in podman's storage.
set -euo pipefail

runtime=localhost/syncgate-runtime:bookworm
build=localhost/syncgate-build:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if podman image exists "$runtime" && podman image exists "$build"; then
    exit 0
fi

work=$(mktemp -d /var/tmp/syncgate-rootfs.XXXXXX)
trap 'rm -rf "$work"' EXIT

echo "== debootstrap: a minimal bookworm"
debootstrap --variant=minbase --include=ca-certificates bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; exit 1; }
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" -c . | podman import --quiet --change 'CMD ["/bin/sh"]' - "$runtime" >/dev/null

echo "== the build image: gcc and the C library's headers for linking"
cp /etc/resolv.conf "$work/root/etc/resolv.conf"
chroot "$work/root" apt-get update -qq >/dev/null
chroot "$work/root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    gcc libc6-dev >/dev/null
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" -c . | podman import --quiet \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/sh"]' - "$build" >/dev/null
echo "== base images ready: $runtime, $build"
