#!/usr/bin/env bash
# End-to-end test of deploy/compose on a real Docker Engine, without any
# image registry:
#
# 1. starts a dockerd of its own (own socket, data and exec roots; no
#    iptables rules of its own, containers on compose-made bridges);
# 2. makes every image locally: a base from a static busybox, the release
#    binaries' shared libraries and the host's iptables (same backend as
#    the host: nf_tables or legacy), the CNNF image from it with
#    deploy/docker/Dockerfile.prebuilt, a NATS image holding the real
#    nats-server binary, and one busybox image per service of the test
#    application (tests/compose-e2e/app.yml);
# 3. brings up deploy/compose unchanged (images, Docker socket and node
#    name through its variables) and the application: a front end that
#    connects to db:5432 every second, the database, and an attacker;
# 4. lets the models learn front-end -> db, locks the three models and
#    switches the cluster to prevent with cnnfctl through the gateway, as
#    an operator would;
# 5. checks that the attacker's connection to db:5432 is dropped (no
#    answer, not refused), that the front end still connects, that the
#    agent counts prevent drops, and that the audit service reports the
#    attacker's connection to db as a prevent audit.
#
#   scripts/compose-e2e.sh
#
# Binaries: CNNF_BIN_DIR when set (used as they are), else
# $CARGO_TARGET_DIR/release after `cargo build --release` of the four
# packages it needs. They are copied (without their debug line tables) at
# the start, so a rebuild during the run changes nothing. Needs root, dockerd and the docker CLI (Debian:
# docker.io), a static busybox (busybox-static), docker-compose 1.29 or
# Compose v2, and the host ports 4222, 8222, 9443, 9100 and 9105 free
# (compose publishes and listens on them). Without root or dockerd it says
# so and exits 0, unless CNNF_REQUIRE_DOCKER=1 (then it fails).
#
# Everything it makes is removed on exit, also after a failure or Ctrl-C:
# compose down -v, the daemon and its directories, the agent's iptables
# chains (the agent keeps them when it stops), and bridge-nf-call-iptables
# is set back if the run had to turn it on. A run killed outright is
# cleaned up by the next run. Exit 0: PASS; 1: FAIL, with what failed and
# the last 50 log lines of every compose service.
# shellcheck source=scripts/common.sh disable=SC2031 # (its subshells change nothing here)
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$CNNF_ROOT" || exit 1

NAME=compose-e2e
PORTS="4222 8222 9443 9100 9105"
# The binaries the image ships (deploy/docker/Dockerfile's CNNF_BINARIES);
# compose runs the first three, this script cnnfctl.
NEEDED_BINARIES="cnnf cnnf-allinone cnnf-agent cnnfctl"
IMAGE_BINARIES="$NEEDED_BINARIES cnnf-ingest cnnf-modeler cnnf-policy cnnf-audit cnnf-gateway"
WORK_PREFIX=/tmp/cnnf-compose-e2e.
# Seconds each wait may take.
LEARN_TIMEOUT=${CNNF_E2E_LEARN_TIMEOUT:-120}
STEP_TIMEOUT=${CNNF_E2E_STEP_TIMEOUT:-60}

started=$(date +%s)
note() { printf '%s: %s\n' "$NAME" "$*" >&2; }

skip() {
  if [ "${CNNF_REQUIRE_DOCKER:-}" = 1 ]; then
    note "FAIL: cannot run: $* (CNNF_REQUIRE_DOCKER=1)"
    exit 1
  fi
  note "SKIPPED: $* (set CNNF_REQUIRE_DOCKER=1 to fail instead)"
  exit 0
}

[ "$(id -u)" = 0 ] || skip "not root (the agent changes iptables, dockerd needs root)"
command -v dockerd >/dev/null || skip "dockerd not found (Debian: docker.io)"
command -v docker >/dev/null || skip "the docker CLI not found (Debian: docker.io)"

# --- What the test needs besides dockerd --------------------------------
ensure_nats_server
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  if ! command -v docker-compose >/dev/null; then
    say "installing Debian's docker-compose"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
  fi
  COMPOSE=(docker-compose)
fi
BUSYBOX=
for candidate in /bin/busybox /usr/bin/busybox; do
  if [ -x "$candidate" ] && ! ldd "$candidate" >/dev/null 2>&1; then
    BUSYBOX=$candidate
    break
  fi
done
[ -n "$BUSYBOX" ] || { note "FAIL: no static busybox (Debian: busybox-static)"; exit 1; }
for program in python3 curl ss tar iptables-save ip6tables-save; do
  command -v "$program" >/dev/null || { note "FAIL: $program not found"; exit 1; }
