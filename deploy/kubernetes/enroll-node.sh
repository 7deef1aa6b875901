#!/usr/bin/env bash
# Enrols one Kubernetes node: makes its own NATS login and installs it on
# that node only, at /etc/cnnf/nats/node.creds, where the agent DaemonSet
# mounts it from (hostPath). No Secret in the cluster ever holds it, so an
# agent, or anyone who can read Secrets in the namespace, never sees
# another node's login.
#
#   deploy/kubernetes/enroll-node.sh AUTH_DIR NODE SSH_TARGET
#   deploy/kubernetes/enroll-node.sh AUTH_DIR NODE --out FILE
#
# NODE is the Kubernetes node name (`kubectl get nodes`): the agent names
# itself after it (spec.nodeName), and the login allows that node's
# subjects and verdict key only. SSH_TARGET ([user@]host) is how to reach
# the node as root (or with sudo); with --out the file is only written,
# for your own provisioning (cloud-init, config management) to place.
# The agent pod on that node starts once the file is there.
#
# Revoking a node (`cnnf nodes revoke --auth-dir AUTH_DIR --cluster C
# --node NODE`) closes its connection and refuses the login from then on.
#
# Environment: CNNF_CLUSTER (default k8s, as in cnnf-config), CNNF_BIN_DIR
# (where cnnf is, default: PATH).
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 64; }
[ $# -eq 3 ] || [ $# -eq 4 ] || usage
auth=$1 node=$2
cluster=${CNNF_CLUSTER:-k8s}
cnnf=${CNNF_BIN_DIR:+$CNNF_BIN_DIR/}cnnf
case "$node" in
  "" | *.* | *' '* | *'*'* | *'>'*)
    echo "enroll-node.sh: node name '$node' is not one NATS subject token (no dots, spaces, * or >)" >&2
    exit 64 ;;
esac

if [ "$3" = --out ]; then
  [ $# -eq 4 ] || usage
  (umask 077 && "$cnnf" nodes enroll --auth-dir "$auth" --cluster "$cluster" --node "$node" --out "$4")
  echo "enroll-node.sh: $4 holds node $node's login; install it on $node as /etc/cnnf/nats/node.creds (root, mode 0400)" >&2
  exit 0
fi
[ $# -eq 3 ] || usage
target=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(umask 077 && "$cnnf" nodes enroll --auth-dir "$auth" --cluster "$cluster" --node "$node" --out "$tmp/node.creds")
# shellcheck disable=SC2029 # the command runs on the node, as written
ssh "$target" 'if [ "$(id -u)" = 0 ]; then as=; else as=sudo; fi; $as install -D -o root -g root -m 0400 /dev/stdin /etc/cnnf/nats/node.creds' <"$tmp/node.creds"
echo "enroll-node.sh: node $node enrolled; its login is at $target:/etc/cnnf/nats/node.creds" >&2
