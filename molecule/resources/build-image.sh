#!/usr/bin/env bash
# Build the local "Raspberry Pi" image: Debian bookworm with systemd as PID 1.
#
# Why: no image registry is reachable from these machines, so the image the
# Molecule scenarios and `make demo` run is made here with debootstrap and
# `docker import`. It carries everything the roles and tests need (python3,
# psutil, prometheus-client, systemd, sshd, sudo), so containers never need the
# network. The image is tagged with a hash of this script: an unchanged recipe
# is skipped in a second, a changed one rebuilds.
#
# Result: rpicluster/debian-systemd:bookworm (and :bookworm-<hash>).
set -euo pipefail

REPO=rpicluster/debian-systemd
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-psutil,python3-prometheus-client,python3-apt,systemd,systemd-sysv,dbus,sudo,iproute2,procps,openssh-server,ca-certificates

HERE=$(cd "$(dirname "$0")" && pwd)
HASH=$(sha256sum "$HERE/build-image.sh" | cut -c1-12)
HASHED_TAG="$REPO:$SUITE-$HASH"
TAG="$REPO:$SUITE"

log() { echo "build-image: $*" >&2; }

# Two callers (make demo and make molecule run in parallel) must not build twice.
exec 9>/var/lock/rpicluster-build-image.lock
flock 9

if docker image inspect "$HASHED_TAG" >/dev/null 2>&1; then
    docker tag "$HASHED_TAG" "$TAG"
    log "$TAG is up to date ($HASHED_TAG)"
    exit 0
fi

# The machine's own Debian mirror: first bookworm URI in its apt sources.
mirror() {
    local uri
    uri=$(awk '
        /^URIs:/ { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm" && uri != "") { print uri; exit } }
    ' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    if [[ -z $uri ]]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" && $0 ~ / bookworm / { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' |
            head -n 1)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq debootstrap >/dev/null
fi

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

log "debootstrap $SUITE minbase from $MIRROR into $ROOT"
start=$SECONDS
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || {
    tail -n 30 "$ROOT.log" >&2
    exit 1
}

# The Pi's login user, as on Raspberry Pi OS: `pi`, with passwordless sudo.
# Its password field is '*' (no password, not locked) so sshd accepts its key.
chroot "$ROOT" useradd --create-home --shell /bin/bash --groups sudo pi
chroot "$ROOT" usermod --password '*' pi
echo 'pi ALL=(ALL) NOPASSWD: ALL' >"$ROOT/etc/sudoers.d/010_pi-nopasswd"
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
tar -C "$ROOT" --numeric-owner -c . |
    docker import -c 'CMD ["/lib/systemd/systemd"]' - "$HASHED_TAG" >/dev/null
docker tag "$HASHED_TAG" "$TAG"
log "built $TAG in $((SECONDS - start))s"
