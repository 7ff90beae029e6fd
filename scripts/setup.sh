#!/usr/bin/env bash
# Idempotent set-up for a fresh machine of this kind (root, Debian bookworm, Python >= 3.11):
# the Debian packages nonstop's lab and baselines need, a virtual environment, the package.
# Usage: scripts/setup.sh [apt|venv|all]    (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# iproute2: ip/tc/bridge; iptables: partitions, loss (statistic), NFQUEUE; procps/psmisc: ps, pkill
# for the lab (its CPU hog is Python). The real peers and baselines the tests and benchmarks start:
# keepalived (failover), bird2 + frr (BGP peers), etcd-server/-client (the etcd store), nginx-light +
# haproxy (virtual server), podman + runc (containers). tcpdump and conntrack: lab diagnostics.
# Services these packages would start are not started (the tests start their own, in namespaces).
APT_PKGS=(iproute2 iptables keepalived procps psmisc bird2 frr etcd-server etcd-client
          nginx-light libnginx-mod-stream haproxy podman runc tcpdump conntrack)

need_apt() {
  local missing=()
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" != 0 ]; then echo "setup: need root for apt-get" >&2; exit 1; fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

need_venv() {
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: $PYTHON is older than 3.11" >&2; exit 1
  fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # Reinstall only when the project's metadata or its C source changed since the last install
  # (the editable install builds the C extension in place, next to its source).
  local stamp="$VENV/.nonstop-installed" changed=""
  for f in pyproject.toml setup.py src/nonstop/session/_repair.c; do
    [ "$f" -nt "$stamp" ] && changed=1
  done
  if [ ! -f "$stamp" ] || [ -n "$changed" ]; then
    echo "setup: installing nonstop and its test tools into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    touch "$stamp"
  fi
}

case "${1:-all}" in
  apt) need_apt ;;
  venv) need_venv ;;
  all) need_apt; need_venv ;;
  *) echo "usage: $0 [apt|venv|all]" >&2; exit 2 ;;
esac
