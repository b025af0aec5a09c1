#!/usr/bin/env bash
# Build a local "Raspberry Pi" image: Debian with systemd as PID 1.
#
#   build-image.sh [SUITE [ARCH]]     SUITE: bookworm (default) | trixie
#                                     ARCH:  amd64 (default) | arm64 | armhf
#
# Why: no image registry is reachable from these machines, so the images the
# Molecule scenarios and `make demo` run are made here with debootstrap and
# `docker import`. They carry everything the roles and tests need (python3,
# psutil, prometheus-client, systemd, sshd, sudo), so containers never need the
# network. Raspberry Pi OS is bookworm (Python 3.11) or trixie (Python 3.13),
# 64-bit (arm64) or 32-bit (armhf); amd64 is the fast stand-in, arm64 and armhf
# run under qemu-user-static + binfmt_misc (real ARM code paths, slowly).
# Each image is tagged with a hash of this script: an unchanged recipe is
# skipped in a second, a changed one rebuilds.
#
# Result: rpicluster/debian-systemd:SUITE for amd64 (what the scenarios and the
# demo use), rpicluster/debian-systemd:SUITE-ARCH for the others, and
# :SUITE-ARCH-<hash> for each.
set -euo pipefail

SUITE=${1:-bookworm}
ARCH=${2:-amd64}
case $SUITE in bookworm | trixie) ;; *)
    echo "build-image: unknown suite '$SUITE' (bookworm or trixie)" >&2
    exit 2
    ;;
esac
case $ARCH in amd64 | arm64 | armhf) ;; *)
    echo "build-image: unknown architecture '$ARCH' (amd64, arm64 or armhf)" >&2
    exit 2
    ;;
esac

REPO=rpicluster/debian-systemd
PACKAGES=python3,python3-venv,python3-psutil,python3-prometheus-client,python3-apt,systemd,systemd-sysv,dbus,sudo,iproute2,procps,openssh-server,ca-certificates

HERE=$(cd "$(dirname "$0")" && pwd)
HASH=$(sha256sum "$HERE/build-image.sh" | cut -c1-12)
HASHED_TAG="$REPO:$SUITE-$ARCH-$HASH"
if [[ $ARCH == amd64 ]]; then
    TAG="$REPO:$SUITE"
else
    TAG="$REPO:$SUITE-$ARCH"
fi

log() { echo "build-image: $*" >&2; }

# Two callers (make demo and make molecule run in parallel) must not build twice.
exec 9>/var/lock/rpicluster-build-image.lock
flock 9

if docker image inspect "$HASHED_TAG" >/dev/null 2>&1; then
    docker tag "$HASHED_TAG" "$TAG"
    log "$TAG is up to date ($HASHED_TAG)"
    exit 0
fi

# The machine's own Debian mirror: the first URI its apt sources use for a
# Debian release suite (bookworm or trixie, not -security or -updates). A
# Debian mirror serves every suite and architecture, so one URI does for all.
mirror() {
    local uri
    uri=$(awk '
        /^URIs:/ { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if (($i == "bookworm" || $i == "trixie") && uri != "") { print uri; exit } }
    ' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    if [[ -z $uri ]]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" && $0 ~ / (bookworm|trixie) / { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' |
            head -n 1)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@" >/dev/null
}

# A foreign architecture runs under qemu-user-static through binfmt_misc. The
# Debian package registers its interpreters with the F (fix binary) flag: the
# kernel opens qemu once, so it also runs inside the chroot and the containers,
# which do not contain it.
enable_emulation() {
    local native qemu
    native=$(dpkg --print-architecture)
    [[ $ARCH == "$native" ]] && return 0
    case $ARCH in
    arm64) qemu=qemu-aarch64 ;;
    armhf) qemu=qemu-arm ;;
    *)
        log "cannot emulate $ARCH on $native"
        exit 2
        ;;
    esac
    if ! command -v update-binfmts >/dev/null 2>&1 || [[ ! -x /usr/bin/$qemu-static ]]; then
        log "installing qemu-user-static and binfmt-support"
        apt_install qemu-user-static binfmt-support
    fi
    if [[ ! -e /proc/sys/fs/binfmt_misc/status ]]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if ! grep -qx enabled "/proc/sys/fs/binfmt_misc/$qemu" 2>/dev/null; then
        update-binfmts --enable "$qemu"
    fi
    grep -q '^flags: .*F' "/proc/sys/fs/binfmt_misc/$qemu" || {
        log "binfmt_misc $qemu lacks the F flag: containers could not find qemu"
        exit 1
    }
}

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt_install debootstrap
fi
enable_emulation

