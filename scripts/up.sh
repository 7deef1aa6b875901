#!/usr/bin/env bash
# Installs what a fresh machine lacks, builds CNNF, and runs a single-node
# system on the embedded defaults: nats-server (deploy/nats/single-node.conf),
# the all-in-one services binary, and a demo workload published into it.
# State goes to ./.cnnf (delete it to start over). Ctrl-C stops everything.
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ensure_all
cd "$CNNF_ROOT"

say "building (the first build compiles RocksDB: about 15 minutes on 2 cores)"
cargo build --release --locked -p cnnf-allinone -p cnnf-cli -p cnnf-agent
BIN="$CARGO_TARGET_DIR/release"
STATE="$CNNF_ROOT/.cnnf"
mkdir -p "$STATE/nats" "$STATE/services"

pids=()
cleanup() {
  say "stopping"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# Demo passwords for the users in single-node.conf; set your own outside a demo.
export CNNF_NATS_SERVICES_PASSWORD=${CNNF_NATS_SERVICES_PASSWORD:-demo-services}
export CNNF_NATS_AGENT_NODE1_PASSWORD=${CNNF_NATS_AGENT_NODE1_PASSWORD:-demo-agent}
say "starting nats-server on 127.0.0.1:4222 (store in .cnnf/nats)"
(cd "$STATE/nats" && exec "$CNNF_NATS_SERVER" -c "$CNNF_ROOT/deploy/nats/single-node.conf") >"$STATE/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -sf http://127.0.0.1:8222/healthz >/dev/null && break; sleep 0.2; done
curl -sf http://127.0.0.1:8222/healthz >/dev/null || { cat "$STATE/nats.log"; exit 1; }

say "starting cnnf-allinone (metrics and readiness on http://127.0.0.1:9105)"
CNNF_DATA_DIR="$STATE/services" CNNF_HTTP_ADDR=127.0.0.1:9105 "$BIN/cnnf-allinone" &
pids+=($!)
for _ in $(seq 100); do curl -sf http://127.0.0.1:9105/ready >/dev/null && break; sleep 0.2; done
curl -sf http://127.0.0.1:9105/ready >/dev/null || { say "services did not become ready"; exit 1; }

say "starting a node agent for node demo-node-1 (heartbeats and workloads; enforcement off in this demo)"
mkdir -p "$STATE/agent"
CNNF_NODE=demo-node-1 CNNF_HTTP_ADDR=127.0.0.1:9100 "$BIN/cnnf-agent" --no-dataplane --data-dir "$STATE/agent" &
pids+=($!)

say "publishing the demo workload"
"$BIN/cnnf" demo
sleep 1
"$BIN/cnnf" status
say "running: try '$BIN/cnnf status', '$BIN/cnnf dlq', curl 127.0.0.1:9105/metrics; Ctrl-C stops"
wait
