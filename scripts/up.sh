#!/usr/bin/env bash
# The README's first command. Installs what a fresh machine lacks, builds
# CNNF and the Radar page, and brings up a protected demo on this node:
# nats-server in operator mode (each process logs in with its own creds
# file, the agent with its node's only), every service and the operator
# gateway (cnnf-allinone), the node agent enforcing through iptables and
# NFQUEUE, and the storefront demo in network namespaces (cnnf-demo up):
# its traffic is learned, the models locked, the cluster switched to
# prevent, and an attacker in the front end is blocked, audited and raises
# an incident. Everything keeps running afterwards; scripts/down.sh stops it
# and removes every namespace, chain and process it made.
#
# Needs root (namespaces, iptables, NFQUEUE). State goes to ./.cnnf.
# Options: --small (a shorter scan, for slow machines and CI).
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ensure_all
cd "$CNNF_ROOT"

scan_ports="1-1024,3306,5672,8079,27017"
for arg in "$@"; do
  case "$arg" in
    --small) scan_ports="1-40,80,3306,5672,8079,27017" ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) say "unknown option $arg (try --help)"; exit 64 ;;
  esac
done
[ "$(id -u)" = 0 ] || { say "run as root: the agent and the demo need namespaces, iptables and NFQUEUE"; exit 1; }

STATE="$CNNF_ROOT/.cnnf"
PIDS="$STATE/pids"
for name in nats allinone agent; do
  if [ -f "$PIDS/$name" ] && kill -0 "$(cat "$PIDS/$name")" 2>/dev/null; then
    say "CNNF is already running ($name, pid $(cat "$PIDS/$name")): run scripts/down.sh first"
    exit 1
  fi
done

say "building (the first build compiles RocksDB: about 15 minutes on 2 cores)"
cargo build --release --locked -p cnnf-allinone -p cnnf-agent -p cnnf-demo -p cnnf-ctl -p cnnf-cli
BIN="$CARGO_TARGET_DIR/release"
mkdir -p "$STATE/nats" "$STATE/services" "$STATE/agent" "$STATE/demo" "$PIDS" "$STATE/logs"

# Operator tokens: the gateway's tokens file keeps only their SHA-256.
if [ ! -f "$STATE/tokens.json" ]; then
  umask 077
  admin=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  viewer=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  printf %s "$admin" >"$STATE/admin.token"
  printf %s "$viewer" >"$STATE/viewer.token"
  printf '{"tokens": {"%s": {"name": "demo-admin", "role": "admin"}, "%s": {"name": "demo-viewer", "role": "viewer"}}}\n' \
    "$(printf %s "$admin" | sha256sum | cut -d' ' -f1)" "$(printf %s "$viewer" | sha256sum | cut -d' ' -f1)" >"$STATE/tokens.json"
  umask 022
fi
admin=$(cat "$STATE/admin.token")
viewer=$(cat "$STATE/viewer.token")

# Starts a program detached from this shell, logging to .cnnf/logs/<name>.log.
start() {
  local name=$1
  shift
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name"
}
wait_http() {
  local url=$1 what=$2
  for _ in $(seq 150); do curl -sf "$url" >/dev/null && return 0; sleep 0.2; done
  say "$what did not come up; its log:"
  tail -20 "$STATE/logs/$3.log" >&2
  exit 1
}

# NATS in operator mode: every process logs in with its own creds file.
# `cnnf auth init` makes the operator, the accounts, the services' login
# and the server's include file once (kept in .cnnf/auth, private); the
# agent gets a login of its own node only (`cnnf nodes enroll`).
AUTH="$STATE/auth"
if [ ! -f "$AUTH/nats-auth.conf" ]; then
  say "making the NATS operator, accounts and the services' login (.cnnf/auth)"
  "$BIN/cnnf" auth init --dir "$AUTH" >/dev/null
fi
# The server's own config; its include path is relative to this file.
cat >"$STATE/nats/nats.conf" <<'CONF'
server_name: cnnf-single
listen: "127.0.0.1:4222"
http: "127.0.0.1:8222"
max_payload: 1MB
include ../auth/nats-auth.conf
jetstream {
  store_dir: "./nats-data"
  sync_interval: "2m"
}
CONF
say "starting nats-server on 127.0.0.1:4222 (operator mode, store in .cnnf/nats)"
(cd "$STATE/nats" && start nats "$CNNF_NATS_SERVER" -c "$STATE/nats/nats.conf")
wait_http http://127.0.0.1:8222/healthz nats-server nats
export CNNF_NATS_CREDS="$AUTH/services.creds"
node_creds="$AUTH/demo-node-1.creds"
if [ ! -f "$node_creds" ]; then
  say "enrolling node demo-node-1 (its own NATS login)"
  "$BIN/cnnf" nodes enroll --auth-dir "$AUTH" --cluster local --node demo-node-1 --out "$node_creds" >/dev/null
fi

say "starting cnnf-allinone: every service and the operator gateway on 127.0.0.1:9443"
CNNF_DATA_DIR="$STATE/services" CNNF_HTTP_ADDR=127.0.0.1:9105 \
  CNNF_GATEWAY_TOKENS_FILE="$STATE/tokens.json" CNNF_GATEWAY_STATIC_DIR="$CNNF_ROOT/web/radar/dist" \
  start allinone "$BIN/cnnf-allinone"
wait_http http://127.0.0.1:9105/ready cnnf-allinone allinone

say "starting the node agent (node demo-node-1), enforcing through iptables and NFQUEUE"
inventory="$STATE/demo/inventory.json"
[ -f "$inventory" ] || echo '{"workloads": []}' >"$inventory"
# The agent enforces only tables signed by the policy service: it trusts
# the public key the all-in-one wrote beside its signing key at first start.
table_keys="$STATE/services/policy/table-signing.pub"
[ -f "$table_keys" ] || { echo "up.sh: $table_keys is missing (cnnf-allinone writes it at start)" >&2; exit 1; }
CNNF_NODE=demo-node-1 CNNF_HTTP_ADDR=127.0.0.1:9100 CNNF_NATS_CREDS="$node_creds" \
  start agent "$BIN/cnnf-agent" --data-dir "$STATE/agent" --workloads "inventory:$inventory" \
  --table-keys "$table_keys"
wait_http http://127.0.0.1:9100/ready cnnf-agent agent

say "running the storefront demo"
status=0
"$BIN/cnnf-demo" up --token "$admin" --inventory "$inventory" --state-dir "$STATE/demo" \
  --scan-ports "$scan_ports" || status=$?

cat >&2 <<MSG

==> Radar:    http://127.0.0.1:9443/#token=$admin
    (read-only: http://127.0.0.1:9443/#token=$viewer)
==> cnnfctl:  export CNNFCTL_TOKEN=\$(cat .cnnf/admin.token); $BIN/cnnfctl audits list
==> logs:     .cnnf/logs/   report: .cnnf/demo/report.json
==> stop:     scripts/down.sh   (removes every namespace, chain and process this started)
MSG
exit "$status"
