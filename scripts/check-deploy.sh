#!/usr/bin/env bash
# Validates everything deploy/ ships, without a cluster or a container
# registry:
#
# - Kubernetes: the kustomization rendered (its resources, and compared
#   with `kubectl kustomize` when kubectl is installed), every manifest
#   against the Kubernetes schemas (pip package kubernetes-validate,
#   strict, two API versions), and what a schema cannot see: every Secret,
#   ConfigMap and volume a pod names exists (in the kustomization or among
#   what make-secrets.sh makes) and holds the file an env var points at,
#   Services and NetworkPolicies select real pods, binaries and CNNF_*
#   variables are real, the agent enforces with its own node's login only.
#   The NATS chart values: YAML, the settings CNNF needs, and the server
#   config the chart renders from them (include, resolver) through
#   `nats-server -t`.
# - compose: `docker-compose config` (Debian's docker-compose 1.29; Compose
#   v2 when installed instead) and the same checks of images, binaries,
#   variables and the agent's settings; its nats.conf through nats-server -t.
# - systemd: `systemd-analyze verify` of every unit in a temporary root
#   holding systemd's own units and the real binaries (cnnf-agent,
#   cnnf-allinone built here, nats-server): verify checks that ExecStart
#   programs exist and are executable; its nats.conf through nats-server -t.
# - the Dockerfile: every COPY source exists and is not dockerignored,
#   every binary it copies is a [[bin]] of the package it builds;
#   Dockerfile.prebuilt: one stage on the build argument BASE, the same
#   binaries' directory, Radar directory, data directories and user.
# - the shell scripts in deploy/ parse (bash -n); make-secrets.sh runs end
#   to end when `cnnf auth init` and `cnnf-table-key` are available, and
#   what it makes is validated like the rest.
#
# nats-server -t needs the include file `cnnf auth init` writes: it is made
# for real with the cnnf binary built here; a tree whose cnnf has no `auth
# init` yet checks the configs with an empty include instead, and says so.
#
# Installs what it lacks, idempotently: Debian's systemd, docker-compose and
# openssl; a venv under $CNNF_TOOLS with kubernetes-validate and PyYAML.
# Exit 0: all good; 1: something is wrong (each problem is printed with
# its file).
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$CNNF_ROOT"

KUBERNETES_VALIDATE_VERSION=1.37.0
PYYAML_VERSION=6.0.3
# Kubernetes API versions the manifests must be valid for.
KUBERNETES_VERSIONS="1.29.0 1.37.0"

ensure_check_tools() {
  local missing=()
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v openssl >/dev/null || missing+=(openssl)
  if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
    missing+=(docker-compose)
  fi
  command -v python3 >/dev/null || missing+=(python3)
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  local venv="$CNNF_TOOLS/deploy-check-venv"
  if ! "$venv/bin/python" -c "
import importlib.metadata as m, sys
sys.exit(m.version('kubernetes-validate') != '$KUBERNETES_VALIDATE_VERSION' or m.version('PyYAML') != '$PYYAML_VERSION')
" 2>/dev/null; then
    say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION (pip, venv $venv)"
    mkdir -p "$CNNF_TOOLS"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "PyYAML==$PYYAML_VERSION"
  fi
  PY="$venv/bin/python"
  KV="$venv/bin/kubernetes-validate"
}

ensure_check_tools
ensure_nats_server

failures=0
fail() { printf 'check-deploy: FAIL %s\n' "$*" >&2; failures=$((failures + 1)); }
ok() { printf 'check-deploy: ok   %s\n' "$*" >&2; }

work="$CARGO_TARGET_DIR/deploy-check"
rm -rf "$work"
mkdir -p "$work"

say "building the binaries the checks run (cnnf, cnnf-agent, cnnf-allinone)"
cargo build --release --locked -q -p cnnf-cli -p cnnf-agent -p cnnf-allinone
BIN="$CARGO_TARGET_DIR/release"

# The include file of operator mode, for nats-server -t.
auth="$work/auth"
real_auth=
if "$BIN/cnnf" auth init --help >/dev/null 2>&1; then
  "$BIN/cnnf" auth init --dir "$auth" >/dev/null
  real_auth=1
  ok "cnnf auth init: a real operator-mode include file for the NATS checks"
