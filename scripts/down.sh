#!/usr/bin/env bash
# Stops what scripts/up.sh started and removes what it made: the demo's
# namespaces, interfaces and processes (cnnf-demo down), the agent (a
# stopped agent keeps its iptables chains so a restart leaves no gap; they
# are removed here with `cnnf-agent --remove-chains`), the services and
# nats-server.
# Checks that nothing is left and says so. Keeps .cnnf (delete it to start
# over with empty stores).
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$CNNF_ROOT"
STATE="$CNNF_ROOT/.cnnf"
PIDS="$STATE/pids"
BIN="$CARGO_TARGET_DIR/release"

if [ -x "$BIN/cnnf-demo" ]; then
  "$BIN/cnnf-demo" down --inventory "$STATE/demo/inventory.json" --state-dir "$STATE/demo"
fi

# Stops one process from its pid file: SIGTERM, then SIGKILL after 20 s.
stop() {
  local name=$1 pid
  [ -f "$PIDS/$name" ] || return 0
  pid=$(cat "$PIDS/$name")
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping $name (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name did not stop in 20 s: killing it"
      kill -KILL "$pid"
    fi
  fi
  rm -f "$PIDS/$name"
}
stop agent
if [ -x "$BIN/cnnf-agent" ]; then
  "$BIN/cnnf-agent" --remove-chains >/dev/null
fi
stop allinone
stop nats

left=0
if ip netns list | grep -q '^cnnfd-'; then
  say "namespaces left: $(ip netns list | grep '^cnnfd-' | tr '\n' ' ')"
  left=1
fi
for table in filter mangle raw; do
  if iptables-save -t "$table" 2>/dev/null | grep -q '^:CNNF-'; then
    say "iptables chains left in $table: $(iptables-save -t "$table" | grep '^:CNNF-' | cut -d' ' -f1 | tr '\n' ' ')"
    left=1
  fi
done
if [ "$left" = 0 ]; then
  say "stopped: no namespace, chain or process of CNNF is left"
else
  exit 1
fi
