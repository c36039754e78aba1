#!/usr/bin/env bash
# Make sure the PostgreSQL server binaries are here for the test suite, which starts its own
# throwaway server (tests/pg_server.py) and stops it at the end.
# - found (Debian's /usr/lib/postgresql/<version>/bin, or pg_ctl on PATH): nothing to do;
# - missing, as root with apt-get: install Debian's `postgresql` package, without the
#   "main" cluster it would otherwise create and start (the tests need no running server);
# - missing otherwise: say so; the PostgreSQL tests then skip, naming this script.
# $FLOWSDK_TEST_POSTGRES (a server URL) makes the tests use that server instead.
set -euo pipefail

if [ -n "${FLOWSDK_TEST_POSTGRES:-}" ]; then
    exit 0
fi
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v pg_ctl >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "ensure-postgres: installing Debian's postgresql package for the test suite" >&2
    mkdir -p /etc/postgresql-common
    if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
        echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    exit 0
fi
echo "ensure-postgres: no PostgreSQL server binaries and no way to install them (needs root" \
    "and apt-get): the PostgreSQL tests will skip. Install the postgresql package, or set" \
    "FLOWSDK_TEST_POSTGRES to a server URL whose role may create databases." >&2