else
  mkdir -p "$auth"
  echo "# cnnf auth init is not available in this tree: an empty include" >"$auth/nats-auth.conf"
  say "NOTE: this tree's cnnf has no 'auth init': NATS configs are checked with an EMPTY nats-auth.conf"
fi

# nats-server -t on a config placed at <root>/<path>, with the include file
# at <root>/<include path>.
nats_check() { # what config-file root config-path include-path
  local what=$1 file=$2 root=$3 path=$4 include=$5
  mkdir -p "$root/$(dirname "$path")" "$root/$(dirname "$include")"
  cp "$file" "$root/$path"
  cp "$auth/nats-auth.conf" "$root/$include"
  local out
  if out=$(cd "$root/$(dirname "$path")" && "$CNNF_NATS_SERVER" -c "$root/$path" -t 2>&1); then
    ok "$what: nats-server -t"
  else
    fail "$what: nats-server -t: $out"
  fi
}

# --- Kubernetes --------------------------------------------------------
secrets_out="$work/k8s-secrets"
if [ -n "$real_auth" ] && [ -x "$BIN/cnnf-table-key" ]; then
  if out=$(CNNF_BIN_DIR="$BIN" bash deploy/kubernetes/make-secrets.sh "$work/k8s-auth" "$secrets_out" 2>&1); then
    ok "deploy/kubernetes/make-secrets.sh: made its Secrets and ConfigMap"
  else
    fail "deploy/kubernetes/make-secrets.sh: $out"
  fi
else
  say "NOTE: make-secrets.sh not run (needs 'cnnf auth init' and cnnf-table-key); its --list is used"
fi
for script in deploy/kubernetes/*.sh; do
  bash -n "$script" || fail "$script: does not parse (bash -n)"
done
bash deploy/kubernetes/make-secrets.sh --list >"$work/external-objects" ||
  fail "deploy/kubernetes/make-secrets.sh --list failed"

if command -v kubectl >/dev/null; then
  kubectl kustomize deploy/kubernetes >"$work/kustomize.yaml" 2>"$work/kustomize.err" ||
    fail "deploy/kubernetes: kubectl kustomize: $(cat "$work/kustomize.err")"
else
  say "NOTE: kubectl not installed: the kustomization is rendered by this script only"
fi

# Semantic checks (and the rendered manifests for the schema check).
if "$PY" - "$work" <<'PY'
import glob, json, os, re, sys, tomllib
import yaml

work = sys.argv[1]
errors = []
def err(where, what):
    errors.append(f"{where}: {what}")

# What exists in the code: binaries and CNNF_* variables.
members = tomllib.load(open("Cargo.toml", "rb"))["workspace"]["members"]
bins = {}  # binary -> package
for member in members:
    cargo = tomllib.load(open(os.path.join(member, "Cargo.toml"), "rb"))
    package = cargo["package"]["name"]
    for b in cargo.get("bin", []):
        bins[b["name"]] = package
    if not cargo.get("bin") and os.path.exists(os.path.join(member, "src/main.rs")):
        bins[package] = package
env_names = {"RUST_LOG", "CNNF_LOG_FORMAT"}
for member in members:
    for path in glob.glob(os.path.join(member, "**/*.rs"), recursive=True):
        env_names.update(re.findall(r'env\s*=\s*"(CNNF_[A-Z0-9_]+)"', open(path).read()))
# The configuration contract of work in progress elsewhere in the tree
# (credentials, TLS, table signing, queue-full policy, service mTLS,
# gateway upstreams): deploy/ uses these names, the code grows them.
env_names.update("""CNNF_NATS_CREDS CNNF_NATS_CA CNNF_NATS_CERT CNNF_NATS_KEY CNNF_QUEUE_FULL
CNNF_TABLE_KEYS CNNF_TABLE_SIGNING_KEY CNNF_GRPC_TLS_CERT CNNF_GRPC_TLS_KEY CNNF_GRPC_CLIENT_CA
CNNF_GATEWAY_UPSTREAM_CA CNNF_GATEWAY_UPSTREAM_CERT CNNF_GATEWAY_UPSTREAM_KEY""".split())
file_envs = {"CNNF_NATS_CREDS", "CNNF_NATS_CA", "CNNF_NATS_CERT", "CNNF_NATS_KEY", "CNNF_TABLE_KEYS",
             "CNNF_TABLE_SIGNING_KEY", "CNNF_GRPC_TLS_CERT", "CNNF_GRPC_TLS_KEY", "CNNF_GRPC_CLIENT_CA",
             "CNNF_GATEWAY_TLS_CERT", "CNNF_GATEWAY_TLS_KEY", "CNNF_GATEWAY_TLS_CLIENT_CA",
             "CNNF_GATEWAY_UPSTREAM_CA", "CNNF_GATEWAY_UPSTREAM_CERT", "CNNF_GATEWAY_UPSTREAM_KEY",
             "CNNF_GATEWAY_TOKENS_FILE"}

