#!/usr/bin/env bash
# Makes every Secret and the ConfigMap the Kubernetes manifests need, as
# manifests in OUT_DIR, from private material kept in AUTH_DIR:
#
#   deploy/kubernetes/make-secrets.sh AUTH_DIR OUT_DIR
#   kubectl apply -f OUT_DIR        # before the NATS chart and apply -k
#   deploy/kubernetes/make-secrets.sh --list   # what it makes: kind, name, keys
#
# AUTH_DIR (made on first use, keep it safe and off the cluster: it holds
# the NATS operator and account keys, the table-signing key and the CAs):
#   cnnf auth init      the NATS operator, accounts, nats-auth.conf,
#                       services.creds (skipped when already initialised)
#   cnnf-table-key      table-signing.key / table-signing.pub
#   openssl             grpc-ca (the services' gRPC: server certificates
#                       for the four services, a client certificate for the
#                       gateway) and gateway-ca (the operator address)
#   admin.token         an operator token with the admin role; only its
#                       SHA-256 goes into the tokens Secret
# Running it again reuses all of that and writes the same manifests; delete
# a file in AUTH_DIR to make it anew. Node logins are not made here: each
# stays on its node (enroll-node.sh).
#
# Environment: CNNF_BIN_DIR (where cnnf and cnnf-table-key are, default:
# PATH), CNNF_NAMESPACE (default cnnf), CNNF_GATEWAY_HOSTS (extra DNS names
# of the operator address, comma-separated), CNNF_CERT_DAYS (default 825).
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 64; }
list=
if [ "${1:-}" = --list ] && [ $# -eq 1 ]; then list=1; set -- "" ""; fi
[ $# -eq 2 ] || usage
auth=$1 out=$2
ns=${CNNF_NAMESPACE:-cnnf}
days=${CNNF_CERT_DAYS:-825}
bin() { if [ -n "${CNNF_BIN_DIR:-}" ]; then echo "$CNNF_BIN_DIR/$1"; else command -v "$1" || echo "$1"; fi; }
generate() {
  for tool in openssl base64 sha256sum od; do
    command -v "$tool" >/dev/null || { echo "make-secrets.sh: $tool is missing" >&2; exit 69; }
  done

  umask 077
  mkdir -p "$auth" "$out"

  # NATS operator mode.
  if [ ! -f "$auth/nats-auth.conf" ]; then
    "$(bin cnnf)" auth init --dir "$auth"
  fi
  # Table signing.
  if [ ! -f "$auth/table-signing.key" ]; then
    "$(bin cnnf-table-key)" generate "$auth/table-signing.key"
  fi

  # CAs and certificates (EC P-256). Server certificates say serverAuth only
  # and the gateway's client certificate clientAuth only, so no certificate
  # serves as both.
  ca() { # name subject
    [ -f "$auth/$1.crt" ] && return 0
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days "$days" \
      -subj "/CN=$2" -keyout "$auth/$1.key" -out "$auth/$1.crt" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  }
  cert() { # name ca cn usage sans
    [ -f "$auth/$1.crt" ] && return 0
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj "/CN=$3" \
      -keyout "$auth/$1.key" -out "$auth/$1.csr" 2>/dev/null
    {
      echo "basicConstraints=critical,CA:FALSE"
      echo "keyUsage=critical,digitalSignature"
      echo "extendedKeyUsage=$4"
      [ -z "$5" ] || echo "subjectAltName=$5"
    } >"$auth/$1.ext"
    openssl x509 -req -in "$auth/$1.csr" -CA "$auth/$2.crt" -CAkey "$auth/$2.key" -CAcreateserial \
      -days "$days" -extfile "$auth/$1.ext" -out "$auth/$1.crt" 2>/dev/null
    rm -f "$auth/$1.csr" "$auth/$1.ext"
  }
  ca grpc-ca "CNNF services gRPC CA"
  ca gateway-ca "CNNF operator address CA"
  for service in ingest modeler policy audit; do
    name=cnnf-$service
    cert "$service-grpc" grpc-ca "$name" serverAuth \
      "DNS:$name,DNS:$name.$ns,DNS:$name.$ns.svc,DNS:$name.$ns.svc.cluster.local"
  done
  cert gateway-upstream grpc-ca cnnf-gateway clientAuth ""
  gateway_sans="DNS:cnnf-gateway,DNS:cnnf-gateway.$ns,DNS:cnnf-gateway.$ns.svc,DNS:cnnf-gateway.$ns.svc.cluster.local,DNS:localhost,IP:127.0.0.1"
  IFS=, read -r -a extra <<<"${CNNF_GATEWAY_HOSTS:-}"
  for host in "${extra[@]}"; do [ -z "$host" ] || gateway_sans="$gateway_sans,DNS:$host"; done
  cert gateway gateway-ca cnnf-gateway serverAuth "$gateway_sans"

  # The first operator token (admin); the gateway keeps only its SHA-256.
  if [ ! -f "$auth/admin.token" ]; then
    od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$auth/admin.token"
  fi
  admin_sha=$(tr -d '\n' <"$auth/admin.token" | sha256sum | cut -d' ' -f1)
  printf '{"tokens": {"%s": {"name": "admin", "role": "admin"}}}\n' "$admin_sha" >"$auth/tokens.json"

}
[ -n "$list" ] || generate

# The manifests.
header() { # kind name [type]
  printf 'apiVersion: v1\nkind: %s\nmetadata:\n  name: %s\n  namespace: %s\n  labels:\n    app.kubernetes.io/part-of: cnnf\n' "$1" "$2" "$ns"
  [ -z "${3:-}" ] || printf 'type: %s\n' "$3"
}
secret() { # name type key=file...
  local name=$1 type=$2 kv
  shift 2
  if [ -n "$list" ]; then
    printf 'Secret %s' "$name"; for kv in "$@"; do printf ' %s' "${kv%%=*}"; done; echo
    return
  fi
  {
    header Secret "$name" "$type"
    echo "data:"
    for kv in "$@"; do printf '  %s: %s\n' "${kv%%=*}" "$(base64 -w0 <"${kv#*=}")"; done
  } >"$out/$name.yaml"
}
secret cnnf-nats-auth Opaque "nats-auth.conf=$auth/nats-auth.conf"
secret cnnf-services-nats Opaque "services.creds=$auth/services.creds"
# The public key beside the secret one: the policy service reads both and
# the volume is read-only.
secret cnnf-table-signing Opaque "table-signing.key=$auth/table-signing.key" "table-signing.pub=$auth/table-signing.pub"
for service in ingest modeler policy audit; do
  secret "cnnf-$service-grpc-tls" kubernetes.io/tls \
    "tls.crt=$auth/$service-grpc.crt" "tls.key=$auth/$service-grpc.key" "ca.crt=$auth/grpc-ca.crt"
done
secret cnnf-gateway-upstream kubernetes.io/tls \
  "tls.crt=$auth/gateway-upstream.crt" "tls.key=$auth/gateway-upstream.key" "ca.crt=$auth/grpc-ca.crt"
secret cnnf-gateway-tls kubernetes.io/tls "tls.crt=$auth/gateway.crt" "tls.key=$auth/gateway.key"
secret cnnf-gateway-tokens Opaque "tokens.json=$auth/tokens.json"
if [ -n "$list" ]; then
  echo "ConfigMap cnnf-table-keys table-keys.pub"
  exit 0
fi
{
  header ConfigMap cnnf-table-keys
  echo "data:"
  echo "  table-keys.pub: |"
  sed 's/^/    /' "$auth/table-signing.pub"
} >"$out/cnnf-table-keys.yaml"

echo "make-secrets.sh: manifests in $out (kubectl apply -f $out)." >&2
echo "  Operator token (admin): $auth/admin.token; the operator address's CA: $auth/gateway-ca.crt" >&2
