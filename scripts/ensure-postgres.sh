#!/bin/sh
# PostgreSQL 15 for the postgresql test variant and `make server`. Installs it only where it is
# missing and we are root; otherwise says what will be skipped. Never fails the build: without
# PostgreSQL the tests skip that variant (saying so) and `make server` falls back to sqlite.
set -u
command -v dpkg >/dev/null 2>&1 || exit 0   # not Debian: the tests look for initdb on PATH
dpkg -s postgresql-15 >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing postgresql-15 (PostgreSQL tests, make server)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq postgresql-15 >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql-15 >/dev/null; } \
        || echo "could not install postgresql-15: the PostgreSQL tests will be skipped" >&2
else
    echo "postgresql-15 is not installed: the PostgreSQL tests will be skipped." \
         "Install it with: sudo apt-get install -y postgresql-15" >&2
fi
exit 0