def nats_version_ok(where, image):
    m = re.match(r"^(?:.*/)?nats:(\d+)\.(\d+)(?:\.(\d+))?", image)
    if not m:
        err(where, f"NATS image {image!r} has no version tag")
    elif (int(m[1]), int(m[2])) < (2, 11):
        err(where, f"NATS image {image!r}: 2.11 or newer needed (Nats-Expected-Last-Subject-Sequence-Subject)")

def check_env(where, names):
    for name in names:
        if name.startswith("CNNF_") and name not in env_names:
            err(where, f"{name} is no CNNF setting (not in the code nor the contract)")

def check_command(where, command):
    if command and command[0] not in bins and not command[0].startswith("/"):
        err(where, f"command {command[0]!r} is no [[bin]] of the workspace")

# ---- Kubernetes: render the kustomization.
kdir = "deploy/kubernetes"
kust = yaml.safe_load(open(f"{kdir}/kustomization.yaml"))
unsupported = set(kust) - {"apiVersion", "kind", "resources"}
if unsupported:
    err(f"{kdir}/kustomization.yaml", f"this check renders only 'resources', not {sorted(unsupported)}")
objects = []
for resource in kust.get("resources", []):
    path = os.path.join(kdir, resource)
    if not os.path.isfile(path):
        err(f"{kdir}/kustomization.yaml", f"resource {resource} does not exist")
        continue
    try:
        docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
    except yaml.YAMLError as e:
        err(path, f"not YAML: {e}")
        continue
    for doc in docs:
        objects.append((path, doc))
listed = {os.path.join(kdir, r) for r in kust.get("resources", [])}
for path in glob.glob(f"{kdir}/*.yaml"):
    if path not in listed and not path.endswith(("kustomization.yaml", "nats-values.yaml")):
        err(path, "a manifest the kustomization does not list")
with open(os.path.join(work, "rendered.yaml"), "w") as out:
    yaml.safe_dump_all([d for _, d in objects], out, sort_keys=False)
ident = lambda d: (d.get("kind"), d.get("metadata", {}).get("namespace"), d.get("metadata", {}).get("name"))
kustomized = os.path.join(work, "kustomize.yaml")
if os.path.exists(kustomized) and os.path.getsize(kustomized):
    theirs = sorted(ident(d) for d in yaml.safe_load_all(open(kustomized)) if d)
    if sorted(ident(d) for _, d in objects) != theirs:
        err(kdir, "kubectl kustomize renders other objects than the resources listed")

# Objects made outside the kustomization: make-secrets.sh (its real output
# when it ran, else its --list).
external = {}
made = os.path.join(work, "k8s-secrets")
if os.path.isdir(made):
    for path in sorted(glob.glob(f"{made}/*.yaml")):
        d = yaml.safe_load(open(path))
        external[(d["kind"], d["metadata"]["name"])] = set(d.get("data", {}))
else:
    for line in open(os.path.join(work, "external-objects")):
        kind, name, *keys = line.split()
        external[(kind, name)] = set(keys)
known = {}
for _, d in objects:
    if d.get("kind") in ("Secret", "ConfigMap"):
        known[(d["kind"], d["metadata"]["name"])] = set(d.get("data", {})) | set(d.get("stringData", {}))
known.update(external)

