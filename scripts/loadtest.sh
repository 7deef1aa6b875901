#!/usr/bin/env bash
# Runs every CNNF benchmark with modest sizes and writes loadtest/RESULTS.md:
# each figure beside a baseline measured in the same run, the ratio, the
# design's target, the machine, and the exact command per benchmark.
#
#   scripts/loadtest.sh              everything (about 10 minutes on 2 cores, with the benches built)
#   FLEET_AGENTS=100 scripts/loadtest.sh   sizes are environment variables (below)
#   LOADTEST_ONLY="fleet bus-throughput" scripts/loadtest.sh   a subset
#
# Every benchmark that talks to NATS gets a fresh nats-server (free port,
# temporary store) of its own, so no benchmark sees another's streams,
# consumers or backlog. The data-plane benchmarks need root, iptables,
# network namespaces and hping3 (what scripts/common.sh installs).
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ensure_all
cd "$CNNF_ROOT"

# Sizes. Each is a plain argument of the benchmark it names.
BUS_EVENTS=${BUS_EVENTS:-200000}
INGEST_WORKLOADS=${INGEST_WORKLOADS:-20000}
INGEST_CHURN=${INGEST_CHURN:-20000}
INGEST_NODES=${INGEST_NODES:-100}
INGEST_SAMPLES=${INGEST_SAMPLES:-1000}
INGEST_RATE=${INGEST_RATE:-500}
MODELER_IMAGES=${MODELER_IMAGES:-2000}
MODELER_CONNECTIONS=${MODELER_CONNECTIONS:-200000}
POLICY_IDENTITIES=${POLICY_IDENTITIES:-10000}
POLICY_RULES=${POLICY_RULES:-10000}
POLICY_CONNECTIONS=${POLICY_CONNECTIONS:-300000}
POLICY_RUNS=${POLICY_RUNS:-3}
AUDIT_AUDITS=${AUDIT_AUDITS:-1000000}
AUDIT_QUERIES=${AUDIT_QUERIES:-200}
FLEET_AGENTS=${FLEET_AGENTS:-1000}
FLEET_SECONDS=${FLEET_SECONDS:-30}
FLEET_RATE=${FLEET_RATE:-20000}
FLEET_BURST_MESSAGES=${FLEET_BURST_MESSAGES:-10}
FLEET_BURST_DECISIONS=${FLEET_BURST_DECISIONS:-50}
FLEET_WRITES=${FLEET_WRITES:-20}
CONNECT_CONNECTS=${CONNECT_CONNECTS:-20000}
SYN_SECONDS=${SYN_SECONDS:-5}
# Criterion's per-benchmark measurement time, seconds (empty: the bench's own).
CRITERION_SECONDS=${CRITERION_SECONDS:-}
LOADTEST_ONLY=${LOADTEST_ONLY:-}

RESULTS="$CNNF_ROOT/loadtest/RESULTS.md"
WORK=$(mktemp -d -t cnnf-loadtest-XXXXXX)
NATS_PID=
NATS_DIR=

nats_stop() {
  if [ -n "$NATS_PID" ]; then
    kill "$NATS_PID" 2>/dev/null || true
    wait "$NATS_PID" 2>/dev/null || true
    NATS_PID=
  fi
  if [ -n "$NATS_DIR" ]; then
    rm -rf "$NATS_DIR"
    NATS_DIR=
  fi
}
trap nats_stop EXIT INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts a fresh nats-server with a temporary store; sets NATS_URL.
nats_start() {
  nats_stop
  NATS_DIR=$(mktemp -d -t cnnf-loadtest-nats-XXXXXX)
  local port http
  port=$(free_port)
  http=$(free_port)
  cat >"$NATS_DIR/nats.conf" <<EOF
server_name: "cnnf-loadtest"
listen: 127.0.0.1:$port
http: 127.0.0.1:$http
jetstream {
  store_dir: "$NATS_DIR/store"
  max_memory_store: 256MB
  max_file_store: 64GB
}
EOF
  "$CNNF_NATS_SERVER" -c "$NATS_DIR/nats.conf" >"$NATS_DIR/nats.log" 2>&1 &
  NATS_PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$http/healthz" >/dev/null && break
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$http/healthz" >/dev/null || { cat "$NATS_DIR/nats.log" >&2; return 1; }
  NATS_URL="nats://127.0.0.1:$port"
}

