#!/usr/bin/env bash
# Installs and starts what the rlhf-feedback tests need beyond cargo: a PostgreSQL
# server (for the database tests) and Chromium + chromedriver (for the browser test).
# Idempotent: safe to run repeatedly. The last line printed is an `export` line, so
#   eval "$(bash .ci/feedback-setup.sh | tail -n 1)"
# sets RLHF_TEST_POSTGRES_URL in the calling shell.
set -euo pipefail

need_install=()
command -v pg_ctlcluster >/dev/null 2>&1 || need_install+=(postgresql)
command -v chromium >/dev/null 2>&1 || need_install+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_install+=(chromium-driver)
if [ ${#need_install[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >&2
  apt-get install -y --no-install-recommends postgresql chromium chromium-driver >&2
fi

# Start the first cluster (creating one if the package left none).
if ! pg_lsclusters -h | grep -q .; then
  ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  pg_createcluster "$ver" main >&2
fi
read -r ver cluster port status _ < <(pg_lsclusters -h | head -n 1)
if [ "$status" != "online" ]; then
  pg_ctlcluster "$ver" "$cluster" start >&2
fi
for _ in $(seq 1 30); do
  pg_isready -q -p "$port" && break
  sleep 1
done

# Role and database for the tests; password auth over TCP on loopback.
su postgres -c "psql -p $port -v ON_ERROR_STOP=1 -qtAc \"DO \\\$\\\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rlhf_test') THEN
    CREATE ROLE rlhf_test LOGIN PASSWORD 'rlhf_test' CREATEDB;
  END IF; END \\\$\\\$;\"" >&2
if ! su postgres -c "psql -p $port -qtAc \"SELECT 1 FROM pg_database WHERE datname = 'rlhf_test'\"" | grep -q 1; then
  su postgres -c "createdb -p $port -O rlhf_test rlhf_test" >&2
fi

echo "export RLHF_TEST_POSTGRES_URL=postgres://rlhf_test:rlhf_test@127.0.0.1:$port/rlhf_test"