images = set()
pods = []  # (where, labels)
namespace_names = {d["metadata"]["name"] for _, d in objects if d.get("kind") == "Namespace"}
for path, d in objects:
    kind, meta = d.get("kind"), d.get("metadata", {})
    where = f"{path} {kind}/{meta.get('name')}"
    if kind != "Namespace" and meta.get("namespace") not in namespace_names:
        err(where, f"namespace {meta.get('namespace')!r} is not one the kustomization makes")
    if kind not in ("Deployment", "DaemonSet", "StatefulSet"):
        continue
    spec = d["spec"]
    template = spec["template"]
    labels = template["metadata"].get("labels", {})
    selector = spec["selector"].get("matchLabels", {})
    if any(labels.get(k) != v for k, v in selector.items()):
        err(where, "selector does not match the pod template's labels")
    pods.append((where, labels, template))
    pod = template["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        cw = f"{where} container {c['name']}"
        images.add(c.get("image"))
        check_command(cw, c.get("command"))
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for ref in c.get("envFrom", []):
            for k, key in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if k in ref and (key, ref[k]["name"]) not in known:
                    err(cw, f"envFrom {key} {ref[k]['name']} is made by nothing")
                elif k in ref:
                    source = next((o for _, o in objects if ident(o)[0] == key and ident(o)[2] == ref[k]["name"]), None)
                    if source:
                        check_env(cw, source.get("data", {}))
                        for name, value in source.get("data", {}).items():
                            env.setdefault(name, value)
        check_env(cw, env)
        mounts = {}
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                err(cw, f"volumeMount {m['name']} names no volume")
            else:
                mounts[m["mountPath"]] = (m, volumes[m["name"]])
        for name, value in env.items():
            if name not in file_envs or not value:
                continue
            hit = [(p, mv) for p, mv in mounts.items() if value == p or value.startswith(p.rstrip("/") + "/")]
            if not hit:
                err(cw, f"{name}={value} is in no mounted volume")
                continue
            path, (m, v) = max(hit, key=lambda h: len(h[0]))
            rest = value[len(path):].lstrip("/")
            for k, key in (("secret", "Secret"), ("configMap", "ConfigMap")):
                if k in v and not m.get("subPath"):
                    ref = v[k].get("secretName") or v[k].get("name")
                    keys = known.get((key, ref))
                    if keys is not None and rest not in keys:
                        err(cw, f"{name}={value}: {key} {ref} has no key {rest!r} (it has {sorted(keys)})")
    for name, v in volumes.items():
        for k, key, field in (("secret", "Secret", "secretName"), ("configMap", "ConfigMap", "name")):
            if k in v and (key, v[k][field]) not in known and not v[k].get("optional"):
                err(where, f"volume {name}: {key} {v[k][field]} is made by nothing (kustomization or make-secrets.sh)")

# The chart's NATS pods (release "nats"), for selectors.
nats_labels = {"app.kubernetes.io/name": "nats", "app.kubernetes.io/instance": "nats", "app.kubernetes.io/component": "nats"}
all_pods = [l for _, l, _ in pods] + [nats_labels]
def matches(selector, labels):
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        has = e["key"] in labels
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
        if e["operator"] == "NotIn" and labels.get(e["key"]) in e["values"]:
            return False
        if e["operator"] == "Exists" and not has or e["operator"] == "DoesNotExist" and has:
            return False
    return True
for path, d in objects:
    kind, name = d.get("kind"), d["metadata"]["name"]
    where = f"{path} {kind}/{name}"
    if kind == "Service":
        targets = [(l, t) for _, l, t in pods if matches({"matchLabels": d["spec"]["selector"]}, l)]
        if not targets:
            err(where, "selects no pod")
        for p in d["spec"]["ports"]:
            names = {cp.get("name") for _, t in targets for c in t["spec"]["containers"] for cp in c.get("ports", [])}
            numbers = {cp["containerPort"] for _, t in targets for c in t["spec"]["containers"] for cp in c.get("ports", [])}
            tp = p.get("targetPort", p["port"])
            if tp not in names and tp not in numbers:
                err(where, f"targetPort {tp} is no port of the pods it selects")
    if kind == "NetworkPolicy":
        selected = [l for l in all_pods if matches(d["spec"]["podSelector"], l)]
        if not selected:
            err(where, "podSelector selects no pod")
        for rule in d["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and not any(matches(peer["podSelector"], l) for l in all_pods):
                    err(where, f"from podSelector {peer['podSelector']} selects no pod")
            offered = {4222, 6222, 8222} if nats_labels in selected else set()
            offered |= {p["containerPort"] for _, l, t in pods if l in selected
                        for c in t["spec"]["containers"] for p in c.get("ports", [])}
            for p in rule.get("ports", []):
                if p.get("port") not in offered:
                    err(where, f"port {p.get('port')} is no port of the pods it selects")
# The agent: enforcing, with its own node's login only.
for where, labels, t in pods:
    if labels.get("app.kubernetes.io/name") != "cnnf-agent":
        continue
    pod = t["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    for need, want in (("hostNetwork", True), ("hostPID", True)):
        if pod.get(need) is not want:
            err(where, f"{need} must be true")
    if not c.get("securityContext", {}).get("privileged"):
        err(where, "the agent must run privileged")
    if env.get("CNNF_FAIL_MODE") != "closed":
        err(where, "CNNF_FAIL_MODE must be closed")
    if not (env.get("CNNF_WORKLOADS") or "").startswith(("cri:", "docker:", "inventory:")):
        err(where, "CNNF_WORKLOADS must name a workload source")
    for var in ("CNNF_NATS_CREDS", "CNNF_TABLE_KEYS"):
        if not env.get(var):
            err(where, f"{var} must be set")
    if any("secret" in v for v in pod.get("volumes", [])):
        err(where, "the agent mounts a Secret: a Secret shared by every agent must not hold node logins")
# Services: streams replicated 3 times.
config = next((d for _, d in objects if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "cnnf-config"), None)
if not config or config.get("data", {}).get("CNNF_REPLICAS") != "3":
    err(f"{kdir}/namespace.yaml", "cnnf-config must set CNNF_REPLICAS to \"3\" (a 3-server NATS)")
for want in ("cnnf-ingest", "cnnf-modeler", "cnnf-policy", "cnnf-audit", "cnnf-gateway", "cnnf-agent"):
    if not any(l.get("app.kubernetes.io/name") == want for _, l, _ in pods):
        err(kdir, f"no workload runs {want}")
if len(images) != 1:
    err(kdir, f"the manifests name several images: {sorted(images)}")

# ---- The NATS chart values.
vpath = f"{kdir}/nats-values.yaml"
try:
    values = yaml.safe_load(open(vpath))
except yaml.YAMLError as e:
    err(vpath, f"not YAML: {e}")
    values = {}
cfg = values.get("config", {})
nats_version_ok(vpath, "nats:" + str(values.get("container", {}).get("image", {}).get("tag", "")))
if cfg.get("cluster", {}).get("replicas") != 3 or not cfg.get("cluster", {}).get("enabled"):
    err(vpath, "config.cluster must be enabled with 3 replicas")
if not cfg.get("jetstream", {}).get("enabled"):
    err(vpath, "config.jetstream must be enabled")
resolver = cfg.get("resolver", {})
if not resolver.get("enabled") or resolver.get("merge", {}).get("type") != "full":
    err(vpath, "config.resolver must be enabled, type full (revocations are pushed to it)")
includes = [v for k, v in cfg.get("merge", {}).items() if k.endswith("$include")]
mounts = [p["value"] for p in values.get("container", {}).get("patch", []) if p.get("path") == "/volumeMounts/-"]
vols = [p["value"] for p in values.get("podTemplate", {}).get("patch", []) if p.get("path") == "/spec/volumes/-"]
if len(includes) != 1:
    err(vpath, "config.merge must include exactly one file (nats-auth.conf)")
else:
    target = os.path.normpath(os.path.join("/etc/nats-config", includes[0]))
    mount = next((m for m in mounts if target.startswith(m["mountPath"].rstrip("/") + "/")), None)
    if not mount:
        err(vpath, f"the include {target} is in no volume mounted into the nats container")
    else:
        vol = next((v for v in vols if v["name"] == mount["name"]), None)
        key = target[len(mount["mountPath"]):].lstrip("/")
        if not vol or "secret" not in vol:
            err(vpath, f"volume {mount['name']} is not a Secret volume of the pod")
        elif key not in known.get(("Secret", vol["secret"]["secretName"]), set()):
            err(vpath, f"Secret {vol['secret']['secretName']} (make-secrets.sh) has no key {key}")
        if not mount["mountPath"].startswith("/etc/"):
            err(vpath, "mount the auth Secret under /etc/ so the chart's config reloader sees it")
    # The server config the chart renders from these values (keys sorted,
    # so the include comes before the resolver that replaces its own).
    def conf(value, indent="  "):
        if isinstance(value, dict):
            return "{\n" + "".join(f"{indent}{k}: {conf(v, indent + '  ')}\n" for k, v in value.items()) + indent[:-2] + "}"
        if isinstance(value, bool):
            return "true" if value else "false"
        # Strings quoted, as the chart writes them (JSON): a bare 2m would
        # be a number to nats-server, not the duration the chart passes.
        if isinstance(value, str):
            return json.dumps(value)
        return str(value)
    root = os.path.join(work, "chart-root")
    rendered = {
        "include": includes[0],
        "server_name": "nats-0",
        "port": 4222,
        "http_port": 8222,
        "cluster": {"name": "nats", "port": 6222, "routes": ["nats://nats-0.nats-headless:6222"]},
        "jetstream": {"store_dir": root + cfg.get("jetstream", {}).get("fileStore", {}).get("dir", "/data")},
        "resolver": dict(resolver.get("merge", {}), dir=root + resolver.get("dir", "/data/resolver")),
    }
    rendered.update({k: v for k, v in cfg.get("merge", {}).items() if not k.endswith("$include")})
    lines = [f"include {includes[0]};"] + [f"{k}: {conf(v)}" for k, v in sorted(rendered.items()) if k != "include"]
    os.makedirs(os.path.join(root, "etc/nats-config"), exist_ok=True)
    open(os.path.join(root, "etc/nats-config/nats.conf"), "w").write("\n".join(lines) + "\n")
    open(os.path.join(work, "chart-include"), "w").write(target)

# ---- compose.
cpath = "deploy/compose/docker-compose.yml"
raw_compose = yaml.safe_load(open(cpath))
# Compose's variables (${NAME:-default}) are checked at their defaults.
def compose_defaults(value):
    if isinstance(value, dict):
        return {k: compose_defaults(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compose_defaults(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"(?<!\$)\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", lambda m: m[1], value)
    return value
compose = compose_defaults(raw_compose)
services = compose.get("services", {})
# Images are variables, so a locally built or mirrored image is used
# without editing the file (scripts/compose-e2e.sh does).
for name, s in raw_compose.get("services", {}).items():
    if not re.fullmatch(r"\$\{[A-Z0-9_]+:-[^}]+\}", str(s.get("image", ""))):
        err(f"{cpath} service {name}", f"image {s.get('image')!r} must be ${{CNNF_..._IMAGE:-<default>}}")
for name, s in services.items():
    where = f"{cpath} service {name}"
    image = s.get("image", "")
    if image.startswith("nats:") or "/nats:" in image:
        nats_version_ok(where, image)
    else:
        command = s.get("command")
        # A shell entrypoint runs a script: its words are checked below.
        if not s.get("entrypoint"):
            check_command(where, command if isinstance(command, list) else None)
    env = s.get("environment", {})
    check_env(where, env if isinstance(env, dict) else [e.split("=")[0] for e in env])
    for entry in s.get("command", []) if isinstance(s.get("command"), list) else []:
        for word in re.findall(r"\bcnnf[a-z-]*\b", str(entry)):
            if word not in bins and word not in ("cnnf",):
                err(where, f"{word} is no [[bin]] of the workspace")
agent = services.get("agent", {})
aenv = agent.get("environment", {})
if not (agent.get("privileged") and agent.get("network_mode") == "host" and agent.get("pid") == "host"):
    err(f"{cpath} service agent", "must run privileged with network_mode host and pid host")
if aenv.get("CNNF_FAIL_MODE") != "closed":
    err(f"{cpath} service agent", "CNNF_FAIL_MODE must be closed")
if not str(aenv.get("CNNF_WORKLOADS", "")).startswith("docker:"):
    err(f"{cpath} service agent", "CNNF_WORKLOADS must be the Docker socket")
else:
    sock = aenv["CNNF_WORKLOADS"][len("docker:"):]
    if not any(isinstance(v, dict) and v.get("target") == sock or isinstance(v, str) and v.split(":")[1:2] == [sock]
               for v in agent.get("volumes", [])):
        err(f"{cpath} service agent", f"the Docker socket {sock} is not mounted")
for var in ("CNNF_NATS_CREDS", "CNNF_TABLE_KEYS"):
    if not aenv.get(var):
        err(f"{cpath} service agent", f"{var} must be set")
if aenv.get("CNNF_NATS_CREDS", "").endswith("services.creds"):
    err(f"{cpath} service agent", "the agent must use its node's login, not the services'")

# ---- systemd.
for path in glob.glob("deploy/systemd/*.service"):
    names = []
    for line in open(path):
        m = re.match(r"^Environment=([A-Z0-9_]+)=", line)
        if m:
            names.append(m[1])
    check_env(path, names)
    for line in open(path):
        m = re.match(r"^Exec\w*=[-+!@:]*(\S+)", line)
        if m and os.path.basename(m[1]).startswith("cnnf") and os.path.basename(m[1]) not in bins:
            err(path, f"{m[1]}: no [[bin]] of the workspace")
agent_unit = open("deploy/systemd/cnnf-agent.service").read()
for want in ("CNNF_FAIL_MODE=closed", "CNNF_WORKLOADS=", "CNNF_NATS_CREDS=", "CNNF_TABLE_KEYS="):
    if f"Environment={want}" not in agent_unit:
        err("deploy/systemd/cnnf-agent.service", f"must set {want}")
env_file = "deploy/systemd/agent.env"
check_env(env_file, [l.lstrip("#").split("=")[0] for l in open(env_file) if re.match(r"^#?[A-Z0-9_]+=", l)])

# ---- Dockerfile.
dpath = "deploy/docker/Dockerfile"
text = re.sub(r"\\\n", " ", open(dpath).read())
ignore = [l.strip() for l in open(dpath + ".dockerignore") if l.strip() and not l.startswith("#")]
args = dict(re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', text, re.M))
for line in text.splitlines():
    m = re.match(r"^COPY\s+(.*)$", line)
    if not m or "--from=" in line:
        continue
    parts = [p for p in m[1].split() if not p.startswith("--")]
    for src in parts[:-1]:
        if not glob.glob(src):
            err(dpath, f"COPY source {src} does not exist")
        for pattern in ignore:
            p = pattern.lstrip("*/")
            if src.rstrip("/") != "." and (src.rstrip("/") == p or src.startswith(p + "/") or ("/" + src).endswith("/" + p)):
                err(dpath, f"COPY source {src} is excluded by {dpath}.dockerignore ({pattern})")
packages = args.get("CNNF_PACKAGES", "").split()
binaries = args.get("CNNF_BINARIES", "").split()
for b in binaries:
    if b not in bins:
        err(dpath, f"binary {b} is no [[bin]] of the workspace")
    elif bins[b] not in packages:
        err(dpath, f"binary {b} belongs to {bins[b]}, which CNNF_PACKAGES does not build")
for p in packages:
    if p not in bins.values():
        err(dpath, f"package {p} has no binary (or is no workspace member)")
for need in ("cnnf-agent", "cnnf-allinone", "cnnf-ingest", "cnnf-modeler", "cnnf-policy", "cnnf-audit",
             "cnnf-gateway", "cnnf", "cnnfctl"):
    if need not in binaries:
        err(dpath, f"the image must ship {need}")
for need in ("iptables", "iproute2"):
    if not re.search(rf"apt-get install[^\n]*\b{need}\b", text.split("FROM")[-1]):
        err(dpath, f"the runtime stage must install {need} (the agent needs it)")
for a in ("RUNTIME_IMAGE",):
    if a not in args or f"FROM ${{{a}}}" not in text:
        err(dpath, f"the runtime base must be the build argument {a}")
static = re.search(r"^ENV CNNF_GATEWAY_STATIC_DIR=(\S+)", text, re.M)
if not static or not re.search(rf"COPY --from=radar \S+ {re.escape(static[1])}/?$", text, re.M):
    err(dpath, "the Radar page must be copied to CNNF_GATEWAY_STATIC_DIR")

# ---- Dockerfile.prebuilt: the same runtime from a context of bin/ and
# radar/ (scripts/compose-e2e.sh builds it for real).
ppath = "deploy/docker/Dockerfile.prebuilt"
ptext = re.sub(r"\\\n", " ", open(ppath).read())
pargs = dict(re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', ptext, re.M))
if "BASE" not in pargs or "FROM ${BASE}" not in ptext:
    err(ppath, "the base must be the build argument BASE")
if len(re.findall(r"^FROM ", ptext, re.M)) != 1:
    err(ppath, "must be a single stage")
if not re.search(r"^COPY bin/ /usr/local/bin/$", ptext, re.M):
    err(ppath, "must copy the context's bin/ to /usr/local/bin/")
for need in ("iptables", "iproute2"):
    if not re.search(rf"apt-get install[^\n]*\b{need}\b", ptext):
        err(ppath, f"must install {need} when the base lacks iptables (the agent needs it)")
pstatic = re.search(r"^ENV CNNF_GATEWAY_STATIC_DIR=(\S+)", ptext, re.M)
if not pstatic or not re.search(rf"^COPY radar/ {re.escape(pstatic[1])}/?$", ptext, re.M):
    err(ppath, "the context's radar/ must be copied to CNNF_GATEWAY_STATIC_DIR")
if not static or not pstatic or static[1] != pstatic[1]:
    err(ppath, f"CNNF_GATEWAY_STATIC_DIR must be the same as in {dpath}")
for d in re.findall(r"/var/lib/cnnf/(\w+)", text):
    if d not in ptext:
        err(ppath, f"must make the data directory /var/lib/cnnf/{d} as {dpath} does")
if "USER 65532:65532" not in ptext:
    err(ppath, "must run as user 65532 by default")

for e in errors:
    print(f"check-deploy: FAIL {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
then
  ok "semantic checks of deploy/ (Kubernetes, chart values, compose, systemd, Dockerfile)"
else
  failures=$((failures + 1))
fi

# Schemas: the kustomization's objects and make-secrets.sh's.
for version in $KUBERNETES_VERSIONS; do
  files=("$work/rendered.yaml")
  [ -d "$secrets_out" ] && files+=("$secrets_out"/*.yaml)
  if out=$("$KV" --strict --quiet -k "$version" "${files[@]}" 2>&1); then
    ok "Kubernetes $version schemas (strict): every manifest"
  else
    fail "Kubernetes $version schemas: $out"
  fi
done

# The NATS config the chart renders from nats-values.yaml.
if [ -f "$work/chart-include" ]; then
  include=$(cat "$work/chart-include")
  mkdir -p "$work/chart-root/$(dirname "$include")"
  cp "$auth/nats-auth.conf" "$work/chart-root/$include"
  if out=$(cd "$work/chart-root/etc/nats-config" && "$CNNF_NATS_SERVER" -c "$work/chart-root/etc/nats-config/nats.conf" -t 2>&1); then
    ok "deploy/kubernetes/nats-values.yaml: the server config it renders passes nats-server -t"
  else
    fail "deploy/kubernetes/nats-values.yaml: rendered server config: $out"
  fi
fi

# --- compose -----------------------------------------------------------
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
if out=$("${compose[@]}" -f deploy/compose/docker-compose.yml config -q 2>&1); then
  ok "deploy/compose/docker-compose.yml: ${compose[*]} config ($("${compose[@]}" version --short 2>/dev/null || true))"
else
  fail "deploy/compose/docker-compose.yml: ${compose[*]} config: $out"
fi
nats_check deploy/compose/nats.conf deploy/compose/nats.conf "$work/compose-root" etc/nats/nats.conf auth/nats-auth.conf

# --- systemd -----------------------------------------------------------
root="$work/systemd-root"
mkdir -p "$root/etc/systemd/system" "$root/usr/local/bin" "$root/usr/lib/systemd" "$root/bin"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
place() { ln -f "$1" "$2" 2>/dev/null || cp "$1" "$2"; }
place "$BIN/cnnf-agent" "$root/usr/local/bin/cnnf-agent"
place "$BIN/cnnf-allinone" "$root/usr/local/bin/cnnf-allinone"
place "$(readlink -f "$CNNF_NATS_SERVER")" "$root/usr/local/bin/nats-server"
place "$(readlink -f /bin/kill)" "$root/bin/kill"
cp deploy/systemd/*.service "$root/etc/systemd/system/"
for unit in deploy/systemd/*.service; do
  name=$(basename "$unit")
  if out=$(systemd-analyze verify --root="$root" --man=no "/etc/systemd/system/$name" 2>&1) && [ -z "$out" ]; then
    ok "$unit: systemd-analyze verify"
  else
    fail "$unit: systemd-analyze verify: $out"
  fi
done
nats_check deploy/systemd/nats.conf deploy/systemd/nats.conf "$work/systemd-nats-root" etc/cnnf/nats.conf etc/cnnf/auth/nats-auth.conf

if [ "$failures" -gt 0 ]; then
  say "check-deploy: $failures check(s) failed"
  exit 1
fi
say "check-deploy: deploy/ is valid"
