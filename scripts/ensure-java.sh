#!/bin/sh
# Java 17 for the Spark engine (`predict -P engine=spark`, tests/test_spark.py). Installs
# openjdk-17-jre-headless only where no java 17+ is found and we are root; otherwise says what
# to install. Never fails the build: without Java, tests/test_spark.py fails saying what to install.
set -u
java_major() {
    "$1" -version 2>&1 | sed -n 's/.*version "\([0-9]*\)\.*.*/\1/p' | head -n 1
}
java=""
if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then java="$JAVA_HOME/bin/java"
elif command -v java >/dev/null 2>&1; then java="$(command -v java)"; fi
if [ -n "$java" ]; then
    major="$(java_major "$java")"
    [ "${major:-0}" -ge 17 ] 2>/dev/null && exit 0
fi
command -v dpkg >/dev/null 2>&1 || { echo "Spark needs Java 17+: install a JRE 17 or 21 (or set JAVA_HOME)." >&2; exit 0; }
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing openjdk-17-jre-headless (Spark engine and its tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq openjdk-17-jre-headless >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq openjdk-17-jre-headless >/dev/null; } \
        || echo "could not install openjdk-17-jre-headless: the Spark tests will fail" >&2
else
    echo "Java 17 is not installed: the Spark engine and its tests need it." \
         "Install it with: sudo apt-get install -y openjdk-17-jre-headless" >&2
fi
exit 0