# Remove a root file system, first unmounting what debootstrap mounted in it
# (proc, sys) so that rm never reaches into the host's own /proc or /sys.
remove_rootfs() {
    local dir=$1 mnt
    findmnt -rn -o TARGET | { grep -F "$dir/" || true; } | sort -r | while read -r mnt; do
        umount -l "$mnt" || true
    done
    rm -rf --one-file-system "$dir" "$dir.log"
}

# Leftovers of a build that was killed (we hold the lock, so none is running).
for stale in /var/tmp/rpicluster-rootfs.*; do
    if [[ -d $stale ]]; then
        remove_rootfs "$stale"
    fi
done

MIRROR=$(mirror)
ROOT=$(mktemp -d /var/tmp/rpicluster-rootfs.XXXXXX)
trap 'remove_rootfs "$ROOT"' EXIT

log "debootstrap $SUITE $ARCH minbase from $MIRROR into $ROOT"
start=$SECONDS
debootstrap --variant=minbase --arch="$ARCH" --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || {
    tail -n 30 "$ROOT.log" >&2
    exit 1
}

# The Pi's login user, as Raspberry Pi Imager makes it (OS customisation, "Set
# username and password"): not `pi`, which today's cards do not have, so the demo
# shows that nothing relies on it. Passwordless sudo in the file Raspberry Pi OS
# keeps for it (010_pi-nopasswd, whatever the user's name). Its password field is
# '*' (no password, not locked) so sshd accepts its key.
LOGIN_USER=admin
chroot "$ROOT" useradd --create-home --shell /bin/bash --groups sudo "$LOGIN_USER"
chroot "$ROOT" usermod --password '*' "$LOGIN_USER"
echo "$LOGIN_USER ALL=(ALL) NOPASSWD: ALL" >"$ROOT/etc/sudoers.d/010_pi-nopasswd"
chmod 0440 "$ROOT/etc/sudoers.d/010_pi-nopasswd"

# sshd: keys only. Host keys are made at first boot so every container of this
# image has its own, like every real Pi.
cat >"$ROOT/etc/ssh/sshd_config.d/rpicluster.conf" <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
CONF
rm -f "$ROOT"/etc/ssh/ssh_host_*
cat >"$ROOT/etc/systemd/system/regenerate-ssh-host-keys.service" <<'UNIT'
[Unit]
Description=Generate this machine's SSH host keys at first boot
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
UNIT
ln -s /etc/systemd/system/regenerate-ssh-host-keys.service \
    "$ROOT/etc/systemd/system/multi-user.target.wants/regenerate-ssh-host-keys.service"

# A container has no consoles or hardware clock: units that wait for them
# would leave the system "degraded" or starting forever.
for unit in getty@tty1.service console-getty.service serial-getty@.service \
    systemd-remount-fs.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer; do
    ln -sf /dev/null "$ROOT/etc/systemd/system/$unit"
done

# Each container gets its own machine id at boot.
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
chroot "$ROOT" apt-get clean

log "importing as $HASHED_TAG"
case $ARCH in arm64) platform=linux/arm64 ;; armhf) platform=linux/arm/v7 ;; *) platform=linux/amd64 ;; esac
# --platform records the architecture in the image (docker image inspect);
# an engine without multi-platform support refuses it, then import without.
tar -C "$ROOT" --numeric-owner -c . |
    docker import --platform "$platform" -c 'CMD ["/lib/systemd/systemd"]' - "$HASHED_TAG" >/dev/null 2>&1 ||
    tar -C "$ROOT" --numeric-owner -c . |
    docker import -c 'CMD ["/lib/systemd/systemd"]' - "$HASHED_TAG" >/dev/null
docker tag "$HASHED_TAG" "$TAG"
log "built $TAG in $((SECONDS - start))s"