wanted() {
  [ -z "$LOADTEST_ONLY" ] || [[ " $LOADTEST_ONLY " == *" $1 "* ]]
}

# run NAME NATS(yes|no) FORMAT(json|stdout) CARGO-ARGS... -- BENCH-ARGS...
# Runs one benchmark, keeps its output in $WORK/NAME.log and the command a
# reader can repeat in $WORK/NAME.cmd; with FORMAT json the benchmark
# writes $WORK/NAME.json itself.
run() {
  local name=$1 nats=$2 format=$3
  shift 3
  local cargo=() args=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do cargo+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  args=("$@")
  wanted "$name" || return 0
  local shown=("${cargo[@]}")
  [ ${#args[@]} -gt 0 ] && shown+=(-- "${args[@]}")
  if [ "$nats" = yes ]; then
    nats_start
    args+=(--nats-url "$NATS_URL")
    [ "${shown[*]}" = "${cargo[*]}" ] && shown+=(--)
    shown+=(--nats-url "<a fresh nats-server>")
  fi
  [ "$format" = json ] && args+=(--json "$WORK/$name.json")
  printf '%s\n' "${shown[*]}" >"$WORK/$name.cmd"
  say "$name: ${shown[*]}"
  local started=$SECONDS
  if "${cargo[@]}" -- "${args[@]}" >"$WORK/$name.log" 2>"$WORK/$name.err"; then
    echo ok >"$WORK/$name.status"
  else
    echo "failed (exit $?)" >"$WORK/$name.status"
    say "$name failed; the end of its output:"
    tail -n 20 "$WORK/$name.err" >&2
  fi
  echo $((SECONDS - started)) >"$WORK/$name.seconds"
  cat "$WORK/$name.log"
  [ "$nats" = yes ] && nats_stop
  return 0
}

# A package that does not build fails its benchmarks; the others still run.
say "building the benchmarks (release)"
cargo build --release --locked -p cnnf-loadtest --bins || say "cnnf-loadtest did not build"
cargo build --release --locked -p cnnf-loadtest-nfqueue --bins || say "cnnf-loadtest-nfqueue did not build"
cargo bench --locked -p cnnf-loadtest --no-run || say "the criterion benches did not build"

uptime >"$WORK/load.before"
START_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
START=$SECONDS

criterion_args=(--output-format bencher)
[ -n "$CRITERION_SECONDS" ] && criterion_args+=(--measurement-time "$CRITERION_SECONDS")

run bus-throughput yes json cargo run --release --locked -q -p cnnf-loadtest --bin bus-throughput -- \
  --events "$BUS_EVENTS"
run ingest-churn yes json cargo run --release --locked -q -p cnnf-loadtest --bin ingest-churn -- \
  --workloads "$INGEST_WORKLOADS" --churn "$INGEST_CHURN" --nodes "$INGEST_NODES" \
  --samples "$INGEST_SAMPLES" --rate "$INGEST_RATE"
run modeler-throughput yes json cargo run --release --locked -q -p cnnf-loadtest --bin modeler-throughput -- \
  --images "$MODELER_IMAGES" --connections "$MODELER_CONNECTIONS"
run policy-compile no json cargo run --release --locked -q -p cnnf-loadtest --bin policy-compile -- \
  --identities "$POLICY_IDENTITIES" --rules "$POLICY_RULES" --connections "$POLICY_CONNECTIONS" --runs "$POLICY_RUNS"
run audit-index no json cargo run --release --locked -q -p cnnf-loadtest --bin audit-index -- \
  --audits "$AUDIT_AUDITS" --queries "$AUDIT_QUERIES"
run fleet yes json cargo run --release --locked -q -p cnnf-loadtest --bin fleet -- \
  --agents "$FLEET_AGENTS" --seconds "$FLEET_SECONDS" --rate "$FLEET_RATE" \
  --burst-messages "$FLEET_BURST_MESSAGES" --burst-decisions "$FLEET_BURST_DECISIONS" --writes "$FLEET_WRITES"
run envelope no stdout cargo bench --locked -q -p cnnf-loadtest --bench envelope -- "${criterion_args[@]}"
run verdict-lookup no stdout cargo bench --locked -q -p cnnf-loadtest --bench verdict_lookup -- "${criterion_args[@]}"
run connect-latency no stdout cargo run --release --locked -q -p cnnf-loadtest-nfqueue --bin connect-latency -- \
  --connects "$CONNECT_CONNECTS"
run syn-verdicts no stdout cargo run --release --locked -q -p cnnf-loadtest-nfqueue --bin syn-verdicts -- \
  --seconds "$SYN_SECONDS"

uptime >"$WORK/load.after"
say "writing $RESULTS"
python3 - "$WORK" "$RESULTS" "$START_DATE" "$((SECONDS - START))" "$("$CNNF_NATS_SERVER" --version)" \
  "$(rustc --version)" "$(git -C "$CNNF_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PYTHON'
"""Collects the benchmarks' figures and writes RESULTS.md.

The load generators write JSON (--json); the criterion benches and the
data-plane benchmarks (whose output format belongs to them) are read from
their stable output lines."""
import json, os, platform, re, sys

work, out, date, seconds, nats, rustc, commit = sys.argv[1:8]
ORDER = ["bus-throughput", "ingest-churn", "modeler-throughput", "policy-compile", "audit-index", "fleet",
         "envelope", "verdict-lookup", "connect-latency", "syn-verdicts"]


def read(name, suffix):
    path = os.path.join(work, f"{name}.{suffix}")
    return open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else None


def figure(name, value, unit, better, baseline_name=None, baseline=None, target=None):
    ratio = value / baseline if value is not None and baseline not in (None, 0) else None
    return dict(name=name, value=value, unit=unit, better=better, baseline_name=baseline_name,
                baseline=baseline, ratio=ratio, target=target)


def bencher(log):
    """criterion --output-format bencher: 'test NAME ... bench: N ns/iter (+/- M)'."""
    found = {}
    for m in re.finditer(r"^test (.+?) \.\.\. bench:\s+([\d,]+) ns/iter", log, re.M):
        found[m.group(1).strip()] = float(m.group(2).replace(",", ""))
    return found


def envelope(log):
    b = bencher(log)
    base = next((v for k, v in b.items() if "baseline" in k), None)
    ours = next((v for k, v in b.items() if "cnnf" in k), None)
    return [figure("decode + checks of a decision event", ours, "ns", "lower", "prost decode", base)]


def verdict_lookup(log):
    """Its 'N rules, timed singly' lines: decide, decide_interned (when
    printed) and the baseline, p50 and p99 each."""
    figures = []
    for line in log.splitlines():
        rules = re.match(r"^\s*(\d+) rules, timed singly", line)
        base = re.search(r"baseline p50 (\d+) ns, p99 (\d+) ns", line)
        if not rules or not base:
            continue
        for what in ("decide", "decide_interned"):
            m = re.search(rf"(?<![\w]){what} p50 (\d+) ns, p99 (\d+) ns", line)
            if not m:
                continue
            for i, p in ((1, "p50"), (2, "p99")):
                figures.append(figure(f"verdict lookup ({what}), {rules.group(1)} rules, 10k identities, 1M learned, {p}",
                                      float(m.group(i)), "ns", "lower", f"HashMap lookup {p}", float(base.group(i)),
                                      "≤ 200 ns p99, flat as rules grow" if p == "p99" else None))
    return figures


def phases(log, unit_pattern):
    """Lines '  x: name ... <numbers>' of the data-plane benchmarks, by letter."""
    found = {}
    for line in log.splitlines():
        m = re.match(r"^\s+([a-z]): (.+?)\s{2,}(.*)$", line)
        if m:
            found[m.group(1)] = (m.group(2).strip(), m.group(3))
    return found


def connect_latency(log):
    figures = []
    found = phases(log, None)
    def lat(letter, p):
        if letter not in found:
            return None
        m = re.search(rf"{p}\s+([\d.]+) µs", found[letter][1])
        return float(m.group(1)) if m else None
    if "c" in found:
        for p, target in (("p50", "≤ 1.1x the accept-all loop"), ("p99", "≤ 1.2x the accept-all loop")):
            figures.append(figure(f"connect latency through the agent ({found['c'][0]}) {p}", lat("c", p), "µs", "lower",
                                  f"{found['b'][0]} {p}" if "b" in found else None, lat("b", p), target))
            figures.append(figure(f"connect latency through the agent ({found['c'][0]}) {p}", lat("c", p), "µs", "lower",
                                  f"{found['a'][0]} {p}" if "a" in found else None, lat("a", p),
                                  "report it; beat the minimal loop"))
    for letter in sorted(set(found) - {"a", "b", "c"}):
        for p in ("p50", "p99"):
            figures.append(figure(f"connect latency, {found[letter][0]} {p}", lat(letter, p), "µs", "lower",
                                  f"{found['b'][0]} {p}" if "b" in found else None, lat("b", p)))
    return figures


def syn_verdicts(log):
    """Verdicts/s of the whole loop, and verdicts per CPU-second of the
    verdict threads alone (the per-core figure the design's bar is about:
    the flooder shares the cores)."""
    found = phases(log, None)
    def rate(letter, pattern):
        if letter not in found:
            return None
        m = re.search(pattern, found[letter][1])
        return float(m.group(1)) if m else None
    per_second, per_cpu = r"^\s*([\d.]+) verdicts/s", r"([\d.]+) per CPU-second"
    if "c" not in found:
        return []
    base = found["b"][0] if "b" in found else None
    return [figure(f"SYN verdicts/s ({found['c'][0]})", rate("c", per_second), "verdicts/s", "higher",
                   base, rate("b", per_second), "report it; beat the accept-all loop"),
            figure(f"SYN verdicts per CPU-second of the verdict threads ({found['c'][0]})", rate("c", per_cpu),
                   "verdicts/CPU-s", "higher", f"{base} per CPU-second" if base else None, rate("b", per_cpu),
                   "≥ 200k per core")]


PARSERS = {"envelope": envelope, "verdict-lookup": verdict_lookup, "connect-latency": connect_latency,
           "syn-verdicts": syn_verdicts}


def number(value, unit):
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f} {unit}"
    if abs(value) >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.3g} {unit}"


