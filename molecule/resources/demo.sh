#!/usr/bin/env bash
# `make demo` / `make demo-down`: a fleet of four container "Pis" deployed over SSH.
#
# Why: a new user should see the whole cluster work before owning a single Pi.
# The containers run the same systemd image as the Molecule scenarios, with
# sshd and a login user with sudo (`admin`, as if made in Raspberry Pi Imager: not
# `pi`), so Ansible reaches them exactly as it reaches real Pis: ssh admin@<ip>,
# become with sudo, the real deploy.yml, and
# inventory/demo/ written the way a user writes inventory/pis/ (its group_vars
# are the shipped ones, linked).
#
#   demo.sh up    start (or reuse) the containers, deploy, print the status
#   demo.sh down  remove the containers, the network, inventory/demo and the key
#
# Environment: DEMO_DEPLOY_ARGS extra ansible-playbook arguments (e.g. -v).
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
IMAGE=rpicluster/debian-systemd:bookworm
NETWORK=rpicluster-demo
LABEL=rpicluster.demo=1
PREFIX=rpicluster-demo-
CACHE=$ROOT/.cache/demo
KEY=$CACHE/id_ed25519
KNOWN_HOSTS=$CACHE/known_hosts
INVENTORY=$ROOT/inventory/demo
# Inventory names, as in inventory/pis/hosts.yml (without .local).
HOSTS=(rpi-master rpi-node-01 rpi-node-02 rpi-node-03)
SSH_WAIT_SECONDS=60
# The images' login user (build-image.sh), as a user makes it in Raspberry Pi Imager.
LOGIN_USER=admin
WEB_PORT=8123
# Where the roles install the CLI (rpicluster_install_dir in the roles' defaults).
CLI=/opt/rpicluster/venv/bin/rpicluster

log() { echo "demo: $*" >&2; }
die() {
    echo "demo: error: $*" >&2
    exit 1
}

container_ip() {
    docker inspect -f "{{with index .NetworkSettings.Networks \"$NETWORK\"}}{{.IPAddress}}{{end}}" "$PREFIX$1"
}

ssh_pi() {
    local ip=$1
    shift
    ssh -i "$KEY" -o BatchMode=yes -o ConnectTimeout=3 -o StrictHostKeyChecking=accept-new \
        -o UserKnownHostsFile="$KNOWN_HOSTS" -o LogLevel=ERROR "$LOGIN_USER@$ip" "$@"
}

ensure_tools() {
    if ! command -v ssh >/dev/null 2>&1 || ! command -v ssh-keygen >/dev/null 2>&1; then
        log "installing openssh-client"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq openssh-client >/dev/null
    fi
    command -v ansible-playbook >/dev/null 2>&1 || die "ansible-playbook not on PATH: run 'make demo' (it uses .venv)"
    docker image inspect "$IMAGE" >/dev/null 2>&1 || die "image $IMAGE is missing: run molecule/resources/build-image.sh"
}

ensure_key() {
    mkdir -p "$CACHE"
    chmod 0700 "$CACHE"
    if [[ ! -f $KEY ]]; then
        log "generating the demo's SSH key $KEY"
        ssh-keygen -q -t ed25519 -N '' -C rpicluster-demo -f "$KEY"
    fi
}

# Start the four containers, or reuse the ones already running.
ensure_containers() {
    docker network inspect "$NETWORK" >/dev/null 2>&1 ||
        docker network create --label "$LABEL" "$NETWORK" >/dev/null
    local host name state
    for host in "${HOSTS[@]}"; do
        name=$PREFIX$host
        if docker container inspect "$name" >/dev/null 2>&1; then
            state=$(docker container inspect -f '{{.State.Status}}' "$name")
        else
            state=missing
        fi
        case $state in
        running) ;;
        missing)
            log "starting $name"
            docker run -d --pull never --name "$name" --hostname "$host" --label "$LABEL" \
                --network "$NETWORK" --stop-signal SIGRTMIN+3 \
                --cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
                --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock \
                "$IMAGE" >/dev/null
            ;;
        *)
            # Left stopped (a reboot, a killed dockerd): boot it again, like a Pi.
            log "restarting $name (was $state)"
            docker start "$name" >/dev/null
            ;;
        esac
    done
}

# Put the demo key in the login user's ~/.ssh/authorized_keys, as Raspberry Pi
# Imager does for a real Pi, then wait until sshd lets the user in and sudo works.
ensure_ssh() {
    local host name ip pub deadline
    pub=$(cat "$KEY.pub")
    for host in "${HOSTS[@]}"; do
        name=$PREFIX$host
        docker exec "$name" sh -c "install -d -m 0700 -o $LOGIN_USER -g $LOGIN_USER ~$LOGIN_USER/.ssh &&
            printf '%s\n' '$pub' > ~$LOGIN_USER/.ssh/authorized_keys &&
            chown $LOGIN_USER:$LOGIN_USER ~$LOGIN_USER/.ssh/authorized_keys &&
            chmod 0600 ~$LOGIN_USER/.ssh/authorized_keys"
    done
    for host in "${HOSTS[@]}"; do
        ip=$(container_ip "$host")
        [[ -n $ip ]] || die "container $PREFIX$host has no address on network $NETWORK"
        deadline=$((SECONDS + SSH_WAIT_SECONDS))
        until ssh_pi "$ip" sudo -n true 2>/dev/null; do
            ((SECONDS < deadline)) || die "ssh $LOGIN_USER@$ip ($host) with sudo did not work within ${SSH_WAIT_SECONDS}s"
            sleep 1
        done
    done
}