done

# The host's iptables: the agent in its container must write the same
# backend (nf_tables or legacy) as the host's own rules use.
IPTABLES=$(readlink -f "$(command -v iptables)")
case "$(iptables -V)" in
*nf_tables*) BACKEND=nf_tables ;;
*legacy*) BACKEND=legacy ;;
*) note "FAIL: cannot tell the iptables backend from: $(iptables -V)"; exit 1 ;;
esac

is_elf() { [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' \n')" = 177ELF ]; }

# The nats-server executable itself: $CNNF_NATS_SERVER may be a wrapper
# script of the pip package, whose binary lives inside the package.
nats_binary() {
  local path venv found
  path=$(readlink -f "$CNNF_NATS_SERVER")
  if is_elf "$path"; then
    echo "$path"
    return
  fi
  venv=$(dirname "$(dirname "$path")")
  while IFS= read -r found; do
    if is_elf "$found"; then
      echo "$found"
      return
    fi
  done < <(find "$venv" -type f -name 'nats-server*' 2>/dev/null)
  return 1
}
NATS_BIN=$(nats_binary) || { note "FAIL: no nats-server executable behind $CNNF_NATS_SERVER"; exit 1; }

# --- Cleanup -------------------------------------------------------------
# One run's state lives in its directory $WORK_PREFIX<pid>: the daemon's
# socket, pid file and roots, what was started (files "projects",
# "bridges", "agent-started") and the variables compose needs ("env").

pid_alive() { [ -n "$1" ] && [ -d "/proc/$1" ]; }

# Processes whose command line names the directory (containerd shims that
# outlive a killed daemon), by pid.
processes_under() {
  local dir=$1 proc pid
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    [ "$pid" = $$ ] && continue
    tr '\0' ' ' 2>/dev/null <"$proc/cmdline" | grep -qF -- "$dir/" && echo "$pid"
  done
}

stop_pid() { # pid seconds
  local pid=$1 i
  pid_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < $2 * 5; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null
  sleep 0.2
}

# The agent's chains (prefix CNNF), as `cnnf-agent --remove-chains` takes
# them off a node; iptables-save for whatever that did not remove.
remove_chains() {
  local dir=$1 family save cmd rule chain
  if [ -x "$dir/context/bin/cnnf-agent" ]; then
    # --allow-unsigned-tables only passes the configuration check, which
    # asks for the table keys even here; --remove-chains starts nothing.
    "$dir/context/bin/cnnf-agent" --remove-chains --allow-unsigned-tables >/dev/null 2>&1 ||
      note "cnnf-agent --remove-chains failed; removing the chains with iptables"
  fi
  for family in iptables ip6tables; do
    save=${family}-save
    cmd=$family
    while IFS= read -r rule; do
      # shellcheck disable=SC2086 # a saved rule is words
      $cmd -t filter -D ${rule#-A } 2>/dev/null
    done < <($save -t filter 2>/dev/null | grep -E '^-A (FORWARD|INPUT|OUTPUT) .*-j CNNF-')
    while IFS= read -r chain; do
      $cmd -t filter -F "$chain" 2>/dev/null
    done < <($save -t filter 2>/dev/null | sed -n 's/^:\(CNNF-[^ ]*\) .*/\1/p')
    while IFS= read -r chain; do
      $cmd -t filter -X "$chain" 2>/dev/null
    done < <($save -t filter 2>/dev/null | sed -n 's/^:\(CNNF-[^ ]*\) .*/\1/p')
  done
}

cleanup_dir() {
  local dir=$1 sock=$1/docker.sock project file pid mount bridge
  [ -d "$dir" ] || return 0
  if [ -S "$sock" ] && DOCKER_HOST="unix://$sock" timeout 10 docker version >/dev/null 2>&1; then
    if [ -f "$dir/projects" ]; then
      # Last started first: the application, then CNNF.
      while read -r project file; do
        (
          # shellcheck disable=SC1091 # written by the run
          [ -f "$dir/env" ] && . "$dir/env"
          DOCKER_HOST="unix://$sock" timeout 120 "${COMPOSE[@]}" -p "$project" -f "$file" down -v --remove-orphans -t 5 >/dev/null 2>&1
        ) || note "cleanup: compose down of $project failed; removing its containers"
      done < <(tac "$dir/projects")
    fi
    local left
    left=$(DOCKER_HOST="unix://$sock" docker ps -aq 2>/dev/null)
    if [ -n "$left" ]; then
      # shellcheck disable=SC2086
      DOCKER_HOST="unix://$sock" timeout 60 docker rm -f -v $left >/dev/null 2>&1
    fi
  fi
  [ -f "$dir/agent-started" ] && remove_chains "$dir"
  pid=$(cat "$dir/dockerd.pid" 2>/dev/null || cat "$dir/dockerd.started" 2>/dev/null || true)
  stop_pid "$pid" 20
  for pid in $(processes_under "$dir"); do
    stop_pid "$pid" 5
  done
  if [ -f "$dir/bridges" ]; then
    while read -r bridge; do
      ip link show "$bridge" >/dev/null 2>&1 && ip link del "$bridge" 2>/dev/null
    done <"$dir/bridges"
  fi
  if [ -f "$dir/bridge-nf-call-iptables" ]; then
    sysctl -qw "net.bridge.bridge-nf-call-iptables=$(cat "$dir/bridge-nf-call-iptables")" 2>/dev/null
  fi
  while IFS= read -r mount; do
    umount -l "$mount" 2>/dev/null
  done < <(awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r)
  rm -rf "$dir"
}

# Runs killed outright leave their directory behind: clean those up.
for dir in "$WORK_PREFIX"*; do
  [ -d "$dir" ] || continue
  owner=${dir#"$WORK_PREFIX"}
  if pid_alive "$owner" && tr '\0' ' ' 2>/dev/null <"/proc/$owner/cmdline" | grep -q "$NAME"; then
    continue
  fi
  note "cleaning up after an earlier run that did not finish ($dir)"
  (set +e; cleanup_dir "$dir")
done

# --- Preconditions that must not be taken for a skip ---------------------
busy=
for port in $PORTS; do
  if [ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]; then
    busy="$busy $port"
  fi
done
if [ -n "$busy" ]; then
  note "FAIL: host port(s)$busy in use; compose needs 4222, 8222 (NATS), 9443 (gateway), 9105 (all-in-one) and 9100 (agent) free. Is scripts/up.sh running (scripts/down.sh stops it)?"
  for port in $busy; do
    ss -Hltnp "sport = :$port" 2>/dev/null | sed 's/^/    /' >&2
  done
  exit 1
fi
if iptables-save -t filter 2>/dev/null | grep -q '^:CNNF-' || ip6tables-save -t filter 2>/dev/null | grep -q '^:CNNF-'; then
  note "FAIL: this host already has an agent's iptables chains (CNNF-*): another agent runs here, or one stopped without removing them (cnnf-agent --remove-chains removes them)"
  exit 1
fi

# --- The run -----------------------------------------------------------------
WORK=$WORK_PREFIX$$
rm -rf "$WORK"
mkdir -p "$WORK"
chmod 0700 "$WORK"
SOCK=$WORK/docker.sock
export DOCKER_HOST=unix://$SOCK
# Compose v2 and the docker CLI: the classic builder (no BuildKit needed).
export DOCKER_BUILDKIT=0
TAG=$$
PROJECT=cnnf-e2e-$TAG
APP_PROJECT=cnnf-e2e-app-$TAG
COMPOSE_FILE=$CNNF_ROOT/deploy/compose/docker-compose.yml
APP_FILE=$CNNF_ROOT/tests/compose-e2e/app.yml
stage=starting
failures=()
up=

compose_cnnf() { "${COMPOSE[@]}" -p "$PROJECT" -f "$COMPOSE_FILE" "$@"; }
compose_app() { "${COMPOSE[@]}" -p "$APP_PROJECT" -f "$APP_FILE" "$@"; }

dump_logs() {
  local service
  for service in $(compose_cnnf config --services 2>/dev/null); do
    note "---- last 50 log lines of $service (deploy/compose)"
    compose_cnnf logs --no-color --tail=50 "$service" 2>&1 | sed 's/^/    /' >&2
  done
  for service in $(compose_app config --services 2>/dev/null); do
    note "---- last 50 log lines of $service (tests/compose-e2e/app.yml)"
    compose_app logs --no-color --tail=50 "$service" 2>&1 | sed 's/^/    /' >&2
  done
  note "---- last 20 lines of dockerd's log"
  tail -n 20 "$WORK/dockerd.log" 2>/dev/null | sed 's/^/    /' >&2
}

finish() {
  local status=$? left daemon
  trap - EXIT INT TERM
  set +e
  if [ "$status" -ne 0 ] || [ ${#failures[@]} -gt 0 ]; then
    [ ${#failures[@]} -gt 0 ] || failures+=("$stage")
    [ -n "$up" ] && dump_logs
  fi
  note "cleaning up (compose down -v, dockerd, the agent's chains, $WORK)"
  daemon=$(cat "$WORK/dockerd.started" 2>/dev/null)
  cleanup_dir "$WORK"
  left=$( (iptables-save; ip6tables-save) 2>/dev/null | grep -i cnnf)
  if [ -n "$left" ]; then
    failures+=("iptables still holds CNNF rules after the cleanup: $(echo "$left" | head -5 | tr '\n' ';')")
  fi
  if pid_alive "$daemon"; then
    failures+=("dockerd still runs after the cleanup")
  fi
  local seconds=$(($(date +%s) - started))
  if [ ${#failures[@]} -gt 0 ]; then
    note "FAIL after ${seconds}s:"
    printf '  - %s\n' "${failures[@]}" >&2
    exit 1
  fi
  note "PASS in ${seconds}s: learned front-end -> db:5432, then in prevent the attacker's connection to db:5432 was dropped and audited while the front end's went on; nothing left behind (iptables-save has no CNNF rule)"
  exit 0
}
trap finish EXIT
trap 'failures+=("interrupted during: $stage"); exit 1' INT TERM

die() {
  failures+=("$stage: $*")
  exit 1
}

step() {
  stage=$1
  note "[$(($(date +%s) - started))s] $stage"
}

# Polls `command...` every second until it succeeds or `seconds` pass.
wait_for() { # seconds what command...
  local seconds=$1 what=$2 deadline
  shift 2
  deadline=$(($(date +%s) + seconds))
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "gave up after ${seconds}s waiting for $what"
    sleep 1
  done
}

# --- Binaries ------------------------------------------------------------
step "staging the release binaries"
if [ -n "${CNNF_BIN_DIR:-}" ]; then
  BIN_DIR=$CNNF_BIN_DIR
else
  BIN_DIR=$CARGO_TARGET_DIR/release
  say "building the binaries it runs (cnnf, cnnf-allinone, cnnf-agent, cnnfctl)"
  cargo build --release --locked -q -p cnnf-cli -p cnnf-allinone -p cnnf-agent -p cnnf-ctl
fi
CONTEXT=$WORK/context
mkdir -p "$CONTEXT/bin" "$CONTEXT/radar"
for binary in $IMAGE_BINARIES; do
  if [ -x "$BIN_DIR/$binary" ]; then
    # Without their debug line tables (nine tenths of their size), so the
    # images are made in seconds.
    strip --strip-debug -o "$CONTEXT/bin/$binary" "$BIN_DIR/$binary" 2>/dev/null ||
      cp "$BIN_DIR/$binary" "$CONTEXT/bin/"
  elif [[ " $NEEDED_BINARIES " == *" $binary "* ]]; then
    die "$BIN_DIR/$binary does not exist (cargo build --release, or set CNNF_BIN_DIR)"
  fi
done
RADAR=${CNNF_RADAR_DIST:-$CNNF_ROOT/web/radar/dist}
if [ -f "$RADAR/index.html" ]; then
  cp -r "$RADAR/." "$CONTEXT/radar/"
else
  # This test does not open Radar; the image gets a page saying so.
  echo '<!doctype html><title>CNNF</title><p>The Radar page was not built (npm run build in web/radar).' >"$CONTEXT/radar/index.html"
fi
CTL=$CONTEXT/bin/cnnfctl

# --- dockerd -------------------------------------------------------------
step "starting dockerd"
# No iptables rules, forwarding or masquerading of its own and no docker0:
# the host's firewall stays as it was but for the agent's chains, and the
# containers talk over the bridges compose makes (bridged traffic passes
# the host's FORWARD chain, where the agent queues it, when
# br_netfilter's bridge-nf-call-iptables is on). Published ports are
# served by docker-proxy.
runtime=()
# A privileged container (the agent) gets every capability the kernel
# knows. Where this machine's own capability bounding set lacks some (a
# sandboxed CI runner may have no CAP_SYS_RESOURCE), runc cannot grant them
# and the container does not start; then runc runs through a wrapper that
# leaves the capabilities the host does not have out of each container's
# sets, and changes nothing else.
last_cap=$(cat /proc/sys/kernel/cap_last_cap)
bounding=$((16#$(awk '/^CapBnd:/ {print $2}' /proc/self/status)))
if [ "$bounding" -ne $(((1 << (last_cap + 1)) - 1)) ]; then
  RUNC=$(command -v runc) || die "runc not found"
  printf '#!/bin/sh\nRUNC=%s\n' "$RUNC" >"$WORK/runc"
  cat >>"$WORK/runc" <<'WRAPPER'
# runc, with the capabilities outside the host's bounding set left out of
# the container's (scripts/compose-e2e.sh).
spec=
previous=
for arg in "$@"; do
  case "$previous" in
  --bundle | -b) spec="$arg/config.json" ;;
  --process | -p) spec="$arg" ;;
  esac
  previous="$arg"
done
if [ -n "$spec" ] && [ -f "$spec" ]; then
  python3 - "$spec" <<'PY'
import json, sys
NAMES = """CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP
LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER
SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE
SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP
MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF
CHECKPOINT_RESTORE""".split()
bounding = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("CapBnd:")), 16)
missing = {"CAP_" + n for i, n in enumerate(NAMES) if not bounding >> i & 1}
path = sys.argv[1]
spec = json.load(open(path))
process = spec.get("process", spec)
caps = process.get("capabilities") or {}
for key, values in caps.items():
    caps[key] = [c for c in values or [] if c not in missing]
json.dump(spec, open(path, "w"))
PY
fi
exec "$RUNC" "$@"
WRAPPER
  chmod 0755 "$WORK/runc"
  runtime=(--add-runtime "cnnf-e2e=$WORK/runc" --default-runtime cnnf-e2e)
  note "this machine's capability bounding set lacks some capabilities: runc runs through $WORK/runc"
fi
dockerd \
  --host="unix://$SOCK" \
  --data-root="$WORK/data" \
  --exec-root="$WORK/exec" \
  --pidfile="$WORK/dockerd.pid" \
  --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
  --bridge=none --shutdown-timeout=5 "${runtime[@]}" \
  >"$WORK/dockerd.log" 2>&1 &
echo $! >"$WORK/dockerd.started"
docker_answers() { docker version >/dev/null 2>&1; }
wait_for 30 "dockerd to answer on $SOCK" docker_answers
BRIDGE_NF=/proc/sys/net/bridge/bridge-nf-call-iptables
if [ "$(cat "$BRIDGE_NF" 2>/dev/null || echo 0)" != 1 ]; then
  # Turned on for the run, and back off at the cleanup.
  if [ -f "$BRIDGE_NF" ]; then cat "$BRIDGE_NF" >"$WORK/bridge-nf-call-iptables"; fi
  modprobe br_netfilter 2>/dev/null || true
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null ||
    die "bridged traffic does not pass iptables (net.bridge.bridge-nf-call-iptables): the agent could not see the containers' connections"
fi

# --- Images ----------------------------------------------------------------
# A root file system with the static busybox and its applets (sh, wget,
# od, tr, sha256sum, cut, timeout, httpd, ...).
busybox_root() {
  local root=$1 applet
  mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" "$root/usr/local/bin" \
    "$root/usr/lib" "$root/usr/lib64" "$root/etc" "$root/tmp" "$root/root" "$root/var/lib" "$root/run"
  ln -s usr/lib "$root/lib"
  ln -s usr/lib64 "$root/lib64"
  chmod 1777 "$root/tmp"
  cp "$BUSYBOX" "$root/bin/busybox"
  for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
cnnf:x:65532:65532:cnnf:/nonexistent:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
cnnf:x:65532:
nogroup:x:65534:
EOF
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  printf '127.0.0.1 localhost\n::1 localhost\n' >"$root/etc/hosts"
}

# Copies files to the same path under root, each with the shared
# libraries ldd names for it (the dynamic loader too).
with_libraries() { # root file...
  local root=$1 lib
  shift
  for lib in $(for f in "$@"; do ldd "$f" 2>/dev/null; done | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
  done
}

import_root() { # root image change...
  local root=$1 image=$2
  shift 2
  local changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
  for change in "$@"; do changes+=(--change "$change"); done
  tar -C "$root" -cf "$root.tar" .
  docker import "${changes[@]}" "$root.tar" "$image" >/dev/null
  rm -f "$root.tar"
}

step "making the CNNF base image (busybox, libraries, iptables $BACKEND)"
BASE_ROOT=$WORK/base-root
busybox_root "$BASE_ROOT"
# iptables: the host's multi-call binary under every name the agent runs,
# and its extensions (NFQUEUE, hashlimit, physdev, ...).
cp "$IPTABLES" "$BASE_ROOT/usr/sbin/"
for name in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  rm -f "$BASE_ROOT/usr/sbin/$name" "$BASE_ROOT/bin/$name"
  ln -s "$(basename "$IPTABLES")" "$BASE_ROOT/usr/sbin/$name"
done
XTABLES=
for dir in /usr/lib/*/xtables /usr/lib/xtables /usr/lib64/xtables; do
  [ -d "$dir" ] && XTABLES=$dir && break
done
[ -n "$XTABLES" ] || die "no iptables extensions directory (xtables) on this host"
mkdir -p "$BASE_ROOT$(dirname "$XTABLES")"
cp -a "$XTABLES" "$BASE_ROOT$XTABLES"
with_libraries "$BASE_ROOT" "$CONTEXT"/bin/* "$IPTABLES" "$XTABLES"/*.so
[ -f /etc/protocols ] && cp /etc/protocols "$BASE_ROOT/etc/"
[ -f /etc/services ] && cp /etc/services "$BASE_ROOT/etc/"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$BASE_ROOT/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$BASE_ROOT/etc/ssl/certs/"
fi
import_root "$BASE_ROOT" "cnnf-e2e-base:$TAG"
rm -rf "$BASE_ROOT"

step "building the CNNF image (deploy/docker/Dockerfile.prebuilt)"
CNNF_IMAGE=cnnf-e2e:$TAG
if ! docker build -q -f "$CNNF_ROOT/deploy/docker/Dockerfile.prebuilt" \
  --build-arg "BASE=cnnf-e2e-base:$TAG" -t "$CNNF_IMAGE" "$CONTEXT" >"$WORK/build.log" 2>&1; then
  die "docker build failed: $(tail -5 "$WORK/build.log" | tr '\n' ' ')"
fi
docker run --rm --entrypoint iptables "$CNNF_IMAGE" -V >"$WORK/image-iptables" 2>&1 ||
  die "iptables does not run in the image: $(cat "$WORK/image-iptables")"
grep -q "$BACKEND" "$WORK/image-iptables" ||
  die "the image's iptables ($(cat "$WORK/image-iptables")) is not the host's backend, $BACKEND"

step "making the NATS image"
NATS_ROOT=$WORK/nats-root
busybox_root "$NATS_ROOT"
cp "$NATS_BIN" "$NATS_ROOT/usr/local/bin/nats-server"
with_libraries "$NATS_ROOT" "$NATS_ROOT/usr/local/bin/nats-server"
NATS_IMAGE=cnnf-e2e-nats:$TAG
# Like the official image: the server is the entrypoint, compose's command
# its arguments.
import_root "$NATS_ROOT" "$NATS_IMAGE" 'ENTRYPOINT ["nats-server"]' 'EXPOSE 4222 6222 8222'
rm -rf "$NATS_ROOT"
docker run --rm "$NATS_IMAGE" --version >"$WORK/nats-version" 2>&1 ||
  die "nats-server does not run in its image: $(cat "$WORK/nats-version")"

step "making the application's images"
APP_ROOT=$WORK/app-root
busybox_root "$APP_ROOT"
mkdir -p "$APP_ROOT/www"
echo "cnnf-e2e db" >"$APP_ROOT/www/index.html"
# One image per service (a model is per image): the same files, a label
# of its own, so three image IDs.
for role in front-end db attacker; do
  import_root "$APP_ROOT" "cnnf-e2e-$role:$TAG" "LABEL org.cnnf.e2e.role=$role"
done
rm -rf "$APP_ROOT"
image_id() { docker image inspect -f '{{.Id}}' "$1"; }
FRONT_END_ID=$(image_id "cnnf-e2e-front-end:$TAG")
DB_ID=$(image_id "cnnf-e2e-db:$TAG")
ATTACKER_ID=$(image_id "cnnf-e2e-attacker:$TAG")
if [ "$FRONT_END_ID" = "$DB_ID" ] || [ "$DB_ID" = "$ATTACKER_ID" ] || [ "$FRONT_END_ID" = "$ATTACKER_ID" ]; then
  die "the application's images share an image ID"
fi

# --- deploy/compose ----------------------------------------------------------
step "bringing up deploy/compose"
NODE=e2e-$TAG
BRIDGE=cnnfe2e$((TAG % 100000))
cat >"$WORK/env" <<EOF
export CNNF_IMAGE='$CNNF_IMAGE' CNNF_NATS_IMAGE='$NATS_IMAGE' CNNF_DOCKER_SOCKET='$SOCK' CNNF_NODE='$NODE'
export CNNF_E2E_FRONT_END_IMAGE='cnnf-e2e-front-end:$TAG' CNNF_E2E_DB_IMAGE='cnnf-e2e-db:$TAG'
export CNNF_E2E_ATTACKER_IMAGE='cnnf-e2e-attacker:$TAG' CNNF_E2E_BRIDGE='$BRIDGE'
EOF
# shellcheck disable=SC1091 # just written
. "$WORK/env"
echo "$PROJECT $COMPOSE_FILE" >>"$WORK/projects"
# From here the agent may have installed its chains.
touch "$WORK/agent-started"
up=1
timeout 300 "${COMPOSE[@]}" -p "$PROJECT" -f "$COMPOSE_FILE" up -d >"$WORK/compose-up.log" 2>&1 ||
  die "compose up failed: $(tail -5 "$WORK/compose-up.log" | tr '\n' ' ')"
for network in $(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT"); do
  echo "br-${network:0:12}" >>"$WORK/bridges"
done
ready() { curl -fsS -o /dev/null --max-time 2 "http://$1/ready"; }
wait_for "$STEP_TIMEOUT" "the all-in-one to be ready (127.0.0.1:9105/ready)" ready 127.0.0.1:9105
wait_for "$STEP_TIMEOUT" "the agent to be ready (127.0.0.1:9100/ready)" ready 127.0.0.1:9100
# The agent in its container enforces in the host's iptables.
iptables-save -t filter | grep -q -- '^-A FORWARD .*-j CNNF-FWD' ||
  die "the agent is ready but the host's FORWARD chain does not jump to CNNF-FWD"

step "reading the admin token (compose run --rm auth-init)"
# auth-init's entrypoint is `sh -ec`: the command is one script.
TOKEN=$(compose_cnnf run --rm -T auth-init 'cat /auth/admin.token' 2>"$WORK/token.err") ||
  die "$(cat "$WORK/token.err")"
TOKEN=$(printf %s "$TOKEN" | tr -d '\r\n')
[ ${#TOKEN} = 64 ] || die "the admin token is not 64 hex digits: '$TOKEN' $(cat "$WORK/token.err")"
export CNNFCTL_SERVER=http://127.0.0.1:9443 CNNFCTL_TOKEN=$TOKEN
"$CTL" mode get >"$WORK/mode" 2>&1 || die "cnnfctl mode get: $(cat "$WORK/mode")"

# --- The application, learning -------------------------------------------
step "bringing up the application (tests/compose-e2e/app.yml)"
echo "$BRIDGE" >>"$WORK/bridges"
echo "$APP_PROJECT $APP_FILE" >>"$WORK/projects"
compose_app up -d >"$WORK/app-up.log" 2>&1 || die "compose up failed: $(tail -5 "$WORK/app-up.log" | tr '\n' ' ')"
declare -A CONTAINERS
for service in front-end db attacker; do
  CONTAINERS[$service]=$(compose_app ps -q "$service")
  [ -n "${CONTAINERS[$service]}" ] || die "no container for $service"
done
container() { echo "${CONTAINERS[$1]}"; }
# A new connection from `service` to db:5432 and a request on it, bounded
# by 3 s; its exit status: 0 answered, 143 timed out (the SYN unanswered).
probe() { # service
  docker exec "$(container "$1")" timeout 3 wget -q -O - http://db:5432/ >"$WORK/probe.out" 2>&1
}
connects() { # service
  probe "$1" && [ "$(cat "$WORK/probe.out")" = "cnnf-e2e db" ]
}
wait_for "$STEP_TIMEOUT" "the front end to reach db:5432" connects front-end

# Models as JSON: field `field` of the model of `image` (empty if none).
model_field() { # image field
  "$CTL" --output json models list 2>/dev/null | python3 -c '
import json, sys
models = {m["imageId"]: m for m in json.load(sys.stdin).get("models", [])}
print(models.get(sys.argv[1], {}).get(sys.argv[2], ""))' "$1" "$2"
}
learned() {
  [ "$(model_field "$FRONT_END_ID" outboundCount)" -ge 1 ] 2>/dev/null &&
    [ "$(model_field "$DB_ID" inboundCount)" -ge 1 ] 2>/dev/null &&
    [ -n "$(model_field "$ATTACKER_ID" state)" ]
}
step "learning"
wait_for "$LEARN_TIMEOUT" "the front end's model to learn db:5432 (and db's to learn it inbound)" learned
note "learned: front-end -> db:5432 (the models of front-end, db and attacker exist)"
# What was learned is exactly front-end -> db:5432.
"$CTL" --output json learned list "$FRONT_END_ID" --side outbound >"$WORK/learned.json" 2>&1 ||
  die "cnnfctl learned list: $(cat "$WORK/learned.json")"
python3 - "$WORK/learned.json" "$DB_ID" <<'PY' || die "the front end's model did not learn db:5432: $(cat "$WORK/learned.json")"
import json, sys
connections = json.load(open(sys.argv[1])).get("connections", [])
sys.exit(0 if any(c.get("peer", {}).get("id") == sys.argv[2] and c.get("port") == 5432 for c in connections) else 1)
PY

step "locking the models"
for image in "$FRONT_END_ID" "$DB_ID" "$ATTACKER_ID"; do
  "$CTL" models lock "$image" >"$WORK/lock" 2>&1 || die "cnnfctl models lock $image: $(cat "$WORK/lock")"
done
enforcing() {
  local image
  for image in "$FRONT_END_ID" "$DB_ID" "$ATTACKER_ID"; do
    [ "$(model_field "$image" state)" = MODEL_STATE_ENFORCING ] || return 1
  done
}
wait_for "$STEP_TIMEOUT" "the three models to enforce" enforcing

step "switching to prevent"
"$CTL" mode set prevent >"$WORK/mode" 2>&1 || die "cnnfctl mode set prevent: $(cat "$WORK/mode")"
"$CTL" --output json mode get | grep -q MODE_PREVENT || die "cnnfctl mode get does not say prevent: $("$CTL" mode get 2>&1)"

# --- The checks ------------------------------------------------------------
step "checking the attack"
# The agent applies the prevent table within a moment of its publication;
# from then on the attacker's SYNs to db go unanswered: dropped, not
# refused.
attack=
dropped() {
  attack=0
  probe attacker || attack=$?
  [ "$attack" = 143 ]
}
deadline=$(($(date +%s) + STEP_TIMEOUT))
until dropped; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    if [ "$attack" = 0 ]; then
      failures+=("attacker -> db:5432 still connects ${STEP_TIMEOUT}s after the switch to prevent")
    else
      failures+=("attacker -> db:5432 failed, but not by a drop (exit status $attack: $(cat "$WORK/probe.out"))")
    fi
    break
  fi
  sleep 1
done
if [ ${#failures[@]} -eq 0 ]; then
  note "attacker -> db:5432: no answer within 3 s (dropped) $(($(date +%s) - deadline + STEP_TIMEOUT))s after the switch"
  # Not a one-off: the next attempts are dropped too.
  for attempt in 1 2; do
    dropped || failures+=("attacker -> db:5432 was not dropped again (attempt $attempt after the first drop; exit status $attack)")
  done
fi
if connects front-end; then
  note "front-end -> db:5432: connects (learned)"
else
  failures+=("front-end -> db:5432 failed in prevent, though it was learned: $(cat "$WORK/probe.out")")
fi
[ "$(docker logs --tail 1 "$(container front-end)" 2>&1)" = ok ] ||
  failures+=("the front end's own loop no longer connects: $(docker logs --tail 3 "$(container front-end)" 2>&1 | tr '\n' ' ')")
drops=$(curl -fsS --max-time 2 http://127.0.0.1:9100/metrics 2>/dev/null |
  awk '/^cnnf_agent_verdicts_total\{/ && /verdict="prevent"/ && /action="drop"/ {sum += $NF} END {print sum + 0}')
if [ "${drops%.*}" -ge 1 ] 2>/dev/null; then
  note "the agent counts $drops prevent drop(s) (cnnf_agent_verdicts_total)"
else
  failures+=("the agent's cnnf_agent_verdicts_total counts no prevent drop (got '$drops')")
fi

step "checking the audit"
audited() {
  "$CTL" --output json audits list --since 10m --verdict prevent --image "$ATTACKER_ID" --all >"$WORK/audits.json" 2>&1 &&
    python3 - "$WORK/audits.json" "$ATTACKER_ID" "$DB_ID" <<'PY'
import json, sys
audits = json.load(open(sys.argv[1])).get("audits", [])
hits = [a for a in audits
        if a.get("source", {}).get("identity", {}).get("id") == sys.argv[2]
        and a.get("destination", {}).get("identity", {}).get("id") == sys.argv[3]
        and a.get("destination", {}).get("port") == 5432
        and a.get("verdict") == "VERDICT_PREVENT"]
for a in hits:
    print(f"compose-e2e: audited: {a.get('auditId')}: attacker {a['source'].get('address')} -> "
          f"db {a['destination'].get('address')}:5432, prevent, count {a.get('count')}, "
          f"decided by {a.get('decidedBy')}", file=sys.stderr)
sys.exit(0 if hits else 1)
PY
}
deadline=$(($(date +%s) + STEP_TIMEOUT))
until audited; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    failures+=("no prevent audit of attacker -> db:5432 within ${STEP_TIMEOUT}s: $(head -c 600 "$WORK/audits.json")")
    break
  fi
  sleep 1
done
stage="done"
