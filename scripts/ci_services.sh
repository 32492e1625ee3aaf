#!/usr/bin/env bash
# Makes sure the services the tests need are up (the README's test command runs this first, and
# so does .ci/run): chromium and npm for the web page's browser test (installed when missing),
# PostgreSQL at 127.0.0.1:5432 (the PostgreSQL job store's tests, issue 12;
# each test creates and drops its own database, tests/pg.py). Started when down, with the
# command this machine's services are started with; the GCS emulator is started by the tests
# themselves (tests/gcs_emulator.py).
# Without PostgreSQL installed (a laptop), it says so and goes on: the PostgreSQL tests then
# skip locally, and fail in CI (CI set), where PostgreSQL must run.
set -u
HOST=127.0.0.1
PORT=5432

# The web page's browser test (tests/test_ui_browser.py) drives Debian's chromium through
# Playwright, which never downloads a browser; `npm ci` (next in the test command) needs npm.
# Installed here when missing on a Debian/Ubuntu machine run as root (CI); elsewhere the
# browser test skips locally and fails in CI.
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ci_services: installing$missing (apt-get)"
    # shellcheck disable=SC2086  # the package names, one word each
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
if ! command -v chromium >/dev/null 2>&1; then
    echo "ci_services: chromium is not installed; the browser test skips (fails in CI)" >&2
    if [ -n "${CI:-}" ]; then exit 1; fi
fi

if ! command -v pg_isready >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # a fresh Debian/Ubuntu machine run as root (CI): install PostgreSQL, and let the test
    # user connect over 127.0.0.1 without a password (a throwaway test cluster)
    echo "ci_services: installing PostgreSQL (apt-get)"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
        [ -f "$hba" ] && sed -i -E 's#^(host\s+all\s+all\s+127\.0\.0\.1/32\s+)\S+#\1trust#' "$hba"
    done
fi
if ! command -v pg_isready >/dev/null 2>&1; then
    echo "ci_services: PostgreSQL client tools not installed; PostgreSQL tests skip (fail in CI)" >&2
    if [ -n "${CI:-}" ]; then exit 1; fi
    exit 0
fi
if pg_isready -q -h "$HOST" -p "$PORT"; then
    echo "ci_services: PostgreSQL is up at $HOST:$PORT"
    exit 0
fi
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    for version in $(ls /etc/postgresql); do
        echo "ci_services: starting PostgreSQL $version (cluster main)"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
fi
for _ in $(seq 1 60); do  # up to 30 s for the server to accept connections
    if pg_isready -q -h "$HOST" -p "$PORT"; then
        echo "ci_services: PostgreSQL is up at $HOST:$PORT"
        exit 0
    fi
    sleep 0.5
done
echo "ci_services: PostgreSQL did not come up at $HOST:$PORT" >&2
if [ -n "${CI:-}" ]; then exit 1; fi
exit 0