write_inventory() {
    mkdir -p "$INVENTORY"
    ln -sfn ../pis/group_vars "$INVENTORY/group_vars"
    {
        echo "---"
        echo "# Generated by molecule/resources/demo.sh (make demo); removed by make demo-down."
        echo "# The same layout as inventory/pis/hosts.yml, with the containers' addresses."
        echo "all:"
        echo "  vars:"
        echo "    ansible_user: $LOGIN_USER"
        echo "    ansible_become: true"
        echo "    ansible_ssh_private_key_file: $KEY"
        echo "    # Every demo container makes its own host keys at first boot: accept new"
        echo "    # ones, in a known_hosts file of the demo's own."
        echo "    ansible_ssh_common_args: -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=$KNOWN_HOSTS"
        echo "  children:"
        echo "    master:"
        echo "      hosts:"
        echo "        rpi-master:"
        echo "          ansible_host: $(container_ip rpi-master)"
        echo "    slaves:"
        echo "      hosts:"
        echo "        rpi-node-03:"
        echo "          ansible_host: $(container_ip rpi-node-03)"
        echo "      children:"
        echo "        vitals:"
        echo "          hosts:"
        echo "            rpi-node-01:"
        echo "              ansible_host: $(container_ip rpi-node-01)"
        echo "        webservers:"
        echo "          hosts:"
        echo "            rpi-node-02:"
        echo "              ansible_host: $(container_ip rpi-node-02)"
    } >"$INVENTORY/hosts.yml.new"
    mv "$INVENTORY/hosts.yml.new" "$INVENTORY/hosts.yml"
}

deploy() {
    local out=$CACHE/deploy.log start end rc=0
    log "ansible-playbook -i inventory/demo deploy.yml ${DEMO_DEPLOY_ARGS:-}"
    start=$(date +%s.%N)
    # shellcheck disable=SC2086  # DEMO_DEPLOY_ARGS is a list of arguments
    ansible-playbook -i inventory/demo deploy.yml ${DEMO_DEPLOY_ARGS:-} 2>&1 | tee "$out" || rc=$?
    end=$(date +%s.%N)
    # For bench/deploy.py: how long the deploy took and what it changed.
    python3 - "$out" "$start" "$end" "$rc" >"$CACHE/last-deploy.json" <<'PY'
import json, re, sys
log, start, end, rc = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
recap = {}
for line in open(log, encoding="utf-8", errors="replace"):
    m = re.match(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", line)
    if m:
        recap[m.group(1)] = {"ok": int(m.group(2)), "changed": int(m.group(3)),
                             "unreachable": int(m.group(4)), "failed": int(m.group(5))}
print(json.dumps({"seconds": round(end - start, 2), "rc": rc, "recap": recap}))
PY
    ((rc == 0)) || die "deploy failed (exit $rc); full log: $out"
    local changed
    changed=$(python3 -c 'import json,sys; print(sum(h["changed"] for h in json.load(open(sys.argv[1]))["recap"].values()))' "$CACHE/last-deploy.json")
    log "deploy took $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"])' "$CACHE/last-deploy.json") s; changed=$changed in total"
}

show_status() {
    local master_ip web_ip
    master_ip=$(container_ip rpi-master)
    web_ip=$(container_ip rpi-node-02)
    echo
    echo "Cluster status (rpicluster status on rpi-master, $master_ip):"
    ssh_pi "$master_ip" sudo "$CLI" status || die "rpicluster status failed on rpi-master"
    echo
    echo "Dashboard: http://$web_ip:$WEB_PORT/   (metrics: http://$web_ip:$WEB_PORT/metrics)"
    echo "Log in to a Pi: ssh -i $KEY -o UserKnownHostsFile=$KNOWN_HOSTS $LOGIN_USER@$master_ip"
    echo "Remove it all: make demo-down"
}

up() {
    ensure_tools
    ensure_key
    ensure_containers
    ensure_ssh
    write_inventory
    deploy
    show_status
}

down() {
    local ids
    ids=$(docker ps -aq --filter "label=$LABEL")
    if [[ -n $ids ]]; then
        log "removing the demo containers"
        # shellcheck disable=SC2086  # one id per word
        docker rm -f $ids >/dev/null
    fi
    if docker network inspect "$NETWORK" >/dev/null 2>&1; then
        docker network rm "$NETWORK" >/dev/null
    fi
    rm -rf "$INVENTORY" "$CACHE"
    log "demo removed"
}

case ${1:-} in
up) up ;;
down) down ;;
*)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
