#!/usr/bin/env bash
# Debian's PostgreSQL server, the backend store of `scripts/cluster.sh up --backend postgres`
# and of its test. Does nothing when a server is already under /usr/lib/postgresql/*/bin.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "installing postgresql (Debian package) for the PostgreSQL-backed cluster tests" >&2
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends postgresql
