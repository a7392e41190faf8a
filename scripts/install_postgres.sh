#!/usr/bin/env bash
# Debian's PostgreSQL server, the backend store of `scripts/cluster.sh up --backend postgres`
# and of its test. Does nothing when a server is already under /usr/lib/postgresql/*/bin:
# a machine that has PostgreSQL keeps its clusters, configuration and services as they are.
#
# tokbench runs a PostgreSQL server of its own per cluster (its data in the cluster's state
# folder, on a port of its choosing), so Debian's default cluster is not wanted: installed,
# the package would create `main` and start it on port 5432, taking the port and running a
# server nobody uses. postgresql-common reads `create_main_cluster` from
# /etc/postgresql-common/createcluster.conf and the files of its include_dir,
# createcluster.d/ (pg_createcluster(1), createcluster.conf(5)); a drop-in there says `false`
# for the install and is removed afterwards, so a later `apt-get install postgresql-NN` on
# this machine behaves as Debian's default again. With no cluster, the package's service
# start has nothing to start.
#
# Environment (for a chroot or a test): POSTGRES_LIB_DIR (default /usr/lib/postgresql),
# POSTGRES_COMMON_ETC (default /etc/postgresql-common), APT_GET (default apt-get).
set -euo pipefail
lib=${POSTGRES_LIB_DIR:-/usr/lib/postgresql}
etc=${POSTGRES_COMMON_ETC:-/etc/postgresql-common}
apt_get=${APT_GET:-apt-get}

if compgen -G "$lib/*/bin/postgres" >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

dropin=$etc/createcluster.d/00-tokbench-no-main-cluster.conf
clusters_before=$(ls -d /etc/postgresql/*/* 2>/dev/null || true)
$SUDO mkdir -p "$etc/createcluster.d"
printf '%s\n' "# Written by tokbench's scripts/install_postgres.sh for the install only; removed after it." \
    "create_main_cluster = false" | $SUDO tee "$dropin" >/dev/null
trap '$SUDO rm -f "$dropin"' EXIT

echo "installing postgresql (Debian package, without its default cluster) for the PostgreSQL-backed cluster" >&2
$SUDO "$apt_get" update -q
# Through env: sudo drops the caller's environment. --force-confold: configuration files
# already on the machine (postgresql-common installed without a server) are kept, never
# replaced or asked about.
$SUDO env DEBIAN_FRONTEND=noninteractive "$apt_get" install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold postgresql

clusters_after=$(ls -d /etc/postgresql/*/* 2>/dev/null || true)
if [ "$clusters_after" != "$clusters_before" ]; then
    # An older postgresql-common that ignores createcluster.d: say what it created.
    echo "warning: the package created a PostgreSQL cluster tokbench does not use ($(comm -13 \
<(echo "$clusters_before") <(echo "$clusters_after") | tr '\n' ' ')); see \`pg_lsclusters\`, and remove it with \`pg_dropcluster --stop VERSION main\` if nothing else needs it" >&2
fi