def meminfo():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1048576:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


lines = [
    "# CNNF benchmark results",
    "",
    f"Written by `scripts/loadtest.sh` on {date} (commit {commit}; the run took {int(seconds) // 60} min "
    f"{int(seconds) % 60} s). Every figure stands beside a baseline measured in the same run on the same "
    "machine; ratio = figure / baseline (so below 1 is better for a latency, above 1 for a rate). Targets are "
    "the bars of DESIGN.md section 4: targets, not test assertions. Sizes are the script's modest defaults "
    "(environment variables in `scripts/loadtest.sh`), smaller than the design's full sizes where a run would "
    "take too long.",
    "",
    "## Machine",
    "",
    f"- kernel: `{platform.release()}`",
    f"- cores: {os.cpu_count()} ({cpu_model()})",
    f"- memory: {meminfo()}",
    f"- load average before the run: {(read('load', 'before') or '').strip().split('load average:')[-1].strip()}",
    f"- load average after the run: {(read('load', 'after') or '').strip().split('load average:')[-1].strip()}",
    f"- {nats.strip()}; {rustc.strip()}",
    "",
    "## Figures",
    "",
]
for name in ORDER:
    status = read(name, "status")
    if status is None:
        continue
    command = (read(name, "cmd") or "").strip()
    took = (read(name, "seconds") or "?").strip()
    lines += [f"### {name}", "", f"```text\n{command}\n```", ""]
    figures = []
    if name in PARSERS:
        figures = PARSERS[name](read(name, "log") or "")
    else:
        document = read(name, "json")
        if document:
            figures = json.loads(document)["figures"]
    if status.strip() != "ok":
        lines += [f"**{status.strip()}** after {took} s; the end of its error output:", "",
                  "```text", *((read(name, "err") or "").strip().splitlines()[-15:]), "```", ""]
    if not figures:
        if status.strip() == "ok":
            lines += [f"No figures found in its output ({took} s).", ""]
        continue
    lines += ["| figure | value | baseline (same run) | baseline value | ratio | target |",
              "| --- | ---: | --- | ---: | ---: | --- |"]
    for f in figures:
        ratio = f"{f['ratio']:.2f}" if f.get("ratio") is not None else ""
        baseline = number(f.get("baseline"), f["unit"]) if f.get("baseline_name") else ""
        lines.append(f"| {f['name']} | {number(f['value'], f['unit'])} | {f.get('baseline_name') or ''} | "
                     f"{baseline} | {ratio} | {f.get('target') or ''} |")
    lines += ["", f"({took} s)", ""]

open(out, "w", encoding="utf-8").write("\n".join(lines).rstrip() + "\n")
PYTHON
say "done: $RESULTS (logs of each benchmark in $WORK)"
